"""REPA's interpolant loss (denoising + representation alignment) and its samplers.

REPA (sihyun-yu/REPA) reverses SiT's time: **t = 0 is data, t = 1 is noise**,

    x_t = (1 - t) * x + t * eps,       target v = eps - x      (linear path)
    x_t = cos(pi t / 2) x + sin(pi t / 2) eps                   (cosine path)

so with s = 1 - t the two conventions describe the same path and

    v_REPA(x, t) = -v_SiT(x, 1 - t).

``repa_to_sit_model`` / ``sit_to_repa_model`` wrap a model from one convention into the other, e.g.
to sample a REPA checkpoint with the SiT ODE/SDE samplers (``Transport("Linear", "velocity")``).

REPA models return ``(output, zs_tilde)``: the prediction and the projector outputs, one [B, T, D_k]
tensor per encoder. The samplers take ``output`` (element 0) and also accept plain-tensor models.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from masked_dit import rng

from .guidance import cfg_combine, in_guidance_interval
from .ode import progress_bar
from .sde import draw_noise
from .transport import ModelFn, expand_t_like_x, mean_flat

REPA_PATHS = ("linear", "cosine")
REPA_WEIGHTINGS = ("uniform", "lognormal")
# SiT's names of REPA's two paths (the config's --objective.path_type is SiT's: one field for both)
_SIT_NAMES = {"Linear": "linear", "GVP": "cosine"}


def repa_path_name(path_type: str) -> str:
    """REPA's name of a path given by SiT's name (Linear, GVP) or REPA's own (linear, cosine)."""
    name = _SIT_NAMES.get(path_type, path_type)
    if name not in REPA_PATHS:
        raise ValueError(f"REPA's paths are Linear (its 'linear') and GVP (its 'cosine'), not {path_type!r}")
    return name


def sit_path_name(path_type: str) -> str:
    """SiT's name (Linear, GVP) of a REPA path given by either name: the same interpolant, time reversed."""
    return {repa: sit for sit, repa in _SIT_NAMES.items()}[repa_path_name(path_type)]


def repa_interpolant(t: torch.Tensor, path_type: str = "linear"):
    """(alpha_t, sigma_t, d_alpha_t, d_sigma_t) with x_t = alpha_t x + sigma_t eps (REPA time)."""
    if path_type == "linear":
        return 1 - t, t, -1.0, 1.0
    if path_type == "cosine":
        return (torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2),
                -math.pi / 2 * torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2))
    raise ValueError(f"unknown REPA path_type {path_type!r}; expected one of {REPA_PATHS}")


#################################################################################
#                          SiT <-> REPA time conventions                        #
#################################################################################

def _prediction(out):
    """REPA models return (prediction, zs); plain models return the prediction."""
    return out[0] if isinstance(out, (tuple, list)) else out


def repa_to_sit_model(model_fn: ModelFn) -> ModelFn:
    """SiT-convention velocity model from a REPA one: v_SiT(x, s) = -v_REPA(x, 1 - s)."""
    def sit_model(x, t, **kwargs):
        return -_prediction(model_fn(x, 1 - t, **kwargs))
    return sit_model


def sit_to_repa_model(model_fn: ModelFn) -> ModelFn:
    """REPA-convention velocity model from a SiT one: v_REPA(x, t) = -v_SiT(x, 1 - t)."""
    def repa_model(x, t, **kwargs):
        return -_prediction(model_fn(x, 1 - t, **kwargs))
    return repa_model


#################################################################################
#                                      Loss                                     #
#################################################################################

