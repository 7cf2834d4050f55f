"""Masked-token gather / scatter (dense [B, K] ids and packed variable-length ids).

MAE-style masking keeps K of N tokens per sample (``ids_keep``), runs the encoder on those, then
puts them back among mask tokens. These ops do the two moves without the official
``torch.gather(x, 1, ids.unsqueeze(-1).repeat(1, 1, D))``, which materialises a B*K*D int64 index.

Public ops (each a ``torch.library.custom_op`` in namespace ``masked_dit`` with a fake and an
autograd rule, so they run under ``torch.compile(fullgraph=True)`` without graph breaks):

    gather_tokens(x [B,N,D], ids_keep [B,K])                                -> [B, K, D]
    scatter_tokens(x_keep [B,K,D], ids_keep [B,K], fill, num_tokens)        -> [B, N, D]
    gather_tokens_varlen(x [B,N,D], ids_keep [T], cu_seqlens [B+1])         -> [T, D]
    scatter_tokens_varlen(x_keep [T,D], ids_keep [T], cu_seqlens, fill, N)  -> [B, N, D]

``fill`` is a mask token [D] (broadcast) or a full [B, N, D] tensor; both get gradients.
Varlen ids are positions *within* each sample: sample b owns packed rows
``cu_seqlens[b]:cu_seqlens[b+1]`` (int32, flash-attn convention, T = cu_seqlens[-1]).

Assumptions: ids are in [0, N) and unique within a sample (MAE masks are permutations), and
cu_seqlens rises from 0 to T. On CPU tensors, ids outside [0, N) and a bad cu_seqlens are one-line
errors; on a GPU nothing data-dependent is checked (it would cost a device sync per call), and
``masked_dit.nn.masking.KeptTokens`` checks its ids once, negatives included (unchecked, the torch
reference would take -1 as the last token, as Python indexing does; the other backends would read
outside the sample). With duplicates, gather is still exact, and so is scatter's gradient (every duplicate gets
the gradient at its position, on every backend), but scatter's output and the gradient of gather are
unspecified at the duplicated positions.

The backward passes are custom ops too (``*_backward``), so they dispatch to the same backends:
the ``torch`` reference (advanced indexing), ``triton`` (:mod:`.triton_kernels.tokens`) and
``cuda`` (``torch.ops.masked_dit_C``, csrc/kernels/tokens.cu). The backends see already
validated inputs; outputs are always new contiguous tensors.
"""
from __future__ import annotations

import torch

from masked_dit.ops import dispatch

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# -----------------------------------------------------------------------------
# Input validation (one clear line per problem; runs in eager and at trace time)
# -----------------------------------------------------------------------------


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(name: str, t: torch.Tensor) -> None:
    _check_tensor(name, t)
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} not supported; use float32, bfloat16, float16 (or float64)")


