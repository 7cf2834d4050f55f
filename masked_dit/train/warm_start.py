"""``--run.init_from``: start a run from another run's weights (fine-tuning), not its optimizer or step.

    masked-dit train --preset imagenet256-maskdit-xl2-unmask --run.init_from=runs/imagenet256-maskdit-xl2

What it accepts, and what it takes from it:

    a run folder            its newest complete checkpoint: model and EMA weights
    a checkpoint folder     (``step_XXXXXXXX``, with meta.json) model and EMA weights
    an export folder        ``ema.safetensors``: model and EMA both start from it
    a checkpoint file       any ``load_official`` format; a training dict with ``'model'`` and
                            ``'ema'`` gives both (as MaskDiT's fine-tune loads them), a plain state
                            dict gives the model and the EMA starts from it

The optimizer, step counter, data position and RNG start fresh (MaskDiT's unmasking fine-tune
also builds a new optimizer). Keys must fit exactly: a mismatch is one line naming the keys.
``--resume`` wins over ``init_from``: an interrupted fine-tune continues from its own checkpoint.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from masked_dit.models.official import (_count, _match_prefixes, _repa_legacy_blocks, check_state_dict, pick_weights,
                                        read_checkpoint, saved_model_name)
from masked_dit.models.registry import check_model_name
from masked_dit.train import checkpoint as ckpt


def initial_weights(spec: str, model: nn.Module, model_name: Optional[str] = None,
                    ema_only: bool = False) -> tuple[dict | None, dict]:
    """(model state, EMA state) for ``model`` from ``spec``, full tensors on the CPU (every rank reads them).
    ``ema_only``: from a DCP checkpoint folder read just the EMA (and the model's buffers): half the
    bytes; the model state is then None."""
    path = Path(spec)
    what = f"--run.init_from {spec}"
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such file or folder")
    if path.is_dir():
        if (path / "meta.json").exists():
            return _from_checkpoint_folder(path, model, model_name, ema_only)
        found = ckpt.list_checkpoints(path / "checkpoints")
        if found:
            return _from_checkpoint_folder(found[-1], model, model_name, ema_only)
        for candidate in (path / "export" / "ema.safetensors", path / "ema.safetensors"):
            if candidate.exists():
                return _from_file(candidate, model, model_name)
        raise ValueError(f"{what}: a folder without a complete checkpoint (checkpoints/, meta.json) or ema.safetensors")
    return _from_file(path, model, model_name)


def unused_source_keys(model: nn.Module) -> set[str]:
    """Weights a source run may hold that ``model`` does not build because its config does not use
    them: MaskDiT's ``mask_token`` exists only with an MAE loss (``mae_loss_coef > 0``), and the
    unmasking fine-tune (``-unmask`` preset: no MAE loss) starts from the masked run, which has one.
    The unmasked model never places mask tokens, so dropping it loses nothing."""
    keys = set()
    for name, module in model.named_modules():
        if getattr(module, "use_decoder", False) and getattr(module, "mask_token", ...) is None:
            keys.add(f"{name}.mask_token" if name else "mask_token")
    return keys


def _from_file(path: Path, model: nn.Module, model_name: Optional[str]) -> tuple[dict, dict]:
    obj = read_checkpoint(path)
    if model_name:  # our exports name their model (DiT and SiT weights fit each other key for key)
        check_model_name(saved_model_name(path), model_name, f"--run.init_from {path}:", same_family=True)
    weights = pick_weights(obj, path, prefer=("model", "state_dict", "module", "ema"))
    ema = pick_weights(obj, path, prefer=("ema", "model", "state_dict", "module"))
    keys = set(model.state_dict())
    weights, ema = _match_prefixes(weights, keys), _match_prefixes(ema, keys)
    if getattr(model, "family", None) == "repa_sit" and any(k.startswith("decoder_blocks.") for k in weights):
        # REPA's legacy layout: its `blocks` are the encoder, as load_official reads it
        depth = _count(weights, "blocks.")
        if depth != model.encoder_depth:
            raise ValueError(f"--run.init_from {path}: a REPA checkpoint of the legacy layout with encoder_depth "
                             f"{depth} (its `blocks`), the model aligns after block {model.encoder_depth}: pass "
                             f"--model.extra='{{\"encoder_depth\": {depth}}}'")
        weights, ema = _repa_legacy_blocks(weights, depth), _repa_legacy_blocks(ema, depth)
    unused = unused_source_keys(model)
    weights = {k: v for k, v in weights.items() if k not in unused}
    ema = {k: v for k, v in ema.items() if k not in unused}
    check_state_dict(model, weights, what=f"--run.init_from {path}")
    check_state_dict(model, ema, what=f"--run.init_from {path} (EMA)")
    return weights, ema


def _from_checkpoint_folder(path: Path, model: nn.Module, model_name: Optional[str],
                            ema_only: bool = False) -> tuple[dict | None, dict]:
    import torch.distributed.checkpoint as dcp

    ckpt.verify_checkpoint(path)
    if model_name:
        check_model_name(ckpt.read_meta(path).get("model"), model_name, f"--run.init_from {path}:")
    ckpt.check_fits(path, model, model_name, ignore=unused_source_keys(model))  # DCP reads only the template's keys
    # Plain CPU tensors as the template: DCP reads only these two entries (not the optimizer) and
    # reshards whatever layout the checkpoint was saved with into full tensors.
    params = dict(model.named_parameters())
    wanted = {k: v for k, v in model.state_dict().items() if not (ema_only and k in params)}  # buffers only
    state = {"model": {k: torch.empty_like(v, device="cpu") for k, v in wanted.items()},
             "ema": {n: torch.empty_like(p, device="cpu", dtype=torch.float32) for n, p in params.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=os.fspath(path))
    ema = dict(state["model"])
    ema.update(state["ema"])  # buffers come from the model
    return (None if ema_only else state["model"]), ema


def load_into_ema(ema, full_state: dict) -> None:
    """Copies full (unsharded) tensors into the EMA shadows, which are FSDP2 DTensor shards or plain."""
    with torch.no_grad():
        for name, shadow in ema.shadow.items():
            full = full_state[name].to(device=shadow.device, dtype=torch.float32)
            if hasattr(shadow, "device_mesh"):  # a DTensor: take this rank's shard of the full tensor
                try:
                    from torch.distributed.tensor import distribute_tensor
                except ImportError:  # torch < 2.5
                    from torch.distributed._tensor import distribute_tensor
                local = distribute_tensor(full, shadow.device_mesh, shadow.placements).to_local()
                shadow.to_local().copy_(local)
            else:
                shadow.copy_(full)
