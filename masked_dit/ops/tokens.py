"""Masked-token gather / scatter (dense and packed variable-length).

PLACEHOLDER (plain PyTorch): the ops helper replaces this with custom ops + backends.
Signatures are final.
"""
from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids_keep [B, K] int64 -> [B, K, D]; out[b, k] = x[b, ids_keep[b, k]]."""
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x_keep: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """fill [D] or [B, N, D] everywhere, except out[b, ids_keep[b, k]] = x_keep[b, k]."""
    B, K, D = x_keep.shape
    base = fill.expand(B, num_tokens, D) if fill.dim() == 1 else fill
    return base.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), x_keep)


def gather_tokens_varlen(x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids_keep [T] (positions within each sample), cu_seqlens [B+1] int32 -> [T, D]."""
    batch = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), cu_seqlens.diff().long())
    return x[batch, ids_keep]


def scatter_tokens_varlen(x_keep: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor,
                          fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """x_keep [T, D] packed -> [B, N, D] holding fill except at the kept positions."""
    B = cu_seqlens.numel() - 1
    D = x_keep.shape[-1]
    base = (fill.expand(B, num_tokens, D) if fill.dim() == 1 else fill).clone()
    batch = torch.repeat_interleave(torch.arange(B, device=x_keep.device), cu_seqlens.diff().long())
    return base.index_put((batch, ids_keep), x_keep)
