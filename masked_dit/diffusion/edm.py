"""EDM (Karras et al. 2022) as MaskDiT uses it: preconditioning, the lognormal-sigma loss with MaskDiT's
masked / MAE variants, and the Heun sampler.

Conventions: ``net(x_noisy, sigma, class_labels, **kw)`` returns the denoised D(x; sigma) (a tensor, or a
dict with key "x" and, when the net masked its input, "mask": [B, L] with 1 on removed patches).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from .gaussian import _randn, _step_noise, mean_flat
from .guidance import ClassifierFreeGuidance


#################################################################################
#                                Preconditioning                                #
#################################################################################

def edm_precond_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning, elementwise in sigma."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4, ...) around any network F.

    F is called as ``model(c_in * x, c_noise[B], *args, **kwargs)``; a dict output keeps its other keys
    (MaskDiT's "mask") with "x" replaced by D. The arithmetic runs in at least float32 (as MaskDiT).
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.0,
                 sigma_max: float = float("inf")):
        super().__init__()
        self.model, self.sigma_data = model, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def forward(self, x: torch.Tensor, sigma, *args, **kwargs):
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1, *([1] * (x.dim() - 1)))
        if sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
        c_skip, c_out, c_in, c_noise = edm_precond_coefficients(sigma, self.sigma_data)
        out = self.model(c_in * x, c_noise.flatten().expand(x.shape[0]), *args, **kwargs)
        F_x = out["x"] if isinstance(out, dict) else out
        D_x = c_skip * x + c_out * F_x.to(dtype)
        if isinstance(out, dict):
            return {**out, "x": D_x}
        return D_x

    @staticmethod
    def round_sigma(sigma):
        return torch.as_tensor(sigma)


#################################################################################
#                                     Loss                                      #
#################################################################################

def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C] with patches in row-major order (MAE's layout)."""
    N, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size {p}")
    x = x.reshape(N, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(N, (H // p) * (W // p), p * p * C)


def mae_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MaskDiT's MAE term, per sample [N]: MSE between pred and the per-patch normalised target
    (mean 0, unbiased variance 1 + eps), averaged over the removed patches (mask == 1)."""
    target, pred = patchify(target, patch_size), patchify(pred, patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)                      # [N, L]
    return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def edm_loss_from_output(denoised: torch.Tensor, images: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
                         mask: torch.Tensor | None = None, patch_size: int = 2, mae_loss_coef: float = 0.0,
                         sigma_data: float = 0.5) -> dict:
    """EDM loss from a computed D(y + n; sigma): dict(loss[N], and mae[N] when mae_loss_coef > 0).

    Without a mask: mean of weight * (D - y)^2 with weight (sigma^2 + sd^2) / (sigma sd)^2. With a mask
    ([N, L], 1 = removed): per-patch mean error averaged over the kept patches, plus mae_loss_coef times
    the MAE loss on the removed patches whose target is the noisy input y + n (`mae_loss`).
    """
    if denoised.shape != images.shape:
        raise ValueError(f"denoised has shape {list(denoised.shape)}, images {list(images.shape)}")
    sigma = sigma.reshape(-1, *([1] * (images.dim() - 1)))
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    err = weight * (denoised - images) ** 2
    if mask is None:
        return {"loss": mean_flat(err)}
    N, _, H, W = images.shape
    p = patch_size
    if mask.shape != (N, (H // p) * (W // p)):
        raise ValueError(f"mask has shape {list(mask.shape)}, expected [{N}, {(H // p) * (W // p)}] for patch {p}")
    mask = mask.to(err.dtype)
    per_patch = err.mean(dim=1).reshape(N, H // p, p, W // p, p).mean(dim=(2, 4)).flatten(1)   # [N, L]
    keep = 1 - mask
    loss = (per_patch * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    terms = {"loss": loss}
    if mae_loss_coef > 0:
        terms["mae"] = mae_loss(noisy, denoised, mask, p)
        terms["loss"] = loss + mae_loss_coef * terms["mae"]
    return terms


def edm_loss(net: Callable, images: torch.Tensor, labels=None, *, P_mean: float = -1.2, P_std: float = 1.2,
             sigma_data: float = 0.5, patch_size: int = 2, mae_loss_coef: float = 0.0, mask: torch.Tensor | None = None,
             sigma: torch.Tensor | None = None, rnd_normal: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, net_kwargs: dict | None = None) -> dict:
    """EDM training loss (MaskDiT's EDMLoss): dict(loss[N], sigma[N], ...).

    sigma = exp(P_mean + P_std * rnd_normal) unless `sigma` is given; `noise` is the unit Gaussian that is
    scaled by sigma; both are drawn (from `generator`) when missing. The net is called as
    ``net(y + n, sigma[N], labels, **net_kwargs)``; the masked loss is used when the output dict holds a
    "mask" (or `mask` is passed).
    """
    N = images.shape[0]
    if sigma is None:
        if rnd_normal is None:
            rnd_normal = _randn((N,), images, generator=generator)
        if rnd_normal.numel() != N:
            raise ValueError(f"rnd_normal has {rnd_normal.numel()} entries for a batch of {N}")
        sigma = (rnd_normal.reshape(N) * P_std + P_mean).exp()
    elif rnd_normal is not None:
        raise ValueError("pass either sigma or rnd_normal, not both")
    sigma = sigma.reshape(N).to(images.dtype)
    if noise is None:
        noise = _randn(images.shape, images, generator=generator)
    if noise.shape != images.shape:
        raise ValueError(f"noise has shape {list(noise.shape)}, expected {list(images.shape)}")
    noisy = images + noise * sigma.view(-1, *([1] * (images.dim() - 1)))
    out = net(noisy, sigma, labels, **(net_kwargs or {}))
    denoised = out["x"] if isinstance(out, dict) else out
    if mask is None and isinstance(out, dict):
        mask = out.get("mask")
    terms = edm_loss_from_output(denoised, images, noisy, sigma, mask, patch_size, mae_loss_coef, sigma_data)
    terms["sigma"] = sigma
    return terms


#################################################################################
#                                 Heun sampler                                  #
#################################################################################

def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (sigma_max^(1/rho) .. sigma_min^(1/rho))^rho, then a final 0: [num_steps + 1], float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    steps = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64)])


def _sigma_rounder(net) -> Callable[[float], float]:
    """The net's ``round_sigma`` (EDM rounds every noise level of the grid and the raised t_hat through
    it, e.g. to iDDPMPrecond's discrete sigmas) on host floats; identity when the net has none."""
    round_sigma = getattr(net, "round_sigma", None)
    if round_sigma is None:
        return lambda sigma: sigma
    return lambda sigma: float(round_sigma(torch.tensor(sigma, dtype=torch.float64)))


def heun_sampler(net: Callable, latents: torch.Tensor, class_labels=None, *, num_steps: int = 18,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0,
                 S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0, cfg_scale: float = 1.0,
                 null_class_labels=None, guided_channels: int | None = None, step_noise=None,
                 generator: torch.Generator | None = None, net_dtype: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float64, net_kwargs: dict | None = None, progress: bool = False):
    """EDM's stochastic Heun sampler (Algorithm 2), as MaskDiT's edm_sampler.

    latents: unit Gaussian x_T / sigma_max. The noise range is clipped to the net's [sigma_min, sigma_max]
    and every noise level rounded through its ``round_sigma``, where the net has them (as EDM). The state
    is kept in `dtype` (float64 as EDM); the net sees it cast to `net_dtype` (default latents.dtype) and
    sigma as a [B] float64 tensor. The last step is a
    plain Euler step to sigma = 0. With S_churn > 0, sigmas in [S_min, S_max] are first raised by
    gamma = min(S_churn / num_steps, sqrt(2) - 1) using step_noise[i] (else a draw from `generator`).
    cfg_scale != 1 guides all channels (MaskDiT) or the first `guided_channels`, with the uncond half
    labelled `null_class_labels` (zeros for one-hot labels by default), in one batched call.
    """
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", float("inf")))
    round_sigma = _sigma_rounder(net)
    net_dtype = latents.dtype if net_dtype is None else net_dtype
    net_kwargs = net_kwargs or {}
    if cfg_scale != 1.0:
        net = ClassifierFreeGuidance(net, cfg_scale, null_label=null_class_labels, guided_channels=guided_channels)
    B = latents.shape[0]

    def denoise(x, sigma: float):
        s = torch.full((B,), sigma, dtype=torch.float64, device=x.device)
        out = net(x.to(net_dtype), s, class_labels, **net_kwargs)
        return (out["x"] if isinstance(out, dict) else out).to(dtype)

    # The whole noise-level schedule lives on the host: the loop branches on floats, never on tensors.
    t_steps = [round_sigma(s) for s in karras_sigmas(num_steps, sigma_min, sigma_max, rho)[:-1].tolist()] + [0.0]
    x_next = latents.to(dtype) * t_steps[0]
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps)
    with torch.no_grad():
        for i in steps:
            t_cur, t_next = t_steps[i], t_steps[i + 1]
            x_cur = x_next
            # Temporarily raise the noise level (churn).
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
            t_hat = round_sigma(t_cur + gamma * t_cur) if gamma > 0 else t_cur
            # (a grid that rounds the raised level down would make EDM take the sqrt of a negative number)
            t_hat = max(t_hat, t_cur)
            if t_hat > t_cur:
                eps = _step_noise(step_noise, i, x_cur)
                if eps is None:
                    eps = _randn(x_cur.shape, x_cur, generator=generator)
                x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * eps
            else:
                x_hat = x_cur
            # Euler step, then the 2nd-order correction except on the last step (to sigma = 0).
            d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            if i < num_steps - 1:
                d_prime = (x_next - denoise(x_next, t_next)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
