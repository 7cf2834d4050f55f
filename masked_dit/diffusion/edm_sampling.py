"""EDM's samplers (Karras et al. 2022) as MaskDiT's sample.py runs them.

One loop, ``edm_sampler``: with its defaults (Heun, the Karras grid, sigma(t) = t, s(t) = 1) it is EDM's
Algorithm 2 (MaskDiT's ``edm_sampler``); the other solver / discretization / schedule / scaling choices
are EDM's generalised ``ablation_sampler`` (Table 1 of the paper), which MaskDiT's ``--solver``,
``--discretization``, ``--schedule`` and ``--scaling`` select.

The whole time grid lives on the host as Python floats: the loop branches on floats, never on
tensors, so it neither syncs the device nor breaks a compiled model's graph.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .gaussian import _randn, _step_noise
from .guidance import ClassifierFreeGuidance

SOLVERS = ("heun", "euler")
DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm")   # where the noise levels of the grid sit
SCHEDULES = ("linear", "vp", "ve")               # sigma(t)
SCALINGS = ("none", "vp")                        # s(t)
VP_DEFAULT_BETAS = (19.1, 0.1)                   # (beta_d, beta_min) of EDM's VP defaults


class SamplerSettingError(ValueError):
    """A setting of EDM's sampler that cannot work; ``option`` names it (discretization, schedule,
    scaling, solver, sigma_min, num_steps), so a caller can spell it as its own command line does."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def _check_choice(option: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise SamplerSettingError(option, f"{option} {value!r} is not valid; choose one of: {', '.join(choices)}")


#################################################################################
#                          Noise-level grids (discretization)                   #
#################################################################################

def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (sigma_max^(1/rho) .. sigma_min^(1/rho))^rho, then a final 0: [num_steps + 1], float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if not (math.isfinite(rho) and rho > 0):  # 1 / rho below
        raise ValueError(f"rho must be a finite number > 0 (EDM: 7), got {rho}")
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    steps = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64)])


