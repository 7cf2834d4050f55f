"""Load official checkpoints as published into our models.

Formats handled (whichever the file is):
  * plain state dicts (DiT ``DiT-XL-2-256x256.pt``, SiT ``SiT-XL-2-256x256.pt``, MDT),
  * training dicts ``{'ema', 'model', 'opt', 'args', ...}`` (MaskDiT, REPA, some MDT): ``'ema'``
    is preferred, as the official sampling scripts do, then ``'model'``, then ``'state_dict'``,
  * ``.safetensors`` files,
  * REPA's legacy layout (``decoder_blocks.i`` after ``encoder_depth`` blocks), renumbered as its
    ``generate.py --legacy`` does,
  * key prefixes from wrappers (``module.`` from DDP, ``_orig_mod.`` from torch.compile, MaskDiT's
    ``model.`` from its EDM wrapper) are matched against the target model's own keys.
"""
from __future__ import annotations

import argparse
import os
import pickle

import torch
import torch.nn as nn

from masked_dit.models.registry import MODEL_CONFIGS, build_model

_PREFERRED = ("ema", "model", "state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


#################################################################################
#                              Reading the file                                 #
#################################################################################

def _torch_load(path: str, weights_only: bool):
    if not weights_only:
        return torch.load(path, map_location="cpu", weights_only=False)
    # Training checkpoints often carry argparse Namespaces ('args'): harmless, allow them.
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: checkpoint holds objects beyond tensors ({first}); if you trust the file, "
                         f"pass weights_only=False") from None


def _looks_like_torch_save(path: str) -> bool:
    """torch.save writes a zip archive (or, legacy, a pickle starting with the protocol byte 0x80)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(1)
    return zipfile.is_zipfile(path) or head == b"\x80"


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict:
    """The dict inside a checkpoint file (.safetensors or torch.save), as stored; one-line errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        elif not _looks_like_torch_save(path):
            raise ValueError("neither a torch.save zip archive nor a legacy pickle")
        else:
            obj = _torch_load(path, weights_only)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files raise many types
        if isinstance(exc, ValueError) and str(exc).startswith(path):
            raise
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {detail})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or a dict holding one, got {type(obj).__name__}")
    return obj


def pick_weights(obj: dict, path, prefer=_PREFERRED) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: ``obj`` itself when it holds tensors, else its first ``prefer`` entry."""
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in prefer:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            raise ValueError(f"{os.fspath(path)}: no weights found; top-level keys are {sorted(map(str, obj))} "
                             f"(expected tensors or one of {list(prefer)})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_official_state_dict(path: str | os.PathLike, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The model weights inside an official checkpoint file (EMA weights when present)."""
    return pick_weights(read_checkpoint(path, weights_only), path)


#################################################################################
#                         Matching keys to our model                            #
#################################################################################

def _match_prefixes(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strips (or adds) wrapper prefixes so that the checkpoint's keys best match ``target_keys``."""
    best, best_hits = state, len(target_keys & state.keys())
    candidates = [state]
    cur = state
    for _ in range(3):  # strip up to three stacked wrapper prefixes (e.g. module._orig_mod.model.)
        for p in _WRAPPER_PREFIXES:
            if cur and all(k.startswith(p) for k in cur):
                cur = {k[len(p):]: v for k, v in cur.items()}
                candidates.append(cur)
                break
        else:
            break
    for p in _WRAPPER_PREFIXES:  # our model may itself be a wrapper (e.g. keys under `model.`)
        candidates.append({p + k: v for k, v in cur.items()})
    for cand in candidates:
        hits = len(target_keys & cand.keys())
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def _repa_legacy_blocks(state: dict[str, torch.Tensor], encoder_depth: int) -> dict[str, torch.Tensor]:
    """REPA's legacy checkpoints split the stack into ``blocks`` (the first ``encoder_depth``) and
    ``decoder_blocks``; REPA's own ``generate.py --legacy`` (utils.load_legacy_checkpoints) renumbers
    ``decoder_blocks.i`` as ``blocks.(i + encoder_depth)``. The same here, so such files load too."""
    if not any(k.startswith("decoder_blocks.") for k in state):
        return state
    out = {}
    for k, v in state.items():
        if k.startswith("decoder_blocks."):
            _, idx, rest = k.split(".", 2)
            k = f"blocks.{int(idx) + encoder_depth}.{rest}"
        out[k] = v
    return out


def _fmt(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raises one ValueError listing missing keys, unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = own.keys() - state.keys()
    unexpected = state.keys() - own.keys()
    shapes = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:8])}"
                            + (f"; ... ({len(shapes) - 8} more)" if len(shapes) > 8 else ""))
        raise ValueError(f"{what} does not fit {getattr(model, 'name', type(model).__name__)}: " + " | ".join(problems))


#################################################################################
#                                 Public API                                    #
#################################################################################

def load_official(path: str | os.PathLike, name: str, *, weights_only: bool = True, **overrides) -> nn.Module:
    """Builds the registered model ``name`` (``'DiT-XL/2'``, ``'SiT-XL/2'``, ``'REPA-SiT-XL/2'``,
    ``'MDTv2-XL/2'``, ...), loads the official checkpoint at ``path`` strictly and returns it in
    eval mode on the CPU. ``overrides`` go to the constructor; ``input_size`` is read from the
    checkpoint's ``pos_embed`` when not given (so 512px DiT checkpoints need nothing extra)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODEL_CONFIGS))}")
    state = load_official_state_dict(path, weights_only=weights_only)
    family, config = MODEL_CONFIGS[name]
    if "input_size" not in overrides:
        pos = next((v for k, v in state.items() if k.split(".")[-1] == "pos_embed" and v.dim() == 3), None)
        patch = overrides.get("patch_size", config.get("patch_size"))
        if pos is not None and patch:
            side = int(round(pos.shape[1] ** 0.5))
            if side * side == pos.shape[1]:
                overrides["input_size"] = side * patch
    with torch.device("meta"):
        shell = build_model(name, **overrides)
    state = _match_prefixes(state, set(shell.state_dict().keys()))
    if getattr(shell, "family", None) == "repa_sit":
        state = _repa_legacy_blocks(state, shell.encoder_depth)
    shell.name = name
    check_state_dict(shell, state, what=f"checkpoint {os.fspath(path)}")
    model = build_model(name, **overrides)
    model.load_state_dict(state, strict=True)
    model.name = name
    return model.eval()
