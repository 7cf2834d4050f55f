"""Triton kernels for masked_dit.ops (imported lazily: triton is optional)."""
import contextlib

import torch


def device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' device (multi-GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
