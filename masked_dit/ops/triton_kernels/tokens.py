"""Triton kernels for masked-token gather / scatter (dense [B, K] ids and packed varlen ids).

Every kernel works on *rows* of D features and takes explicit strides, so inputs may be any
view (transposed, sliced, expanded); outputs are freshly allocated and contiguous. Triton
specialises a stride equal to 1, so the D-contiguous case gets vectorised loads for free.

Scatter-type kernels run over the *output* rows [B*N] and look up an inverse map
``inv[b*N + n] = k + 1`` (0: not kept), built with two cheap integer ops. That way every output
row is written exactly once (ideal traffic: N*D writes), instead of writing the fill everywhere
and then overwriting the kept rows. Ids within a sample must be unique (MAE masks are
permutations): with duplicates, which x_keep row lands at a position is unspecified (scatter's
backward gathers, so there every duplicate gets the gradient at its position, as the reference).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from masked_dit.ops.triton_kernels import device_guard

# -----------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(
    x_ptr, ids_ptr, batch_ptr, out_ptr,
    R, K, D,
    sx_b, sx_n, sx_d,
    VARLEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r] = x[b(r), ids[r]]; b(r) = r // K (dense) or batch[r] (varlen)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < D)[None, :]
    n = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    if VARLEN:
        b = tl.load(batch_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        b = (rows // K).to(tl.int64)
    src = x_ptr + (b * sx_b + n * sx_n)[:, None] + cols[None, :].to(tl.int64) * sx_d
    val = tl.load(src, mask=mask)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], val, mask=mask)


@triton.jit
def _scatter_rows_kernel(
    keep_ptr, inv_ptr, fill_ptr, out_ptr,
    R, N, D,
    sk_0, sk_1, sk_d,
    sf_b, sf_n, sf_d,
    VARLEN: tl.constexpr, FILL_ZERO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, n] = x_keep[row inv-1] if kept else fill[b, n] (or 0); R = B*N output rows.

    x_keep row offset: dense ``b*sk_0 + k*sk_1``, varlen (packed [T, D]) ``t*sk_0``.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < D)[None, :]
    inv = tl.load(inv_ptr + rows, mask=row_ok, other=0)
    kept = inv > 0
    k = (inv - 1).to(tl.int64)
    rows64 = rows.to(tl.int64)
    b = rows64 // N
    n = rows64 % N
    cols64 = cols[None, :].to(tl.int64)
    if VARLEN:
        keep_off = k * sk_0
    else:
        keep_off = b * sk_0 + k * sk_1
    x = tl.load(keep_ptr + keep_off[:, None] + cols64 * sk_d, mask=mask & kept[:, None])
    if FILL_ZERO:
        val = tl.where(kept[:, None], x, tl.zeros_like(x))
    else:
        f = tl.load(fill_ptr + (b * sf_b + n * sf_n)[:, None] + cols64 * sf_d, mask=mask & (inv <= 0)[:, None])
        val = tl.where(kept[:, None], x, f)
    tl.store(out_ptr + rows64[:, None] * D + cols64, val, mask=mask)


@triton.jit
def _scatter_backward_fill_kernel(
    grad_ptr, inv_ptr, gfill_ptr,
    R, N, D,
    sg_b, sg_n, sg_d,
    FILL_DENSE: tl.constexpr, ROWS_PER_PROG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_fill of scatter from the non-kept rows of grad_out [B, N, D] (kept rows are not read:
    their gradient goes to x_keep, gathered by the caller): dense -> grad_out with kept rows zeroed;
    [D] -> per-program fp32 partial sums (fp64 for fp64 inputs), written to gfill_ptr[program_row, :]
    (reduced over programs by the caller: a deterministic two-stage reduction, no atomics).
    """
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    cols64 = cols[None, :].to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=gfill_ptr.dtype.element_ty)  # fp32 (fp64 for fp64 inputs)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = pid_r * ROWS_PER_PROG + r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        mask = row_ok[:, None] & col_ok[None, :]
        inv = tl.load(inv_ptr + rows, mask=row_ok, other=0)
        rows64 = rows.to(tl.int64)
        b = rows64 // N
        n = rows64 % N
        g = tl.load(grad_ptr + (b * sg_b + n * sg_n)[:, None] + cols64 * sg_d, mask=mask & (inv == 0)[:, None],
                    other=0.0)  # kept rows read as 0
        if FILL_DENSE:
            tl.store(gfill_ptr + rows64[:, None] * D + cols64, g, mask=mask)
        else:
            acc += tl.sum(g.to(acc.dtype), axis=0)
    if not FILL_DENSE:
        tl.store(gfill_ptr + pid_r.to(tl.int64) * D + cols, acc, mask=col_ok)


