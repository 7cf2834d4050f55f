"""EDM (Karras et al. 2022) as MaskDiT uses it: preconditioning, the lognormal-sigma loss with MaskDiT's
masked / MAE variants. The samplers are in ``edm_sampling``.

Conventions: ``net(x_noisy, sigma, class_labels, **kw)`` returns the denoised D(x; sigma) (a tensor, or a
dict with key "x" and, when the net masked its input, "mask": [B, L] with 1 on removed patches).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .gaussian import _randn, mean_flat


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
