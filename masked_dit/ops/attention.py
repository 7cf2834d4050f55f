"""Attention over (kept) tokens: dense, packed variable-length, MDT relative-position bias.

PLACEHOLDER (plain PyTorch): the attention helper replaces this with the real op.
Signature is final.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q, k, v, *, cu_seqlens=None, max_seqlen=None, rel_pos_bias=None, positions=None):
    """q, k, v [B, N, H, Dh] (or packed [T, H, Dh] with cu_seqlens) -> output in q's layout."""
    if cu_seqlens is not None:
        raise NotImplementedError("packed attention lands with the attention op")
    bias = None
    if rel_pos_bias is not None:
        table, index = rel_pos_bias
        idx = index if positions is None else index[positions[:, :, None], positions[:, None, :]]
        bias = table[idx]  # [N, N, H] or [B, K, K, H]
        bias = bias.permute(2, 0, 1)[None] if bias.dim() == 3 else bias.permute(0, 3, 1, 2)
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)