def _check_ids(ids_keep: torch.Tensor, dim: int, device: torch.device) -> None:
    _check_tensor("ids_keep", ids_keep)
    if ids_keep.dtype != torch.int64:
        raise ValueError(f"ids_keep must be int64, got {ids_keep.dtype}")
    if ids_keep.dim() != dim:
        raise ValueError(f"ids_keep must be {dim}-D, got shape {tuple(ids_keep.shape)}")
    if ids_keep.device != device:
        raise ValueError(f"ids_keep is on {ids_keep.device} but the tokens are on {device}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int | None, device: torch.device) -> None:
    _check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [B+1], got shape {tuple(cu_seqlens.shape)}")
    if batch is not None and cu_seqlens.numel() != batch + 1:
        raise ValueError(f"cu_seqlens has {cu_seqlens.numel()} entries but x has batch {batch} (need B+1)")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")


def _check_fill(fill: torch.Tensor, x_keep: torch.Tensor, B, N, D) -> None:
    _check_tensor("fill", fill)
    if fill.dtype != x_keep.dtype:
        raise ValueError(f"fill dtype {fill.dtype} differs from x_keep dtype {x_keep.dtype}")
    if fill.device != x_keep.device:
        raise ValueError(f"fill is on {fill.device} but x_keep is on {x_keep.device}")
    if fill.dim() == 1:
        if fill.shape[0] != D:
            raise ValueError(f"fill [D] has D={fill.shape[0]} but x_keep has D={D}")
    elif fill.dim() == 3:
        if tuple(fill.shape) != (B, N, D):
            raise ValueError(f"fill must be [D] or [B, N, D] = {(B, N, D)}, got {tuple(fill.shape)}")
    else:
        raise ValueError(f"fill must be [D] or [B, N, D], got shape {tuple(fill.shape)}")


def _check_gather(x: torch.Tensor, ids_keep: torch.Tensor) -> None:
    _check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got shape {tuple(x.shape)}")
    _check_ids(ids_keep, 2, x.device)
    if ids_keep.shape[0] != x.shape[0]:
        raise ValueError(f"batch mismatch: x has B={x.shape[0]}, ids_keep has B={ids_keep.shape[0]}")


def _check_scatter(x_keep: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, num_tokens: int) -> None:
    _check_float("x_keep", x_keep)
    if x_keep.dim() != 3:
        raise ValueError(f"x_keep must be [B, K, D], got shape {tuple(x_keep.shape)}")
    _check_ids(ids_keep, 2, x_keep.device)
    B, K, D = x_keep.shape
    if tuple(ids_keep.shape) != (B, K):
        raise ValueError(f"ids_keep shape {tuple(ids_keep.shape)} does not match x_keep [B, K] = {(B, K)}")
    if num_tokens < K:
        raise ValueError(f"num_tokens={num_tokens} is smaller than the {K} kept tokens")
    _check_fill(fill, x_keep, B, num_tokens, D)


def _check_gather_varlen(x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    _check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got shape {tuple(x.shape)}")
    _check_ids(ids_keep, 1, x.device)
    _check_cu_seqlens(cu_seqlens, x.shape[0], x.device)


def _check_scatter_varlen(x_keep, ids_keep, cu_seqlens, fill, num_tokens) -> None:
    _check_float("x_keep", x_keep)
    if x_keep.dim() != 2:
        raise ValueError(f"x_keep must be packed [T, D], got shape {tuple(x_keep.shape)}")
    _check_ids(ids_keep, 1, x_keep.device)
    if ids_keep.shape[0] != x_keep.shape[0]:
        raise ValueError(f"ids_keep has {ids_keep.shape[0]} rows but x_keep has T={x_keep.shape[0]}")
    _check_cu_seqlens(cu_seqlens, None, x_keep.device)
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    _check_fill(fill, x_keep, cu_seqlens.shape[0] - 1, num_tokens, x_keep.shape[1])


class IdsOutOfRange(ValueError, IndexError):
    """ids_keep >= N: a ValueError like every other check, and the IndexError the torch reference raised."""


def check_ids_values(ids_keep: torch.Tensor, num_tokens: int) -> None:
    """IdsOutOfRange unless every id lies in [0, num_tokens) (reads the values: a device sync off the CPU)."""
    if ids_keep.numel():
        lo, hi = int(ids_keep.min()), int(ids_keep.max())
        if lo < 0 or hi >= num_tokens:
            raise IdsOutOfRange(f"ids_keep must lie in [0, {num_tokens}), got min {lo}, max {hi}")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_len: int | None = None,
                            prefix: str = "") -> torch.Tensor:
    """Sequence lengths [B] of a packed batch, once ``cu_seqlens`` is checked to rise from 0 to ``total``
    (by at most ``max_len`` per sample): else a one-line ValueError starting with ``prefix``. It reads the
    values, so callers use it where that costs no device sync (CPU tensors, eager)."""
    lengths = cu_seqlens.diff()
    too_long = max_len is not None and bool((lengths > max_len).any())
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != total or (lengths < 0).any() or too_long:
        by = "" if max_len is None else f" by at most num_tokens={max_len} per sample"
        raise ValueError(f"{prefix}cu_seqlens must rise from 0 to T={total}{by}, got {cu_seqlens.tolist()}")
    return lengths


def _check_values(ids_keep: torch.Tensor, num_tokens: int, cu_seqlens: torch.Tensor | None = None) -> None:
    """Data-dependent checks, on CPU tensors only (elsewhere they would cost a device sync). Without them the
    Triton kernels read or wrote past x for ids >= N, and a bad cu_seqlens failed inside repeat_interleave
    ("allocated size does not match required size"), and negative ids before x's row."""
    if ids_keep.device.type != "cpu":
        return
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, ids_keep.shape[0])
    check_ids_values(ids_keep, num_tokens)


