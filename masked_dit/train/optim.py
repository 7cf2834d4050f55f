"""Optimizers (AdamW, our own Adan) and the learning-rate schedule.

Adan (Xie et al., 2022; sail-sg/Adan), as MDTv2 trains with it. Per parameter, step k >= 1, with
gradient g_k and g_0 := g_1 (so the first difference is zero)::

    diff = g_k - g_{k-1}
    m_k  = b1 m + (1 - b1) g_k                         (gradient momentum)
    v_k  = b2 v + (1 - b2) diff                        (difference momentum)
    n_k  = b3 n + (1 - b3) (g_k + b2 diff)^2           (second moment of the Nesterov-corrected gradient)
    u    = (m_k / (1 - b1^k) + b2 v_k / (1 - b2^k)) / (sqrt(n_k / (1 - b3^k)) + eps)
    p   <- (p - lr u) / (1 + lr wd)                    (proximal decay; no_prox: p (1 - lr wd) - lr u)

``max_grad_norm`` > 0 clips as the official ``max_grad_norm`` (MDT trains with 1): before the update every
gradient is scaled in place by ``min(max_grad_norm / (norm + eps), 1)``, ``norm`` the global L2 norm of all
groups' gradients and ``eps`` the optimizer's (torch's clip_grad_norm_ adds 1e-6, not eps).

betas are the decay rates (0.98, 0.92, 0.99), as the official implementation's arguments. Each
parameter counts its own k (the official counts one per group: the same wherever every parameter has
a gradient at every step; a parameter that first gets one later is corrected from its own k = 1 here).

Two implementations of the same step: foreach (the reference, any device and dtype) and a single-pass
multi-tensor Triton kernel (masked_dit/ops/triton_kernels/adan.py: contiguous fp32 on CUDA; one launch
per group; 11 accesses of 4 bytes per parameter against ~39 and five full-size temporaries), agreeing
to fp32 rounding.
"""
from __future__ import annotations

import functools
import math
import os

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def grad_norm_and_clip(params, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Total gradient norm (all ranks' shards under FSDP2), a 0-dim tensor left on the device (no
    host sync); when max_norm > 0 scales the gradients in place by min(max_norm / (norm + eps), 1):
    torch's clip_grad_norm_ with eps 1e-6, the official Adan's max_grad_norm with its eps (``clip_eps``)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, 2.0, False, None)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + eps), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


# -----------------------------------------------------------------------------
# fused (Triton) step: where it can run


@functools.lru_cache(maxsize=None)
def _triton_why_not(device_type: str, interpret: str | None) -> str | None:
    """Cached (it looks triton up): checked for every parameter every step. ``interpret`` is
    TRITON_INTERPRET, a key so that a changed environment is seen."""
    from masked_dit.ops.dispatch import availability

    ok, why = availability("triton", device_type)
    return None if ok else why


def _fused_unsupported(tensors, strict: bool) -> str | None:
    """Why the fused Triton step cannot update these local tensors (one parameter's p, grad and
    state), or None. Auto (strict False) takes CUDA only: the CPU interpreter is for tests."""
    p = tensors[0]
    for t in tensors:
        if t.dtype != torch.float32:
            return f"{t.dtype} tensor (the fused step updates float32 parameters and state)"
        if t.device != p.device:
            return f"tensors on {p.device} and {t.device}"
        if not t.is_contiguous():
            return f"non-contiguous tensor of shape {tuple(t.shape)} (strides {t.stride()})"
    if not strict and p.device.type != "cuda":
        return f"{p.device.type} tensor"
    return _triton_why_not(p.device.type, os.environ.get("TRITON_INTERPRET"))


