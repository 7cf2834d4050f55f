"""Triton kernels for adaLN modulate and its fusion with the gated residual add.

One program normalises one token row (the whole row lives in registers, so statistics are
two-pass over registers: exact and overflow-free for |x| ~ 1e4). Backward programs each own a
chunk of token rows of one sample and keep dshift/dscale/dgate partial sums in registers, written
once per program to a small fp32 buffer [B, chunks, D] and summed afterwards: a two-stage
reduction, no atomics on the hot [B, D] rows.

Statistics and accumulation are fp32 (fp64 when the activations are fp64, for gradcheck).
Every tensor is addressed through its strides, so strided chunks of the adaLN Linear output
([B, 6D] -> six [B, D] views) and transposed activations are read without copies.
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from masked_dit.ops.triton_kernels import device_guard

# -----------------------------------------------------------------------------
# launch heuristics


def _block_d(D: int) -> int:
    return max(32, triton.next_power_of_2(D))  # at least one warp wide


def _num_warps(block_d: int, values_per_thread: int) -> int:
    # forward: 8 values of the row per thread; backward: 4, since it keeps ~10 row-sized
    # vectors live (inputs, scale, gate, three accumulators) -- with 8 the gated backward needs
    # ~180 registers at D = 1152 (measured with ptxas), with 4 about 60
    return max(4, min(32, block_d // (32 * values_per_thread)))


def _num_chunks(B: int, L: int, device: torch.device) -> int:
    """Token chunks per sample for the backward: enough programs to fill the GPU, no more
    (each extra chunk adds a [B, D] fp32 partial to the second reduction stage)."""
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4  # interpreter: few programs, but still more than one chunk per sample
    return max(1, min(L, math.ceil(target / max(B, 1))))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# -----------------------------------------------------------------------------
# shared jit helpers


@triton.jit
def _to_acc(v, ACC_F64: tl.constexpr):
    if ACC_F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _to_out(v, PTR):
    """v cast to the element type of PTR for a store. Half types from fp64 go through fp32, as torch's
    cast does (c10 converts double to bf16/fp16 via float), so fp64 statistics give the reference's
    values; Triton's direct fp64 -> bf16 conversion also gives garbage under the interpreter."""
    ty = PTR.dtype.element_ty
    if ty.is_fp16() or ty.is_bf16():
        v = v.to(tl.float32)
    return v.to(ty)


@triton.jit
def _normalize(x, mask, D, eps):
    """(xhat, mean, rstd) of one row held in registers; masked lanes of xhat are 0."""
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd, mean, rstd


