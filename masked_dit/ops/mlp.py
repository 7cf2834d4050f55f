"""The block MLP with a derivative, its GELU inside the GEMMs (training).

    mlp_gelu(x, w1, b1, w2, b2)  ==  F.linear(gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

Unfused, the MLP makes three passes over its [M, 4D] hidden activations besides the GEMMs: GELU in
the forward, GELU's derivative and fc1's bias gradient in the backward (≈ 0.26 GB per image at
DiT-XL/2, benchmarks/NOTES.md). The ``cuda`` backend puts them in cuBLASLt epilogues
(csrc/kernels/mlp_gemm.cu): fc1 writes ``act = gelu(pre)`` and keeps ``pre`` as its aux output; fc2's
input-gradient GEMM reads ``pre`` and writes ``dpre = (dout @ w2) * gelu'(pre)`` and ``db1``. It must be
one op over the whole MLP, since fc2's input gradient and GELU's derivative are separate autograd nodes
otherwise. It saves what the unfused MLP saves (x, pre, act).

Backends: ``torch`` (the reference; the public function runs it as plain autograd code, which
Inductor fuses under compile) and ``cuda`` (the extension, bf16/fp16 with widths a multiple of 8 and
16-byte aligned operands; otherwise it runs the reference). The ``cuda`` backend is **opt-in**
(``MASKED_DIT_OPT_IN=mlp_gelu`` or ``ops.opt_in("mlp_gelu")``) until a GPU measurement shows it beats
cuBLAS + Inductor's fused GELU; ``benchmarks/bench_train_step.py`` measures it as ``compiled_fused_mlp``.
There is no Triton backend: Inductor's ``max-autotune`` GEMM templates are that alternative.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from masked_dit.ops import dispatch
from masked_dit.ops.linear_gelu import linear_input_dtype

OP = "mlp_gelu"
_LT_DTYPES = (torch.bfloat16, torch.float16)
ALGO_ENV_VAR = "MASKED_DIT_LT_ALGO"  # which of cuBLASLt's heuristic candidates the epilogue GEMMs run
MAX_ALGOS = 8                        # csrc/kernels/mlp_gemm.h kMaxAlgos


def reference(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


# ----------------------------------------------------------------------------------------
# Backends: forward -> (out, pre, act); backward -> (dx, dw1, db1, dw2, db2). 2-D x [M, K].
# The backward computes dx only if ``need_x`` and the weight gradients only if ``need_w`` (a frozen
# MLP: two GEMMs fewer); what it skips it returns as empty tensors.
# ----------------------------------------------------------------------------------------

def _linear_grads(dout, x, w1, act, dpre, db1, need_x, need_w):
    """What follows dpre in both backends: three plain GEMMs (dx, dw1, dw2) and fc2's bias gradient."""
    dx = dpre @ w1 if need_x else x.new_empty(0)
    if not need_w:
        return (dx, *(x.new_empty(0) for _ in range(4)))
    return dx, dpre.t() @ x, db1, dout.t() @ act, dout.sum(0)


@dispatch.register(OP, "torch")
def _mlp_gelu_torch(x, w1, b1, w2, b2):
    pre = F.linear(x, w1, b1)
    act = F.gelu(pre, approximate="tanh")
    return F.linear(act, w2, b2), pre, act


@dispatch.register(OP + "_backward", "torch")
def _mlp_gelu_backward_torch(dout, x, w1, w2, pre, act, need_x, need_w):
    dpre = torch.ops.aten.gelu_backward(dout @ w2, pre, approximate="tanh")
    return _linear_grads(dout, x, w1, act, dpre, dpre.sum(0) if need_w else None, need_x, need_w)


def _cublaslt_ok(*tensors: Tensor) -> bool:
    """Whether cuBLASLt's epilogue GEMMs take these operands (else the reference runs): half
    precision, contiguous, rows of a multiple of 8 elements, 16-byte aligned, no empty dimension
    (cuBLASLt refuses a zero width, where the reference gives GELU of the bias)."""
    first = tensors[0]
    return (first.dtype in _LT_DTYPES
            and all(t.is_contiguous() and t.numel() > 0 and t.shape[-1] % 8 == 0 and t.data_ptr() % 16 == 0
                    for t in tensors))


def lt_algo() -> int:
    """``MASKED_DIT_LT_ALGO`` (default 0: the heuristic's first choice, not always the fastest for epilogue
    GEMMs; ``bench_ops.py --ops mlp_gelu`` under each value finds the best on a GPU)."""
    value = os.environ.get(ALGO_ENV_VAR, "0").strip() or "0"
    if not value.isdigit() or int(value) >= MAX_ALGOS:
        raise ValueError(f"{ALGO_ENV_VAR}={value!r} is not a cuBLASLt candidate index; valid: 0..{MAX_ALGOS - 1}")
    return int(value)


def _lt_ops():
    """The extension's cuBLASLt ops (a function, so that CPU tests can stand in for them)."""
    return torch.ops.masked_dit_C


@dispatch.register(OP, "cuda", auto=False)
def _mlp_gelu_cuda(x, w1, b1, w2, b2):
    if not _cublaslt_ok(x, w1, b1, w2):
        return _mlp_gelu_torch(x, w1, b1, w2, b2)
    act, pre = _lt_ops().linear_gelu_aux(x, w1, b1, lt_algo())
    return F.linear(act, w2, b2), pre, act


