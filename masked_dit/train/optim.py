"""Optimizers (AdamW, our own Adan) and the learning-rate schedule.

Adan (Xie et al., 2022; sail-sg/Adan), as MDTv2 trains with it. Per parameter, step k >= 1, with
gradient g_k and g_0 := g_1 (so the first difference is zero)::

    diff = g_k - g_{k-1}
    m_k  = b1 m + (1 - b1) g_k                         (gradient momentum)
    v_k  = b2 v + (1 - b2) diff                        (difference momentum)
    n_k  = b3 n + (1 - b3) (g_k + b2 diff)^2           (second moment of the Nesterov-corrected gradient)
    u    = (m_k / (1 - b1^k) + b2 v_k / (1 - b2^k)) / (sqrt(n_k / (1 - b3^k)) + eps)
    p   <- (p - lr u) / (1 + lr wd)                    (proximal decay; no_prox: p (1 - lr wd) - lr u)

betas are the decay rates (0.98, 0.92, 0.99), as the official implementation's arguments.
"""
from __future__ import annotations

import math

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Adan(torch.optim.Optimizer):
    """Adan with decoupled (proximal) weight decay; multi-tensor (foreach) updates."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, no_prox: bool = False, foreach: bool = True):
        if lr < 0:
            raise ValueError(f"Adan: lr must be >= 0 (got {lr})")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adan: betas must be three values in [0, 1) (got {tuple(betas)})")
        if eps < 0:
            raise ValueError(f"Adan: eps must be >= 0 (got {eps})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                        foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b1, b2, b3 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            grads, m, v, n, prev = [], [], [], [], []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_diff"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["pre_grad"] = p.grad.detach().clone()  # first difference is zero
                state["step"] += 1
                # FSDP2 DTensors: update each rank's shard in place (elementwise, no communication).
                grads.append(_local(p.grad))
                m.append(_local(state["exp_avg"]))
                v.append(_local(state["exp_avg_diff"]))
                n.append(_local(state["exp_avg_sq"]))
                prev.append(_local(state["pre_grad"]))
            k = int(self.state[params[0]]["step"].item())
            bc1, bc2, bc3 = 1 - b1 ** k, 1 - b2 ** k, 1 - b3 ** k

            diff = torch._foreach_sub(grads, prev)
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_lerp_(v, diff, 1 - b2)
            corrected = torch._foreach_add(grads, diff, alpha=b2)
            torch._foreach_mul_(n, b3)
            torch._foreach_addcmul_(n, corrected, corrected, value=1 - b3)
            denom = torch._foreach_sqrt(n)
            torch._foreach_div_(denom, math.sqrt(bc3))
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m, bc1)
            torch._foreach_add_(update, torch._foreach_div(v, bc2), alpha=b2)
            torch._foreach_div_(update, denom)
            params = [_local(p) for p in params]
            if group["no_prox"]:
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_add_(params, update, alpha=-lr)
            else:
                torch._foreach_add_(params, update, alpha=-lr)
                if wd:
                    torch._foreach_div_(params, 1 + lr * wd)
            torch._foreach_copy_(prev, grads)
        return loss


def build_optimizer(params, optim_cfg, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or Adan from an ``OptimConfig`` (lr is the peak; the schedule scales it)."""
    params = [p for p in params if p.requires_grad]
    if optim_cfg.name == "adamw":
        kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
        if fused:
            kw["fused"] = True
        return torch.optim.AdamW(params, **kw)
    if optim_cfg.name == "adan":
        return Adan(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay)
    raise ValueError(f"unknown optimizer {optim_cfg.name!r}; valid: adamw, adan")


def lr_at(step: int, optim_cfg) -> float:
    """Constant lr after a linear warmup over ``warmup_steps`` (all five papers use a constant lr)."""
    if optim_cfg.warmup_steps > 0 and step < optim_cfg.warmup_steps:
        return optim_cfg.lr * (step + 1) / optim_cfg.warmup_steps
    return optim_cfg.lr