@triton.jit
def _modulate_store(x, SHIFT, SCALE, H, MEAN, RSTD, row, b, cols, mask, D, eps, ssh_b, ssh_d, ssc_b, ssc_d,
                    ACC_F64: tl.constexpr):
    """Forward tail shared by both kernels: normalise the row x, modulate with sample b's
    shift/scale, store h and the row's mean/rstd."""
    xhat, mean, rstd = _normalize(x, mask, D, eps)
    shift = _to_acc(tl.load(SHIFT + b * ssh_b + cols * ssh_d, mask=mask, other=0.0), ACC_F64)
    scale = _to_acc(tl.load(SCALE + b * ssc_b + cols * ssc_d, mask=mask, other=0.0), ACC_F64)
    h = xhat * (1.0 + scale) + shift
    tl.store(H + row * D + cols, _to_out(h, H), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_input_grad(dh, xhat, scale1, rstd, D):
    """d(LayerNorm input) from dh, for h = xhat * scale1 + shift."""
    g = dh * scale1
    g_mean = tl.sum(g, axis=0) / D
    gx_mean = tl.sum(g * xhat, axis=0) / D
    return (g - g_mean - xhat * gx_mean) * rstd


# -----------------------------------------------------------------------------
# forward kernels


@triton.jit
def _adaln_fwd_kernel(
    X, SHIFT, SCALE, H, MEAN, RSTD,
    L, D, eps,
    sx_b, sx_l, sx_d, ssh_b, ssh_d, ssc_b, ssc_d,
    BLOCK_D: tl.constexpr, ACC_F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    cols64 = cols.to(tl.int64)  # cols * (stride of d) may pass 2^31 in strided views
    mask = cols < D
    x = _to_acc(tl.load(X + b * sx_b + l * sx_l + cols64 * sx_d, mask=mask, other=0.0), ACC_F64)
    _modulate_store(x, SHIFT, SCALE, H, MEAN, RSTD, row, b, cols, mask, D, eps, ssh_b, ssh_d, ssc_b, ssc_d, ACC_F64)


@triton.jit
def _gated_fwd_kernel(
    X, BR, GATE, SHIFT, SCALE, R, H, MEAN, RSTD,
    L, D, eps,
    sx_b, sx_l, sx_d, sbr_b, sbr_l, sbr_d, sg_b, sg_d, ssh_b, ssh_d, ssc_b, ssc_d,
    BLOCK_D: tl.constexpr, ACC_F64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    cols64 = cols.to(tl.int64)  # cols * (stride of d) may pass 2^31 in strided views
    mask = cols < D
    x = _to_acc(tl.load(X + b * sx_b + l * sx_l + cols64 * sx_d, mask=mask, other=0.0), ACC_F64)
    br = _to_acc(tl.load(BR + b * sbr_b + l * sbr_l + cols64 * sbr_d, mask=mask, other=0.0), ACC_F64)
    gate = _to_acc(tl.load(GATE + b * sg_b + cols * sg_d, mask=mask, other=0.0), ACC_F64)
    r = _to_out(x + gate * br, R)
    tl.store(R + row * D + cols, r, mask=mask)
    # normalise the stored (rounded) residual: h == adaln_modulate(r) exactly, and the
    # backward, which re-reads r, sees the same values the forward normalised
    _modulate_store(_to_acc(r, ACC_F64), SHIFT, SCALE, H, MEAN, RSTD, row, b, cols, mask, D, eps,
                    ssh_b, ssh_d, ssc_b, ssc_d, ACC_F64)


# -----------------------------------------------------------------------------
# backward kernels (stage 1: per-row input grads + per-program partial sums over tokens)


@triton.jit
def _adaln_bwd_kernel(
    DH, X, SCALE, MEAN, RSTD, DX, DSHIFT_P, DSCALE_P,
    L, D, rows_per_prog, n_chunks,
    sdh_b, sdh_l, sdh_d, sx_b, sx_l, sx_d, ssc_b, ssc_d,
    BLOCK_D: tl.constexpr, ACC_F64: tl.constexpr,
):
    # 1-D grid (pid = b * n_chunks + chunk): a grid's y/z dims stop at 65535, so B may not be one
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_chunks
    chunk = pid % n_chunks
    cols = tl.arange(0, BLOCK_D)
    cols64 = cols.to(tl.int64)  # cols * (stride of d) may pass 2^31 in strided views
    mask = cols < D
    scale1 = 1.0 + _to_acc(tl.load(SCALE + b * ssc_b + cols * ssc_d, mask=mask, other=0.0), ACC_F64)
    acc_dshift = _to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), ACC_F64)
    acc_dscale = _to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), ACC_F64)
    l_start = chunk * rows_per_prog
    l_end = tl.minimum(l_start + rows_per_prog, L)
    for l in range(l_start, l_end):  # int64 (chunk is): l * sx_l must not wrap for large views
        row = b * L + l
        x = _to_acc(tl.load(X + b * sx_b + l * sx_l + cols64 * sx_d, mask=mask, other=0.0), ACC_F64)
        dh = _to_acc(tl.load(DH + b * sdh_b + l * sdh_l + cols64 * sdh_d, mask=mask, other=0.0), ACC_F64)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dx = _ln_input_grad(dh, xhat, scale1, rstd, D)
        tl.store(DX + row * D + cols, _to_out(dx, DX), mask=mask)
        acc_dshift += dh
        acc_dscale += dh * xhat
    out = (b * n_chunks + chunk) * D + cols
    tl.store(DSHIFT_P + out, acc_dshift, mask=mask)
    tl.store(DSCALE_P + out, acc_dscale, mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DR, DH, R, BR, GATE, SCALE, MEAN, RSTD, DX, DBR, DGATE_P, DSHIFT_P, DSCALE_P,
    L, D, rows_per_prog, n_chunks,
    sdr_b, sdr_l, sdr_d, sdh_b, sdh_l, sdh_d, sr_b, sr_l, sr_d, sbr_b, sbr_l, sbr_d,
    sg_b, sg_d, ssc_b, ssc_d,
    BLOCK_D: tl.constexpr, ACC_F64: tl.constexpr,
):
    # 1-D grid (pid = b * n_chunks + chunk): a grid's y/z dims stop at 65535, so B may not be one
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_chunks
    chunk = pid % n_chunks
    cols = tl.arange(0, BLOCK_D)
    cols64 = cols.to(tl.int64)  # cols * (stride of d) may pass 2^31 in strided views
    mask = cols < D
    scale1 = 1.0 + _to_acc(tl.load(SCALE + b * ssc_b + cols * ssc_d, mask=mask, other=0.0), ACC_F64)
    gate = _to_acc(tl.load(GATE + b * sg_b + cols * sg_d, mask=mask, other=0.0), ACC_F64)
    acc_dgate = _to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), ACC_F64)
    acc_dshift = _to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), ACC_F64)
    acc_dscale = _to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), ACC_F64)
    l_start = chunk * rows_per_prog
    l_end = tl.minimum(l_start + rows_per_prog, L)
    for l in range(l_start, l_end):  # int64 (chunk is): l * sx_l must not wrap for large views
        row = b * L + l
        r = _to_acc(tl.load(R + b * sr_b + l * sr_l + cols64 * sr_d, mask=mask, other=0.0), ACC_F64)
        dh = _to_acc(tl.load(DH + b * sdh_b + l * sdh_l + cols64 * sdh_d, mask=mask, other=0.0), ACC_F64)
        dr = _to_acc(tl.load(DR + b * sdr_b + l * sdr_l + cols64 * sdr_d, mask=mask, other=0.0), ACC_F64)
        br = _to_acc(tl.load(BR + b * sbr_b + l * sbr_l + cols64 * sbr_d, mask=mask, other=0.0), ACC_F64)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (r - mean) * rstd, 0.0)
        dres = dr + _ln_input_grad(dh, xhat, scale1, rstd, D)
        tl.store(DX + row * D + cols, _to_out(dres, DX), mask=mask)
        tl.store(DBR + row * D + cols, _to_out(gate * dres, DBR), mask=mask)
        acc_dgate += dres * br
        acc_dshift += dh
        acc_dscale += dh * xhat
    out = (b * n_chunks + chunk) * D + cols
    tl.store(DGATE_P + out, acc_dgate, mask=mask)
    tl.store(DSHIFT_P + out, acc_dshift, mask=mask)
    tl.store(DSCALE_P + out, acc_dscale, mask=mask)


