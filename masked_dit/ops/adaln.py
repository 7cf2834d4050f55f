"""adaLN LayerNorm + modulate, and its fusion with the gated residual add.

In a DiT block the adaLN Linear gives ``shift, scale, gate`` ([B, D] each, six of them) and

    x = x + gate_msa[:, None] * attn(modulate(norm1(x), shift_msa, scale_msa))
    x = x + gate_mlp[:, None] * mlp(modulate(norm2(x), shift_mlp, scale_mlp))

``adaln_modulate`` is ``modulate(norm(x), shift, scale)`` in one pass; ``gated_residual_adaln``
is the seam between the two halves: the residual add and the next norm + modulate, reading x and
the branch output once and writing both the new residual stream r and the normalised h.

Each op is a ``torch.library.custom_op`` (namespace ``masked_dit``) whose forward also returns
the per-token mean and rstd (fp32; fp64 for fp64 inputs) so the backward -- itself a custom op --
needs no statistics pass. Both dispatch at call time to a backend (see
:mod:`masked_dit.ops.dispatch`): ``torch`` (reference, below), ``triton``
(:mod:`masked_dit.ops.triton_kernels.adaln`) or ``cuda`` (``torch.ops.masked_dit_C``).

Dtypes: h has x's dtype; r (and its h) has the dtype torch gives ``x + gate[:, None] * branch``;
``out_dtype`` stores h in another dtype instead (the block passes autocast's dtype: h feeds a Linear
that would cast it anyway, so writing bf16 once saves the cast's read + write of an fp32 h and halves
h's own write; the values are those of the cast, the kernels compute in fp32 either way).
Gradients come back in each input's dtype; dh may come in any float dtype. All tensors may be strided views (e.g. ``chunk`` of
the adaLN Linear's [B, 6D] output); the triton and cuda backends read them without copies.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from masked_dit.ops import dispatch

# -----------------------------------------------------------------------------
# input checks (run in the public functions, so also at torch.compile trace time)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _check_activation(name: str, t: Tensor) -> None:
    _check_float(name, t)
    if t.dim() != 3:
        raise ValueError(f"{name} must be [B, L, D], got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has an empty feature dim D=0")


def _check_modulation(name: str, t: Tensor, x: Tensor) -> None:
    _check_float(name, t)
    B, _, D = x.shape
    if tuple(t.shape) != (B, D):
        raise ValueError(f"{name} must be [B, D] = {(B, D)} to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise ValueError(f"out_dtype must be None or float16/bfloat16/float32/float64, got {out_dtype}")


def _check_adaln(x: Tensor, shift: Tensor, scale: Tensor) -> None:
    _check_activation("x", x)
    _check_modulation("shift", shift, x)
    _check_modulation("scale", scale, x)


def _check_gated(x: Tensor, branch: Tensor, gate: Tensor, shift: Tensor, scale: Tensor) -> None:
    _check_activation("x", x)
    _check_activation("branch", branch)
    if branch.shape != x.shape:
        raise ValueError(f"branch shape {tuple(branch.shape)} must equal x shape {tuple(x.shape)}")
    if branch.device != x.device:
        raise ValueError(f"branch is on {branch.device} but x is on {x.device}")
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        _check_modulation(name, t, x)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _residual_dtype(x: Tensor, branch: Tensor, gate: Tensor) -> torch.dtype:
    """dtype of ``x + gate[:, None] * branch`` under torch's promotion rules."""
    return torch.promote_types(torch.promote_types(x.dtype, branch.dtype), gate.dtype)


# -----------------------------------------------------------------------------
# torch backend (the reference every other backend is tested against)


def _contiguous(*outputs: Tensor) -> tuple[Tensor, ...]:
    # every backend returns contiguous outputs (the fake impls promise so)
    return tuple(t.contiguous() for t in outputs)


