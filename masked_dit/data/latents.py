"""VAE latents extracted once, read memory-mapped, resampled every step (fast-DiT/MaskDiT/REPA).

Layout of an extracted folder::

    manifest.json            vae (and its scaling_factor), image size, latent shape, classes, flip,
                             images_sha1 (which files, in order), shards (only complete ones)
    shard_00000.mean.npy     [n, C, h, w] posterior means            (float16 or float32)
    shard_00000.std.npy      [n, C, h, w] posterior standard deviations
    shard_00000.labels.npy   [n] int64
    shard_00000.flip_mean.npy / .flip_std.npy  (with --flip: moments of the mirrored image)

A shard is written under a temporary name, verified (shape, finiteness) and renamed, then the
manifest is rewritten: an interrupted extraction resumes at the first missing shard. Under torchrun
each rank encodes every world-size-th missing shard (``data/shards.py``). Training
draws ``z = (mean + std * eps) * 0.18215`` with a fresh ``eps`` each step.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from masked_dit.data.shards import ShardProgress, read_own_manifest, save_npy_atomic

MANIFEST = "manifest.json"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


#################################################################################
#                                   Extraction                                  #
#################################################################################

def load_vae(vae: str, device: str = "cpu"):
    """A diffusers AutoencoderKL from a hub id or a local folder."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as exc:
        raise ImportError("extract-latents needs diffusers: pip install 'masked-dit[vae]'") from exc
    path = Path(vae).expanduser()
    if (path.is_absolute() or vae.startswith((".", "~"))) and not path.is_dir():  # a folder, not a hub id
        raise ValueError(f"--vae {vae}: no such folder (a save_pretrained AutoencoderKL folder or a hub id)")
    try:
        model = AutoencoderKL.from_pretrained(vae)
    except OSError as exc:  # no such folder / hub id, no config.json, unreadable weights: name --vae, one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--vae {vae}: cannot load an AutoencoderKL ({detail})") from None
    return model.to(device).eval()


def check_vae_factor(vae, image_size: int) -> None:
    """The VAE halves the image once per level past the first (SD's: 8x); a side that is not a multiple
    loses its last rows and columns silently (15 px -> 7x7 latents that decode to 14 px)."""
    channels = getattr(getattr(vae, "config", None), "block_out_channels", None)
    if not isinstance(channels, (list, tuple)) or not channels:
        return
    factor = 2 ** (len(channels) - 1)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} must be a multiple of the VAE's downsampling factor {factor} "
                         f"(it would encode {image_size // factor}x{image_size // factor} latents that decode to "
                         f"{image_size // factor * factor}px)")


