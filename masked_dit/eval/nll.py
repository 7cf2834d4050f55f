"""Bits per dimension of data under a SiT (or REPA-SiT) model: SiT's ``sample.py ODE --likelihood``, from data.

SiT's sample scripts hand the likelihood ODE their sampling noise in place of images, so the number
they get measures nothing. Here the flow starts from data, as the change of variables needs: the run's
held-out digits, or the first images / latents of its training data. The figure is the continuous
density of the model's inputs (pixels in [-1, 1], or VAE latents times ``latent_scale``):
-log p(x) / (D ln 2). A likelihood of discrete 8-bit images needs dequantisation terms on top.

Batch ``b``'s random draws (a latent's posterior sample, Hutchinson's vectors) come from its own
generator seeded with ``(seed, b)``, as ``masked-dit sample``'s batches: the figures are the same for
any number of torchrun ranks and across a resume, and finished batches wait in ``<out>.parts/``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from masked_dit.eval.generate import PartsFolder, batch_generator, run_batches


def likelihood_data(data_cfg, model_cfg, split: Optional[str]):
    """(dataset, what): the run's data as ``score_batches`` reads it (items ``{'x', 'y'}``, or a latent's
    ``{'mean', 'std', 'y'}``); digits from ``split`` (default held out)."""
    from masked_dit.data import DigitsDataset, build_dataset

    if data_cfg.source == "digits":
        split = split or "heldout"
        return DigitsDataset(split, data_cfg.image_size), f"{split} digits"
    if split is not None:
        raise ValueError(f"--split {split}: splits are the embedded digits'; this run's data is "
                         f"--data.source={data_cfg.source} (its first --num-samples items are used)")
    # items are read unflipped and without REPA's features: neither setting applies
    return build_dataset(dataclasses.replace(data_cfg, random_flip=False, features=None), model_cfg), \
        f"{data_cfg.source} {data_cfg.path}"


def probability_flow(objective, model):
    """(SiT ``Transport``, model in SiT's convention) of a SiT or REPA objective's probability flow:
    REPA's linear / cosine paths are SiT's Linear / GVP with time reversed (t = 0 data there)."""
    from masked_dit.diffusion.repa import repa_to_sit_model, sit_path_name
    from masked_dit.diffusion.transport import Transport

    if objective.kind == "transport":
        return objective.transport, model
    if objective.kind == "repa":
        return Transport(sit_path_name(objective.path_type), "velocity"), repa_to_sit_model(model)
    raise ValueError(f"the probability-flow likelihood needs an interpolant model (objective transport or repa), "
                     f"not {objective.kind}")


def _batch(dataset, start: int, stop: int, latent_scale: float, generator: torch.Generator):
    """Items [start, stop) as (x, y int64); latents get one posterior draw from ``generator``."""
    batch = torch.utils.data.default_collate([dataset[i] for i in range(start, stop)])
    if "mean" in batch:
        mean = batch["mean"]
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        batch["x"] = (mean + batch["std"] * noise) * latent_scale
    return batch["x"], batch["y"].long()


def score_batches(objective, model, dataset, num: int, *, batch_size: int = 64, latent_scale: float = 1.0,
                  method: str = "dopri5", steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3, seed: int = 0,
                  parts: Optional[PartsFolder] = None, world=None, progress: bool = False) -> Optional[torch.Tensor]:
    """log p [num] (nats, float64) of the first ``num`` items of ``dataset``. With ``world``, rank r takes
    batches r, r + size, ...; with ``parts``, each finished batch is kept there and skipped by a re-run.
    Returns the figures on rank 0 (None elsewhere)."""
    from masked_dit.diffusion.likelihood import ode_likelihood

    device = next(model.parameters()).device
    transport, flow_model = probability_flow(objective, model)
    num_batches = (num + batch_size - 1) // batch_size
    kept = {}

    def compute(b: int) -> None:
        g = batch_generator(seed, b, device)
        x, y = _batch(dataset, b * batch_size, min(num, (b + 1) * batch_size), latent_scale, g)
        logp, _ = ode_likelihood(transport, flow_model, x.to(device), method=method, num_steps=steps, atol=atol,
                                 rtol=rtol, model_kwargs={"y": y.to(device)}, generator=g)
        kept[b] = logp.double().cpu()
        if parts is not None:
            parts.write(b, kept[b].numpy(), y.numpy())

    if not run_batches(num_batches, compute, parts=parts, world=world, progress=progress, desc="likelihood"):
        return None
    logps = []
    for b in range(num_batches):
        if b in kept:
            logps.append(kept[b])
        else:  # done by another rank or an earlier run
            logps.append(torch.from_numpy(parts.read(b)[0]))
    return torch.cat(logps)


def summarize(logp: torch.Tensor, dims: int) -> dict:
    """Mean bits/dim with its standard error and the mean NLL in nats of per-sample log p (nats)."""
    if not torch.isfinite(logp).all():
        raise FloatingPointError(f"{int((~torch.isfinite(logp)).sum())} of {len(logp)} log-likelihoods are not "
                                 f"finite (the ODE diverged): try --ode-method dopri5 with a smaller --rtol")
    bpd = -logp / (dims * math.log(2))
    stderr = bpd.std().item() / math.sqrt(len(bpd)) if len(bpd) > 1 else None  # JSON has no NaN
    return {"bits_per_dim": bpd.mean().item(), "bits_per_dim_stderr": stderr, "nll_nats": -logp.mean().item(),
            "num": len(bpd), "dims": dims, "per_sample_bits_per_dim": bpd.tolist()}


def bits_per_dim(objective, model, x: torch.Tensor, y: torch.Tensor, **options) -> dict:
    """``summarize`` of ``score_batches`` over in-memory ``x`` [N, ...] and labels ``y`` [N]."""
    dataset = [{"x": xi, "y": yi} for xi, yi in zip(x, y)]
    return summarize(score_batches(objective, model, dataset, len(dataset), **options), x[0].numel())