def _layer_norm_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(xhat, mean, rstd) in the statistics dtype; two-pass, so exact for large |x|."""
    xf = x.to(_stats_dtype(x.dtype))
    mean = xf.mean(dim=-1)
    xc = xf - mean[..., None]
    rstd = torch.rsqrt((xc * xc).mean(dim=-1) + eps)
    return xc * rstd[..., None], mean, rstd


def _layer_norm_input_grad(dh: Tensor, xhat: Tensor, scale: Tensor, rstd: Tensor) -> Tensor:
    """d(norm input) for h = xhat * (1 + scale) + shift, all in the statistics dtype."""
    g = dh * (1 + scale[:, None])
    g_mean = g.mean(dim=-1, keepdim=True)
    gx_mean = (g * xhat).mean(dim=-1, keepdim=True)
    return (g - g_mean - xhat * gx_mean) * rstd[..., None]


@dispatch.register("adaln_modulate", "torch")
def _adaln_modulate_torch(x, shift, scale, eps, out_dtype=None):
    xhat, mean, rstd = _layer_norm_stats(x, eps)
    acc = mean.dtype
    h = xhat * (1 + scale.to(acc)[:, None]) + shift.to(acc)[:, None]
    return _contiguous(h.to(out_dtype or x.dtype), mean, rstd)


@dispatch.register("adaln_modulate_backward", "torch")
def _adaln_modulate_backward_torch(dh, x, scale, mean, rstd, shift_dtype=None):
    acc = mean.dtype
    xhat = (x.to(acc) - mean[..., None]) * rstd[..., None]
    dhf = dh.to(acc)
    dx = _layer_norm_input_grad(dhf, xhat, scale.to(acc), rstd)
    return _contiguous(dx.to(x.dtype), dhf.sum(dim=1).to(shift_dtype or scale.dtype),
                       (dhf * xhat).sum(dim=1).to(scale.dtype))


def gated_sum(x: Tensor, branch: Tensor, gate: Tensor) -> Tensor:
    """``x + gate * branch`` in the gated ops' arithmetic: accumulated in float32 (float64 for float64),
    stored in the promoted dtype. ``gate`` must broadcast against ``branch`` as given."""
    r_dtype = _residual_dtype(x, branch, gate)
    acc = _stats_dtype(r_dtype)
    return (x.to(acc) + gate.to(acc) * branch.to(acc)).to(r_dtype)


@dispatch.register("gated_residual_adaln", "torch")
def _gated_residual_adaln_torch(x, branch, gate, shift, scale, eps, out_dtype=None):
    r = gated_sum(x, branch, gate[:, None])
    h, mean, rstd = _adaln_modulate_torch(r, shift, scale, eps, out_dtype)
    return _contiguous(r, h, mean, rstd)


@dispatch.register("gated_residual_adaln_backward", "torch")
def _gated_residual_adaln_backward_torch(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype=None):
    acc = mean.dtype
    xhat = (r.to(acc) - mean[..., None]) * rstd[..., None]
    dhf = dh.to(acc)
    dres = dr.to(acc) + _layer_norm_input_grad(dhf, xhat, scale.to(acc), rstd)
    return _contiguous(
        dres.to(r.dtype),
        (gate.to(acc)[:, None] * dres).to(branch.dtype),
        (dres * branch.to(acc)).sum(dim=1).to(gate.dtype),
        dhf.sum(dim=1).to(shift_dtype or scale.dtype),
        (dhf * xhat).sum(dim=1).to(scale.dtype),
    )


# -----------------------------------------------------------------------------
# triton backend (imported lazily: TRITON_INTERPRET must be set before triton is imported)


def _triton():
    from masked_dit.ops.triton_kernels import adaln

    return adaln


# One program holds a whole row in registers: past 16384 features (the widest the GPU tests run) the
# kernels spill, and past 2^20 (Triton's largest block) they do not compile at all (the interpreter
# raised "numel exceeds triton maximum tensor numel"). Wider rows run the torch reference, as the
# CUDA backend's do past its kMaxD.
_TRITON_MAX_D = 16384


@dispatch.register("adaln_modulate", "triton")
def _adaln_modulate_triton(x, shift, scale, eps, out_dtype=None):
    if x.shape[-1] > _TRITON_MAX_D:
        return _adaln_modulate_torch(x, shift, scale, eps, out_dtype)
    return _triton().adaln_modulate_fwd(x, shift, scale, eps, out_dtype)


@dispatch.register("adaln_modulate_backward", "triton")
def _adaln_modulate_backward_triton(dh, x, scale, mean, rstd, shift_dtype=None):
    if x.shape[-1] > _TRITON_MAX_D:
        return _adaln_modulate_backward_torch(dh, x, scale, mean, rstd, shift_dtype)
    return _triton().adaln_modulate_bwd(dh, x, scale, mean, rstd, shift_dtype)


@dispatch.register("gated_residual_adaln", "triton")
def _gated_residual_adaln_triton(x, branch, gate, shift, scale, eps, out_dtype=None):
    if x.shape[-1] > _TRITON_MAX_D:
        return _gated_residual_adaln_torch(x, branch, gate, shift, scale, eps, out_dtype)
    return _triton().gated_residual_adaln_fwd(x, branch, gate, shift, scale, eps, _residual_dtype(x, branch, gate),
                                              out_dtype)


@dispatch.register("gated_residual_adaln_backward", "triton")
def _gated_residual_adaln_backward_triton(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype=None):
    if r.shape[-1] > _TRITON_MAX_D:
        return _gated_residual_adaln_backward_torch(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype)
    return _triton().gated_residual_adaln_bwd(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype)


# -----------------------------------------------------------------------------
# cuda backend (torch.ops.masked_dit_C from csrc/bindings/adaln.cpp)
# The kernels are templated on one activation dtype and one modulation dtype. The [B, D]
# modulation tensors are tiny, so a mixed set is cast to fp32; a branch whose dtype differs
# from the residual's is cast (a copy; rare). fp64 (a test dtype) runs the torch reference.


_CUDA_MAX_D = 16384  # kMaxD in csrc/kernels/adaln.h: wider rows run the torch reference


def _cuda_unsupported(act: Tensor) -> bool:
    return act.dtype == torch.float64 or act.shape[-1] > _CUDA_MAX_D


def _cuda_modulation(*mods: Tensor, grad_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, ...]:
    # fp64 modulation with non-fp64 activations: the reference computes in fp32 too, so cast.
    # grad_dtype: a gradient the kernel stores in the modulation dtype but that is wanted in another
    # (dshift for a shift wider than scale): fp32 then, so it is rounded once, to its own dtype
    if (all(m.dtype == mods[0].dtype for m in mods) and mods[0].dtype != torch.float64
            and grad_dtype in (None, mods[0].dtype)):
        return mods
    return tuple(m.float() for m in mods)


def _other_out_dtype(out_dtype, like: torch.dtype) -> bool:
    # the CUDA kernels store h in the activation dtype: another h dtype runs the Triton kernel (which
    # stores any dtype), else the CUDA kernel and a cast
    return out_dtype is not None and out_dtype != like


def _lossy_grad(grad: Tensor, like: torch.dtype) -> bool:
    # the backward kernels read gradients in the activation dtype: fp32 holds bf16/fp16 exactly, but
    # fp32 -> bf16 rounds and bf16 -> fp16 can overflow, so such gradients run the Triton kernel (which
    # reads any dtype) when it can
    return grad.dtype != like and like != torch.float32 and dispatch.triton_importable()


@dispatch.register("adaln_modulate", "cuda")
def _adaln_modulate_cuda(x, shift, scale, eps, out_dtype=None):
    if _cuda_unsupported(x):
        return _adaln_modulate_torch(x, shift, scale, eps, out_dtype)
    if _other_out_dtype(out_dtype, x.dtype) and dispatch.triton_importable():
        return _adaln_modulate_triton(x, shift, scale, eps, out_dtype)
    shift, scale = _cuda_modulation(shift, scale)
    h, mean, rstd = torch.ops.masked_dit_C.adaln_modulate(x, shift, scale, eps)
    return h.to(out_dtype or h.dtype), mean, rstd


@dispatch.register("adaln_modulate_backward", "cuda")
def _adaln_modulate_backward_cuda(dh, x, scale, mean, rstd, shift_dtype=None):
    if _cuda_unsupported(x):
        return _adaln_modulate_backward_torch(dh, x, scale, mean, rstd, shift_dtype)
    if _lossy_grad(dh, x.dtype):
        return _adaln_modulate_backward_triton(dh, x, scale, mean, rstd, shift_dtype)
    (scale_c,) = _cuda_modulation(scale, grad_dtype=shift_dtype)
    dx, dshift, dscale = torch.ops.masked_dit_C.adaln_modulate_backward(dh.to(x.dtype), x, scale_c, mean, rstd)
    return dx, dshift.to(shift_dtype or scale.dtype), dscale.to(scale.dtype)


@dispatch.register("gated_residual_adaln", "cuda")
def _gated_residual_adaln_cuda(x, branch, gate, shift, scale, eps, out_dtype=None):
    r_dtype = _residual_dtype(x, branch, gate)
    if r_dtype == torch.float64 or x.shape[-1] > _CUDA_MAX_D:
        return _gated_residual_adaln_torch(x, branch, gate, shift, scale, eps, out_dtype)
    if _other_out_dtype(out_dtype, r_dtype) and dispatch.triton_importable():
        return _gated_residual_adaln_triton(x, branch, gate, shift, scale, eps, out_dtype)
    gate, shift, scale = _cuda_modulation(gate, shift, scale)
    r, h, mean, rstd = torch.ops.masked_dit_C.gated_residual_adaln(x.to(r_dtype), branch.to(r_dtype), gate, shift,
                                                                   scale, eps)
    return r, h.to(out_dtype or h.dtype), mean, rstd


@dispatch.register("gated_residual_adaln_backward", "cuda")
def _gated_residual_adaln_backward_cuda(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype=None):
    if _cuda_unsupported(r):
        return _gated_residual_adaln_backward_torch(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype)
    if _lossy_grad(dr, r.dtype) or _lossy_grad(dh, r.dtype):
        return _gated_residual_adaln_backward_triton(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype)
    gate_c, scale_c = _cuda_modulation(gate, scale, grad_dtype=shift_dtype)
    dx, dbranch, dgate, dshift, dscale = torch.ops.masked_dit_C.gated_residual_adaln_backward(
        dr.to(r.dtype), dh.to(r.dtype), r, branch.to(r.dtype), gate_c, scale_c, mean, rstd)
    return (dx, dbranch.to(branch.dtype), dgate.to(gate.dtype), dshift.to(shift_dtype or scale.dtype),
            dscale.to(scale.dtype))


# -----------------------------------------------------------------------------
# custom ops: forward and backward are each one op, so they dispatch and compile as units


def _empty_stats(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    B, L, _ = x.shape
    stats = _stats_dtype(dtype)
    return x.new_empty((B, L), dtype=stats), x.new_empty((B, L), dtype=stats)


@torch.library.custom_op("masked_dit::adaln_modulate", mutates_args=())
def _adaln_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float,
                       out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.impl("adaln_modulate", x.device)(x, shift, scale, eps, out_dtype)


@_adaln_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype=None):
    return (torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format),
            *_empty_stats(x, x.dtype))


@torch.library.custom_op("masked_dit::adaln_modulate_backward", mutates_args=())
def _adaln_modulate_backward_op(
    dh: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, shift_dtype: Optional[torch.dtype] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale); dshift in ``shift_dtype`` (default scale's): shift may be wider than scale."""
    return dispatch.impl("adaln_modulate_backward", x.device)(dh, x, scale, mean, rstd, shift_dtype)


