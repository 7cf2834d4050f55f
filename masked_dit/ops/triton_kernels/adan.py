"""Triton kernel for one Adan step (masked_dit.train.optim.Adan), fused into a single pass.

Per element: read p, g, pre_grad, exp_avg, exp_avg_diff, exp_avg_sq; write p, the three moments
and pre_grad (= g): 11 fp32 accesses, no temporaries. The foreach path makes ~39 passes and holds
five full-size fp32 temporaries (diff, corrected, denom, update, v / bc2).

The arithmetic follows the foreach ops one by one, in fp32: lerp as ATen computes it, IEEE-rounded
division and square root (``div_rn`` / ``sqrt_rn``; Triton's ``/`` and ``sqrt`` are approximate
on GPU). Hyper-parameters and bias corrections are runtime float arguments, so a new lr each
step (the trainer's schedule) never recompiles. Flat contiguous fp32 tensors only.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import triton
import triton.language as tl

from masked_dit.ops.triton_kernels import device_guard

BLOCK = 1024  # 8 fp32 per thread at 4 warps: two 16-byte accesses per tensor
NUM_WARPS = 4

# -----------------------------------------------------------------------------
# Kernel
# -----------------------------------------------------------------------------


@triton.jit
def _lerp(a, b, w):
    """ATen's lerp(a, b, w) with a scalar weight (two formulas, exact at both ends)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _adan_kernel(
    P, G, PREV, M, V, N,
    numel,
    lr, w1, w2, b2, b3, w3, sqrt_bc3, eps, bc1, bc2, wd_mul, wd_div,
    NO_PROX: tl.constexpr, BLOCK: tl.constexpr,
):
    """One Adan step on ``numel`` elements; w_i = 1 - b_i (lerp / addcmul weights),
    sqrt_bc3 = sqrt(bc3), wd_mul = 1 - lr wd (no_prox), wd_div = 1 + lr wd (prox)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel may pass 2^31
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0)
    prev = tl.load(PREV + offs, mask=mask, other=0.0)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    n = tl.load(N + offs, mask=mask, other=0.0)
    p = tl.load(P + offs, mask=mask, other=0.0)

    diff = g - prev
    m = _lerp(m, g, w1)
    v = _lerp(v, diff, w2)
    corrected = g + b2 * diff
    n = n * b3
    n = n + w3 * corrected * corrected
    denom = tl.math.div_rn(tl.sqrt_rn(n), sqrt_bc3) + eps
    update = tl.math.div_rn(m, bc1) + b2 * tl.math.div_rn(v, bc2)
    update = tl.math.div_rn(update, denom)
    if NO_PROX:
        p = p * wd_mul - lr * update
    else:
        p = tl.math.div_rn(p - lr * update, wd_div)

    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    tl.store(N + offs, n, mask=mask)
    tl.store(PREV + offs, g, mask=mask)


# -----------------------------------------------------------------------------
# Launch helper
# -----------------------------------------------------------------------------


def adan_step_(p, g, prev, m, v, n, *, lr: float, betas, eps: float, bc1: float, bc2: float, bc3: float,
               weight_decay: float, no_prox: bool) -> None:
    """In place: p, m (exp_avg), v (exp_avg_diff), n (exp_avg_sq), prev (pre_grad <- g).

    All six: contiguous fp32 of one shape on one device (the caller checks). wd = 0 takes the
    same code as wd > 0 (x * 1 and x / 1 are exact), so there is one compiled variant per mode.
    """
    numel = p.numel()
    if numel == 0:
        return
    b1, b2, b3 = (float(b) for b in betas)
    lr, wd = float(lr), float(weight_decay)  # floats: an int 0 or 1 would be specialised (recompiles)
    with device_guard(p.device):
        _adan_kernel[(triton.cdiv(numel, BLOCK),)](
            p, g, prev, m, v, n,
            numel,
            lr, 1.0 - b1, 1.0 - b2, b2, b3, 1.0 - b3, float(bc3) ** 0.5, float(eps), float(bc1), float(bc2),
            1.0 - lr * wd, 1.0 + lr * wd,
            NO_PROX=bool(no_prox), BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
