"""Attention over (kept) tokens: dense, packed variable-length, MDT relative-position bias.

    attention(q, k, v)                                         q, k, v [B, N, H, Dh]
    attention(q, k, v, cu_seqlens=cu, max_seqlen=L)            packed [T, H, Dh], cu int32 [S+1]
    attention(q, k, v, rel_pos_bias=(table, index), positions=ids_keep)   MDT bias over kept tokens

Softmax scale Dh ** -0.5; the output has q's layout. With ``rel_pos_bias=(table [R, H],
index [N, N])`` the score of query i and key j in head h gets
``table[index[positions[i], positions[j]], h]`` (positions default to arange(N)); gradients
reach ``table``.

Backends (see :func:`attention_backend`, printed by ``masked-dit info``), first usable wins:

    dense, no bias     flash-attn > xformers > SDPA
    packed, no bias    flash-attn (varlen) > torch varlen_attn (>= 2.10) > FlexAttention > math
    MDT bias           FlexAttention (score_mod) > math

flash-attn and xformers are optional and import-guarded; flash-attn and varlen_attn need
CUDA and fp16/bf16. FlexAttention is used on CUDA only (on CPU it has no backward and is an
unfused fallback). ``math`` is :mod:`masked_dit.ops.attention_math`: chunked, memory-bounded
in forward *and* backward, runs anywhere; it is also the float64 reference of the tests.
Force a backend with ``use_attention_backend(name)`` or ``MASKED_DIT_ATTENTION=name``;
``MASKED_DIT_BACKEND=torch`` (the global reference switch) selects ``math``.

Design (custom ops): SDPA, FlexAttention and varlen_attn are already traceable by
``torch.compile``, and wrapping them in an opaque custom op would only hide them from
Inductor (FlexAttention *needs* Inductor to fuse the score_mod), so they are called
directly. The one custom op pair is the math path (``masked_dit::attention_math`` and its
backward): a hand-written recomputing backward is what keeps its memory bounded, and an op
with a fake kernel keeps its Python chunk loop out of the graph. The backend is chosen
from Python constants (import-time feature flags, dtype, device), so every form compiles
with ``fullgraph=True``.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from masked_dit.ops import attention_flex, dispatch
from masked_dit.ops.attention_math import attention_math
from masked_dit.ops.tokens import check_cu_seqlens_values

# ----------------------------------------------------------------------------------------
# Optional libraries (feature flags fixed at import: selection must stay trace-friendly)
# ----------------------------------------------------------------------------------------

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # not installed, or built for another torch
    flash_attn_func = flash_attn_varlen_func = None

try:
    import xformers.ops as _xops
except Exception:
    _xops = None

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
    _VARLEN_TAKES_SCALE = "scale" in inspect.signature(_varlen_attn).parameters
except Exception:  # torch < 2.10
    _varlen_attn, _VARLEN_TAKES_SCALE = None, False

BACKENDS = ("flash", "xformers", "varlen", "flex", "sdpa", "math")
ENV_VAR = "MASKED_DIT_ATTENTION"
_HALF = (torch.float16, torch.bfloat16)
_forced: list[str] = []  # use_attention_backend stack (a plain list: dynamo reads it as a constant)


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """``with use_attention_backend("math"): ...`` forces the attention backend inside."""
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _requested() -> str:
    if _forced:
        return _forced[-1]
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in ("auto",) + BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not an attention backend; valid: auto, {', '.join(BACKENDS)}")
    if value == "auto" and dispatch.requested() == "torch":
        return "math"
    return value


# ----------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------

def _usable(name: str, device: str, dtype: torch.dtype, head_dim: int, packed: bool, biased: bool) -> tuple[bool, str]:
    """Whether backend ``name`` can run this form, and why (not)."""
    if name == "math":
        return True, "chunked PyTorch math, any device/dtype/form"
    if biased and name != "flex":
        return False, f"{name} cannot add the relative-position bias without materialising it"
    if name == "flex":
        if not attention_flex.AVAILABLE:
            return False, "torch.nn.attention.flex_attention missing (torch < 2.5)"
        if device != "cuda":
            return False, "FlexAttention on CPU is an unfused fallback without backward"
        return True, "FlexAttention" + (" with score_mod bias" if biased else "") + (
            " and block mask" if packed else "")
    if name == "sdpa":
        if packed:
            return False, "SDPA has no variable-length form"
        return True, "torch scaled_dot_product_attention"
    if device != "cuda":
        return False, f"{name} needs CUDA tensors"
    if name == "flash":
        if flash_attn_func is None:
            return False, "flash-attn is not installed"
        if dtype not in _HALF:
            return False, f"flash-attn needs fp16/bf16, got {dtype}"
        if head_dim % 8 or head_dim > 256:
            return False, f"flash-attn needs head dim a multiple of 8 up to 256, got {head_dim}"
        return True, "flash-attn" + (" varlen" if packed else "")
    if name == "xformers":
        if _xops is None:
            return False, "xformers is not installed"
        if packed:
            return False, "xformers' packed mask needs host-side lengths (a sync per call)"
        return True, "xformers memory_efficient_attention"
    if name == "varlen":
        if _varlen_attn is None:
            return False, "torch.nn.attention.varlen.varlen_attn missing (torch < 2.10)"
        if not packed:
            return False, "varlen_attn is for packed sequences"
        if dtype not in _HALF:
            return False, f"varlen_attn needs fp16/bf16, got {dtype}"
        return True, "torch varlen_attn (flash kernels)"
    raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")


def _auto_order(packed: bool, biased: bool) -> tuple[str, ...]:
    if biased:
        return ("flex", "math")
    if packed:
        return ("flash", "varlen", "flex", "math")
    return ("flash", "xformers", "sdpa")


def attention_backend(q, *, packed: bool = False, biased: bool = False,
                      requires_grad: bool | None = None) -> tuple[str, str]:
    """(backend, reason) that :func:`attention` uses for tensors like ``q`` and this form; ``requires_grad``:
    whether any input needs a gradient (default: whether q does).

    ``q`` may also be a device ("cpu", "cuda"): then a bf16, head-dim-72 training call is assumed.
    """
    if isinstance(q, Tensor):
        return select_backend(q.device.type, q.dtype, q.shape[-1], packed=packed, biased=biased,
                              requires_grad=requires_grad if requires_grad is not None else q.requires_grad)
    return select_backend(torch.device(q).type, torch.bfloat16, 72, packed=packed, biased=biased)


def select_backend(device_type: str, dtype: torch.dtype, head_dim: int, *, packed: bool = False,
                   biased: bool = False, requires_grad: bool = True) -> tuple[str, str]:
    """:func:`attention_backend` without a tensor (for ``masked-dit info`` on any machine)."""
    req = _requested()
    if req != "auto":
        ok, why = _usable(req, device_type, dtype, head_dim, packed, biased)
        if ok:
            return req, f"requested: {why}"
        if req == "flex" and device_type == "cpu" and attention_flex.AVAILABLE and not requires_grad:
            return req, "requested: FlexAttention unfused CPU fallback (forward only, for tests)"
        raise RuntimeError(f"attention backend {req!r} requested but unusable here: {why}")
    skipped = []
    for name in _auto_order(packed, biased):
        ok, why = _usable(name, device_type, dtype, head_dim, packed, biased)
        if ok:
            return name, "auto: " + why + "".join(f"; not {s}" for s in skipped)
        skipped.append(f"{name} ({why})")
    raise RuntimeError("no attention backend usable: " + "; ".join(skipped))  # pragma: no cover


def describe_backends(device_type: str, dtype: torch.dtype = torch.bfloat16,
                      head_dim: int = 72) -> list[tuple[str, str, str]]:
    """[(form, backend, reason)] for the dense, packed and MDT-biased forms on ``device_type``."""
    forms = (("dense", False, False), ("packed", True, False), ("rel_pos_bias", False, True),
             ("packed+rel_pos_bias", True, True))
    return [(form, *select_backend(device_type, dtype, head_dim, packed=p, biased=b)) for form, p, b in forms]


# ----------------------------------------------------------------------------------------
# MDT relative-position index (BEiT recipe)
# ----------------------------------------------------------------------------------------

def relative_position_index(grid_size) -> Tensor:
    """[N, N] int64, N = h*w: index of the (dy, dx) offset between tokens i and j.

    ``index[i, j] = (y_i - y_j + h - 1) * (2w - 1) + (x_i - x_j + w - 1)`` for a row-major
    grid; the bias table has ``relative_position_table_size(grid_size)`` rows, (2h-1)(2w-1)
    plus 3 that BEiT keeps for a class token and MDT never indexes.
    """
    h, w = _grid_hw(grid_size)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + h - 1
    dx = xs[:, None] - xs[None, :] + w - 1
    return dy * (2 * w - 1) + dx


def relative_position_table_size(grid_size) -> int:
    h, w = _grid_hw(grid_size)
    return (2 * h - 1) * (2 * w - 1) + 3


def _grid_hw(grid_size) -> tuple[int, int]:
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if h < 1 or w < 1:
        raise ValueError(f"grid_size must be positive, got {grid_size!r}")
    return int(h), int(w)


# ----------------------------------------------------------------------------------------
# Input checks (one-line errors)
# ----------------------------------------------------------------------------------------

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, q: Optional[Tensor] = None) -> None:
    """t is a tensor (on q's device, when q is given: the math path would mix devices or fail deep inside)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q is not None and t.device != q.device:
        raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")


def _check(q, k, v, cu_seqlens, max_seqlen, rel_pos_bias, positions) -> None:
    packed = cu_seqlens is not None
    want = 3 if packed else 4
    layout = "[T, H, Dh] (packed)" if packed else "[B, N, H, Dh]"
    _check_tensor("q", q)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, q)
        if x.dim() != want:
            hint = "" if packed else " (packed input needs cu_seqlens)"
            raise ValueError(f"attention: {name} must be {layout}, got shape {tuple(x.shape)}{hint}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    # the math path casts each to its accumulate dtype (and returned integer q as integers); the kernels refuse
    if q.dtype not in _FLOATS:
        raise ValueError(f"attention: q must be float16/bfloat16/float32/float64, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"attention: {name} dtype {x.dtype} differs from q dtype {q.dtype}")
    if q.shape[-1] == 0:
        raise ValueError(f"attention: head dim must be >= 1 (the scale is Dh ** -0.5), got shape {tuple(q.shape)}")
    if packed:
        _check_tensor("cu_seqlens", cu_seqlens, q)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"attention: cu_seqlens must be 1-D int32 [num_seqs + 1], got {cu_seqlens.dtype} "
                             f"shape {tuple(cu_seqlens.shape)}")
        if not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"attention: packed input needs max_seqlen as a positive int, got {max_seqlen!r}")
    elif max_seqlen is not None:
        raise ValueError("attention: max_seqlen given without cu_seqlens")
    if rel_pos_bias is not None:
        _check_bias(q, packed, rel_pos_bias, positions)
    elif positions is not None:
        raise ValueError("attention: positions given without rel_pos_bias")
    if not torch.compiler.is_compiling() and q.device.type == "cpu":
        _check_values(q, cu_seqlens, max_seqlen, rel_pos_bias, positions)


