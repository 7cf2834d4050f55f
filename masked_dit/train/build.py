"""Config -> model: the constructor arguments a ``ModelConfig`` (and its objective) imply."""
from __future__ import annotations

import torch.nn as nn

from masked_dit.diffusion.objectives import DEFAULT_OBJECTIVE, FAMILIES


def model_kwargs(cfg) -> tuple[str, dict]:
    """(registry name, constructor overrides) for ``cfg.model`` trained with ``cfg.objective``."""
    from masked_dit.models import MODEL_CONFIGS

    mc, oc = cfg.model, cfg.objective
    if mc.name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {mc.name!r}; valid: {', '.join(sorted(MODEL_CONFIGS))}")
    family = MODEL_CONFIGS[mc.name][0]
    if family not in FAMILIES[oc.kind]:
        raise ValueError(f"--objective.kind={oc.kind} trains {', '.join(FAMILIES[oc.kind])} models, but "
                         f"--model.name={mc.name} is a {family} model (use --objective.kind={DEFAULT_OBJECTIVE[family]})")
    kw = dict(input_size=mc.input_size, in_channels=mc.in_channels, num_classes=mc.num_classes,
              class_dropout_prob=mc.class_dropout_prob)
    for key in ("learn_sigma", "depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(mc, key) is not None:
            kw[key] = getattr(mc, key)
    if family in ("mdtv2", "mdtv1"):
        kw["mask_ratio"] = oc.mask_ratio  # makes the mask token trainable
    elif family == "maskdit":
        kw["mask_ratio"] = oc.mask_ratio
        kw["mae_loss_coef"] = oc.mae_loss_coef
    elif family == "repa_sit":
        kw["path_type"] = "linear"
        if oc.encoder == "patches":
            patch = kw.get("patch_size", MODEL_CONFIGS[mc.name][1].get("patch_size", 2))
            kw["z_dims"] = [patch * patch * mc.in_channels]
    kw.update(mc.extra)
    return mc.name, kw


def build_model_from_config(cfg) -> nn.Module:
    from masked_dit.models import build_model

    name, kw = model_kwargs(cfg)
    try:
        model = build_model(name, **kw)
    except TypeError as exc:  # an unknown --model.extra key
        raise ValueError(f"cannot build {name} with {kw}: {exc}") from None
    return model
