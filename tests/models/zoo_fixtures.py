"""Reading the model fixtures (shared by test_dit, test_repa, test_zoo)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

# fixture config entries that are not constructor arguments
NOT_ARGS = {"cfg_scale", "scale_pow", "effective_mask_ratio", "len_keep", "sigma_data"}


def load_model_fixture(fixtures_dir: Path, name: str):
    """(config, state_dict, inputs, outputs) of ``models/<name>``."""
    base = fixtures_dir / "models" / name
    meta = json.loads(base.with_suffix(".json").read_text())
    tensors = load_file(str(base.with_suffix(".safetensors")))

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return meta["config"], part("state_dict."), part("input."), part("output.")


def constructor_args(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_ARGS}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the fixtures' bar is 1e-5 in float32)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
