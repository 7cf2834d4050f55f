"""FlexAttention path: MDT relative-position bias as a ``score_mod``, packed sequences as a block mask.

The bias is read inside the kernel, ``score + table[index[pos_q, pos_k], h]``, so the
[B, H, K, K] bias that the MDT reference gathers per block never exists in memory, and
FlexAttention's backward scatters d(score) into ``table`` (captured tensors that require grad
get gradients). Packed variable-length batches run as one sequence of T tokens with a block
mask built straight from ``cu_seqlens`` (no T x T boolean mask is ever made): a tile is
skipped when its query and key blocks share no sequence, and runs without ``mask_mod`` when
both lie inside one sequence.

Outside ``torch.compile`` FlexAttention is an unfused math fallback, so on CUDA we run
:func:`flex_core` through one cached ``torch.compile`` (automatic dynamic shapes keep the
changing kept-token counts from recompiling every step). Inside a compiled model we call it
plainly and the outer graph inlines it. On CPU it runs eagerly (forward only: FlexAttention
has no CPU backward), which is how the tests check the score_mod and block mask logic.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # FlexAttention appeared in torch 2.5
    from torch.nn.attention import flex_attention as _flex_module
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch
    _flex_module = None
    BlockMask = flex_attention = None

AVAILABLE = flex_attention is not None
BLOCK_SIZE = 128


def _any_head_dim_supported() -> bool:
    """Older FlexAttention (<= 2.6) rejects head dims that are not powers of two from 2 (e.g. 72, or 1)."""
    validate = getattr(_flex_module, "_validate_embed_dim", None)
    if validate is None:  # newer torch dropped the check
        return True
    try:
        x = torch.empty(1, 1, 1, 72, device="meta")
        validate(x, x, x)
        return True
    except Exception:
        return False


ANY_HEAD_DIM = AVAILABLE and _any_head_dim_supported()
_FROM_KV_BLOCKS_HAS_SEQ_LENGTHS = AVAILABLE and "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters


# ----------------------------------------------------------------------------------------
# Packed sequences -> block mask
# ----------------------------------------------------------------------------------------

def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Sequence id of every packed token: [T] int64 (seg[t] = s for cu[s] <= t < cu[s+1])."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)


def document_block_mask(seg: Tensor, total: int, block: int = BLOCK_SIZE) -> "BlockMask":
    """Block mask for packed sequences: token i sees token j iff seg[i] == seg[j]."""
    nb = -(-total // block)
    starts = torch.arange(nb, device=seg.device) * block
    ends = (starts + block).clamp(max=total) - 1
    first, last = seg[starts], seg[ends]  # sequences are contiguous: a block spans [first, last]
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    inside_one = (first == last) & (starts + block <= total)  # whole block within one sequence
    full = inside_one[:, None] & inside_one[None, :] & (first[:, None] == first[None, :])
    partial = overlap & ~full

    def ordered(m: Tensor) -> tuple[Tensor, Tensor]:
        num = m.sum(-1).to(torch.int32)[None, None]
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)[None, None]
        return num, idx

    def same_sequence(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    extra = {"seq_lengths": (total, total)} if _FROM_KV_BLOCKS_HAS_SEQ_LENGTHS else {}
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=same_sequence, **extra)


# ----------------------------------------------------------------------------------------
# The attention call
# ----------------------------------------------------------------------------------------

def flex_core(q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], index: Optional[Tensor],
              positions: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float) -> Tensor:
    """q, k, v [B, N, H, Dh] (or packed [T, H, Dh] with cu_seqlens) -> same layout as q."""
    packed = cu_seqlens is not None
    if packed:  # one sequence of T tokens, [1, H, T, Dh]
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    else:
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    dh = qh.shape[-1]
    pad = 0 if ANY_HEAD_DIM else max(2, 1 << (dh - 1).bit_length()) - dh  # old torch: powers of two from 2
    if pad:  # zero columns change neither q.k nor the kept output columns
        qh, kh, vh = (F.pad(x, (0, pad)) for x in (qh, kh, vh))

    block_mask = None
    if packed:
        block_mask = document_block_mask(segment_ids(cu_seqlens, q.shape[0]), q.shape[0])

    # The kernel hands score_mod an fp32 score; adding the table without casting it to q's
    # dtype keeps the bias unrounded under bf16 (as MDT adds it to fp32 scores).
    def bias_full_grid(score, b, h, q_idx, kv_idx):
        return score + table[index[q_idx, kv_idx], h]

    def bias_packed(score, b, h, q_idx, kv_idx):
        return score + table[index[positions[q_idx], positions[kv_idx]], h]

    def bias_kept(score, b, h, q_idx, kv_idx):
        return score + table[index[positions[b, q_idx], positions[b, kv_idx]], h]

    score_mod = None
    if table is not None:
        score_mod = bias_full_grid if positions is None else bias_packed if packed else bias_kept

    out = flex_attention(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale)
    if pad:
        out = out[..., :dh]
    return out[0].transpose(0, 1) if packed else out.transpose(1, 2)


# Eagerly on CUDA each form runs through its own compiled entry point: dynamo caches compiled
# graphs per code object (8 at most), and grad mode, dtype and static->dynamic shapes each
# add entries, so sharing one entry among the forms could exhaust it and fall back to the
# unfused path.

def _flex_unmasked(q, k, v, table, index, scale):
    return flex_core(q, k, v, table, index, None, None, scale)


def _flex_kept(q, k, v, table, index, positions, scale):
    return flex_core(q, k, v, table, index, positions, None, scale)


def _flex_packed(q, k, v, table, index, positions, cu_seqlens, scale):
    return flex_core(q, k, v, table, index, positions, cu_seqlens, scale)


_compiled: dict = {}


def _compiled_entry(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True)
    return _compiled[fn]


def flex(q, k, v, table, index, positions, cu_seqlens, scale):
    """Run :func:`flex_core`: fused through a cached torch.compile on CUDA when called eagerly."""
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_core(q, k, v, table, index, positions, cu_seqlens, scale)
    if cu_seqlens is not None:
        return _compiled_entry(_flex_packed)(q, k, v, table, index, positions, cu_seqlens, scale)
    if positions is not None:
        return _compiled_entry(_flex_kept)(q, k, v, table, index, positions, scale)
    return _compiled_entry(_flex_unmasked)(q, k, v, table, index, scale)
