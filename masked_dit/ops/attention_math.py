"""Reference attention in plain PyTorch math: the CPU path and the ground truth of the others.

One custom op pair, ``masked_dit::attention_math`` (forward, returns the output and the
log-sum-exp) and ``masked_dit::attention_math_backward``, covers every form of
:func:`masked_dit.ops.attention` on a *padded* batch:

    q, k, v    [B, L, H, Dh]   any strides (views of a fused qkv are fine)
    kv_len     [B] int or None  keys j >= kv_len[b] are masked (packed batches padded to L)
    table      [R, H] or None   MDT relative-position bias table (learnable)
    index      [N, N] int64     relative-position index over the full token grid
    positions  [B, L] int64     grid position of each token (row i of the bias is index[pos_i])

Why a custom op rather than a few differentiable torch lines: autograd over a chunked
softmax would still keep every chunk's probabilities for backward, i.e. the whole
[B, H, L, L] matrix. Here the forward keeps only (out, lse) and the backward recomputes the
scores chunk by chunk (the FlashAttention recipe), so peak memory is one query chunk of
scores in both passes, bias included. Being an opaque op with a fake kernel, it also traces
under ``torch.compile(fullgraph=True)`` without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Scores of one query chunk, [B, H, chunk, L], are kept under this many elements.
CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(B: int, H: int, L: int) -> int:
    return max(1, min(L, CHUNK_ELEMENTS // max(1, B * H * L)))


def _chunk_scores(q_c: Tensor, k_t: Tensor, scale: float, rows: slice, kv_len: Optional[Tensor],
                  table: Optional[Tensor], index: Optional[Tensor], positions: Optional[Tensor]) -> Tensor:
    """Scores of one query chunk: q_c [B, H, c, Dh] (acc dtype), k_t [B, H, Dh, L] -> [B, H, c, L]."""
    s = torch.matmul(q_c, k_t) * scale
    L = k_t.shape[-1]
    if table is not None:
        rel = _rel_index(index, positions, rows, L, s.shape[0])  # [B, c, L]
        s = s + table.to(s.dtype)[rel].permute(0, 3, 1, 2)
    if kv_len is not None:
        # An empty sequence (kv_len 0) only has padding rows; let them see key 0 so they stay finite.
        valid = torch.arange(L, device=s.device) < kv_len.clamp(min=1)[:, None].to(s.device)
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return s


def _rel_index(index: Tensor, positions: Optional[Tensor], rows: slice, L: int, B: int) -> Tensor:
    """index[positions[b, i], positions[b, j]] for i in rows, all j -> [B, c, L] int64."""
    if positions is None:
        return index[rows, :L].expand(B, -1, -1)
    pos = positions.long()
    return index[pos[:, rows, None], pos[:, None, :]]


def _heads_first(x: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, L, H, Dh] -> [B, H, L, Dh] in the accumulate dtype."""
    return x.transpose(1, 2).to(dtype)


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("masked_dit::attention_math", mutates_args=())
def attention_math(q: Tensor, k: Tensor, v: Tensor, kv_len: Optional[Tensor], table: Optional[Tensor],
                   index: Optional[Tensor], positions: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, L, H, Dh] in q's dtype, lse [B, H, L] in the accumulate dtype)."""
    B, L, H, Dh = q.shape
    acc = _acc_dtype(q.dtype)
    k_t = _heads_first(k, acc).transpose(-1, -2)
    v_h = _heads_first(v, acc)
    out = torch.empty(B, H, L, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(B, H, L, dtype=acc, device=q.device)
    step = _chunk_rows(B, H, L)
    for start in range(0, L, step):
        rows = slice(start, min(L, start + step))
        q_c = q[:, rows].transpose(1, 2).to(acc)
        s = _chunk_scores(q_c, k_t, scale, rows, kv_len, table, index, positions)
        lse_c = torch.logsumexp(s, dim=-1)
        out[:, :, rows] = torch.matmul(torch.exp(s - lse_c[..., None]), v_h)
        lse[:, :, rows] = lse_c
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse


@attention_math.register_fake
def _(q, k, v, kv_len, table, index, positions, scale):
    B, L, H, _ = q.shape
    out = q.new_empty(B, L, H, v.shape[-1])
    return out, q.new_empty(B, H, L, dtype=_acc_dtype(q.dtype))


# ----------------------------------------------------------------------------------------
# Backward (recomputes each chunk's probabilities from lse)
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("masked_dit::attention_math_backward", mutates_args=())
def attention_math_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                            kv_len: Optional[Tensor], table: Optional[Tensor], index: Optional[Tensor],
                            positions: Optional[Tensor], scale: float
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dtable); dtable is an empty tensor when there is no bias table."""
    B, L, H, Dh = q.shape
    acc = _acc_dtype(q.dtype)
    k_h = _heads_first(k, acc)
    k_t = k_h.transpose(-1, -2)
    v_h = _heads_first(v, acc)
    dq = torch.empty(B, H, L, Dh, dtype=acc, device=q.device)
    dk = torch.zeros_like(k_h)
    dv = torch.zeros_like(v_h)
    dtable = torch.zeros(table.shape, dtype=acc, device=table.device) if table is not None else None
    step = _chunk_rows(B, H, L)
    for start in range(0, L, step):
        rows = slice(start, min(L, start + step))
        q_c = q[:, rows].transpose(1, 2).to(acc)
        do_c = grad_out[:, rows].transpose(1, 2).to(acc)
        s = _chunk_scores(q_c, k_t, scale, rows, kv_len, table, index, positions)
        p = torch.exp(s - lse[:, :, rows, None])
        dv += torch.matmul(p.transpose(-1, -2), do_c)
        dp = torch.matmul(do_c, v_h.transpose(-1, -2))
        delta = (do_c * out[:, rows].transpose(1, 2).to(acc)).sum(-1, keepdim=True)
        ds = p * (dp - delta)  # d(loss)/d(score) after scaling and bias
        dq[:, :, rows] = torch.matmul(ds, k_h) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q_c) * scale
        if dtable is not None:
            rel = _rel_index(index, positions, rows, L, B)
            dtable.index_add_(0, rel.reshape(-1), ds.permute(0, 2, 3, 1).reshape(-1, H))
    dtable = dtable.to(table.dtype) if dtable is not None else q.new_empty(0)
    return (dq.transpose(1, 2).to(q.dtype).contiguous(), dk.transpose(1, 2).to(k.dtype).contiguous(),
            dv.transpose(1, 2).to(v.dtype).contiguous(), dtable)


@attention_math_backward.register_fake
def _(grad_out, q, k, v, out, lse, kv_len, table, index, positions, scale):
    # contiguous, as the real op's (accumulated in a new buffer): empty_like would copy a transposed table's strides
    dtable = torch.empty_like(table, memory_format=torch.contiguous_format) if table is not None else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dtable)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_len, table, index, positions, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_len, table, index, positions)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_len, table, index, positions = ctx.saved_tensors
    dq, dk, dv, dtable = attention_math_backward(grad_out, q, k, v, out, lse, kv_len, table, index,
                                                 positions, ctx.scale)
    return dq, dk, dv, None, (dtable if table is not None else None), None, None, None


attention_math.register_autograd(_backward, setup_context=_setup_context)
