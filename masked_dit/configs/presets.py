"""Named presets: the papers' ImageNet-256 recipes and small runs of every family on digits.

A preset is a dict of ``section.key -> value`` applied over the defaults, so each one reads as
"what this recipe changes". ``digits-mdtv2`` is what ``masked-dit train`` runs with no arguments.
"""
from __future__ import annotations

#################################################################################
#                         Papers' recipes (ImageNet 256)                        #
#################################################################################

# Shared by every ImageNet-256 recipe: SD-VAE latents 32x32x4, 1000 classes, batch 256,
# EMA 0.9999, AdamW 1e-4 without weight decay (DiT/SiT/REPA/MDT/MaskDiT all agree on these).
# 4 loader workers per rank (DiT's train.py default): batches load while the GPU steps (with none, a
# REPA batch of 256 latents + DINOv2 features took ~0.1 s of the step on the host; CPU-measured).
_IMAGENET = {
    "model.input_size": 32, "model.in_channels": 4, "model.num_classes": 1000, "model.class_dropout_prob": 0.1,
    "data.source": "latents", "data.image_size": 256, "data.num_workers": 4,
    "optim.name": "adamw", "optim.lr": 1e-4, "optim.weight_decay": 0.0, "optim.ema_decay": 0.9999,
    "train.global_batch": 256, "train.log_every": 100, "train.ckpt_every": 50_000, "train.sample_every": 50_000,
}

_IMAGENET_RECIPES = {
    # DiT (Peebles & Xie): ADM diffusion with learned sigma, fp32, 7M steps (400K for the ablations);
    # sampled with 250 DDPM steps, cfg 1.5 on channels 0-2.
    "imagenet256-dit-xl2": {
        "model.name": "DiT-XL/2", "objective.kind": "adm", "train.steps": 7_000_000,
        "sample.sampler": "ddpm", "sample.steps": 250, "sample.cfg_scale": 1.5,
    },
    # SiT (Ma et al.): Linear interpolant, velocity prediction, 7M steps; SDE sampler 250 steps, cfg 1.5.
    "imagenet256-sit-xl2": {
        "model.name": "SiT-XL/2", "objective.kind": "transport", "objective.path_type": "Linear",
        "objective.prediction": "velocity", "train.steps": 7_000_000,
        "sample.sampler": "sde", "sample.steps": 250, "sample.cfg_scale": 1.5,
    },
    # REPA (Yu et al.): SiT-XL/2 + DINOv2-B alignment after block 8, lambda 0.5, grad clip 1,
    # sd-vae-ft-mse latents without flips, 4M steps; SDE 250 steps, cfg 1.8 in t <= 0.7.
    # DINOv2 features come with the batch (``zs``), cached beside the latents by `masked-dit extract-features
    # --encoder dinov2-vit-b` (exact: REPA trains without flips); --objective.encoder=dinov2-vit-b with
    # --data.source=folder encodes the images online instead, as REPA's train.py does.
    # REPA trains under accelerate's fp16 autocast (--mixed-precision fp16, its README and default) with TF32:
    # bf16 autocast here (no loss scaler needed; the projection loss is normalised in fp32, REPA #46).
    "imagenet256-repa-sit-xl2": {
        "model.name": "REPA-SiT-XL/2", "model.extra": {"encoder_depth": 8}, "objective.kind": "repa",
        "objective.proj_coeff": 0.5, "objective.encoder": "none", "optim.grad_clip": 1.0,
        "data.random_flip": False, "train.steps": 4_000_000, "parallel.precision": "bf16",
        "sample.sampler": "sde", "sample.steps": 250, "sample.cfg_scale": 1.8, "sample.guidance_high": 0.7,
    },
    # MDTv2 (Gao et al.): masked latent modelling, two passes per step, Min-SNR-5 weights,
    # Adan lr 3e-4 betas (0.98, 0.92, 0.99), grad clip 1 (by Adan's rule), fp32 without TF32 matmuls (MDT's
    # train_util sets no TF32 flag); cfg 3.8 with power-cosine(4).
    "imagenet256-mdtv2-xl2": {
        "model.name": "MDTv2-XL/2", "model.extra": {"decode_layer": 4}, "objective.kind": "mdtv2",
        "objective.mask_ratio": 0.3, "objective.mask_ratio_jitter": 0.2, "objective.min_snr_gamma": 5.0,
        "optim.name": "adan", "optim.lr": 3e-4, "optim.betas": (0.98, 0.92, 0.99), "optim.eps": 1e-8,
        "optim.grad_clip": 1.0, "train.steps": 4_600_000, "parallel.tf32": False,
        "sample.sampler": "ddpm", "sample.steps": 250, "sample.cfg_scale": 3.8,
    },
    # MaskDiT (Zheng et al.): EDM with 50% of patches removed, MAE loss 0.1, batch 1024, 2M steps,
    # mixed precision (its fp16 autocast as bf16; its config's tf32: False) + torch.compile; Heun 40 steps,
    # cfg 1.5 on all channels.
    # No flips: every MaskDiT config has train.xflip False (its dataset then skips the flipped latents).
    # Its lr ramp, lr * min(step * batch / max(lr_rampup_kimg * 1000, 1e-8), 1) with lr_rampup_kimg 0,
    # gives a fresh run's first step lr 0 (AdamW's moments take that gradient, the weights stay): not
    # reproduced, the lr is constant from the first step.
    "imagenet256-maskdit-xl2": {
        "model.name": "MaskDiT-XL/2", "objective.kind": "edm_maskdit", "objective.mask_ratio": 0.5,
        "objective.mae_loss_coef": 0.1, "train.global_batch": 1024, "train.steps": 2_000_000,
        "data.random_flip": False, "parallel.precision": "bf16", "parallel.tf32": False, "parallel.compile": True,
        "sample.sampler": "heun", "sample.steps": 40, "sample.cfg_scale": 1.5,
    },
    # MaskDiT's unmasking fine-tune: no masking, no MAE loss, lr 5e-5, from the masked run's model and EMA
    # weights with a fresh optimizer: --run.init_from=<the masked run folder or its checkpoint>. (The
    # official fine-tune runs fp32 + TF32 at batch 512 for up to 100K steps, keeping the best FID.)
    "imagenet256-maskdit-xl2-unmask": {
        "model.name": "MaskDiT-XL/2", "objective.kind": "edm_maskdit", "objective.mask_ratio": 0.0,
        "objective.mae_loss_coef": 0.0, "optim.lr": 5e-5, "train.global_batch": 1024, "train.steps": 37_500,
        "data.random_flip": False, "parallel.precision": "bf16", "parallel.compile": True,
        "sample.sampler": "heun", "sample.steps": 40, "sample.cfg_scale": 1.5,
    },
    # MaskDiT's other fine-tune (configs/finetune/imagenet256-latent-cos.yaml, whose "cos4" means cosine4): the
    # mask ratio falls from 0.5 to 0 as cos(pi x / 2)^4 over the run's steps, MAE loss kept; lr 5e-5, batch
    # 512, 100K steps, fp32 with TF32 (its amp: False, tf32: True), from the masked run (--run.init_from), as
    # the official config.
    "imagenet256-maskdit-xl2-unmask-cos": {
        "model.name": "MaskDiT-XL/2", "objective.kind": "edm_maskdit", "objective.mask_ratio": 0.5,
        "objective.mask_ratio_fn": "cosine4", "objective.mask_ratio_min": 0.0, "objective.mae_loss_coef": 0.1,
        "optim.lr": 5e-5, "train.global_batch": 512, "train.steps": 100_000,
        "data.random_flip": False, "parallel.precision": "fp32", "parallel.tf32": True, "parallel.compile": True,
        "sample.sampler": "heun", "sample.steps": 40, "sample.cfg_scale": 1.5,
    },
}

