"""Many samples for FID: fixed per-batch noise, sharded over torchrun ranks, resumable.

    masked-dit sample DiT-XL-2-256x256.pt --model DiT-XL/2 --num-samples 50000 --out samples.npz --vae stabilityai/sd-vae-ft-ema
    torchrun --nproc-per-node=8 -m masked_dit sample ...same flags...      # each rank takes every 8th batch

Batch ``b`` holds samples ``[b * batch_size, (b + 1) * batch_size)``; its labels come from the seed
and its noise (initial and per step) from its own generator seeded with ``(seed, b)``. So the
output is the same for any number of ranks and across a resume. Each finished batch is written to
``<out>.parts/`` (temporary name, then rename); a re-run skips the batches already there, after
checking that ``parts/settings.json`` matches (mixing settings would corrupt the set silently).
Rank 0 assembles the ``.npz`` (uint8 NHWC ``arr_0``, labels ``arr_1``, the ADM evaluator's layout)
once every batch exists, then removes the parts.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from masked_dit.rng import check_seed
from masked_dit.train.grid import to_uint8


def sample_labels(num: int, num_classes: int, seed: int, classes=None) -> torch.Tensor:
    """``num`` labels: uniform over the classes from ``seed``, or ``classes`` repeated in order. An
    unconditional model (``num_classes=0``, MaskDiT) ignores labels: all 0, as its grids label them."""
    if num_classes <= 0:
        if classes and any(int(c) != 0 for c in classes):
            raise ValueError(f"--classes {list(classes)}: the model is unconditional (num_classes=0); leave them out")
        return torch.zeros(num, dtype=torch.long)
    if classes:
        bad = [c for c in classes if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"--classes {bad} are outside [0, {num_classes - 1}]")
        reps = (num + len(classes) - 1) // len(classes)
        return torch.tensor([int(c) for c in classes], dtype=torch.long).repeat(reps)[:num]
    # a stream of its own, next to (not among) this seed's batch streams on the CPU
    g = torch.Generator().manual_seed((_mix32(seed) - 1) & 0xFFFFFFFF)
    return torch.randint(0, num_classes, (num,), generator=g)


def batch_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of batch ``index``: independent of which rank runs it and of resumes."""
    check_seed(seed, "seed")
    if not 0 <= index < 1 << 24:  # the low 24 bits of the packed seed
        raise ValueError(f"batch index {index} is outside [0, 2**24): use a larger --batch-size")
    g = torch.Generator(device=device)
    if g.device.type == "cpu":  # mt19937 keeps the low 32 bits of a seed: seed << 24 | index would repeat
        return g.manual_seed((_mix32(seed) + index) & 0xFFFFFFFF)  # every 256 seeds (0 and 256 alike)
    return g.manual_seed(seed << 24 | index)  # Philox takes all 64 bits


def _mix32(x: int) -> int:
    """A bijection of 32-bit integers (lowbias32): each seed's run of CPU batch seeds starts far from
    its neighbours'."""
    x ^= x >> 16
    x = x * 0x7FEB352D & 0xFFFFFFFF
    x ^= x >> 15
    x = x * 0x846CA68B & 0xFFFFFFFF
    return x ^ (x >> 16)


def sample_batch(draw: Callable, y: torch.Tensor, shape: tuple, seed: int, index: int,
                 decode: Optional[Callable] = None) -> torch.Tensor:
    """Batch ``index``: noise from its generator, ``draw(noise, y, generator)``, optional decoding;
    float images in [-1, 1] on the CPU."""
    g = batch_generator(seed, index, y.device)
    noise = torch.randn((len(y), *shape), generator=g, device=y.device)
    x = draw(noise, y, g)
    if decode is not None:
        x = decode(x)
    bad = (~torch.isfinite(x)).flatten(1).any(1)
    if bad.any():  # to_uint8 would write NaN as black images: a diverged model or sampler setting, said
        raise FloatingPointError(f"batch {index}: {int(bad.sum())} of {len(x)} samples are not finite (NaN or "
                                 f"inf): the weights or the sampler settings diverge; nothing was written for it")
    return x.float().clamp(-1, 1).cpu()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of the model's weights (names, shapes, float64 sums) for a parts folder's settings:
    a re-run with other weights under the same path (the run trained on meanwhile) must not resume
    into the batches of the old ones."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            digest.update(f"{name}{tuple(t.shape)}".encode())
            if t.is_floating_point():
                t = t.detach().double()
                digest.update(struct.pack("<dd", t.sum().item(), t.abs().sum().item()))
    return digest.hexdigest()[:16]


