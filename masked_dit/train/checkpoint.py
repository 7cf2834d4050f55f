"""Checkpoints with torch.distributed.checkpoint (DCP), and the EMA export.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXXX/``:

    __0_0.distcp, .metadata   DCP shards of {'model', 'ema', 'optim'} (resharded on load)
    rank_00000.pt             this rank's RNG states and data position
    meta.json                 step, world size; written last: its presence marks the checkpoint complete

Everything is written to ``step_XXXXXXXX.tmp`` first and renamed by rank 0 after all ranks are done,
so a crash mid-save leaves only a ``.tmp`` folder that resume ignores (and the next save removes).
``keep_last`` complete checkpoints are kept; complete ones newer than the step just saved (an
abandoned trajectory) are renamed ``step_XXXXXXXX.superseded``, so the new one is the latest. A
checkpoint is deleted by removing its ``meta.json`` first, so a crash mid-delete leaves an
incomplete folder, never a "complete" one with missing shards. The rank files, meta.json and the
renames are fsynced (DCP syncs its shards), so a node crash cannot keep a checkpoint's name without
its bytes. ``resume='latest'`` takes the newest checkpoint whose files are all there and whole
(``verify_checkpoint``: shard sizes, readable rank files), and a checkpoint of another model is
refused with the mismatching keys.

The export (``<run>/export/``: ``ema.safetensors`` + ``config.json``) holds the unsharded EMA weights
under the official key names; ``masked_dit.models.load_official(path, name, **kwargs)`` loads it
without torch.distributed (``load_export`` does exactly that from the folder).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

CKPT_RE = re.compile(r"^step_(\d{8})$")
_SET_ASIDE_RE = re.compile(r"^step_(\d{8})\.old$")  # a step being re-saved, between its two renames


#################################################################################
#                                  RNG states                                   #
#################################################################################

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


#################################################################################
#                                 Save / load                                   #
#################################################################################

def list_checkpoints(ckpt_root) -> list[Path]:
    """Complete checkpoints, oldest first. A ``step_X.old`` (the previous save of a step being
    re-saved) stands in for ``step_X`` when a kill came between the save's two renames: with
    ``keep_last=1`` it is the run's only complete checkpoint then."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        match = CKPT_RE.match(p.name) or _SET_ASIDE_RE.match(p.name)
        if match and (p / "meta.json").exists():
            step = int(match.group(1))
            if step not in found or CKPT_RE.match(p.name):
                found[step] = p
    return [found[step] for step in sorted(found)]


def checkpoint_step(path) -> int:
    """The step a checkpoint folder's name says (``step_XXXXXXXX``, or its ``.old`` stand-in)."""
    name = Path(path).name
    return int((CKPT_RE.match(name) or _SET_ASIDE_RE.match(name)).group(1))


