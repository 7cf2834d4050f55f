"""Log-likelihood of data under a SiT model's probability flow (SiT's ``Sampler.sample_ode_likelihood``).

The flow dx/dt = v(x, t) maps data (t1) to noise (t0); by the instantaneous change of variables

    log p(x) = log N(z; 0, I) - delta,    delta = integral over [t0, t1] of div v(x(t), t) dt,

with z the state at t0. ``div v`` is Hutchinson's estimate eps^T (dv/dx) eps with one Rademacher eps
per function evaluation (one vector-Jacobian product), as SiT does; it is exact when dv/dx is diagonal.

The integration runs on one packed state [B, N + 1] (x flattened, then the running delta) with the
error norm torchdiffeq uses for SiT's (x, logp) tuple: the larger of the two parts' RMS. So the
adaptive steps are SiT's, on torchdiffeq or on the native dopri5.

Deviation from SiT, as ``sample_ode(reverse=True)``: the data end is the sampling interval's t1. For
Linear/GVP that is SiT's interval; for VP, SiT integrates model times [eps, 1], where a score or noise
model is NaN at t = 1 (sigma_t = 0); here VP runs over [0, 1 - eps].
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from masked_dit import rng

from .ode import _rms_norm, batch_time, integrate_ode, time_grid
from .transport import ModelFn, Transport


def prior_logp(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample [B] (SiT's ``Transport.prior_logp``)."""
    n = z[0].numel()
    return -0.5 * n * math.log(2 * math.pi) - 0.5 * z.flatten(1).pow(2).sum(1)


def ode_likelihood(transport: Transport, model_fn: ModelFn, x: torch.Tensor, *, method: str = "dopri5",
                   num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3, model_kwargs: Optional[dict] = None,
                   backend: str = "auto", generator: Optional[torch.Generator] = None,
                   progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(x) [B] in nats, z): the model's log-likelihood of data x and the noise the flow maps it to.

    ``model_fn(x, t [B], **model_kwargs)`` returns the raw output (velocity, score or noise as the
    transport predicts); SiT's defaults (dopri5, 50 points, atol 1e-6, rtol 1e-3). The Hutchinson
    draws come from ``generator`` (the global RNG without one: then the draws, like SiT's, follow
    ``torch.manual_seed``). Bits per dimension: ``-logp / (x[0].numel() * ln 2)`` plus the data's
    dequantisation and scaling terms. Runs with gradients of the state only (no parameter grads).
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...], got shape {list(x.shape)}")
    shape, n = x.shape, x[0].numel()
    t0, t1 = transport.interval(eval=True)

    def drift(t: float, state: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            y = state[:, :n].detach().reshape(shape).requires_grad_(True)
            eps = rng.randint(2, y.shape, device=y.device, generator=generator).to(y.dtype) * 2 - 1
            tb = batch_time(t, y)
            v = transport.velocity(model_fn(y, tb, **model_kwargs), y, tb)
            (vjp,) = torch.autograd.grad((v * eps).sum(), y)
        div = (vjp * eps).flatten(1).sum(1)
        # Time runs t1 -> t0, so the packed delta integrates -div v to reach + integral over [t0, t1].
        return torch.cat([v.detach().flatten(1), -div[:, None]], dim=1)

    def mixed_norm(err: torch.Tensor) -> torch.Tensor:
        return torch.maximum(_rms_norm(err[:, :n]), _rms_norm(err[:, n:]))

    start = torch.cat([x.flatten(1), x.new_zeros(x.shape[0], 1)], dim=1)
    with torch.no_grad():
        end = integrate_ode(drift, start, time_grid(t1, t0, num_steps), method, atol, rtol, backend, progress,
                            norm=mixed_norm, keep_all=False)[-1]
    z, delta = end[:, :n].reshape(shape), end[:, n]
    return prior_logp(z) - delta, z
