"""Triton kernels for masked_dit.ops (imported lazily: triton is optional)."""