# -----------------------------------------------------------------------------
# launchers (same contracts as the torch reference in masked_dit/ops/adaln.py)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def adaln_modulate_fwd(x, shift, scale, eps, out_dtype=None):
    B, L, D = x.shape
    stats = _stats_dtype(x.dtype)
    h = torch.empty((B, L, D), dtype=out_dtype or x.dtype, device=x.device)  # the store converts
    mean = torch.empty((B, L), dtype=stats, device=x.device)
    rstd = torch.empty((B, L), dtype=stats, device=x.device)
    if B * L == 0:
        return h, mean, rstd
    block_d = _block_d(D)
    with device_guard(x.device):
        _adaln_fwd_kernel[(B * L,)](
            x, shift, scale, h, mean, rstd, L, D, eps,
            *x.stride(), *shift.stride(), *scale.stride(),
            BLOCK_D=block_d, ACC_F64=stats == torch.float64, num_warps=_num_warps(block_d, 8),
        )
    return h, mean, rstd


def adaln_modulate_bwd(dh, x, scale, mean, rstd, shift_dtype=None):
    B, L, D = x.shape
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    n_chunks = _num_chunks(B, L, x.device)
    # every program writes its whole slot (zeros for empty chunks); zeros only for B*L == 0
    partial = (torch.empty if B * L else torch.zeros)((2, B, n_chunks, D), dtype=mean.dtype, device=x.device)
    if B * L > 0:
        block_d = _block_d(D)
        with device_guard(x.device):
            _adaln_bwd_kernel[(B * n_chunks,)](
                dh, x, scale, mean, rstd, dx, partial[0], partial[1],
                L, D, math.ceil(L / n_chunks), n_chunks,
                *dh.stride(), *x.stride(), *scale.stride(),
                BLOCK_D=block_d, ACC_F64=mean.dtype == torch.float64, num_warps=_num_warps(block_d, 4),
            )
    # stage 2: [B, chunks, D] -> [B, D]
    return dx, partial[0].sum(dim=1).to(shift_dtype or scale.dtype), partial[1].sum(dim=1).to(scale.dtype)


