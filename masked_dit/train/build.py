"""Config -> model: the constructor arguments a ``ModelConfig`` (and its objective) imply."""
from __future__ import annotations

import dataclasses
import json

import torch.nn as nn

from masked_dit.configs import FAMILY_SAMPLE_KEYS, ConfigError, SampleConfig
from masked_dit.diffusion.objectives import DEFAULT_OBJECTIVE, FAMILIES, SAMPLERS
from masked_dit.diffusion.sample_settings import check_family_sampling, check_sample_steps
from masked_dit.diffusion.repa import repa_path_name


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
        kw["path_type"] = repa_path_name(oc.path_type)
        patch = kw.get("patch_size", MODEL_CONFIGS[mc.name][1].get("patch_size", 2))
        if oc.encoder == "patches":
            kw["z_dims"] = [patch * patch * mc.in_channels]
        elif oc.encoder != "none":
            if cfg.data.source == "latents":
                raise ValueError(f"--objective.encoder={oc.encoder} encodes raw images, which --data.source=latents "
                                 "lacks: cache them with `masked-dit extract-features <images> <latents> --encoder "
                                 f"{oc.encoder}`, then train with --data.features=<name> --objective.encoder=none")
            kw["z_dims"] = encoder_z_dims(oc.encoder)
        elif cfg.data.features:
            kw["z_dims"] = cached_feature_dims(cfg.data, mc.input_size // patch)
    check_extra(mc, kw)
    kw.update(mc.extra)
    return mc.name, kw


# constructor arguments that model_kwargs takes from options outside --model
_SET_BY = {"mask_ratio": "--objective.mask_ratio", "mae_loss_coef": "--objective.mae_loss_coef",
           "path_type": "--objective.path_type", "z_dims": "--objective.encoder / --data.features"}


def check_extra(mc, kw: dict) -> None:
    """--model.extra holds only arguments no option sets: one that does would silently win over the
    option (config.json saying otherwise) and skip the option's checks (digits' num_classes)."""
    typed = {f.name: f"--model.{f.name}" for f in dataclasses.fields(mc) if f.name != "extra"}
    typed.update({k: _SET_BY[k] for k in kw if k in _SET_BY})
    clash = [k for k in mc.extra if k in typed]
    if clash:
        raise ConfigError(f"--model.extra={json.dumps(mc.extra)} sets {', '.join(clash)}, which "
                          f"{'has its own option' if len(clash) == 1 else 'have their own options'}: use "
                          f"{', '.join(typed[k] for k in clash)} instead")


def check_sampler(cfg) -> None:
    """Before training: a sampler the objective lacks (or a step count its respacing cannot make) would
    otherwise stop the run at its first grid."""
    sampler, kind = cfg.sample.sampler, cfg.objective.kind
    if sampler != "auto" and sampler not in SAMPLERS[kind]:
        raise ValueError(f"--sample.sampler={sampler} does not apply to --objective.kind={kind}; choose one of: "
                         f"auto, {', '.join(SAMPLERS[kind])}")
    check_sample_steps(kind, sampler, cfg.sample.steps, cfg.objective.diffusion_steps,
                       f"--sample.steps={cfg.sample.steps}")
    keys = FAMILY_SAMPLE_KEYS.get(kind, ())
    check_family_sampling(cfg.objective, sampler, cfg.sample.steps, {k: getattr(cfg.sample, k) for k in keys},
                          [k for k in keys if getattr(cfg.sample, k) != getattr(SampleConfig, k)],
                          lambda key: f"--sample.{key}={getattr(cfg.sample, key)}")


def encoder_z_dims(specs: str) -> list[int]:
    """Feature widths of comma-separated DINOv2 specs without loading weights: REPA names from
    their table, timm names from the architecture, folders and hub ids from their config.json."""
    from masked_dit.data.encoders import DINOV2_SIZES, encoder_z_dim, resolve_encoder

    dims = []
    for spec in (s.strip() for s in specs.split(",") if s.strip()):
        try:
            dims.append(encoder_z_dim(spec))  # dinov2-vit-b style
            continue
        except ValueError:
            pass
        backend, source = resolve_encoder(spec)
        if backend == "timm":
            dims.append(next(z for _, arch, z in DINOV2_SIZES.values() if source.startswith(arch + "_")))
            continue
        from transformers import AutoConfig

        try:
            dims.append(int(AutoConfig.from_pretrained(source).hidden_size))
        except OSError as exc:
            raise OSError(f"cannot read the config of encoder {spec!r} ({exc}); without internet pass a local "
                          "save_pretrained folder") from exc
    return dims


def cached_feature_dims(data_cfg, token_grid: int) -> list[int]:
    """Feature widths of the ``--data.features`` caches, checked against the model's token grid."""
    from masked_dit.data import feature_dirs
    from masked_dit.data.encoders import EncoderFeatureDataset

    dims = []
    for d in feature_dirs(data_cfg):
        tokens, z_dim = EncoderFeatureDataset(d).feature_shape
        if tokens != token_grid ** 2:
            raise ValueError(f"features in {str(d)!r} hold {tokens} tokens per image but the model has "
                             f"{token_grid}x{token_grid} tokens: re-extract them with `masked-dit extract-features "
                             f"... --token-grid={token_grid} --name=<new name>`")
        dims.append(int(z_dim))
    return dims


def build_model_from_config(cfg) -> nn.Module:
    from masked_dit.models import build_model
    from masked_dit.models.official import error_line

    name, kw = model_kwargs(cfg)
    try:
        return build_model(name, **kw)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. an unknown key or a bad value in --model.extra
        extra = f" and --model.extra={json.dumps(cfg.model.extra)}" if cfg.model.extra else ""
        raise ValueError(f"cannot build {name} with {kw} (from the --model options{extra}): "
                         f"{type(exc).__name__}: {error_line(exc)}") from None