# -----------------------------------------------------------------------------
# Custom ops: forward
# -----------------------------------------------------------------------------


@torch.library.custom_op("masked_dit::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    _check_gather(x, ids_keep)
    _check_values(ids_keep, x.shape[1])
    return dispatch.impl("gather_tokens", x.device)(x, ids_keep)


@_gather_tokens_op.register_fake
def _(x, ids_keep):
    _check_gather(x, ids_keep)
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))


@torch.library.custom_op("masked_dit::scatter_tokens", mutates_args=())
def _scatter_tokens_op(x_keep: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    _check_scatter(x_keep, ids_keep, fill, num_tokens)
    _check_values(ids_keep, num_tokens)
    return dispatch.impl("scatter_tokens", x_keep.device)(x_keep, ids_keep, fill, num_tokens)


@_scatter_tokens_op.register_fake
def _(x_keep, ids_keep, fill, num_tokens):
    _check_scatter(x_keep, ids_keep, fill, num_tokens)
    return x_keep.new_empty((x_keep.shape[0], num_tokens, x_keep.shape[2]))


@torch.library.custom_op("masked_dit::gather_tokens_varlen", mutates_args=())
def _gather_tokens_varlen_op(x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    _check_gather_varlen(x, ids_keep, cu_seqlens)
    _check_values(ids_keep, x.shape[1], cu_seqlens)
    return dispatch.impl("gather_tokens_varlen", x.device)(x, ids_keep, cu_seqlens)


@_gather_tokens_varlen_op.register_fake
def _(x, ids_keep, cu_seqlens):
    _check_gather_varlen(x, ids_keep, cu_seqlens)
    return x.new_empty((ids_keep.shape[0], x.shape[2]))


@torch.library.custom_op("masked_dit::scatter_tokens_varlen", mutates_args=())
def _scatter_tokens_varlen_op(x_keep: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor,
                              fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    _check_scatter_varlen(x_keep, ids_keep, cu_seqlens, fill, num_tokens)
    _check_values(ids_keep, num_tokens, cu_seqlens)
    return dispatch.impl("scatter_tokens_varlen", x_keep.device)(x_keep, ids_keep, cu_seqlens, fill, num_tokens)


@_scatter_tokens_varlen_op.register_fake
def _(x_keep, ids_keep, cu_seqlens, fill, num_tokens):
    _check_scatter_varlen(x_keep, ids_keep, cu_seqlens, fill, num_tokens)
    return x_keep.new_empty((cu_seqlens.shape[0] - 1, num_tokens, x_keep.shape[1]))


# -----------------------------------------------------------------------------
# Custom ops: backward (gather's adjoint is a zero-filled scatter; scatter's adjoint returns the
# kept rows plus the fill gradient in one pass over grad_out)
# -----------------------------------------------------------------------------


@torch.library.custom_op("masked_dit::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward_op(grad_out: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return dispatch.impl("gather_tokens_backward", grad_out.device)(grad_out, ids_keep, num_tokens)


@_gather_tokens_backward_op.register_fake
def _(grad_out, ids_keep, num_tokens):
    return grad_out.new_empty((grad_out.shape[0], num_tokens, grad_out.shape[2]))


@torch.library.custom_op("masked_dit::scatter_tokens_backward", mutates_args=())
def _scatter_tokens_backward_op(grad_out: torch.Tensor, ids_keep: torch.Tensor,
                                fill_dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.impl("scatter_tokens_backward", grad_out.device)(grad_out, ids_keep, fill_dense)


@_scatter_tokens_backward_op.register_fake
def _(grad_out, ids_keep, fill_dense):
    B, N, D = grad_out.shape
    grad_fill = grad_out.new_empty((B, N, D) if fill_dense else (D,))
    return grad_out.new_empty((B, ids_keep.shape[1], D)), grad_fill


@torch.library.custom_op("masked_dit::gather_tokens_varlen_backward", mutates_args=())
def _gather_tokens_varlen_backward_op(grad_out: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor,
                                      num_tokens: int) -> torch.Tensor:
    return dispatch.impl("gather_tokens_varlen_backward", grad_out.device)(grad_out, ids_keep, cu_seqlens, num_tokens)


@_gather_tokens_varlen_backward_op.register_fake
def _(grad_out, ids_keep, cu_seqlens, num_tokens):
    return grad_out.new_empty((cu_seqlens.shape[0] - 1, num_tokens, grad_out.shape[1]))


@torch.library.custom_op("masked_dit::scatter_tokens_varlen_backward", mutates_args=())
def _scatter_tokens_varlen_backward_op(grad_out: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor,
                                       fill_dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.impl("scatter_tokens_varlen_backward", grad_out.device)(grad_out, ids_keep, cu_seqlens, fill_dense)


@_scatter_tokens_varlen_backward_op.register_fake
def _(grad_out, ids_keep, cu_seqlens, fill_dense):
    B, N, D = grad_out.shape
    grad_fill = grad_out.new_empty((B, N, D) if fill_dense else (D,))
    return grad_out.new_empty((ids_keep.shape[0], D)), grad_fill


# -----------------------------------------------------------------------------
# Autograd. The rules close over each other (gather <-> zero-filled scatter, scatter <->
# scatter_backward), so double backward works too.
# -----------------------------------------------------------------------------


def _setup_gather(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:3])  # ids_keep (and cu_seqlens for varlen)
    ctx.num_tokens = inputs[0].shape[1]


def _gather_bwd(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    return _gather_tokens_backward_op(grad, ids_keep, ctx.num_tokens), None


def _gather_varlen_bwd(ctx, grad):
    ids_keep, cu_seqlens = ctx.saved_tensors
    return _gather_tokens_varlen_backward_op(grad, ids_keep, cu_seqlens, ctx.num_tokens), None, None


def _setup_scatter(ctx, inputs, output):
    *index, fill, _ = inputs[1:]
    ctx.save_for_backward(*index)
    ctx.fill_dense = fill.dim() == 3


def _scatter_bwd(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    if not ctx.needs_input_grad[2]:  # no fill grad wanted: a plain gather is all we need
        return _gather_tokens_op(grad, ids_keep), None, None, None
    grad_keep, grad_fill = _scatter_tokens_backward_op(grad, ids_keep, ctx.fill_dense)
    return grad_keep, None, grad_fill, None


def _scatter_varlen_bwd(ctx, grad):
    ids_keep, cu_seqlens = ctx.saved_tensors
    if not ctx.needs_input_grad[3]:
        return _gather_tokens_varlen_op(grad, ids_keep, cu_seqlens), None, None, None, None
    grad_keep, grad_fill = _scatter_tokens_varlen_backward_op(grad, ids_keep, cu_seqlens, ctx.fill_dense)
    return grad_keep, None, None, grad_fill, None


def _setup_gather_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:-1])


def _gather_backward_bwd(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    return _gather_tokens_op(grad, ids_keep), None, None


def _gather_varlen_backward_bwd(ctx, grad):
    ids_keep, cu_seqlens = ctx.saved_tensors
    return _gather_tokens_varlen_op(grad, ids_keep, cu_seqlens), None, None, None


def _setup_scatter_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:-1])
    ctx.fill_dense = inputs[-1]
    ctx.num_tokens = inputs[0].shape[1]


def _scatter_backward_bwd(ctx, grad_keep, grad_fill):
    (ids_keep,) = ctx.saved_tensors
    B, K = ids_keep.shape
    D = grad_keep.shape[-1] if grad_keep is not None else grad_fill.shape[-1]
    if grad_keep is None:
        grad_keep = grad_fill.new_zeros((B, K, D))
    if grad_fill is None:
        grad_fill = grad_keep.new_zeros((B, ctx.num_tokens, D) if ctx.fill_dense else (D,))
    return _scatter_tokens_op(grad_keep, ids_keep, grad_fill, ctx.num_tokens), None, None


def _scatter_varlen_backward_bwd(ctx, grad_keep, grad_fill):
    ids_keep, cu_seqlens = ctx.saved_tensors
    B, T = cu_seqlens.shape[0] - 1, ids_keep.shape[0]
    D = grad_keep.shape[-1] if grad_keep is not None else grad_fill.shape[-1]
    if grad_keep is None:
        grad_keep = grad_fill.new_zeros((T, D))
    if grad_fill is None:
        grad_fill = grad_keep.new_zeros((B, ctx.num_tokens, D) if ctx.fill_dense else (D,))
    return _scatter_tokens_varlen_op(grad_keep, ids_keep, cu_seqlens, grad_fill, ctx.num_tokens), None, None, None


for _op, _bwd, _setup in (
        (_gather_tokens_op, _gather_bwd, _setup_gather),
        (_gather_tokens_varlen_op, _gather_varlen_bwd, _setup_gather),
        (_scatter_tokens_op, _scatter_bwd, _setup_scatter),
        (_scatter_tokens_varlen_op, _scatter_varlen_bwd, _setup_scatter),
        (_gather_tokens_backward_op, _gather_backward_bwd, _setup_gather_backward),
        (_gather_tokens_varlen_backward_op, _gather_varlen_backward_bwd, _setup_gather_backward),
        (_scatter_tokens_backward_op, _scatter_backward_bwd, _setup_scatter_backward),
        (_scatter_tokens_varlen_backward_op, _scatter_varlen_backward_bwd, _setup_scatter_backward)):
    dispatch.register_autograd_following_request(_op, _bwd, _setup)

# -----------------------------------------------------------------------------
# Public API
# -----------------------------------------------------------------------------


def _call(name: str, op, check, *args) -> torch.Tensor:
    """Runs custom op ``name``; under torch.compile with the torch backend selected, its reference is
    traced inline instead, so Inductor fuses the indexing with its neighbours (an opaque op would
    run it as separate kernels). Autograd then differentiates the reference directly."""
    # A list or an array where a tensor goes: the op's schema error would not say which argument (and
    # the device below needs a tensor); the check names it. num_tokens is the one int.
    if any(not isinstance(a, (torch.Tensor, int)) for a in args) or not isinstance(args[0], torch.Tensor):
        check(*args)
    if dispatch.inline_reference(name, args[0].device):
        check(*args)
        return dispatch.impl(name, args[0].device)(*args)
    return op(*args)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids_keep [B, K] int64 -> [B, K, D]; out[b, k] = x[b, ids_keep[b, k]]."""
    return _call("gather_tokens", _gather_tokens_op, _check_gather, x, ids_keep)


def scatter_tokens(x_keep: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """fill [D] or [B, N, D] everywhere, except out[b, ids_keep[b, k]] = x_keep[b, k].

    Gradients reach x_keep and fill (for a [D] mask token: the sum over all non-kept positions).
    Ids within a sample must be unique.
    """
    return _call("scatter_tokens", _scatter_tokens_op, _check_scatter, x_keep, ids_keep, fill, num_tokens)


def gather_tokens_varlen(x: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids_keep [T] (positions within each sample), cu_seqlens [B+1] int32 -> [T, D]."""
    return _call("gather_tokens_varlen", _gather_tokens_varlen_op, _check_gather_varlen, x, ids_keep, cu_seqlens)


def scatter_tokens_varlen(x_keep: torch.Tensor, ids_keep: torch.Tensor, cu_seqlens: torch.Tensor,
                          fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """x_keep [T, D] packed -> [B, N, D] holding fill ([D] or [B, N, D]) except at the kept positions."""
    return _call("scatter_tokens_varlen", _scatter_tokens_varlen_op, _check_scatter_varlen,
                 x_keep, ids_keep, cu_seqlens, fill, num_tokens)


# -----------------------------------------------------------------------------
# Backend "torch": the reference. Advanced indexing with a broadcast (batch, position) pair
# reads/writes whole rows; no B*K*D index is ever built.
# -----------------------------------------------------------------------------


def _batch_rows(B: int, device: torch.device) -> torch.Tensor:
    return torch.arange(B, device=device)[:, None]


def varlen_batch_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] int64 sample index of each packed row (no device sync: output size is given)."""
    B = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(B, device=cu_seqlens.device), lengths, output_size=total)


def _torch_scatter(x_keep, index, fill, B, N):
    out = torch.empty((B, N, x_keep.shape[-1]), dtype=x_keep.dtype, device=x_keep.device)
    out.copy_(fill.expand(B, N, x_keep.shape[-1]))
    out[index] = x_keep
    return out


def _torch_scatter_backward(grad_out, index, fill_dense):
    grad_keep = grad_out[index]
    if fill_dense:
        grad_fill = grad_out.clone(memory_format=torch.contiguous_format)
        grad_fill[index] = 0
        return grad_keep, grad_fill
    kept = torch.zeros(grad_out.shape[:2], dtype=torch.bool, device=grad_out.device)
    kept[index] = True
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    grad_fill = grad_out.masked_fill(kept[..., None], 0).sum((0, 1), dtype=acc).to(grad_out.dtype)
    return grad_keep, grad_fill


@dispatch.register("gather_tokens", "torch")
def _gather_torch(x, ids_keep):
    return x[_batch_rows(x.shape[0], x.device), ids_keep]


@dispatch.register("gather_tokens_backward", "torch")
def _gather_backward_torch(grad_out, ids_keep, num_tokens):
    B, _, D = grad_out.shape
    return _torch_scatter(grad_out, (_batch_rows(B, grad_out.device), ids_keep), grad_out.new_zeros(()), B, num_tokens)


@dispatch.register("scatter_tokens", "torch")
def _scatter_torch(x_keep, ids_keep, fill, num_tokens):
    B = x_keep.shape[0]
    return _torch_scatter(x_keep, (_batch_rows(B, x_keep.device), ids_keep), fill, B, num_tokens)


@dispatch.register("scatter_tokens_backward", "torch")
def _scatter_backward_torch(grad_out, ids_keep, fill_dense):
    return _torch_scatter_backward(grad_out, (_batch_rows(grad_out.shape[0], grad_out.device), ids_keep), fill_dense)


@dispatch.register("gather_tokens_varlen", "torch")
def _gather_varlen_torch(x, ids_keep, cu_seqlens):
    return x[varlen_batch_index(cu_seqlens, ids_keep.shape[0]), ids_keep]


@dispatch.register("gather_tokens_varlen_backward", "torch")
def _gather_varlen_backward_torch(grad_out, ids_keep, cu_seqlens, num_tokens):
    index = (varlen_batch_index(cu_seqlens, ids_keep.shape[0]), ids_keep)
    return _torch_scatter(grad_out, index, grad_out.new_zeros(()), cu_seqlens.shape[0] - 1, num_tokens)


@dispatch.register("scatter_tokens_varlen", "torch")
def _scatter_varlen_torch(x_keep, ids_keep, cu_seqlens, fill, num_tokens):
    index = (varlen_batch_index(cu_seqlens, ids_keep.shape[0]), ids_keep)
    return _torch_scatter(x_keep, index, fill, cu_seqlens.shape[0] - 1, num_tokens)


@dispatch.register("scatter_tokens_varlen_backward", "torch")
def _scatter_varlen_backward_torch(grad_out, ids_keep, cu_seqlens, fill_dense):
    index = (varlen_batch_index(cu_seqlens, ids_keep.shape[0]), ids_keep)
    return _torch_scatter_backward(grad_out, index, fill_dense)


# -----------------------------------------------------------------------------
# Backend "triton" (kernels imported lazily: triton is optional)
# -----------------------------------------------------------------------------


def _tk():
    from masked_dit.ops.triton_kernels import tokens as kernels

    return kernels


@dispatch.register("gather_tokens", "triton")
def _gather_triton(x, ids_keep):
    return _tk().gather_rows(x, ids_keep, None)


@dispatch.register("gather_tokens_backward", "triton")
def _gather_backward_triton(grad_out, ids_keep, num_tokens):
    tk = _tk()
    B, _, D = grad_out.shape
    return tk.scatter_rows(grad_out, tk.inverse_map_dense(ids_keep, num_tokens), None, B, num_tokens, D, varlen=False)


@dispatch.register("scatter_tokens", "triton")
def _scatter_triton(x_keep, ids_keep, fill, num_tokens):
    tk = _tk()
    B, _, D = x_keep.shape
    return tk.scatter_rows(x_keep, tk.inverse_map_dense(ids_keep, num_tokens), fill, B, num_tokens, D, varlen=False)


@dispatch.register("scatter_tokens_backward", "triton")
def _scatter_backward_triton(grad_out, ids_keep, fill_dense):
    tk = _tk()
    inv = tk.inverse_map_dense(ids_keep, grad_out.shape[1])
    return tk.scatter_backward(grad_out, inv, ids_keep, None, fill_dense)


def _varlen_inverse(ids_keep, cu_seqlens, num_tokens, batch=None):
    """The inverse map of packed ids; ``batch`` (each packed row's sample) is computed when not given."""
    batch = varlen_batch_index(cu_seqlens, ids_keep.shape[0]) if batch is None else batch
    return _tk().inverse_map_varlen(ids_keep, batch, cu_seqlens.shape[0] - 1, num_tokens)


@dispatch.register("gather_tokens_varlen", "triton")
def _gather_varlen_triton(x, ids_keep, cu_seqlens):
    return _tk().gather_rows(x, ids_keep, varlen_batch_index(cu_seqlens, ids_keep.shape[0]))


@dispatch.register("gather_tokens_varlen_backward", "triton")
def _gather_varlen_backward_triton(grad_out, ids_keep, cu_seqlens, num_tokens):
    B, D = cu_seqlens.shape[0] - 1, grad_out.shape[1]
    inv = _varlen_inverse(ids_keep, cu_seqlens, num_tokens)
    return _tk().scatter_rows(grad_out, inv, None, B, num_tokens, D, varlen=True)


@dispatch.register("scatter_tokens_varlen", "triton")
def _scatter_varlen_triton(x_keep, ids_keep, cu_seqlens, fill, num_tokens):
    B, D = cu_seqlens.shape[0] - 1, x_keep.shape[1]
    inv = _varlen_inverse(ids_keep, cu_seqlens, num_tokens)
    return _tk().scatter_rows(x_keep, inv, fill, B, num_tokens, D, varlen=True)


@dispatch.register("scatter_tokens_varlen_backward", "triton")
def _scatter_varlen_backward_triton(grad_out, ids_keep, cu_seqlens, fill_dense):
    batch = varlen_batch_index(cu_seqlens, ids_keep.shape[0])  # the inverse map and the gather both need it
    inv = _varlen_inverse(ids_keep, cu_seqlens, grad_out.shape[1], batch)
    return _tk().scatter_backward(grad_out, inv, ids_keep, batch, fill_dense)


# -----------------------------------------------------------------------------
# Backend "cuda": the compiled extension (csrc/bindings/tokens.cpp), same argument order
# -----------------------------------------------------------------------------


def _cuda_op(name: str):
    def run(*args):
        return getattr(torch.ops.masked_dit_C, name)(*args)

    run.__name__ = f"_{name}_cuda"
    return dispatch.register(name, "cuda")(run)


for _name in ("gather_tokens", "gather_tokens_backward", "scatter_tokens", "scatter_tokens_backward",
              "gather_tokens_varlen", "gather_tokens_varlen_backward", "scatter_tokens_varlen",
              "scatter_tokens_varlen_backward"):
    _cuda_op(_name)
del _name
