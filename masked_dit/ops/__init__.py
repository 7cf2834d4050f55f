"""Fused ops for masked diffusion transformers, importable on their own.

Every op dispatches between a PyTorch reference, Triton and the CUDA extension
(see :mod:`masked_dit.ops.dispatch`); attention picks among flash/SDPA/FlexAttention kernels, and
``linear_gelu`` (no-gradient forwards) runs cuBLASLt's GELU epilogue on CUDA, the reference elsewhere.
"""
from masked_dit.ops.adaln import adaln_modulate, gated_residual_adaln
from masked_dit.ops.attention import attention
from masked_dit.ops.dispatch import use_backend
from masked_dit.ops.linear_gelu import linear_gelu
from masked_dit.ops.tokens import gather_tokens, gather_tokens_varlen, scatter_tokens, scatter_tokens_varlen

__all__ = [
    "adaln_modulate", "attention", "gated_residual_adaln", "gather_tokens", "gather_tokens_varlen", "linear_gelu",
    "scatter_tokens", "scatter_tokens_varlen", "use_backend",
]
