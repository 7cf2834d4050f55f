"""Checkpoints with torch.distributed.checkpoint (DCP), and the EMA export.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXXX/``:

    __0_0.distcp, .metadata   DCP shards of {'model', 'ema', 'optim'} (resharded on load)
    rank_00000.pt             this rank's RNG states and data position
    meta.json                 step, world size; written last: its presence marks the checkpoint complete

Everything is written to ``step_XXXXXXXX.tmp`` first and renamed by rank 0 after all ranks are
done, so a crash mid-save leaves only a ``.tmp`` folder that resume ignores (and the next save
removes). ``keep_last`` complete checkpoints are kept.

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
    """Complete checkpoints, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def resolve_resume(resume: str | None, ckpt_root) -> Path | None:
    """``None`` -> no resume; ``'latest'`` -> newest complete checkpoint (None if there is none); else a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").exists():
        raise ValueError(f"--resume {resume}: not a complete checkpoint folder (no meta.json); "
                         f"complete ones: {[str(p) for p in list_checkpoints(ckpt_root)] or 'none'}")
    return path


def _app_state(model, optimizer, ema) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}


def save_checkpoint(ckpt_root, step: int, model, optimizer, ema, world, extra: dict, keep_last: int = 2) -> Path:
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
    with warnings.catch_warnings():  # DCP warns that one process without a process group is "single process"
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save(_app_state(model, optimizer, ema), checkpoint_id=str(tmp))
    torch.save({"rng": rng_state(), **extra}, tmp / f"rank_{world.rank:05d}.pt")
    _barrier(world)
    if world.is_main:
        if final.exists():
            shutil.rmtree(final)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": world.size}) + "\n")
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(world)
    return final


def load_checkpoint(path, model, optimizer, ema, world) -> dict:
    """Loads ``path`` in place; returns this rank's extra state (RNG restored already) and the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    state = _app_state(model, optimizer, ema)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    rank_file = path / f"rank_{world.rank:05d}.pt"
    extra = {}
    if rank_file.exists() and meta["world_size"] == world.size:
        extra = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(extra.pop("rng"))
    extra["step"] = meta["step"]
    return extra


def _barrier(world) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


#################################################################################
#                                    Export                                     #
#################################################################################

def export_ema(out_dir, full_state: dict, model_name: str, model_kwargs: dict, run_config: dict | None = None) -> Path:
    """Writes ``ema.safetensors`` (official keys) and ``config.json`` (model name and arguments)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in full_state.items()}
    tmp = out / "ema.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"model": model_name})
    os.replace(tmp, out / "ema.safetensors")
    cfg = {"model": model_name, "model_kwargs": model_kwargs}
    if run_config is not None:
        cfg["run_config"] = run_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out / "ema.safetensors"


def load_export(export_dir):
    """The exported EMA model (eval mode, CPU) from an export folder, without torch.distributed."""
    from masked_dit.models import load_official

    export_dir = Path(export_dir)
    cfg = json.loads((export_dir / "config.json").read_text())
    kwargs = dict(cfg["model_kwargs"])
    return load_official(export_dir / "ema.safetensors", cfg["model"], **kwargs)
