"""Name registry: families (official constructors) and named configurations (``DiT-XL/2``)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

FAMILIES: dict[str, type[nn.Module]] = {}
# name -> (family, constructor kwargs using the official argument names)
MODEL_CONFIGS: dict[str, tuple[str, dict]] = {}

# depth / hidden_size / num_heads of the four DiT sizes (shared by every family)
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def register_family(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        FAMILIES[name] = cls
        cls.family = name
        return cls
    return deco


def register_config(name: str, family: str, **kwargs) -> None:
    MODEL_CONFIGS[name] = (family, kwargs)


def register_sizes(prefix: str, family: str, patch_sizes=(2, 4, 8), **extra) -> None:
    """Registers ``{prefix}-{S,B,L,XL}/{p}`` for a family."""
    for size, (depth, hidden, heads) in SIZES.items():
        for p in patch_sizes:
            register_config(f"{prefix}-{size}/{p}", family, depth=depth, hidden_size=hidden, num_heads=heads,
                            patch_size=p, **extra)


# Sizes every family takes, checked before the constructor: 0 or a fraction failed deep inside it
# (a ZeroDivisionError in the weight init, a modulo by zero), and depth -1 built a model without blocks.
_AT_LEAST_ONE = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads")


def check_sizes(kwargs: dict) -> None:
    """One ValueError naming a size that is not a positive integer, or a label dropout outside [0, 1)."""
    for key in _AT_LEAST_ONE:
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1 (got {value!r})")
    classes = kwargs.get("num_classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 0):
        raise ValueError(f"num_classes must be an integer >= 0 (got {classes!r})")
    dropout = kwargs.get("class_dropout_prob")
    if dropout is not None and not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"class_dropout_prob must be in [0, 1) (got {dropout!r}): 1 drops every label")


def build(family: str, **kwargs) -> nn.Module:
    """Builds a model of ``family`` with the official constructor's keyword arguments."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(sorted(FAMILIES))}")
    check_sizes(kwargs)
    return FAMILIES[family](**kwargs)


def build_model(name: str, **overrides) -> nn.Module:
    """Builds a named configuration (``'MDTv2-S/2'``), with keyword overrides."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODEL_CONFIGS))}")
    family, kwargs = MODEL_CONFIGS[name]
    return build(family, **{**kwargs, **overrides})


def check_model_name(saved: str | None, name: str, what: str, same_family: bool = False) -> None:
    """Refuses weights that ``what`` says were saved from a ``saved`` model when ``name`` is asked for:
    DiT and SiT (or MDTv1 and v2) share every key and shape, so only the name tells an epsilon DiT from
    a velocity SiT. With ``same_family`` another size of the same family is left to the shape checks
    (a DiT-S/2 with DiT-B/2's sizes passed as arguments is that network), and a name not registered
    here (foreign metadata) tells nothing."""
    if not saved or saved == name:
        return
    family = lambda n: MODEL_CONFIGS.get(n, (None,))[0]  # noqa: E731
    if same_family and family(saved) in (None, family(name)):
        return
    raise ValueError(f"{what} holds a {saved} model, not {name}")