def gated_residual_adaln_fwd(x, branch, gate, shift, scale, eps, r_dtype, out_dtype=None):
    B, L, D = x.shape
    stats = _stats_dtype(r_dtype)
    r = torch.empty((B, L, D), dtype=r_dtype, device=x.device)
    h = torch.empty((B, L, D), dtype=out_dtype or r_dtype, device=x.device)
    mean = torch.empty((B, L), dtype=stats, device=x.device)
    rstd = torch.empty((B, L), dtype=stats, device=x.device)
    if B * L == 0:
        return r, h, mean, rstd
    block_d = _block_d(D)
    with device_guard(x.device):
        _gated_fwd_kernel[(B * L,)](
            x, branch, gate, shift, scale, r, h, mean, rstd, L, D, eps,
            *x.stride(), *branch.stride(), *gate.stride(), *shift.stride(), *scale.stride(),
            BLOCK_D=block_d, ACC_F64=stats == torch.float64, num_warps=_num_warps(block_d, 8),
        )
    return r, h, mean, rstd


def gated_residual_adaln_bwd(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype=None):
    B, L, D = r.shape
    dx = torch.empty((B, L, D), dtype=r.dtype, device=r.device)
    dbranch = torch.empty((B, L, D), dtype=branch.dtype, device=r.device)
    n_chunks = _num_chunks(B, L, r.device)
    partial = (torch.empty if B * L else torch.zeros)((3, B, n_chunks, D), dtype=mean.dtype, device=r.device)
    if B * L > 0:
        block_d = _block_d(D)
        with device_guard(r.device):
            _gated_bwd_kernel[(B * n_chunks,)](
                dr, dh, r, branch, gate, scale, mean, rstd, dx, dbranch, partial[0], partial[1], partial[2],
                L, D, math.ceil(L / n_chunks), n_chunks,
                *dr.stride(), *dh.stride(), *r.stride(), *branch.stride(), *gate.stride(), *scale.stride(),
                BLOCK_D=block_d, ACC_F64=mean.dtype == torch.float64, num_warps=_num_warps(block_d, 4),
            )
    # stage 2: [B, chunks, D] -> [B, D]
    dgate, dshift, dscale = (partial[i].sum(dim=1) for i in range(3))
    return dx, dbranch, dgate.to(gate.dtype), dshift.to(shift_dtype or scale.dtype), dscale.to(scale.dtype)