def read_meta(path) -> dict:
    """A checkpoint's meta.json: a JSON object with integer ``step`` and ``world_size`` (ValueError naming
    the checkpoint when it is torn or edited)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {path} is damaged: meta.json is unreadable ({type(exc).__name__})") from None
    valid = isinstance(meta, dict) and all(type(meta.get(k)) is int for k in ("step", "world_size"))
    if not valid or meta["step"] < 0 or meta["world_size"] < 1:
        raise ValueError(f"checkpoint {path} is damaged: meta.json lacks an integer step >= 0 and world_size >= 1")
    return meta


def verify_checkpoint(path, world_size: int | None = None) -> None:
    """Raises ValueError naming the first missing or truncated file of the checkpoint at ``path``."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    meta = read_meta(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint {path} is damaged: .metadata is missing")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many types
        raise ValueError(f"checkpoint {path} is damaged: .metadata is unreadable ({type(exc).__name__})") from None
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        file = path / name
        if not file.is_file() or file.stat().st_size < size:
            raise ValueError(f"checkpoint {path} is damaged: {name} is missing or truncated")
    if world_size is None or meta["world_size"] == world_size:
        ranks = range(meta["world_size"]) if world_size is None else range(world_size)
    else:  # another world size reads rank 0's file (the data position) only
        ranks = range(1)
    for rank in ranks:
        file = path / f"rank_{rank:05d}.pt"
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is damaged: {file.name} is missing")
        # Small files (RNG, data position) that DCP's size table does not cover: an empty or torn one
        # (a node crash before it reached the disk) must make the checkpoint skipped, not a crash at load.
        try:
            torch.load(file, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a torn pickle / zip raises many types
            raise ValueError(f"checkpoint {path} is damaged: {file.name} is unreadable") from None


def resolve_resume(resume: str | None, ckpt_root, world_size: int | None = None) -> Path | None:
    """``None`` -> no resume; ``'latest'`` -> newest complete, undamaged checkpoint (None if there is
    none); else a path (checked)."""
    if not resume:
        return None
    if resume == "latest":
        found, newest_problem = list_checkpoints(ckpt_root), None
        for path in reversed(found):
            try:
                verify_checkpoint(path, world_size)
            except ValueError as exc:
                warnings.warn(f"skipping {exc}", stacklevel=2)
                newest_problem = newest_problem or str(exc)
                continue
            return path
        if found:  # starting over would set the run's checkpoints and metrics aside: the user decides
            raise ValueError(f"--resume latest: every checkpoint in {ckpt_root} is damaged ({len(found)}; newest: "
                             f"{newest_problem}); move them aside to start anew, or restore one")
        return None
    path = Path(resume)
    if not (path / "meta.json").exists():
        raise ValueError(f"--resume {resume}: not a complete checkpoint folder (no meta.json); "
                         f"complete ones: {[str(p) for p in list_checkpoints(ckpt_root)] or 'none'}")
    verify_checkpoint(path, world_size)
    return path


def remove_checkpoint(path) -> None:
    """Deletes a checkpoint folder, unmarking it (meta.json) first: a crash mid-delete leaves an
    incomplete folder that resume ignores, never a 'complete' one with shards missing."""
    path = Path(path)
    try:
        (path / "meta.json").unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def check_fits(path, model, name: str | None = None, ignore=()) -> None:
    """Raises ValueError (missing / unexpected keys, shape mismatches) if the checkpoint at ``path``
    holds weights of another model than ``model``; reads only the DCP metadata. Saved keys named in
    ``ignore`` may be there (weights the model does not build, see ``warm_start``)."""
    from torch.distributed.checkpoint import FileSystemReader

    from masked_dit.models.official import check_state_dict

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: torch.empty(v.size, device="meta") for k, v in metadata.items()
             if k.startswith("model.") and hasattr(v, "size") and k[len("model."):] not in ignore}
    own = {}
    for k, v in model.state_dict().items():
        for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
            k = k.replace(wrapper, "")
        own[k] = torch.empty(v.shape, device="meta")
    shell = type("Shell", (), {"state_dict": lambda self: own, "name": name or type(model).__name__})()
    check_state_dict(shell, saved, what=f"checkpoint {path}")


def _app_state(model, optimizer, ema) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}


def save_checkpoint(ckpt_root, step: int, model, optimizer, ema, world, extra: dict, keep_last: int = 2,
                    model_name: str | None = None) -> Path:
    """Saves a complete checkpoint of ``step`` (collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    root = Path(ckpt_root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(world)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # DCP warns that one process without a process group is "single process"
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save(_app_state(model, optimizer, ema), checkpoint_id=str(tmp))
        torch.save({"rng": rng_state(), **extra}, tmp / f"rank_{world.rank:05d}.pt")
        _fsync(tmp / f"rank_{world.rank:05d}.pt")  # DCP syncs its own files; ours too, before meta.json exists
    except (CheckpointException, RuntimeError, OSError) as exc:
        raise _save_error(root, tmp, exc) from None
    _barrier(world)
    if world.is_main:
        meta = {"step": step, "world_size": world.size, **({"model": model_name} if model_name else {}),
                "optimizer": type(optimizer).__name__}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        _fsync(tmp / "meta.json")
        _fsync(tmp)
        # Checkpoints past this step belong to a trajectory this run has left (resumed from an older
        # checkpoint, or past a damaged newest one): left complete, they would stay "latest" (a
        # --resume latest would jump back onto the abandoned run) and keep_last would prune the
        # checkpoint just written. Renamed out of the checkpoint namespace (kept for the user) before
        # the new one is put in place: a kill in between falls back to an older step of this run.
        for newer in [p for p in list_checkpoints(root) if checkpoint_step(p) > step]:
            aside, n = root / f"step_{checkpoint_step(newer):08d}.superseded", 1
            while aside.exists():
                aside, n = root / f"step_{checkpoint_step(newer):08d}.superseded{n}", n + 1
            os.replace(newer, aside)
            warnings.warn(f"{newer.name} is newer than step {step} this run is saving: moved to {aside.name} "
                          f"(no longer resumed by --resume latest)", stacklevel=2)
        aside = root / f"step_{step:08d}.old"
        if final.exists():  # re-saving a step: move the old one aside (renames are atomic), then drop it
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)  # a kill before the next rename: list_checkpoints takes the .old
        os.replace(tmp, final)
        _fsync(root)  # the renames: durable before older checkpoints are pruned
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            remove_checkpoint(old)
        for stale in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:
            remove_checkpoint(stale)
        for empty in root.iterdir():  # folders a crash mid-delete left without meta.json
            if CKPT_RE.match(empty.name) and not (empty / "meta.json").exists():
                shutil.rmtree(empty, ignore_errors=True)
    _barrier(world)
    return final


def _save_error(root: Path, tmp: Path, exc: BaseException) -> OSError:
    """One line for a failed save: DCP wraps the writer's error in a CheckpointException (a BaseException,
    with a multi-rank traceback as its text), and a full disk can surface as torch.save's zip-writer
    RuntimeError ("unexpected pos"), so the cause, the free space and the checkpoint left to resume from
    are named."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc
    cause = (str(exc).strip().splitlines() or [""])[0]
    try:
        free = f"{shutil.disk_usage(root).free / 2 ** 20:.0f} MiB free on its disk"
    except OSError:
        free = "free space unknown"
    done = list_checkpoints(root)
    last = f"the last complete checkpoint, {done[-1].name}, is intact" if done else "no complete checkpoint yet"
    return OSError(f"saving checkpoint {tmp} failed ({type(exc).__name__}: {cause}); {free}; {last}")