@_adaln_modulate_backward_op.register_fake
def _(dh, x, scale, mean, rstd, shift_dtype=None):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            scale.new_empty(scale.shape, dtype=shift_dtype or scale.dtype), scale.new_empty(scale.shape))


def _adaln_modulate_setup(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _adaln_modulate_grad(ctx, dh, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _adaln_modulate_backward_op(dh, x, scale, mean, rstd, ctx.shift_dtype)
    return dx, dshift, dscale, None, None


dispatch.register_autograd_following_request(_adaln_modulate_op, _adaln_modulate_grad, _adaln_modulate_setup)


@torch.library.custom_op("masked_dit::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(
    x: Tensor, branch: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dispatch.impl("gated_residual_adaln", x.device)(x, branch, gate, shift, scale, eps, out_dtype)


@_gated_residual_adaln_op.register_fake
def _(x, branch, gate, shift, scale, eps, out_dtype=None):
    r_dtype = _residual_dtype(x, branch, gate)
    r = torch.empty(x.shape, dtype=r_dtype, device=x.device)
    return r, torch.empty_like(r, dtype=out_dtype or r_dtype), *_empty_stats(x, r_dtype)


@torch.library.custom_op("masked_dit::gated_residual_adaln_backward", mutates_args=())
def _gated_residual_adaln_backward_op(
    dr: Tensor, dh: Tensor, r: Tensor, branch: Tensor, gate: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
    shift_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dbranch, dgate, dshift, dscale); dshift in ``shift_dtype`` (default scale's)."""
    return dispatch.impl("gated_residual_adaln_backward", r.device)(dr, dh, r, branch, gate, scale, mean, rstd,
                                                                    shift_dtype)


@_gated_residual_adaln_backward_op.register_fake
def _(dr, dh, r, branch, gate, scale, mean, rstd, shift_dtype=None):
    return (torch.empty_like(r, memory_format=torch.contiguous_format),
            torch.empty(r.shape, dtype=branch.dtype, device=r.device),
            gate.new_empty(gate.shape), scale.new_empty(scale.shape, dtype=shift_dtype or scale.dtype),
            scale.new_empty(scale.shape))


def _gated_residual_adaln_setup(ctx, inputs, output):
    x, branch, gate, shift, scale, _, _ = inputs
    r, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(r, branch, gate, scale, mean, rstd)
    ctx.x_dtype, ctx.shift_dtype = x.dtype, shift.dtype


def _gated_residual_adaln_grad(ctx, dr, dh, _dmean, _drstd):
    r, branch, gate, scale, mean, rstd = ctx.saved_tensors
    dx, dbranch, dgate, dshift, dscale = _gated_residual_adaln_backward_op(dr, dh, r, branch, gate, scale, mean, rstd,
                                                                           ctx.shift_dtype)
    return dx.to(ctx.x_dtype), dbranch, dgate, dshift, dscale, None, None


dispatch.register_autograd_following_request(_gated_residual_adaln_op, _gated_residual_adaln_grad,
                                             _gated_residual_adaln_setup)


# -----------------------------------------------------------------------------
# public API


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                   out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """LayerNorm(x) (no affine) * (1 + scale[:, None]) + shift[:, None]; x [B, L, D], shift/scale [B, D];
    stored in ``out_dtype`` (default x's dtype)."""
    _check_adaln(x, shift, scale)
    _check_out_dtype(out_dtype)
    if dispatch.inline_reference("adaln_modulate", x.device):
        return _adaln_modulate_torch(x, shift, scale, float(eps), out_dtype)[0]
    return _adaln_modulate_op(x, shift, scale, float(eps), out_dtype)[0]


def gated_residual_adaln(x: Tensor, branch: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                         eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(r, h): r = x + gate[:, None] * branch; h = adaln_modulate(r, shift, scale, eps), stored in
    ``out_dtype`` (default r's dtype)."""
    _check_gated(x, branch, gate, shift, scale)
    _check_out_dtype(out_dtype)
    op = _gated_residual_adaln_torch if dispatch.inline_reference("gated_residual_adaln", x.device) \
        else _gated_residual_adaln_op
    r, h, _, _ = op(x, branch, gate, shift, scale, float(eps), out_dtype)
    return r, h