@torch.no_grad()
def extract_latents(dataset, out_dir, vae, *, vae_name: str = "", batch_size: int = 32, shard_size: int = 1024,
                    flip: bool = False, dtype: str = "float32", device: str = "cpu", progress: bool = True,
                    world=None) -> dict:
    """Encodes ``dataset`` (items ``{'x': [3,H,W] in [-1,1], 'y'}``) into shards under ``out_dir``.

    ``vae`` is an AutoencoderKL (or anything whose ``encode(x).latent_dist`` has ``mean`` and
    ``std``). Re-running with the same arguments resumes; different arguments are an error. Under
    torchrun (``world``: ``masked_dit.train.dist.World``) each rank encodes its share of the shards.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"latent dtype must be float16 or float32 (got {dtype!r})")
    if shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size})")
    n = len(dataset)
    image_size = int(dataset[0]["x"].shape[-1])
    check_vae_factor(vae, image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {"vae": vae_name, "num_images": n, "image_size": image_size, "flip": flip, "dtype": dtype,
              "shard_size": shard_size, "classes": list(getattr(dataset, "classes", [])),
              "num_classes": int(getattr(dataset, "num_classes", 0))}
    # The VAE's own latent scale, recorded (not compared on resume: older folders lack it) so training
    # can tell when --data.latent_scale is not this VAE's (SDXL's 0.13025 where SD's is 0.18215).
    factor = getattr(getattr(vae, "config", None), "scaling_factor", None)
    recorded = {"scaling_factor": float(factor)} if isinstance(factor, (int, float)) else {}
    # Which images, in which order (an image folder's digest); like the scale, checked only when known.
    digest = dataset.digest() if hasattr(dataset, "digest") else None
    if digest:
        recorded["images_sha1"] = digest
    if getattr(dataset, "min_image_size", None) is not None:  # extract-features takes the same images
        recorded["min_image_size"] = int(dataset.min_image_size)
    manifest_path = out / MANIFEST
    old = None
    if manifest_path.exists():
        old = read_own_manifest(manifest_path)
        mismatched = [k for k in header if old.get(k) != header[k]]
        # which images a skip or an upscale put in each row: checked when both runs know it
        mismatched += [k for k in ("min_image_size",) if k in recorded and old.get(k, recorded[k]) != recorded[k]]
        if mismatched:
            raise ValueError(f"{manifest_path} was made with different settings ({', '.join(mismatched)}); "
                             "use a new output folder")
        if digest and old.get("images_sha1", digest) != digest:
            raise ValueError(f"{manifest_path} was made from other images (same count, other files or order); "
                             "use a new output folder")
    done = ShardProgress(manifest_path, old, world)
    num_shards = (n + shard_size - 1) // shard_size
    latent_shape = done.shards[0]["latent_shape"] if done.shards else None
    todo = done.share([si for si in range(num_shards) if si not in done.done])
    bar = done.progress_bar("extract-latents", todo) if progress else None
    for si in todo:
        start, stop = si * shard_size, min(n, (si + 1) * shard_size)
        parts = {"mean": [], "std": [], "labels": [], "flip_mean": [], "flip_std": []}
        for b in range(start, stop, batch_size):
            items = [dataset[i] for i in range(b, min(stop, b + batch_size))]
            x = torch.stack([it["x"] for it in items]).to(device)
            parts["labels"].append(torch.stack([torch.as_tensor(it["y"]) for it in items]).cpu())
            views = [("", x)] + ([("flip_", x.flip(-1))] if flip else [])
            for prefix, xv in views:
                dist = vae.encode(xv).latent_dist
                parts[prefix + "mean"].append(dist.mean.float().cpu())
                parts[prefix + "std"].append(dist.std.float().cpu())
        files = {}
        for key, chunks in parts.items():
            if not chunks:
                continue
            arr = torch.cat(chunks).numpy()
            if key != "labels":
                arr = arr.astype(dtype)
                if not np.isfinite(arr).all():
                    raise ValueError(f"non-finite {key} latents in shard {si} (images {start}..{stop - 1})")
                shape = list(arr.shape[1:])
                if latent_shape is not None and shape != latent_shape:
                    raise ValueError(f"shard {si} {key} has latent shape {shape}, expected {latent_shape}")
                latent_shape = shape
            if arr.shape[0] != stop - start:
                raise ValueError(f"shard {si} {key} holds {arr.shape[0]} rows, expected {stop - start}")
            fname = f"shard_{si:05d}.{key}.npy"
            save_npy_atomic(out / fname, arr)
            files[key] = fname
        done.add({"index": si, "start": start, "count": stop - start, "files": files, "latent_shape": latent_shape},
                 {**header, **recorded, "latent_shape": latent_shape})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return done.finish(lambda shards: {**header, **recorded, "latent_shape": _one_shape(shards)}, num_shards)


def _one_shape(shards: list[dict]) -> list[int]:
    """The latent shape every shard has (ranks encode shards apart: checked when they are merged)."""
    shapes = {tuple(s["latent_shape"]) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"shards have different latent shapes {sorted(shapes)}")
    return list(shapes.pop())


#################################################################################
#                                    Reading                                    #
#################################################################################

def read_manifest(root: Path, name: str, what: str, first: str, rerun: str) -> dict:
    """The manifest ``root/name`` of a finished extraction (latents, encoder features); one line naming
    the folder when it is missing (``first``: what to run), not JSON, or unfinished (``rerun``)."""
    path = root / name
    if not path.exists():
        raise FileNotFoundError(f"no {name} in {str(root)!r}: run {first} first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {root}: {name} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        raise ValueError(f"{what} in {str(root)!r} are incomplete: re-run {rerun} to finish them")
    return manifest


def open_shard(root: Path, name: str, what: str) -> np.ndarray:
    """``root/name`` memory-mapped; one line naming it when it is missing or not a .npy array (numpy's
    own messages, 'EOF: reading array header ...', name no file)."""
    file = root / name
    if not file.is_file():
        raise ValueError(f"{what} {root}: shard file {name} is missing")
    try:
        return np.load(file, mmap_mode="r")
    except Exception:  # noqa: BLE001 - numpy raises ValueError/OSError/EOFError for broken files
        raise ValueError(f"{what} {root}: shard file {name} is truncated or not a .npy array") from None


def check_shards(root: Path, what: str, manifest: dict, row_shapes: dict[str, list]) -> None:
    """The shards of a finished extraction (latents, encoder features), checked before training reads
    them: they hold rows 0..num_images in order, and each lists a file per key of ``row_shapes`` that is
    there, readable and ``[count, *row_shapes[key]]`` (headers only). A hand-edited manifest.json
    otherwise failed at some step with a KeyError or an IndexError."""
    bad = f"{what} {root}: {MANIFEST}"
    shards, num_images = manifest["shards"], manifest["num_images"]
    if not isinstance(shards, list) or not isinstance(num_images, int):
        raise ValueError(f"{bad} needs a list of shards and an integer num_images")
    end = 0
    for si, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("start"), int)
                and isinstance(shard.get("count"), int) and isinstance(shard.get("files"), dict)):
            raise ValueError(f"{bad}: shard {si} needs an integer start and count and a dict of files")
        if shard["start"] != end:  # rows are found by start: each shard begins where the one before ends
            raise ValueError(f"{bad}: shard {si} starts at row {shard['start']}, expected {end}")
        end += shard["count"]
        for key, shape in row_shapes.items():
            name = shard["files"].get(key)
            if not isinstance(name, str):
                raise ValueError(f"{bad}: shard {si} lists no {key} file")
            got, want = list(open_shard(root, name, what).shape), [shard["count"], *shape]
            if got != want:
                raise ValueError(f"{what} {root}: {name} has shape {got}, expected {want}")
    if end != num_images:
        raise ValueError(f"{bad}: its shards hold {end} images but num_images is {num_images}")


class ShardedRows(torch.utils.data.Dataset):
    """Rows of the memory-mapped shards ``self.shards`` under ``self.root`` (latents, encoder features);
    ``what`` names them in errors."""
    what = "shards"

    def _open_shards(self, row_shapes: dict[str, list]) -> None:
        """Checks the shards (``check_shards``), then indexes them by first row; files map lazily."""
        check_shards(self.root, self.what, self.manifest, row_shapes)
        self.starts = np.array([s["start"] for s in self.shards])
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, row in it) of dataset row ``index``."""
        si = int(np.searchsorted(self.starts, index, side="right") - 1)
        return si, index - self.shards[si]["start"]

    def _array(self, si: int, key: str) -> np.ndarray:
        if (si, key) not in self._maps:  # opened lazily so DataLoader workers each map their own
            self._maps[(si, key)] = open_shard(self.root, self.shards[si]["files"][key], self.what)
        return self._maps[(si, key)]

    def _row(self, si: int, key: str, row: int) -> torch.Tensor:
        """Row ``row`` in its stored dtype (fp16 shards stay fp16: half the bytes through the workers,
        collate and host-to-device copy; the trainer widens them to float32 on the device, exactly).
        NaN/inf is an error naming the file: training would skip every step as non-finite and end with
        its initial weights."""
        value = np.array(self._array(si, key)[row])
        if not _all_finite(value):
            name = self.shards[si]["files"][key]
            raise ValueError(f"{self.what} {self.root}: non-finite values in {name} row {row}")
        return torch.from_numpy(value)


