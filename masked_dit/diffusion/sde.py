"""Reverse-time SDE samplers for SiT transports (Euler-Maruyama and Heun), as SiT's ``sample_sde``.

    dx = [v(x, t) + D(t) * score(x, t)] dt + sqrt(2 D(t)) dW,     t from t0 (noise) to t1 (data),

with D(t) one of ``DIFFUSION_FORMS`` times ``diffusion_norm``. The grid is
torch.linspace(t0, t1, num_steps) with t1 = 1 - last_step_size, so there are ``num_steps - 1``
stochastic steps (one Gaussian draw each) and one deterministic last step from t1:

* "Mean":    x + (v + D * score) * last_step_size     (SiT's default)
* "Tweedie": x / alpha + sigma^2 / alpha * score        (the posterior mean of the data)
* "Euler":   x + v * last_step_size
* None:      x unchanged (and then no last step is reserved: t1 is the usual end time)

Each model evaluation yields both v and score (SiT calls the model twice for them; the result is
the same). Times are Python floats, so no step synchronises the host with the GPU.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from masked_dit import rng

from .ode import batch_time, progress_bar, time_grid
from .transport import ModelFn, Transport, diffusion_form_name

SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


def draw_noise(noise: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]], i: int, like: torch.Tensor,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """The Gaussian draw for step i: ``noise[i]`` if given, else from ``generator``."""
    if noise is not None:
        w = noise[i]
        if w.shape != like.shape:
            raise ValueError(f"noise[{i}] has shape {list(w.shape)}, expected {list(like.shape)}")
        return w.to(device=like.device, dtype=like.dtype)
    return rng.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def sde_interval(transport: Transport, method: str, diffusion_form: str, last_step: Optional[str],
                 last_step_size: float):
    """(t0, t1, ends_on_data) of an SDE run, after one-line checks of its options (no model needed, so
    a trainer or CLI can check before the first sample)."""
    if method not in SDE_METHODS:
        raise ValueError(f"unknown SDE method {method!r}; expected one of {SDE_METHODS}")
    diffusion_form_name(diffusion_form)  # one-line error for an unknown form (SiT's spelling accepted)
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; expected one of {LAST_STEPS}")
    if last_step is None:
        last_step_size = 0.0
    t0, t1 = transport.interval(sde=True, eval=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
    # sigma_t1 = 0 (a Linear velocity model ending at t = 1): the score is 0/0 at t1.
    ends_on_data = float(transport.path.sigma(torch.tensor(t1, dtype=torch.float64))[0]) == 0.0
    if method == "Heun" and ends_on_data:
        # Heun's corrector evaluates the drift at t1; where sigma_t1 = 0 (Linear velocity model with
        # last_step=None) the score is 0/0 and SiT returns NaN samples.
        raise ValueError(f"sample_sde: method='Heun' with last_step={last_step!r} ends at t={t1}, where sigma_t = 0 "
                         f"makes the score of a {transport.path.name} {transport.prediction} model singular; use "
                         f"last_step='Mean' (SiT's default) or method='Euler'")
    return t0, t1, ends_on_data


def sample_sde(transport: Transport, model_fn: ModelFn, x: torch.Tensor, *, method: str = "Euler",
               diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step: Optional[str] = "Mean",
               last_step_size: float = 0.04, num_steps: int = 250,
               noise: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
               generator: Optional[torch.Generator] = None, model_kwargs: Optional[dict] = None,
               progress: bool = False, return_trajectory: bool = False):
    """SiT SDE sampling from noise x; returns the final sample (or all ``num_steps`` states).

    noise: optional per-step Gaussian draws, ``num_steps - 1`` tensors shaped like x (a list or a
    stacked tensor); otherwise they are drawn with ``generator``. SiT's SBDM form starts at
    t0 = sample_eps, which is 0 for Linear/GVP velocity models, where D(0) is infinite (NaN samples);
    those start at ``SBDM_VELOCITY_T0`` = 1e-3 here. The state is carried in float32 at least (a bf16
    x comes back as float32).
    """
    if noise is not None and len(noise) != num_steps - 1:
        raise ValueError(f"noise must hold num_steps - 1 = {num_steps - 1} draws, got {len(noise)}")
    t0, t1, ends_on_data = sde_interval(transport, method, diffusion_form, last_step, last_step_size)
    if last_step is None:
        last_step_size = 0.0
    model_kwargs = {} if model_kwargs is None else model_kwargs
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    path = transport.path
    times = time_grid(t0, t1, num_steps)
    dt = times[1] - times[0]
    sqrt_dt = math.sqrt(dt)

    def velocity_and_score(y, tb):
        out = model_fn(y, tb, **model_kwargs)
        return transport.velocity(out, y, tb), transport.score(out, y, tb)

    def sde_drift(y, tb):
        v, s = velocity_and_score(y, tb)
        return v + path.diffusion(y, tb, diffusion_form, diffusion_norm) * s

    states = [x]
    with torch.no_grad():
        for i in progress_bar(range(num_steps - 1), progress, f"SDE {method}"):
            y, tb = states[-1], batch_time(times[i], states[-1])
            dw = draw_noise(noise, i, y, generator) * sqrt_dt
            diffusion = path.diffusion(y, tb, diffusion_form, diffusion_norm)
            if method == "Euler":
                y_mean = y + sde_drift(y, tb) * dt
                y = y_mean + torch.sqrt(2 * diffusion) * dw
            else:  # Heun: noise first, then a trapezoid step of the drift (SiT's order)
                y_hat = y + torch.sqrt(2 * diffusion) * dw
                k1 = sde_drift(y_hat, tb)
                k2 = sde_drift(y_hat + dt * k1, batch_time(times[i] + dt, y))
                y = y_hat + 0.5 * dt * (k1 + k2)
            states.append(y)
            if not return_trajectory:  # only the last state is returned: hold no others
                del states[:-1]

        y, tb = states[-1], batch_time(t1, states[-1])
        if last_step in ("Mean", "Euler") and last_step_size == 0:
            pass  # a step of size 0 is the identity; SiT evaluates the drift anyway (NaN where sigma_t1 = 0)
        elif last_step == "Mean":
            y = y + sde_drift(y, tb) * last_step_size
        elif last_step == "Euler":
            y = y + velocity_and_score(y, tb)[0] * last_step_size
        elif last_step == "Tweedie":
            tx = tb.reshape(-1, *([1] * (y.dim() - 1)))
            alpha_t, sigma_t = path.alpha(tx)[0], path.sigma(tx)[0]
            if ends_on_data:  # sigma^2 * score -> 0 at sigma = 0 (SiT computes 0 * NaN)
                y = y / alpha_t
            else:
                y = y / alpha_t + sigma_t ** 2 / alpha_t * velocity_and_score(y, tb)[1]
        states.append(y)
    # SiT returns num_steps states: the stochastic ones and the last step (not the initial noise).
    return torch.stack(states[1:]) if return_trajectory else states[-1]