_INDEX_DTYPES = (torch.int32, torch.int64)  # bool / uint8 would index as masks, int8/16 not at all


def _check_bias(q, packed, rel_pos_bias, positions) -> None:
    if not isinstance(rel_pos_bias, (tuple, list)) or len(rel_pos_bias) != 2:
        raise ValueError("attention: rel_pos_bias must be a (table [R, H], index [N, N]) pair")
    table, index = rel_pos_bias
    _check_tensor("rel_pos_bias table", table, q)
    _check_tensor("rel_pos_bias index", index, q)
    H = q.shape[-2]
    if table.dim() != 2 or table.shape[1] != H:
        raise ValueError(f"attention: rel_pos_bias table must be [R, {H}], got {tuple(table.shape)}")
    if not table.dtype.is_floating_point:  # its own dtype may differ from q's (an fp32 parameter under autocast)
        raise ValueError(f"attention: rel_pos_bias table must be floating point, got {table.dtype}")
    if index.dim() != 2 or index.shape[0] != index.shape[1] or index.dtype not in _INDEX_DTYPES:
        raise ValueError(f"attention: rel_pos_bias index must be an int32/int64 [N, N], "
                         f"got {index.dtype} {tuple(index.shape)}")
    seq_shape = tuple(q.shape[:-2])  # (B, K) or (T,)
    if positions is None:
        if packed:
            raise ValueError("attention: packed attention with rel_pos_bias needs positions [T]")
        if q.shape[1] != index.shape[0]:
            raise ValueError(f"attention: {q.shape[1]} tokens but index is {tuple(index.shape)}; "
                             "pass positions of the kept tokens")
    else:
        _check_tensor("positions", positions, q)
    if positions is not None and (tuple(positions.shape) != seq_shape or positions.dtype not in _INDEX_DTYPES):
        raise ValueError(f"attention: positions must be int32/int64 {list(seq_shape)}, "
                         f"got {positions.dtype} {tuple(positions.shape)}")