# -----------------------------------------------------------------------------
# Launch helpers (torch tensors in, torch tensors out)
# -----------------------------------------------------------------------------


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): ~4K elements per program, D split in power-of-two tiles of <= 256."""
    # D = 0 launches nothing, but scatter_backward sizes its partials before checking (next_power_of_2(0) is 0)
    block_d = min(triton.next_power_of_2(max(D, 1)), 256)
    return max(1, 4096 // block_d), block_d


def _inverse_map(ids_flat_pos: torch.Tensor, values: torch.Tensor, rows: int) -> torch.Tensor:
    """inv [rows] int32: inv[ids_flat_pos[i]] = values[i] + 1, 0 elsewhere."""
    inv = torch.zeros(rows, dtype=torch.int32, device=ids_flat_pos.device)
    inv.index_copy_(0, ids_flat_pos, values.to(torch.int32) + 1)
    return inv


def inverse_map_dense(ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B*N] int32: k + 1 at (b, ids_keep[b, k]), else 0."""
    B, K = ids_keep.shape
    base = torch.arange(B, device=ids_keep.device)[:, None] * num_tokens
    k = torch.arange(K, device=ids_keep.device).expand(B, K)
    return _inverse_map((base + ids_keep).reshape(-1), k.reshape(-1), B * num_tokens)


def inverse_map_varlen(ids_keep: torch.Tensor, batch: torch.Tensor, B: int, num_tokens: int) -> torch.Tensor:
    """[B*N] int32: t + 1 at (batch[t], ids_keep[t]) for packed row t, else 0."""
    t = torch.arange(ids_keep.numel(), device=ids_keep.device)
    return _inverse_map(batch * num_tokens + ids_keep, t, B * num_tokens)


def gather_rows(x: torch.Tensor, ids: torch.Tensor, batch: torch.Tensor | None) -> torch.Tensor:
    """Dense (ids [B, K], batch None) -> [B, K, D]; varlen (ids [T], batch [T]) -> [T, D]."""
    D = x.shape[-1]
    ids = ids.contiguous()
    R = ids.numel()
    out = torch.empty((*ids.shape, D), dtype=x.dtype, device=x.device)
    if R == 0 or D == 0:
        return out
    K = ids.shape[-1] if batch is None else 1
    block_r, block_d = _blocks(D)
    grid = (triton.cdiv(R, block_r), triton.cdiv(D, block_d))
    with device_guard(x.device):
        _gather_rows_kernel[grid](
            x, ids, ids if batch is None else batch.contiguous(), out,
            R, K, D, *x.stride(),
            VARLEN=batch is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return out


def scatter_rows(x_keep: torch.Tensor, inv: torch.Tensor, fill: torch.Tensor | None,
                 B: int, N: int, D: int, varlen: bool) -> torch.Tensor:
    """[B, N, D]: x_keep rows where inv > 0, else fill ([D] or [B, N, D]; None means zeros)."""
    out = torch.empty((B, N, D), dtype=x_keep.dtype, device=x_keep.device)
    R = B * N
    if R == 0 or D == 0:
        return out
    sk = (x_keep.stride(0), 0, x_keep.stride(1)) if varlen else x_keep.stride()
    if fill is None:
        sf, fill_arg = (0, 0, 0), x_keep
    elif fill.dim() == 1:
        sf, fill_arg = (0, 0, fill.stride(0)), fill
    else:
        sf, fill_arg = fill.stride(), fill
    block_r, block_d = _blocks(D)
    grid = (triton.cdiv(R, block_r), triton.cdiv(D, block_d))
    with device_guard(out.device):
        _scatter_rows_kernel[grid](
            x_keep, inv, fill_arg, out,
            R, N, D, *sk, *sf,
            VARLEN=varlen, FILL_ZERO=fill is None, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return out


def scatter_backward(grad_out: torch.Tensor, inv: torch.Tensor, ids: torch.Tensor, batch: torch.Tensor | None,
                     fill_dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x_keep, grad_fill) of scatter; grad_x_keep is [B, K, D] (dense: ids [B, K], batch None) or
    [T, D] (varlen: ids and batch [T]). grad_x_keep is grad_out gathered at the ids, so every x_keep
    row gets its gradient even where ids repeat; with the fill pass skipping kept rows, grad_out is
    still read once."""
    B, N, D = grad_out.shape
    R = B * N
    grad_keep = gather_rows(grad_out, ids, batch)
    block_r, block_d = _blocks(D)
    # Dense fill: plain row tiles. [D] fill: each program sums up to ~256 rows, so the fp32
    # partials buffer stays ~1/256 of grad_out.
    rows_per_prog = block_r if fill_dense else block_r * max(1, min(256 // block_r, triton.cdiv(R, block_r)))
    n_prog = triton.cdiv(R, rows_per_prog) if R else 0
    if fill_dense:
        grad_fill = torch.empty((B, N, D), dtype=grad_out.dtype, device=grad_out.device)
    else:
        acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
        grad_fill = torch.empty((n_prog, D), dtype=acc_dtype, device=grad_out.device)
    if R and D:
        grid = (n_prog, triton.cdiv(D, block_d))
        with device_guard(grad_out.device):
            _scatter_backward_fill_kernel[grid](
                grad_out, inv, grad_fill,
                R, N, D, *grad_out.stride(),
                FILL_DENSE=fill_dense, ROWS_PER_PROG=rows_per_prog, BLOCK_R=block_r, BLOCK_D=block_d,
            )
    if not fill_dense:
        grad_fill = grad_fill.sum(0).to(grad_out.dtype)
    return grad_keep, grad_fill