# The exponent bits of IEEE floats: all ones means inf or NaN. One integer pass instead of a float
# classification (a [256, 768] fp16 feature row: 36 us instead of 830 us with the float32 cast).
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000),
                  np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def _all_finite(a: np.ndarray) -> bool:
    bits = _EXPONENT_BITS.get(a.dtype)
    if bits is None:
        return bool(np.isfinite(a).all())
    as_int, mask = bits
    return not ((a.view(as_int) & as_int(mask)) == as_int(mask)).any()


class LatentDataset(ShardedRows):
    """Memory-mapped moments; items ``{'mean', 'std', 'y'}`` (the flipped moments when the key flips)."""
    what = "latents"

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, MANIFEST, "latents", "`masked-dit extract-latents`", "extract-latents")
        try:
            self.has_flip = bool(self.manifest["flip"])
            self.num_classes = self.manifest.get("num_classes", 0)
            self.latent_shape = tuple(self.manifest["latent_shape"])
            self.shards = self.manifest["shards"]
            int(self.manifest["num_images"])
        except (KeyError, TypeError, ValueError) as exc:  # a hand-edited or foreign manifest.json
            raise ValueError(f"latents {self.root}: {MANIFEST} is not one extract-latents wrote (bad or missing "
                             f"{exc}): re-run extract-latents") from None
        # the manifest's shards and every file they need (the flipped moments when it says flip);
        # values are checked for NaN/inf as they are read (``__getitem__``)
        moments = ["mean", "std"] + (["flip_mean", "flip_std"] if self.has_flip else [])
        self._open_shards({**dict.fromkeys(moments, list(self.latent_shape)), "labels": []})
        labels = (np.load(self.root / s["files"]["labels"], mmap_mode="r") for s in self.shards)
        self.max_label = max((int(a.max()) for a in labels if len(a)), default=-1)

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        si, row = self._locate(index)
        prefix = "flip_" if flip and self.has_flip else ""
        mean, std = self._row(si, prefix + "mean", row), self._row(si, prefix + "std", row)
        return {"mean": mean, "std": std, "y": torch.tensor(int(self._array(si, "labels")[row]))}


def sample_posterior(batch: dict, scale: float) -> dict:
    """Turns ``{'mean','std','y'}`` into ``{'x','y'}`` with a fresh posterior draw times ``scale``."""
    if "mean" not in batch:
        return batch
    mean, std = batch["mean"], batch["std"]
    x = (mean + std * torch.randn_like(mean)) * scale
    out = {k: v for k, v in batch.items() if k not in ("mean", "std")}
    out["x"] = x
    return out