def _check_values(q, cu_seqlens, max_seqlen, rel_pos_bias, positions) -> None:
    """Data-dependent checks, only where they cost no device sync (eager, CPU)."""
    if cu_seqlens is not None:
        lengths = check_cu_seqlens_values(cu_seqlens, q.shape[0], prefix="attention: ")
        if lengths.numel() and lengths.max() > max_seqlen:
            raise ValueError(f"attention: max_seqlen={max_seqlen} below the longest sequence {int(lengths.max())}")
    if positions is not None and positions.numel():
        N = rel_pos_bias[1].shape[0]
        if positions.min() < 0 or positions.max() >= N:
            raise ValueError(f"attention: positions must lie in [0, {N})")
    if rel_pos_bias is not None and rel_pos_bias[1].numel():
        table, index = rel_pos_bias
        if index.min() < 0 or index.max() >= table.shape[0]:
            raise ValueError(f"attention: rel_pos_bias index must lie in [0, {table.shape[0]}) (the table's rows), "
                             f"got values from {int(index.min())} to {int(index.max())}")


# ----------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------

def attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Optional[Tensor] = None,
              max_seqlen: Optional[int] = None, rel_pos_bias=None, positions: Optional[Tensor] = None) -> Tensor:
    """q, k, v [B, N, H, Dh] (or packed [T, H, Dh] with cu_seqlens) -> output in q's layout."""
    _check(q, k, v, cu_seqlens, max_seqlen, rel_pos_bias, positions)
    packed, biased = cu_seqlens is not None, rel_pos_bias is not None
    table, index = rel_pos_bias if biased else (None, None)
    scale = q.shape[-1] ** -0.5
    if packed and q.shape[0] == 0:  # no tokens at all: FlexAttention's block mask fails on an empty sequence
        return q + k + v  # [0, H, Dh], connected to the inputs for autograd
    grad = any(t is not None and t.requires_grad for t in (q, k, v, table))
    backend, _ = attention_backend(q, packed=packed, biased=biased, requires_grad=grad)

    if backend == "math":
        if packed:
            return _math_packed(q, k, v, cu_seqlens, max_seqlen, table, index, positions, scale)
        return attention_math(q, k, v, None, table, index, positions, scale)[0]
    if backend == "flex":
        return attention_flex.flex(q, k, v, table, index, positions, cu_seqlens, scale)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    if backend == "flash":
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        if packed:
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale)
        return flash_attn_func(q, k, v, softmax_scale=scale)
    if backend == "xformers":
        return _xops.memory_efficient_attention(q, k, v, scale=scale)
    if backend == "varlen":
        extra = {"scale": scale} if _VARLEN_TAKES_SCALE else {}  # the default scale is Dh ** -0.5 too
        return _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **extra)
    raise AssertionError(backend)  # pragma: no cover


def _math_packed(q, k, v, cu_seqlens, max_seqlen, table, index, positions, scale) -> Tensor:
    """Packed [T, H, Dh] -> padded [S, max_seqlen, H, Dh], masked math attention, -> packed."""
    total, num_seqs = q.shape[0], cu_seqlens.numel() - 1
    seg = attention_flex.segment_ids(cu_seqlens, total)
    offset = torch.arange(total, device=q.device) - cu_seqlens.long()[seg]

    def pad(x: Tensor) -> Tensor:
        return x.new_zeros((num_seqs, max_seqlen) + tuple(x.shape[1:])).index_put((seg, offset), x)

    pos = pad(positions.long()) if positions is not None else None
    out, _ = attention_math(pad(q), pad(k), pad(v), cu_seqlens.diff(), table, index, pos, scale)
    return out[seg, offset]
