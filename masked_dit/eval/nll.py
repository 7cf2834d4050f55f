"""Bits per dimension of data under a SiT (or REPA-SiT) model: SiT's ``sample.py ODE --likelihood``, from data.

SiT's sample scripts hand the likelihood ODE their sampling noise in place of images, so the number
they get measures nothing. Here the flow starts from data, as the change of variables needs: the run's
held-out digits, or the first images / latents of its training data. The figure is the continuous
density of the model's inputs (pixels in [-1, 1], or VAE latents times ``latent_scale``):
-log p(x) / (D ln 2). A likelihood of discrete 8-bit images needs dequantisation terms on top.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch


def likelihood_data(data_cfg, model_cfg, split: Optional[str], num: Optional[int], seed: int):
    """(x [N, C, H, W] float32, y [N] int64, what): the first ``num`` items of the run's data; digits
    from ``split`` (default held out), latents with one posterior draw each (seeded by ``seed``)."""
    from masked_dit.data import DigitsDataset, build_dataset, sample_posterior

    if data_cfg.source == "digits":
        split = split or "heldout"
        ds = DigitsDataset(split, data_cfg.image_size)
        what = f"{split} digits"
    elif split is not None:
        raise ValueError(f"--split {split}: splits are the embedded digits'; this run's data is "
                         f"--data.source={data_cfg.source} (its first --num-samples items are used)")
    else:  # items are read unflipped and without REPA's features: neither setting applies
        ds = build_dataset(dataclasses.replace(data_cfg, random_flip=False, features=None), model_cfg)
        what = f"{data_cfg.source} {data_cfg.path}"
    n = len(ds) if num is None else min(num, len(ds))
    if n == 0:
        raise ValueError(f"{what}: no items to score")
    batch = torch.utils.data.default_collate([ds[i] for i in range(n)])
    if "mean" in batch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            batch = sample_posterior(batch, data_cfg.latent_scale)
    return batch["x"].float(), batch["y"].long(), what


def probability_flow(objective, model):
    """(SiT ``Transport``, model in SiT's convention) of a SiT or REPA objective's probability flow:
    REPA's linear / cosine paths are SiT's Linear / GVP with time reversed (t = 0 data there)."""
    from masked_dit.diffusion.repa import repa_to_sit_model
    from masked_dit.diffusion.transport import Transport

    if objective.kind == "transport":
        return objective.transport, model
    if objective.kind == "repa":
        return Transport({"linear": "Linear", "cosine": "GVP"}[objective.path_type], "velocity"), \
            repa_to_sit_model(model)
    raise ValueError(f"the probability-flow likelihood needs an interpolant model (objective transport or repa), "
                     f"not {objective.kind}")


def bits_per_dim(objective, model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 64,
                 method: str = "dopri5", steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3, seed: int = 0,
                 progress: bool = False) -> dict:
    """Per-sample log-likelihoods of ``x`` (on the model's device, in batches) and their summary:
    mean bits/dim with its standard error, mean NLL in nats. Hutchinson draws come from one
    generator seeded with ``seed``, so a re-run gives the same figures."""
    from masked_dit.diffusion.likelihood import ode_likelihood

    device = next(model.parameters()).device
    transport, flow_model = probability_flow(objective, model)
    generator = torch.Generator(device).manual_seed(seed)
    dims = x[0].numel()
    logps = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logp, _ = ode_likelihood(transport, flow_model, xb, method=method, num_steps=steps, atol=atol,
                                 rtol=rtol, model_kwargs={"y": yb}, generator=generator, progress=progress)
        logps.append(logp.double().cpu())
    logp = torch.cat(logps)
    if not torch.isfinite(logp).all():
        raise FloatingPointError(f"{int((~torch.isfinite(logp)).sum())} of {len(logp)} log-likelihoods are not "
                                 f"finite (the ODE diverged): try --ode-method dopri5 with a smaller --rtol")
    bpd = -logp / (dims * math.log(2))
    stderr = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else None  # JSON has no NaN
    return {"bits_per_dim": bpd.mean().item(), "bits_per_dim_stderr": stderr, "nll_nats": -logp.mean().item(),
            "num": len(bpd), "dims": dims, "per_sample_bits_per_dim": bpd.tolist()}