class Adan(torch.optim.Optimizer):
    """Adan with decoupled (proximal) weight decay.

    ``fused``: None picks the single-pass Triton step for every parameter whose (local) tensors are
    contiguous float32 on CUDA with triton installed, foreach for the rest; True requires it (CPU:
    under TRITON_INTERPRET=1 only, for tests) and raises where it cannot run; False is foreach, the
    reference. Both keep the same state (a checkpoint of one loads in the other).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_grad_norm: float = 0.0, no_prox: bool = False, foreach: bool = True,
                 fused: bool | None = None):
        if not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"Adan: max_grad_norm must be a finite number >= 0 (0: no clipping; got {max_grad_norm})")
        if lr < 0:
            raise ValueError(f"Adan: lr must be >= 0 (got {lr})")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adan: betas must be three values in [0, 1) (got {tuple(betas)})")
        if eps < 0:
            raise ValueError(f"Adan: eps must be >= 0 (got {eps})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                        foreach=foreach)
        super().__init__(params, defaults)
        # Not group defaults: a group key would change the state dict (and be missing from old ones).
        self.fused = fused
        self.max_grad_norm = float(max_grad_norm)
        if fused:  # fail at construction where the parameters alone rule it out (grads are checked per step)
            for i, p in enumerate(q for g in self.param_groups for q in g["params"]):
                why = _fused_unsupported([_local(p)], strict=True)
                if why is not None:
                    raise RuntimeError(f"Adan(fused=True): parameter {i}: {why}")

    def __getstate__(self):  # Optimizer's pickles only defaults, state and param_groups: keep fused (copy, pickle)
        return {**super().__getstate__(), "fused": self.fused, "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state):
        # Optimizer.load_state_dict calls this with state and param_groups only: this instance's settings
        # stay (they were reset to the defaults: a resumed run lost its clipping, fused=False became auto);
        # a pickle from before fused / max_grad_norm existed gets the defaults.
        super().__setstate__(state)
        self.__dict__.setdefault("fused", None)
        self.__dict__.setdefault("max_grad_norm", 0.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.max_grad_norm > 0:  # before the state is made: the first pre_grad is the clipped gradient
            # over every group, with the last group's eps (as the official step)
            grad_norm_and_clip([p for group in self.param_groups for p in group["params"]], self.max_grad_norm,
                               self.param_groups[-1]["eps"])
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b1, b2, b3 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            # bucketed by the parameter's own step count: one that joins later (no grad at first) gets
            # its own bias correction, not the first parameter's
            fused, foreach, todo = {}, {}, []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_diff"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    # first difference is zero; laid out like p (as the moments), whatever the grad's strides
                    state["pre_grad"] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(p.grad)
                # FSDP2 DTensors: update each rank's shard in place (elementwise, no communication).
                t = tuple(_local(x) for x in (p, p.grad, state["pre_grad"], state["exp_avg"],
                                                state["exp_avg_diff"], state["exp_avg_sq"]))
                why = "fused=False" if self.fused is False else _fused_unsupported(t, strict=bool(self.fused))
                if why is not None and self.fused:
                    raise RuntimeError(f"Adan(fused=True): parameter of shape {tuple(p.shape)}: {why}")
                todo.append((foreach if why is not None else fused, t))
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1)
            steps = torch.stack(steps).tolist()
            for (bucket, t), k in zip(todo, steps):  # one host read per group, wherever the counts live
                bucket.setdefault(int(k), []).append(t)
            for k in sorted(set(fused) | set(foreach)):
                bc1, bc2, bc3 = 1 - b1 ** k, 1 - b2 ** k, 1 - b3 ** k
                if k in fused:
                    from masked_dit.ops.triton_kernels.adan import adan_step_

                    adan_step_(fused[k], lr=lr, betas=(b1, b2, b3), eps=eps, bc1=bc1, bc2=bc2, bc3=bc3,
                               weight_decay=wd, no_prox=group["no_prox"])
                if k in foreach:
                    _foreach_step(*(list(x) for x in zip(*foreach[k])), b1=b1, b2=b2, b3=b3, lr=lr, wd=wd,
                                  eps=eps, bc1=bc1, bc2=bc2, bc3=bc3, no_prox=group["no_prox"])
        return loss


def _foreach_step(params, grads, prev, m, v, n, *, b1, b2, b3, lr, wd, eps, bc1, bc2, bc3, no_prox):
    """The reference update, multi-tensor. Temporaries are dropped as soon as they are used (at
    most two full-size sets alive); the arithmetic, op by op, is unchanged."""
    diff = torch._foreach_sub(grads, prev)
    torch._foreach_lerp_(m, grads, 1 - b1)
    torch._foreach_lerp_(v, diff, 1 - b2)
    corrected = torch._foreach_add(grads, diff, alpha=b2)
    del diff
    torch._foreach_mul_(n, b3)
    torch._foreach_addcmul_(n, corrected, corrected, value=1 - b3)
    del corrected
    update = torch._foreach_div(m, bc1)
    v_corrected = torch._foreach_div(v, bc2)
    torch._foreach_add_(update, v_corrected, alpha=b2)
    del v_corrected
    denom = torch._foreach_sqrt(n)
    torch._foreach_div_(denom, math.sqrt(bc3))
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(update, denom)
    del denom
    if no_prox:
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, update, alpha=-lr)
    else:
        torch._foreach_add_(params, update, alpha=-lr)
        if wd:
            torch._foreach_div_(params, 1 + lr * wd)
    torch._foreach_copy_(prev, grads)


def use_fused(name: str, device_type: str, fsdp_mixed_precision: bool) -> bool:
    """Whether a run's optimizer takes its fused step: on CUDA; fused AdamW not under FSDP2 mixed
    precision, Adan's Triton step there too (it updates each rank's local shard, plain contiguous fp32
    tensors: sharded params stay fp32, grads are reduced in fp32; a shard it cannot take runs foreach)."""
    return device_type == "cuda" and (not fsdp_mixed_precision or name == "adan")


def build_optimizer(params, optim_cfg, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or Adan from an ``OptimConfig`` (lr is the peak; the schedule scales it).

    ``fused``: AdamW's fused CUDA kernel; for Adan, the Triton step where it can run (``fused=None``:
    foreach for the tensors it cannot update, so a CUDA run without triton still trains)."""
    params = [p for p in params if p.requires_grad]
    if optim_cfg.name == "adamw":
        kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
        if fused:
            kw["fused"] = True
        return torch.optim.AdamW(params, **kw)
    if optim_cfg.name == "adan":
        # grad_clip is applied by the training loop, with Adan's rule (clip_eps): the norm it needs anyway
        # for its log and non-finite check is then taken once
        return Adan(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay, fused=None if fused else False)
    raise ValueError(f"unknown optimizer {optim_cfg.name!r}; valid: adamw, adan")


def clip_eps(optim_cfg) -> float:
    """The eps of the training loop's gradient clip, min(max / (norm + eps), 1): Adan's own eps, as the
    official Adan's max_grad_norm (MDT's loop leaves clipping to it); torch's clip_grad_norm_'s 1e-6 for
    AdamW (DiT's / REPA's loops)."""
    return optim_cfg.eps if optim_cfg.name == "adan" else 1e-6


def lr_at(step: int, optim_cfg) -> float:
    """Constant lr after a linear warmup over ``warmup_steps`` (all five papers use a constant lr)."""
    if optim_cfg.warmup_steps > 0 and step < optim_cfg.warmup_steps:
        return optim_cfg.lr * (step + 1) / optim_cfg.warmup_steps
    return optim_cfg.lr
