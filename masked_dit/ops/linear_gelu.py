"""Linear + GELU(tanh) in one GEMM, for forwards that need no gradient (sampling, evaluation).

    linear_gelu(x, weight, bias)  ==  gelu(x @ weight.T + bias, approximate="tanh")

The MLP's GELU is a pass of its own over the 4·D hidden activations (in bf16: read and write, 16·D
bytes per token; at DiT-XL/2 ≈ 40% of a sampling step's non-matmul traffic). On CUDA, cuBLASLt applies
it in the GEMM epilogue instead (``torch._addmm_activation``: its tanh form, DiT's), from the fp32
accumulator, rounding once where the two kernels round twice. That path has no derivative, so the
blocks use it only where no gradient is needed. It is a custom op so that ``torch.compile`` keeps it
whole: Inductor decomposes ``_addmm_activation`` back into addmm + gelu. Elsewhere the op runs the
reference (``F.linear`` then ``F.gelu``), which the public function traces inline under compile.

Dtypes as ``nn.Linear`` gives them: under autocast the inputs are cast to its dtype (the weight per
call: autocast's weight cache is not reachable from here; ≈ 1% of the bytes saved at batch 256).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_input_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast will cast a Linear's input to (None: no autocast, or fp64, which it leaves).
    The blocks' adaLN ops store h in it directly, so the cast's extra pass over an fp32 h disappears."""
    device = x.device.type
    # meta (shape-only forwards): autocast has no state for it, and is_autocast_enabled("meta") raises
    if x.dtype == torch.float64 or device == "meta" or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd would record an op on ``tensors`` (where :func:`linear_gelu` cannot run)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _reference(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@torch.library.custom_op("masked_dit::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    if x.is_cuda:
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return _reference(x, weight, bias)


@_linear_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu(F.linear(x, weight, bias), approximate="tanh")`` without a gradient (one GEMM on CUDA).
    x [..., K], weight [N, K], bias [N] -> [..., N]."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if (t is not None or name != "bias") and not isinstance(t, Tensor):
            raise TypeError(f"linear_gelu: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"linear_gelu: x must be floating point, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"linear_gelu: x must have a feature dim [..., K], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or bias is None or bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_gelu: x [..., {x.shape[-1]}], weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not make a Linear with a bias")
    if needs_grad(x, weight, bias):
        raise RuntimeError("linear_gelu has no derivative: call it under torch.no_grad() (or use fc1 + GELU)")
    dtype = linear_input_dtype(x)
    if dtype is not None:
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    # checked after autocast's casts (which make them agree); the GEMM's own errors name no argument
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype != x.dtype:
            raise ValueError(f"linear_gelu: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"linear_gelu: {name} is on {t.device} but x is on {x.device}")
    if not x.is_cuda and torch.compiler.is_compiling():  # the reference, for Inductor to fuse
        return _reference(x, weight, bias)
    return _linear_gelu_op(x, weight, bias)
