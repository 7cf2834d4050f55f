"""Fused ops for masked diffusion transformers, importable on their own.

Every op dispatches between a PyTorch reference, Triton and the CUDA extension
(see :mod:`masked_dit.ops.dispatch`); attention picks among flash/SDPA/FlexAttention kernels,
``linear_gelu`` (no-gradient forwards) runs cuBLASLt's GELU epilogue on CUDA, the reference elsewhere,
and ``mlp_gelu`` (the MLP with a derivative) runs cuBLASLt's GELU epilogues where opted in.
"""
from masked_dit.ops.adaln import adaln_modulate, gated_residual_adaln
from masked_dit.ops.attention import attention
from masked_dit.ops.dispatch import opt_in, use_backend
from masked_dit.ops.linear_gelu import linear_gelu
from masked_dit.ops.mlp import mlp_gelu, mlp_gelu_is_fused
from masked_dit.ops.tokens import gather_tokens, gather_tokens_varlen, scatter_tokens, scatter_tokens_varlen

__all__ = [
    "adaln_modulate", "attention", "gated_residual_adaln", "gather_tokens", "gather_tokens_varlen", "linear_gelu",
    "mlp_gelu", "mlp_gelu_is_fused", "opt_in", "scatter_tokens", "scatter_tokens_varlen", "use_backend",
]