def vp_sigma(beta_d: float, beta_min: float) -> Callable[[float], float]:
    """The VP SDE's noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return lambda t: math.sqrt(math.expm1(0.5 * beta_d * t * t + beta_min * t))


def default_sigma_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """EDM's (sigma_min, sigma_max) for each discretization, used where the caller gives none."""
    _check_choice("discretization", discretization, DISCRETIZATIONS)
    if discretization == "vp":
        sigma = vp_sigma(*VP_DEFAULT_BETAS)
        return sigma(epsilon_s), sigma(1.0)
    return {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[discretization]


def vp_betas(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP process with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    beta_d = 2 * (math.log1p(sigma_min ** 2) / epsilon_s - math.log1p(sigma_max ** 2)) / (epsilon_s - 1)
    return beta_d, math.log1p(sigma_max ** 2) - 0.5 * beta_d


def iddpm_sigmas(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> list[float]:
    """iDDPM's cosine schedule as noise levels u_0 > ... > u_M = 0 (EDM's Table 1, with the alpha-bar
    ratio clipped at C_1).

    Computed with EDM's (and MaskDiT's) own tensor steps: alpha_bar(j) of an integer tensor j is float32
    in torch, and the float64 recursion divides by a 0-dim tensor (a multiply by its reciprocal). An
    all-float64 evaluation differs by up to 5e-4 (relative, at the smallest levels)."""
    return list(_iddpm_sigmas(M, C_1, C_2))


@functools.lru_cache(maxsize=8)
def _iddpm_sigmas(M: int, C_1: float, C_2: float) -> tuple[float, ...]:
    alpha_bar = lambda j: (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2  # noqa: E731  (float32, as EDM's)
    u = torch.zeros(M + 1, dtype=torch.float64)
    for j in torch.arange(M, 0, -1):  # M, ..., 1
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return tuple(u.tolist())


def noise_levels(num_steps: int, discretization: str = "edm", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, *, epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008,
                 M: int = 1000) -> list[float]:
    """The grid's ``num_steps`` noise levels, largest first (no final 0). A one-step grid is {sigma_max}
    (EDM's formulas divide 0 by 0 there)."""
    _check_choice("discretization", discretization, DISCRETIZATIONS)
    if num_steps < 1:
        raise SamplerSettingError("num_steps", f"num_steps must be >= 1, got {num_steps}")
    if not (0 < sigma_min <= sigma_max and math.isfinite(sigma_max)):
        raise SamplerSettingError("sigma_min", f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, "
                                  f"sigma_max={sigma_max}")
    frac = [i / max(num_steps - 1, 1) for i in range(num_steps)]
    if discretization == "edm":
        return karras_sigmas(num_steps, sigma_min, sigma_max, rho)[:-1].tolist()
    if discretization == "vp":
        beta_d, beta_min = vp_betas(sigma_min, sigma_max, epsilon_s)
        if not beta_min + beta_d > 0:  # sigma(t) peaks inside [epsilon_s, 1]: the levels would not decrease
            raise SamplerSettingError("discretization", f"the vp discretization cannot span sigma_min={sigma_min} .. "
                                      f"sigma_max={sigma_max}: its sigma(t) peaks above sigma_max inside "
                                      f"[epsilon_s, 1] (beta_d = {beta_d:.4g}); lower sigma_min or raise sigma_max")
        sigma = vp_sigma(beta_d, beta_min)
        return [sigma(1 + f * (epsilon_s - 1)) for f in frac]
    if discretization == "ve":
        return [math.sqrt(sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** f) for f in frac]
    u = [s for s in iddpm_sigmas(M, C_1, C_2) if sigma_min <= s <= sigma_max]
    if not u:
        raise SamplerSettingError("discretization", f"the iddpm discretization has no noise level in "
                                  f"[sigma_min={sigma_min}, sigma_max={sigma_max}]")
    # EDM's index ((len - 1) / (num_steps - 1)) * i, in that order: (len - 1) * (i / (num_steps - 1))
    # rounds differently where the product is near k + 0.5 and picks a neighbouring level (e.g. step
    # 29 of 59 on the default range). Ties go to the even index (round, as torch.round).
    stride = (len(u) - 1) / max(num_steps - 1, 1)
    return [u[round(stride * i)] for i in range(num_steps)]


#################################################################################
#                        Noise schedule sigma(t), scaling s(t)                  #
#################################################################################

@dataclass(frozen=True)
class TimeSchedule:
    """sigma(t) and s(t) with their derivatives, and sigma's inverse: x(t) = s(t) (y + sigma(t) n)."""

    sigma: Callable[[float], float]
    sigma_deriv: Callable[[float], float]
    sigma_inv: Callable[[float], float]
    s: Callable[[float], float]
    s_deriv: Callable[[float], float]


def time_schedule(schedule: str = "linear", scaling: str = "none", sigma_min: float = 0.002,
                  sigma_max: float = 80.0, epsilon_s: float = 1e-3) -> TimeSchedule:
    """EDM's sigma(t) (``schedule``) and s(t) (``scaling``); VP's betas put sigma(epsilon_s) = sigma_min
    and sigma(1) = sigma_max."""
    _check_choice("schedule", schedule, SCHEDULES)
    _check_choice("scaling", scaling, SCALINGS)
    if schedule == "vp":
        beta_d, beta_min = vp_betas(sigma_min, sigma_max, epsilon_s)
        # sigma(t) rises while beta_min + beta_d t > 0. A high sigma_min gives beta_d < 0: sigma(t) may then
        # peak inside [epsilon_s, 1] and come back to sigma_max at t = 1. As EDM, sigma_inv takes the rising
        # branch, where every level up to sigma_max has its time (the vp discretization refuses such betas).
        if beta_d == 0 or not beta_min + beta_d * epsilon_s > 0:
            raise SamplerSettingError("schedule", f"the vp schedule cannot span sigma_min={sigma_min} .. "
                                      f"sigma_max={sigma_max} (beta_d = {beta_d:.4g}): change sigma_min or sigma_max")
        sigma = vp_sigma(beta_d, beta_min)
        sigma_deriv = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))  # noqa: E731

        def sigma_inv(s: float) -> float:
            disc = beta_min ** 2 + 2 * beta_d * math.log1p(s ** 2)
            if disc < 0:  # beta_d < 0 and s above sigma(t)'s peak
                raise SamplerSettingError("schedule", f"noise level {s:.6g} is above the vp schedule's peak "
                                          f"(sigma_min={sigma_min}, sigma_max={sigma_max})")
            return (math.sqrt(disc) - beta_min) / beta_d
    elif schedule == "ve":
        sigma, sigma_deriv, sigma_inv = math.sqrt, (lambda t: 0.5 / math.sqrt(t)), (lambda s: s ** 2)
    else:
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: 1.0), (lambda s: s)
    if scaling == "vp":
        s = lambda t: 1 / math.sqrt(1 + sigma(t) ** 2)  # noqa: E731
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * s(t) ** 3  # noqa: E731
    else:
        s, s_deriv = (lambda t: 1.0), (lambda t: 0.0)
    return TimeSchedule(sigma, sigma_deriv, sigma_inv, s, s_deriv)


def _sigma_rounder(net) -> Callable[[float], float]:
    """The net's ``round_sigma`` (EDM rounds every noise level of the grid and the raised t_hat through
    it, e.g. to iDDPMPrecond's discrete sigmas) on host floats; identity when the net has none."""
    round_sigma = getattr(net, "round_sigma", None)
    if round_sigma is None:
        return lambda sigma: sigma
    return lambda sigma: float(round_sigma(torch.tensor(sigma, dtype=torch.float64)))


def edm_grid(num_steps: int, *, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
             rho: float = 7.0, discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
             epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
             net_sigma_range: tuple[float, float] = (0.0, float("inf")),
             round_sigma: Callable[[float], float] = lambda s: s) -> tuple[list[float], TimeSchedule]:
    """The sampler's times t_0 > ... > t_N = 0 and its ``TimeSchedule``. ``sigma_min`` / ``sigma_max``
    default to the discretization's (EDM's) and are clipped to ``net_sigma_range``; every level passes
    through ``round_sigma``. Raises SamplerSettingError naming the setting that cannot work."""
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min = max(default_min if sigma_min is None else sigma_min, net_sigma_range[0])
    sigma_max = min(default_max if sigma_max is None else sigma_max, net_sigma_range[1])
    levels = noise_levels(num_steps, discretization, sigma_min, sigma_max, rho, epsilon_s=epsilon_s, C_1=C_1,
                          C_2=C_2, M=M)
    sched = time_schedule(schedule, scaling, sigma_min, sigma_max, epsilon_s)
    return [sched.sigma_inv(round_sigma(s)) for s in levels] + [0.0], sched


#################################################################################
#                                    Sampler                                    #
#################################################################################

def edm_sampler(net: Callable, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, rho: float = 7.0,
                solver: str = "heun", discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
                epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, alpha: float = 1.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                cfg_scale: float = 1.0, null_class_labels=None, guided_channels: int | None = None,
                step_noise=None, generator: torch.Generator | None = None, net_dtype: torch.dtype | None = None,
                dtype: torch.dtype = torch.float64, net_kwargs: dict | None = None,
                progress: bool = False) -> torch.Tensor:
    """EDM's stochastic sampler: Algorithm 2 by default, EDM's ablation sampler for the other choices.

    latents: unit Gaussian, scaled to x_0 = latents * sigma(t_0) s(t_0). The net is the denoiser
    D(x; sigma) and sees x / s(t) cast to `net_dtype` (default latents.dtype) with sigma(t) as a [B]
    float64 tensor; the state is kept in `dtype` (float64 as EDM). ``sigma_min`` / ``sigma_max`` default
    to the discretization's and are clipped to the net's, and every level is rounded through its
    ``round_sigma`` (as EDM). ``solver`` 'heun' adds the 2nd-order correction (EDM's generic form with
    ``alpha``) except on the last step; 'euler' never. With S_churn > 0, levels in [S_min, S_max] are
    first raised by gamma = min(S_churn / num_steps, sqrt(2) - 1) using step_noise[i] (else a draw from
    `generator`); with no churn the step draws nothing. cfg_scale != 1 guides all channels (MaskDiT) or
    the first `guided_channels`, the uncond half labelled `null_class_labels` (zeros for one-hot labels
    by default), in one batched call.
    """
    _check_choice("solver", solver, SOLVERS)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (EDM's 2nd-order step lands at t + alpha h), got {alpha}")
    round_sigma = _sigma_rounder(net)
    t_steps, sc = edm_grid(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, discretization=discretization,
                           schedule=schedule, scaling=scaling, epsilon_s=epsilon_s, C_1=C_1, C_2=C_2, M=M,
                           net_sigma_range=(getattr(net, "sigma_min", 0.0), getattr(net, "sigma_max", float("inf"))),
                           round_sigma=round_sigma)
    net_dtype = latents.dtype if net_dtype is None else net_dtype
    net_kwargs = net_kwargs or {}
    if cfg_scale != 1.0:
        net = ClassifierFreeGuidance(net, cfg_scale, null_label=null_class_labels, guided_channels=guided_channels)
    B = latents.shape[0]

    def slope(x, t: float):
        """dx/dt of the probability-flow ODE at (x, t), EDM's eq. 4 through D(x / s(t); sigma(t))."""
        sigma, s = sc.sigma(t), sc.s(t)
        out = net((x / s).to(net_dtype), torch.full((B,), sigma, dtype=torch.float64, device=x.device),
                  class_labels, **net_kwargs)
        denoised = (out["x"] if isinstance(out, dict) else out).to(dtype)
        d = (x - s * denoised) / sigma * sc.sigma_deriv(t)  # Algorithm 2's (x - D) / t when sigma(t) = t, s = 1
        s_deriv = sc.s_deriv(t)
        return d + x * (s_deriv / s) if s_deriv else d

    x_next = latents.to(dtype) * (sc.sigma(t_steps[0]) * sc.s(t_steps[0]))
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps)
    with torch.no_grad():
        for i in steps:
            t_cur, t_next = t_steps[i], t_steps[i + 1]
            x_cur = x_next
            # Temporarily raise the noise level (churn); a grid that rounds the raised level down is
            # not allowed to lower it (EDM clips the noise variance at 0 there).
            sigma_cur = sc.sigma(t_cur)
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma_cur <= S_max else 0.0
            t_hat = max(sc.sigma_inv(round_sigma(sigma_cur + gamma * sigma_cur)), t_cur) if gamma > 0 else t_cur
            if t_hat > t_cur:
                eps = _step_noise(step_noise, i, x_cur)
                if eps is None:
                    eps = _randn(x_cur.shape, x_cur, generator=generator)
                x_hat = (sc.s(t_hat) / sc.s(t_cur) * x_cur
                         + math.sqrt(max(sc.sigma(t_hat) ** 2 - sigma_cur ** 2, 0.0)) * sc.s(t_hat) * S_noise * eps)
            else:
                x_hat = x_cur
            # Euler step, then the 2nd-order correction except on the last step (to sigma = 0).
            h = t_next - t_hat
            d_cur = slope(x_hat, t_hat)
            if solver == "euler" or i == num_steps - 1:
                x_next = x_hat + h * d_cur
            else:
                t_prime = t_next if alpha == 1 else t_hat + alpha * h  # t_hat + h would round off t_next
                d_prime = slope(x_hat + alpha * h * d_cur, t_prime)
                x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


def heun_sampler(net: Callable, latents: torch.Tensor, class_labels=None, **kwargs) -> torch.Tensor:
    """EDM's Algorithm 2 (MaskDiT's ``edm_sampler``): :func:`edm_sampler` with the Heun solver."""
    return edm_sampler(net, latents, class_labels, solver="heun", **kwargs)
