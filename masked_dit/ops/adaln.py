"""adaLN LayerNorm + modulate, and its fusion with the gated residual add.

PLACEHOLDER (plain PyTorch): the ops helper replaces this with custom ops + backends.
Signatures are final.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) (no affine) * (1 + scale[:, None]) + shift[:, None]; x [B, L, D], shift/scale [B, D]."""
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (h * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def gated_residual_adaln(x, branch, gate, shift, scale, eps: float = 1e-6):
    """(r, h): r = x + gate[:, None] * branch; h = adaln_modulate(r, shift, scale, eps)."""
    r = x + gate[:, None] * branch
    return r, adaln_modulate(r, shift, scale, eps)