#################################################################################
#                          Small runs on embedded digits                        #
#################################################################################

# 16x16 grayscale digits in [-1, 1], patch 4 -> 16 tokens of 4x4 pixels; a ~1.3M-parameter model
# (width 96, depth 6): 2000 steps of batch 64 take ~5 minutes on two CPU cores (~0.15 s/step).
# Labels are learnt late in so short a run, so the grid uses a constant guidance scale of 4
# (scale_pow 0) rather than MDT's power-cosine ramp, which guides only the last, low-noise steps.
_DIGITS = {
    "model.input_size": 16, "model.in_channels": 1, "model.num_classes": 10, "model.class_dropout_prob": 0.1,
    "model.depth": 6, "model.hidden_size": 96, "model.num_heads": 4, "model.patch_size": 4,
    "data.source": "digits", "data.image_size": 16, "data.random_flip": False,  # flipped digits are other glyphs
    "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.0, "optim.ema_decay": 0.995,
    "optim.grad_clip": 1.0, "optim.warmup_steps": 50,
    "train.steps": 2000, "train.global_batch": 64, "train.log_every": 50, "train.sample_every": 100_000,
    "train.ckpt_every": 500, "train.keep_last": 2, "train.device": "auto",
    "sample.num_per_class": 8, "sample.cfg_scale": 4.0, "sample.scale_pow": 0.0,
}

_DIGITS_RECIPES = {
    "digits-mdtv2": {
        "model.name": "MDTv2-S/2", "model.extra": {"decode_layer": 2}, "objective.kind": "mdtv2",
        "optim.name": "adan", "optim.betas": (0.98, 0.92, 0.99), "optim.lr": 2e-3,  # 1e-3 is too slow for 2000 steps
        "sample.sampler": "ddpm", "sample.steps": 100,
    },
    "digits-dit": {"model.name": "DiT-S/2", "objective.kind": "adm", "sample.sampler": "ddpm", "sample.steps": 100},
    "digits-sit": {"model.name": "SiT-S/2", "objective.kind": "transport", "sample.sampler": "ode", "sample.steps": 50},
    "digits-repa-sit": {
        "model.name": "REPA-SiT-S/2", "model.extra": {"encoder_depth": 2, "projector_dim": 256},
        "objective.kind": "repa", "objective.encoder": "patches", "sample.sampler": "euler", "sample.steps": 50,
    },
    "digits-maskdit": {
        "model.name": "MaskDiT-S/2", "objective.kind": "edm_maskdit", "objective.mask_ratio": 0.5,
        "model.extra": {"decoder_hidden_size": 128, "decoder_depth": 2, "decoder_num_heads": 4},
        "sample.sampler": "heun", "sample.steps": 18,
    },
}


def _build() -> dict:
    presets = {}
    for name, recipe in _IMAGENET_RECIPES.items():
        presets[name] = {**_IMAGENET, **recipe, "run.name": name}
    for name, recipe in _DIGITS_RECIPES.items():
        presets[name] = {**_DIGITS, **recipe, "run.name": name}
    return presets


PRESETS: dict[str, dict] = _build()
DEFAULT_PRESET = "digits-mdtv2"


def get_preset(name: str = DEFAULT_PRESET):
    """The ``Config`` of a named preset."""
    from masked_dit.configs import Config, ConfigError, apply_overrides

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    cfg = apply_overrides(Config(), PRESETS[name])
    cfg.preset = name
    return cfg