@dispatch.register(OP + "_backward", "cuda", auto=False)
def _mlp_gelu_backward_cuda(dout, x, w1, w2, pre, act, need_x, need_w):
    dout = dout.contiguous()
    if not _cublaslt_ok(dout, w2, pre):
        return _mlp_gelu_backward_torch(dout, x, w1, w2, pre, act, need_x, need_w)
    dpre, db1 = _lt_ops().dgelu_bgrad(dout, w2, pre, lt_algo())
    return _linear_grads(dout, x, w1, act, dpre, db1, need_x, need_w)


# ----------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------

def _backend(device_type: str) -> str:
    """The backend the op runs now: dispatch's choice, or the reference where the requested backend is one
    the MLP does not have (``triton``: Inductor's GEMM templates are that alternative)."""
    req = dispatch.requested()
    if req != "auto" and req not in dispatch.backends_of(OP):
        return "torch"
    return dispatch.select(OP, device_type)[0]


@torch.library.custom_op("masked_dit::mlp_gelu", mutates_args=())
def _mlp_gelu_op(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.implementation(OP, _backend(x.device.type))(x, w1, b1, w2, b2)


@_mlp_gelu_op.register_fake
def _(x, w1, b1, w2, b2):
    hidden = x.new_empty(x.shape[0], w1.shape[0])
    return x.new_empty(x.shape[0], w2.shape[0]), hidden, torch.empty_like(hidden)


@torch.library.custom_op("masked_dit::mlp_gelu_backward", mutates_args=())
def _mlp_gelu_backward_op(dout: Tensor, x: Tensor, w1: Tensor, w2: Tensor, pre: Tensor, act: Tensor, backend: str,
                          need_x: bool, need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return dispatch.implementation(OP + "_backward", backend)(dout, x, w1, w2, pre, act, need_x, need_w)


@_mlp_gelu_backward_op.register_fake
def _(dout, x, w1, w2, pre, act, backend, need_x, need_w):
    if not need_w:
        return (x.new_empty(x.shape if need_x else 0), *(x.new_empty(0) for _ in range(4)))
    return (x.new_empty(x.shape if need_x else 0), w1.new_empty(w1.shape), w1.new_empty(w1.shape[0]),
            w2.new_empty(w2.shape), w2.new_empty(w2.shape[0]))


def _setup(ctx, inputs, output):
    x, w1, _b1, w2, _b2 = inputs
    _out, pre, act = output
    ctx.save_for_backward(x, w1, w2, pre, act)
    # the backward runs the forward's backend, not what a context says when (and on the thread where)
    # autograd runs it
    ctx.backend = _backend(x.device.type)


def _grad(ctx, dout, _dpre, _dact):  # pre and act are saved activations, never used downstream
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
    need_w = need_w1 or need_b1 or need_w2 or need_b2
    grads = _mlp_gelu_backward_op(dout, *ctx.saved_tensors, ctx.backend, need_x, need_w)
    return (grads[0] if need_x else None, *(g if need_w else None for g in grads[1:]))


_mlp_gelu_op.register_autograd(_grad, setup_context=_setup)


# ----------------------------------------------------------------------------------------
# Public
# ----------------------------------------------------------------------------------------

@torch._dynamo.assume_constant_result
def _runs_fused(device_type: str) -> bool:
    return _backend(device_type) != "torch"


def _fusable(dtype: torch.dtype, w1: Tensor, w2: Tensor) -> bool:
    """What the fused backend needs that is known before it runs: half precision, widths a multiple of 8
    (pointer alignment is checked when it runs). Else the op would run its reference body as one opaque
    op, where compile could not fuse it."""
    return (dtype in _LT_DTYPES and w1.numel() > 0 and w2.numel() > 0
            and w1.shape[0] % 8 == 0 and w1.shape[1] % 8 == 0 and w2.shape[0] % 8 == 0)


def mlp_gelu_is_fused(x: Tensor, w1: Tensor, w2: Tensor) -> bool:
    """Whether :func:`mlp_gelu` of these operands runs a fused backend now (else the plain reference)."""
    return _runs_fused(x.device.type) and _fusable(linear_input_dtype(x) or x.dtype, w1, w2)


def mlp_gelu(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """fc2(GELU_tanh(fc1(x))) with a derivative. x [..., K], w1 [H, K], b1 [H], w2 [N, H], b2 [N] -> [..., N].
    Dtypes as nn.Linear gives them (under autocast: its dtype)."""
    for name, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"mlp_gelu: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"mlp_gelu: x must be floating point, got {x.dtype}")
    if x.dim() == 0 or w1.dim() != 2 or w2.dim() != 2 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0] \
            or b1.shape != (w1.shape[0],) or b2.shape != (w2.shape[0],):
        raise ValueError(f"mlp_gelu: x [..., {x.shape[-1] if x.dim() else '?'}], w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, "
                         f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)} do not make fc1 [H, K] -> fc2 [N, H] with biases")
    dtype = linear_input_dtype(x)  # autocast's: every operand is cast to it, as nn.Linear's are
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if dtype is None and t.dtype != x.dtype:
            raise ValueError(f"mlp_gelu: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"mlp_gelu: {name} is on {t.device} but x is on {x.device}")
    if not mlp_gelu_is_fused(x, w1, w2):
        return reference(x, w1, b1, w2, b2)
    if dtype is not None:
        x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    out = _mlp_gelu_op(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)[0]
    return out.view(*x.shape[:-1], w2.shape[0])