def projection_loss(zs: Sequence[torch.Tensor], zs_tilde: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over encoders, samples and tokens of -cos(z_tilde, z) (REPA's proj_loss, a scalar).

    Both sides are normalised in float32 or wider: REPA normalises in the autocast dtype and fp16
    under/overflows to NaN (REPA issue #46).
    """
    if len(zs) != len(zs_tilde) or len(zs) == 0:
        raise ValueError(f"need one projector output per encoder feature, got {len(zs_tilde)} and {len(zs)}")
    total = 0.0
    for k, (z, z_tilde) in enumerate(zip(zs, zs_tilde)):
        if z.shape != z_tilde.shape or z.dim() != 3:
            raise ValueError(f"encoder {k}: feature {list(z.shape)} and projector output {list(z_tilde.shape)} "
                             "must both be [B, T, D]")
        dtype = torch.promote_types(torch.promote_types(z.dtype, z_tilde.dtype), torch.float32)
        cos = (F.normalize(z.to(dtype), dim=-1) * F.normalize(z_tilde.to(dtype), dim=-1)).sum(dim=-1)
        total = total + (-cos).mean()
    return total / len(zs)


def sample_repa_time(batch: int, device, dtype, weighting: str = "uniform", path_type: str = "linear",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Training times [B, 1, 1, 1]: uniform, or EDM's log-normal sigma mapped onto the path."""
    if weighting == "uniform":
        return rng.rand((batch, 1, 1, 1), generator=generator, device=device, dtype=dtype)
    if weighting == "lognormal":
        sigma = rng.randn((batch, 1, 1, 1), generator=generator, device=device, dtype=dtype).exp()
        if path_type == "linear":
            return sigma / (1 + sigma)
        if path_type == "cosine":
            return 2 / math.pi * torch.atan(sigma)
        raise ValueError(f"unknown REPA path_type {path_type!r}; expected one of {REPA_PATHS}")
    raise ValueError(f"unknown REPA weighting {weighting!r}; expected one of {REPA_WEIGHTINGS}")


def repa_training_losses(model_fn: ModelFn, x: torch.Tensor, zs: Sequence[torch.Tensor],
                         t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                         generator: Optional[torch.Generator] = None, model_kwargs: Optional[dict] = None,
                         path_type: str = "linear", weighting: str = "uniform",
                         proj_coeff: float = 0.5) -> dict:
    """REPA's SILoss with velocity prediction, plus the total loss of REPA's train.py.

    ``model_fn(x_t, t [B], **model_kwargs)`` must return (v_pred, zs_tilde). t ([B] or [B, 1, 1, 1])
    and noise may be given, else drawn (time first, then noise, as REPA). Returns
    {"denoising_loss" [B], "proj_loss" scalar, "loss" = mean(denoising) + proj_coeff * proj_loss,
    "pred", "zs_tilde", "t" [B, 1, 1, 1]}.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    B = x.shape[0]
    t_dtype = torch.promote_types(x.dtype, torch.float32)  # never draw times in bf16/fp16
    if t is None:
        t = sample_repa_time(B, x.device, t_dtype, weighting, path_type, generator)
    if t.numel() != B:
        raise ValueError(f"t must hold one time per sample ({B}), got shape {list(t.shape)}")
    t = expand_t_like_x(t.reshape(B), x).to(t_dtype)
    if noise is None:
        noise = rng.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the data's shape {list(x.shape)}, got {list(noise.shape)}")
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = repa_interpolant(t, path_type)
    x_t = alpha_t * x + sigma_t * noise
    target = d_alpha_t * x + d_sigma_t * noise
    out = model_fn(x_t, t.flatten(), **model_kwargs)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError("REPA model_fn must return (prediction, zs_tilde)")
    pred, zs_tilde = out
    if pred.shape != x.shape:
        raise ValueError(f"model output shape {list(pred.shape)} does not match input shape {list(x.shape)}")
    denoising_loss = mean_flat((pred - target) ** 2)
    proj_loss = projection_loss(zs, zs_tilde)
    return {"denoising_loss": denoising_loss, "proj_loss": proj_loss,
            "loss": denoising_loss.mean() + proj_coeff * proj_loss,
            "pred": pred, "zs_tilde": zs_tilde, "t": t}


#################################################################################
#                                    Samplers                                   #
#################################################################################
# REPA integrates from t = 1 (noise) to t = 0 in float64 whatever the latents' dtype, calling the
# model in the latents' dtype. Classifier-free guidance doubles the batch with the null label
# (``null_label``, 1000 for ImageNet) and mixes uncond + scale * (cond - uncond) on all channels,
# only while guidance_low <= t <= guidance_high (the guidance interval; REPA's best FID uses
# scale 1.8 on [0, 0.7]). Times are Python floats: no host sync per step.

def _guided(t: float, cfg_scale: float, guidance_low: float, guidance_high: float) -> bool:
    """Whether CFG runs at time t (a scale <= 1 means no guidance and no doubled batch)."""
    return cfg_scale > 1.0 and in_guidance_interval(t, guidance_low, guidance_high)


def _guided_velocity(model_fn, x, t, y, y_null, guided, model_dtype, model_kwargs):
    """float64 velocity at (x, t), guided when ``guided``."""
    if guided:
        x_in, y_in = torch.cat([x, x]), torch.cat([y, y_null])
    else:
        x_in, y_in = x, y
    t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
    v = _prediction(model_fn(x_in.to(model_dtype), t_in.to(model_dtype), y=y_in, **model_kwargs)).to(torch.float64)
    return x_in, v


def _cfg(v: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Guide a [cond; uncond] batch on all channels (REPA)."""
    return cfg_combine(*v.chunk(2), cfg_scale)


def _check_num_steps(num_steps) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1 (got {num_steps!r})")


def repa_euler_sampler(model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, *, num_steps: int = 20,
                       heun: bool = False, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                       guidance_high: float = 1.0, null_label: int = 1000, model_kwargs: Optional[dict] = None,
                       progress: bool = False) -> torch.Tensor:
    """REPA's ``euler_sampler``: ODE Euler (or Heun) from t = 1 to 0 in ``num_steps`` steps.

    Heun adds a corrector at t_next on every step but the last (which lands on t = 0); the
    corrector's guidance decision uses t_cur, as in REPA. Returns float64 samples (like REPA).
    """
    _check_num_steps(num_steps)
    model_kwargs = {} if model_kwargs is None else model_kwargs
    model_dtype = latents.dtype
    y_null = torch.full_like(y, null_label)
    times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = latents.to(torch.float64)
    with torch.no_grad():
        for i in progress_bar(range(num_steps), progress, "REPA Heun" if heun else "REPA Euler"):
            t_cur, t_next = times[i], times[i + 1]
            guided = _guided(t_cur, cfg_scale, guidance_low, guidance_high)
            _, d_cur = _guided_velocity(model_fn, x, t_cur, y, y_null, guided, model_dtype, model_kwargs)
            if guided:
                d_cur = _cfg(d_cur, cfg_scale)
            x_next = x + (t_next - t_cur) * d_cur
            if heun and i < num_steps - 1:
                _, d_prime = _guided_velocity(model_fn, x_next, t_next, y, y_null, guided, model_dtype, model_kwargs)
                if guided:
                    d_prime = _cfg(d_prime, cfg_scale)
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            x = x_next
    return x


def repa_euler_maruyama_sampler(model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, *, num_steps: int = 20,
                                cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                                path_type: str = "linear", null_label: int = 1000,
                                noise: Optional[Sequence[torch.Tensor]] = None,
                                generator: Optional[torch.Generator] = None, model_kwargs: Optional[dict] = None,
                                progress: bool = False) -> torch.Tensor:
    """REPA's ``euler_maruyama_sampler`` (its evaluation sampler, 250 steps for FID 1.42).

    Times: linspace(1, 0.04, num_steps) then 0. The first ``num_steps - 1`` steps follow the SDE
    dx = [v - (D/2) score] dt + sqrt(D) dW with D(t) = 2t (guidance mixes this drift); the last step
    from 0.04 to 0 takes the drift only. noise: optional ``num_steps - 1`` draws shaped like latents.
    """
    _check_num_steps(num_steps)
    if noise is not None and len(noise) != num_steps - 1:
        raise ValueError(f"noise must hold num_steps - 1 = {num_steps - 1} draws, got {len(noise)}")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    model_dtype = latents.dtype
    y_null = torch.full_like(y, null_label)
    times = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = latents.to(torch.float64)

    def drift(x, t):
        guided = _guided(t, cfg_scale, guidance_low, guidance_high)
        x_in, v = _guided_velocity(model_fn, x, t, y, y_null, guided, model_dtype, model_kwargs)
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
        score = _repa_score_from_velocity(v, x_in, t_in, path_type)
        d = v - 0.5 * (2 * t) * score
        return _cfg(d, cfg_scale) if guided else d

    with torch.no_grad():
        for i in progress_bar(range(num_steps - 1), progress, "REPA Euler-Maruyama"):
            t_cur, t_next = times[i], times[i + 1]
            dt = t_next - t_cur
            eps = draw_noise(noise, i, x, generator)
            x = x + drift(x, t_cur) * dt + math.sqrt(2 * t_cur) * (eps * math.sqrt(abs(dt)))
        x = x + (times[-1] - times[-2]) * drift(x, times[-2])
    return x


def _repa_score_from_velocity(v, x, t, path_type):
    """Score of x_t from a REPA-convention velocity (same algebra as SiT's, reversed time)."""
    t = expand_t_like_x(t, x)
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = repa_interpolant(t, path_type)
    reverse_ratio = alpha_t / d_alpha_t
    var = sigma_t ** 2 - reverse_ratio * d_sigma_t * sigma_t
    return (reverse_ratio * v - x) / var