class PartsFolder:
    """``<out>.parts/``: one ``batch_XXXXXX.npz`` per finished batch and the settings they were made with."""

    def __init__(self, out: Path, settings: dict):
        self.root = Path(str(out) + ".parts")
        self.settings = settings

    def open(self, is_main: bool) -> None:
        """Creates the folder (rank 0), or checks that an existing one was made with the same settings.
        One that holds no batch yet (a run that stopped before its first) takes the new settings."""
        path = self.root / "settings.json"
        old = None
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                pass
        if old != self.settings and any(self.root.glob("batch_*.npz")):
            if old is None:  # a clean-up cut short, or a hand edit: which settings made them is unknown
                raise ValueError(f"{self.root} holds batches but no readable settings.json: remove it or choose "
                                 f"another --out")
            diff = sorted(k for k in set(self.settings) | set(old) if old.get(k) != self.settings.get(k))
            raise ValueError(f"{self.root} holds batches made with other settings ({', '.join(diff)} differ): "
                             f"remove it or choose another --out")
        if old != self.settings and is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name("settings.json.tmp")
            tmp.write_text(json.dumps(self.settings, indent=1, sort_keys=True))
            tmp.replace(path)

    def path(self, index: int) -> Path:
        return self.root / f"batch_{index:06d}.npz"

    def done(self, index: int) -> bool:
        return self.path(index).exists()

    def read(self, index: int) -> tuple:
        """(arr_0, arr_1) of a finished batch; one line naming the file if it was damaged since."""
        try:
            with np.load(self.path(index)) as part:
                return part["arr_0"], part["arr_1"]
        except Exception:  # noqa: BLE001 - numpy raises OSError/ValueError/BadZipFile/KeyError for broken files
            raise ValueError(f"{self.path(index)} is damaged (not a readable batch): remove it and run again to "
                             f"redo that batch") from None

    def write(self, index: int, images: np.ndarray, labels: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"batch_{index:06d}.tmp.npz"
        np.savez(tmp, arr_0=images, arr_1=labels)
        tmp.replace(self.path(index))

    def assemble(self, num_batches: int, out: Path) -> int:
        """Concatenates every batch into ``out`` (temporary name, then rename) and removes the folder."""
        arr = labels = None
        start = 0
        for b in range(num_batches):  # filled in place: 50k 256px samples are 9.8 GB, once
            images, ys = self.read(b)
            if arr is None:
                num = self.settings["num"]
                arr = np.empty((num, *images.shape[1:3], 3), dtype=np.uint8)  # the ADM evaluator expects RGB
                labels = np.empty((num,), dtype=ys.dtype)
            arr[start:start + len(images)] = images  # one channel broadcasts to three
            labels[start:start + len(images)] = ys
            start += len(images)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.stem + ".tmp.npz")
        np.savez(tmp, arr_0=arr, arr_1=labels)
        tmp.replace(out)
        self.remove()
        return len(arr)

    def remove(self) -> None:
        """Deletes the folder, its batches first: a kill midway leaves settings.json with what remains."""
        for batch in self.root.glob("batch_*"):
            batch.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


def run_batches(num_batches: int, compute: Callable[[int], None], *, parts: Optional[PartsFolder] = None,
                world=None, progress: bool = True, desc: str = "batches") -> bool:
    """Runs ``compute(b)`` (which stores batch b's result, in ``parts`` when given) for this rank's
    batches ``rank, rank + size, ...``, skipping those ``parts`` already holds. Returns True on rank 0
    once every batch is done (False elsewhere); one line naming the first missing batch when another
    rank stopped early."""
    from masked_dit.train.dist import barrier

    rank, size, is_main = (world.rank, world.size, world.is_main) if world is not None else (0, 1, True)
    if size > 1 and parts is None:
        raise ValueError(f"{desc}: ranks hand their batches to rank 0 through a parts folder; pass parts")
    if parts is not None:
        parts.open(is_main)
        if world is not None:
            barrier(world)  # settings.json exists before any rank writes a batch
    mine = [b for b in range(rank, num_batches, size) if parts is None or not parts.done(b)]
    bar = contextlib.nullcontext()
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc=f"{desc} (rank 0 of {size})", dynamic_ncols=True)
    with bar as pbar:
        for b in mine:
            compute(b)
            if pbar is not None:
                pbar.update(1)
    if world is not None:
        barrier(world)
    if not is_main:
        return False
    missing = [b for b in range(num_batches) if parts is not None and not parts.done(b)]
    if missing:  # another rank stopped early: its batches are for the next run
        raise ValueError(f"{len(missing)} batches of {parts.root} are missing (first: {missing[0]}): run again to finish")
    return True


def generate_npz(draw: Callable, labels: torch.Tensor, out: Path, *, shape: tuple, batch_size: int, seed: int,
                 settings: dict, world, decode: Optional[Callable] = None, progress: bool = True) -> Optional[int]:
    """Samples every label into ``out`` (.npz) through ``<out>.parts/``; this rank runs batches
    ``rank, rank + world.size, ...`` that are not done yet. Returns the sample count on rank 0 once
    assembled (None elsewhere)."""
    num = len(labels)
    num_batches = (num + batch_size - 1) // batch_size
    parts = PartsFolder(out, {**settings, "num": num, "batch_size": batch_size, "seed": seed,
                              "shape": list(shape)})

    def compute(b: int) -> None:
        y = labels[b * batch_size:(b + 1) * batch_size].to(world.device)
        x = sample_batch(draw, y, shape, seed, b, decode)
        parts.write(b, to_uint8(x), y.cpu().numpy())

    if not run_batches(num_batches, compute, parts=parts, world=world, progress=progress, desc="sample"):
        return None
    return parts.assemble(num_batches, out)