def load_checkpoint(path, model, optimizer, ema, world, model_name: str | None = None) -> dict:
    """Loads ``path`` in place; returns this rank's extra state (RNG restored already) and the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    verify_checkpoint(path, world.size)
    meta = read_meta(path)
    if model_name:
        from masked_dit.models.registry import check_model_name

        check_model_name(meta.get("model"), model_name, f"checkpoint {path}")
    check_fits(path, model, model_name)
    if meta.get("optimizer", type(optimizer).__name__) != type(optimizer).__name__:
        raise ValueError(f"checkpoint {path} holds {meta['optimizer']} state but this run uses "
                         f"{type(optimizer).__name__} (--optim.name): resume with the optimizer it was saved with, "
                         f"or take its weights only with --run.init_from")
    state = _app_state(model, optimizer, ema)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        try:
            dcp.load(state, checkpoint_id=str(path))
        # DCP wraps planner errors (state this checkpoint lacks) in a CheckpointException, a BaseException
        except getattr(dcp.api, "CheckpointException", ValueError) as exc:  # not e.g. OOM: those stay as they are
            missing = re.search(r"Missing key in checkpoint state_dict: ([\w.]*\w)", str(exc), re.M)
            detail = f"it lacks {missing.group(1)}" if missing else type(exc).__name__
            raise ValueError(f"checkpoint {path} does not hold this run's training state ({detail}); was a "
                             f"setting such as --optim.name changed since it was saved?") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    rank_file = path / f"rank_{world.rank:05d}.pt"
    extra = {}
    if rank_file.exists() and meta["world_size"] == world.size:
        extra = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(extra.pop("rng"))
    elif (path / "rank_00000.pt").exists():
        # Another world size: the RNG streams are per rank and start afresh, but the data position is
        # global (every rank holds the same) and BatchStream converts it to the new batch geometry.
        saved = [torch.load(f, map_location="cpu", weights_only=False) for f in sorted(path.glob("rank_*.pt"))]
        extra = saved[0]  # rank_00000.pt
        extra.pop("rng", None)
        extra["rng_restored"] = False  # the caller reseeds (the run's seed, rank and step)
        # The open log window's sums are per rank: every new rank takes their mean over the old ranks,
        # so the record that closes it is still the mean over all ranks of the same steps.
        windows = [rank.get("metrics") for rank in saved]
        if all(windows):
            sums = {k: sum(w["sums"][k] for w in windows) / len(windows) for k in windows[0]["sums"]}
            extra["metrics"] = {"count": windows[0]["count"], "sums": sums, "last": windows[0].get("last", {})}
    extra["step"] = meta["step"]
    return extra


def _fsync(path) -> None:
    """Flushes a file's bytes (or a folder's entries: renames) to the disk. A killed process loses
    nothing the kernel has; a crashed node loses what was not synced, and a checkpoint renamed into
    place must not outlive its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a folder: their renames are as durable as they get
        pass
    finally:
        os.close(fd)


def _barrier(world) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


#################################################################################
#                                    Export                                     #
#################################################################################

def export_ema(out_dir, full_state: dict, model_name: str, model_kwargs: dict, run_config: dict | None = None,
               step: int | None = None) -> Path:
    """Writes ``ema.safetensors`` (official keys) and ``config.json`` (model name and arguments, and the
    training step of the weights)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in full_state.items()}
    tmp = out / "ema.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"model": model_name})
    os.replace(tmp, out / "ema.safetensors")
    cfg = {"model": model_name, "model_kwargs": model_kwargs}
    if step is not None:
        cfg["step"] = step
    if run_config is not None:
        cfg["run_config"] = run_config
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    return out / "ema.safetensors"


def load_export(export_dir):
    """The exported EMA model (eval mode, CPU) from an export folder, without torch.distributed."""
    from masked_dit.models import load_official

    export_dir = Path(export_dir)
    cfg = json.loads((export_dir / "config.json").read_text())
    kwargs = dict(cfg["model_kwargs"])
    return load_official(export_dir / "ema.safetensors", cfg["model"], **kwargs)
