"""The model zoo: DiT, SiT, REPA-SiT, MDTv1/v2 and MaskDiT on one fused block.

    from masked_dit.models import build_model, load_official
    model = build_model("DiT-XL/2")                       # random init, official keys
    model = load_official("DiT-XL-2-256x256.pt", "DiT-XL/2")  # official checkpoint, eval mode
"""
import importlib
import importlib.util

from masked_dit.models.registry import FAMILIES, MODEL_CONFIGS, build, build_model
from masked_dit.models.dit import DiT, SiT  # registers dit, sit
from masked_dit.models.flops import FlopCount, FlopsMixin, flops_per_image, forward_flops, model_table
from masked_dit.models.official import load_official, load_official_state_dict
from masked_dit.models.repa import REPASiT  # registers repa_sit

# MDT and MaskDiT register themselves on import (their modules may still be missing in a partial
# checkout; a module that exists but fails to import raises as usual).
for _name in ("mdt", "maskdit"):
    if importlib.util.find_spec(f"masked_dit.models.{_name}") is not None:
        importlib.import_module(f"masked_dit.models.{_name}")

# Every family gets `model.flops_per_image(...)` / `model.forward_flops(...)` (used by the trainer for MFU).
for _cls in FAMILIES.values():
    for _attr in ("flops_per_image", "forward_flops"):
        if not hasattr(_cls, _attr):
            setattr(_cls, _attr, getattr(FlopsMixin, _attr))

__all__ = [
    "DiT", "FAMILIES", "FlopCount", "MODEL_CONFIGS", "REPASiT", "SiT", "build", "build_model", "flops_per_image",
    "forward_flops", "load_official", "load_official_state_dict", "model_table",
]
