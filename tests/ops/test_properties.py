"""Property-based tests (hypothesis) of every fused op against plain float64 references.

Each op is compared, forward and backward, with a float64 reference written out here by formula
(explicit row loops for gather/scatter, LayerNorm by mean/variance, attention by softmax), over
random shapes (odd sizes, D not a multiple of 8/16), dtypes and memory layouts (transposed,
sliced and strided views, adaLN shift/scale/gate as chunks of one [B, 6D] tensor). Tensor values
come from a torch.Generator seeded by hypothesis, so a failure prints a small, replayable case.

Backends: ``torch`` gets TORCH_EXAMPLES examples per op (cheap), the Triton interpreter
(TRITON_INTERPRET=1, set in tests/conftest.py) TRITON_EXAMPLES with small shapes. Attention
has no Triton path: it runs its CPU backends (``math``, ``sdpa``; ``flex`` forward only).

Tolerances: ``|actual - ref| <= TOL[dtype] * |ref| + ACC_TOL * scale``. The relative term is the
rounding of the result to its dtype (the reference sees the very same low-precision inputs):
    float32   1e-5   (fp32 arithmetic)
    float16   2e-3   (rounding to fp16 is at most 2^-11 relative: 4 half-ulps)
    bfloat16  1.6e-2 (rounding to bf16 is at most 2^-8 relative: 4 half-ulps)
(plus one subnormal step of the dtype: fp16 rounds values below 6e-5 to a fixed 6e-8 grid).
The absolute term is fp32 accumulation (ACC_TOL = 1e-5; every backend computes in fp32) relative
to ``scale``, the size of the *terms* the value is made of: max|ref| by default; for sums (dshift,
dgate, a [D] fill's gradient) the sum of |terms|; for LayerNorm, whose mean subtraction and dx
cancel, the terms times max|x| * rstd, the digits a row with a large mean loses.
Gather/scatter and their x/x_keep gradients are copies, so they must match *exactly*.

Everything is deterministic: the profile below is derandomized and has no example database.
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from masked_dit.ops import (adaln_modulate, attention, gated_residual_adaln, gather_tokens, gather_tokens_varlen,
                            scatter_tokens, scatter_tokens_varlen, use_backend)
from masked_dit.ops import attention_flex, attention_math, dispatch
from masked_dit.ops.attention import relative_position_index, use_attention_backend

# -----------------------------------------------------------------------------
# Hypothesis profile (deterministic, database-free) and example budgets
# -----------------------------------------------------------------------------

settings.register_profile(
    "masked-dit-properties", database=None, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PROFILE = settings.get_profile("masked-dit-properties")
TORCH_EXAMPLES = 200   # per op on the torch backend
TRITON_EXAMPLES = 20   # per op under the (slow) Triton interpreter


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=n)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: a second intra-op thread only adds wake-up/spin time (measured:
    ~8 ms of CPU per small op on a busy 2-core machine). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HAS_TRITON = os.environ.get("TRITON_INTERPRET") == "1" and dispatch.triton_importable()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable or TRITON_INTERPRET unset")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ACC_TOL = 1e-5
EPS = 1e-6
ACT_LAYOUTS = ("contiguous", "transposed", "sliced", "strided", "d_strided", "d_major", "batch_broadcast")
MOD_LAYOUTS = ("contiguous", "chunk6", "transposed", "strided")
GRAD_LAYOUTS = ("contiguous", "expanded", "transposed")  # of the upstream gradient

# -----------------------------------------------------------------------------
# Inputs: random values in a chosen memory layout
# -----------------------------------------------------------------------------


def activation(B, L, D, dtype, layout, gen, std=1.0, mean=0.0):
    """[B, L, D] random values stored as a view of a bigger / permuted buffer."""
    def randn(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype)

    if layout == "contiguous":
        return randn(B, L, D)
    if layout == "transposed":  # sequence-major storage seen batch-major
        return randn(L, B, D).transpose(0, 1)
    if layout == "sliced":  # a slice of a wider row, e.g. q out of a fused qkv
        return randn(B, L, D + 5)[..., 2:2 + D]
    if layout == "strided":  # every other token
        return randn(B, 2 * L, D)[:, ::2]
    if layout == "d_strided":  # stride(-1) == 2
        return randn(B, L, 2 * D)[..., ::2]
    if layout == "d_major":  # stride(-1) == L
        return randn(B, D, L).transpose(1, 2)
    if layout == "batch_broadcast":  # stride(0) == 0, e.g. pos_embed.expand(B, -1, -1)
        return randn(1, L, D).expand(B, L, D)
    raise AssertionError(layout)


def modulations(B, D, n, dtype, layout, gen, std=0.5):
    """n [B, D] tensors; ``chunk6`` takes them from one adaLN Linear output [B, 6D] (row stride 6D)."""
    def randn(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    if layout == "chunk6":
        chunks = randn(B, 6 * D).chunk(6, dim=1)
        return [chunks[i] for i in (4, 1, 3, 0, 5, 2)[:n]]
    if layout == "contiguous":
        return [randn(B, D) for _ in range(n)]
    if layout == "transposed":
        return [randn(D, B).t() for _ in range(n)]
    if layout == "strided":
        return [randn(2 * B, 3 * D)[::2, 1::3] for _ in range(n)]
    raise AssertionError(layout)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A grad-requiring leaf with t's strides (detach keeps the view), so the op sees the layout."""
    return t.detach().requires_grad_()


def cotangent(shape, dtype, layout, gen):
    """The upstream gradient fed to backward, in the layouts autograd really hands over: dense,
    broadcast (stride 0, e.g. from ``out.sum()`` or a mean), or a transposed view."""
    shape = tuple(shape)
    if layout == "expanded":
        return torch.randn(shape[-1], generator=gen).to(dtype).expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(shape[::-1], generator=gen).to(dtype).permute(*range(len(shape) - 1, -1, -1))
    return torch.randn(shape, generator=gen).to(dtype)


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).requires_grad_()


def assert_close(name, actual, ref, dtype, scale=None):
    """|actual - ref| <= TOL[dtype] |ref| + ACC_TOL scale; scale defaults to max|ref| (module docstring)."""
    ref = ref.detach()
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    actual = actual.detach().double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if scale is None:
        scale = ref.abs().max().item() if ref.numel() else 0.0
    elif isinstance(scale, torch.Tensor):
        scale = scale.detach().double()
    # + one subnormal step of the dtype: below the smallest normal, rounding error is absolute
    bound = TOL[dtype] * ref.abs() + ACC_TOL * scale + torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    err = (actual - ref).abs()
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off; first at flat {i}: "
                             f"got {actual.flatten()[i].item():.6g}, ref {ref.flatten()[i].item():.6g}, "
                             f"bound {bound.flatten()[i].item():.3g}; max err {err.max().item():.3g}")


def assert_equal(name, actual, ref):
    assert actual.shape == ref.shape and actual.dtype == ref.dtype, \
        f"{name}: {actual.dtype}{tuple(actual.shape)} != {ref.dtype}{tuple(ref.shape)}"
    diff = (actual.double() - ref.double()).abs().max() if actual.numel() else 0
    assert torch.equal(actual, ref), f"{name}: not an exact copy (max diff {diff})"


# -----------------------------------------------------------------------------
# Strategies
# -----------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


def sizes(small: bool):
    """(max B, max N, max D). The interpreter runs each program in Python but vectorises within a
    block, so under it B * N stays tiny while D still crosses the 256-wide column tiles."""
    return (2, 9, 300) if small else (4, 24, 160)


@st.composite
def token_cases(draw, small=False, varlen=False):
    max_b, max_n, max_d = sizes(small)
    B = draw(st.integers(1, max_b))
    N = draw(st.integers(1, max_n))
    if varlen:
        counts = draw(st.lists(st.integers(0, N), min_size=B, max_size=B))
    else:
        counts = [draw(st.integers(0, N))] * B
    return dict(
        B=B, N=N, D=draw(st.integers(1, max_d)), counts=counts,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(ACT_LAYOUTS)),
        fill=draw(st.sampled_from(("token", "token_strided", "dense", "dense_transposed", "dense_expanded"))),
        fill_grad=draw(st.booleans()),
        grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)),
        seed=draw(seeds),
    )


@st.composite
def adaln_cases(draw, small=False):
    max_b, max_n, max_d = sizes(small)
    dtype = draw(st.sampled_from(DTYPES))
    return dict(
        B=draw(st.integers(1, max_b)), L=draw(st.integers(1, max_n)), D=draw(st.integers(1, max_d)),
        dtype=dtype,
        # under autocast the adaLN Linear may run in another dtype than the residual stream
        mod_dtype=draw(st.sampled_from((dtype, dtype, torch.float32))),
        branch_dtype=draw(st.sampled_from((dtype, dtype, dtype, torch.float32))),  # gated op only
        layout=draw(st.sampled_from(ACT_LAYOUTS)),
        mod_layout=draw(st.sampled_from(MOD_LAYOUTS)),
        mean=draw(st.sampled_from((0.0, 0.0, 3.0, -20.0))),  # an offset tests the two-pass variance
        std=draw(st.sampled_from((1.0, 1.0, 0.1, 8.0))),
        eps=draw(st.sampled_from((EPS, EPS, 1e-5))),
        grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)),
        seed=draw(seeds),
    )


def random_ids(B, N, counts, gen):
    """Per-sample unique ids in [0, N): the first counts[b] entries of a random permutation."""
    return [torch.randperm(N, generator=gen)[:c] for c in counts]


# -----------------------------------------------------------------------------
# gather_tokens / scatter_tokens (dense [B, K] ids)
# -----------------------------------------------------------------------------


def ref_gather(x, ids_per_sample):
    """Row-by-row loop: out[b][k] = x[b, ids[b][k]] (ids may differ in length: packed)."""
    return [torch.stack([x[b, int(i)] for i in ids]) if len(ids) else x.new_zeros((0, x.shape[-1]))
            for b, ids in enumerate(ids_per_sample)]


def ref_scatter(rows_per_sample, ids_per_sample, fill, B, N, D):
    """Start from fill everywhere, then overwrite each kept position row by row."""
    out = [[fill[b, n] if fill.dim() == 3 else fill for n in range(N)] for b in range(B)]
    for b, (rows, ids) in enumerate(zip(rows_per_sample, ids_per_sample)):
        for row, i in zip(rows, ids):
            out[b][int(i)] = row
    return torch.stack([torch.stack(r) for r in out]) if N else fill.new_zeros((B, 0, D))


def make_fill(case, B, N, D, gen):
    kind, dtype = case["fill"], case["dtype"]
    if kind == "token":
        return torch.randn(D, generator=gen).to(dtype)
    if kind == "token_strided":
        return torch.randn(3 * D, generator=gen).to(dtype)[1::3]
    if kind == "dense":
        return torch.randn(B, N, D, generator=gen).to(dtype)
    if kind == "dense_expanded":  # a mask token broadcast to [B, N, D] (strides 0, 0, 1)
        return torch.randn(D, generator=gen).to(dtype).expand(B, N, D)
    return torch.randn(N, B, D, generator=gen).to(dtype).transpose(0, 1)


def check_dense_tokens(case, backend):
    B, N, D, dtype = case["B"], case["N"], case["D"], case["dtype"]
    K = case["counts"][0]
    gen = torch.Generator().manual_seed(case["seed"])
    ids = random_ids(B, N, case["counts"], gen)
    # ids_keep as the MAE recipe makes it: a [:, :K] slice (non-contiguous when K < N) of a shuffle
    shuffle = torch.stack([torch.cat([i, torch.tensor([j for j in range(N) if j not in set(i.tolist())],
                                                      dtype=torch.int64)]) for i in ids])
    ids_keep = shuffle[:, :K]
    x = leaf(activation(B, N, D, dtype, case["layout"], gen))
    x_keep = leaf(activation(B, K, D, dtype, case["layout"], gen))
    fill = make_fill(case, B, N, D, gen).requires_grad_(case["fill_grad"])

    with use_backend(backend):
        got = gather_tokens(x, ids_keep)
        grad_got = cotangent((B, K, D), dtype, case["grad_layout"], gen)
        (dx,) = torch.autograd.grad(got, x, grad_got)
        out = scatter_tokens(x_keep, ids_keep, fill, N)
        grad_out = cotangent((B, N, D), dtype, case["grad_layout"], gen)
        wrt = (x_keep, fill) if case["fill_grad"] else (x_keep,)
        grads = torch.autograd.grad(out, wrt, grad_out)

    # gather: exact copy of rows; its gradient puts grad rows back, zeros elsewhere
    assert_equal("gather", got, torch.stack(ref_gather(x.detach(), ids)) if K else x.new_zeros(B, 0, D))
    assert_equal("gather dx", dx, ref_scatter(list(grad_got), ids, torch.zeros(D, dtype=dtype), B, N, D))
    # scatter: exact; d x_keep is a gather of grad_out; d fill is grad_out where removed (summed for [D])
    assert_equal("scatter", out, ref_scatter(list(x_keep.detach()), ids, fill.detach(), B, N, D))
    kept_grad = torch.stack(ref_gather(grad_out, ids)) if K else x_keep.new_zeros(B, 0, D)
    assert_equal("scatter dx_keep", grads[0], kept_grad)
    if case["fill_grad"]:
        check_fill_grad(grads[1], grad_out, ids, fill, dtype)


def check_fill_grad(dfill, grad_out, ids_per_sample, fill, dtype):
    removed = torch.ones(grad_out.shape[:2], dtype=torch.bool)
    for b, ids in enumerate(ids_per_sample):
        removed[b, ids] = False
    g = grad_out.double() * removed[..., None]
    if fill.dim() == 3:
        assert_equal("scatter dfill", dfill, g.to(dtype))  # a masked copy: exact
    else:
        assert dfill.dtype == dtype
        assert_close("scatter dfill", dfill, g.sum((0, 1)), dtype, g.abs().sum((0, 1)))


@examples(TORCH_EXAMPLES)
@given(case=token_cases())
def test_gather_scatter_tokens_torch(case):
    check_dense_tokens(case, "torch")


@needs_triton
@examples(TRITON_EXAMPLES)
@given(case=token_cases(small=True))
@example(case=dict(B=2, N=5, D=300, counts=[3, 3], dtype=torch.bfloat16, layout="d_strided", fill="token_strided",
                   fill_grad=True, grad_layout="transposed", seed=1))  # two column tiles, strided everything
def test_gather_scatter_tokens_triton(case):
    check_dense_tokens(case, "triton")


# -----------------------------------------------------------------------------
# gather_tokens_varlen / scatter_tokens_varlen (packed [T] ids + cu_seqlens)
# -----------------------------------------------------------------------------


def check_varlen_tokens(case, backend):
    B, N, D, dtype, counts = case["B"], case["N"], case["D"], case["dtype"], case["counts"]
    gen = torch.Generator().manual_seed(case["seed"])
    ids = random_ids(B, N, counts, gen)
    ids_keep = torch.cat(ids)
    T = ids_keep.numel()
    cu_seqlens = torch.tensor([sum(counts[:b]) for b in range(B + 1)], dtype=torch.int32)
    x = leaf(activation(B, N, D, dtype, case["layout"], gen))
    # packed rows as a (possibly) non-contiguous view: [T, D] sliced out of [1, T, D]-shaped storage
    x_keep = leaf(activation(1, T, D, dtype, case["layout"], gen)[0])
    fill = make_fill(case, B, N, D, gen).requires_grad_(case["fill_grad"])

    with use_backend(backend):
        got = gather_tokens_varlen(x, ids_keep, cu_seqlens)
        grad_got = cotangent((T, D), dtype, case["grad_layout"], gen)
        (dx,) = torch.autograd.grad(got, x, grad_got)
        out = scatter_tokens_varlen(x_keep, ids_keep, cu_seqlens, fill, N)
        grad_out = cotangent((B, N, D), dtype, case["grad_layout"], gen)
        wrt = (x_keep, fill) if case["fill_grad"] else (x_keep,)
        grads = torch.autograd.grad(out, wrt, grad_out)

    segments = lambda t: [t[cu_seqlens[b]:cu_seqlens[b + 1]] for b in range(B)]  # noqa: E731
    assert_equal("gather_varlen", got, torch.cat(ref_gather(x.detach(), ids)))
    assert_equal("gather_varlen dx", dx, ref_scatter(segments(grad_got), ids, torch.zeros(D, dtype=dtype), B, N, D))
    assert_equal("scatter_varlen", out, ref_scatter(segments(x_keep.detach()), ids, fill.detach(), B, N, D))
    assert_equal("scatter_varlen dx_keep", grads[0], torch.cat(ref_gather(grad_out, ids)))
    if case["fill_grad"]:
        check_fill_grad(grads[1], grad_out, ids, fill, dtype)


@examples(TORCH_EXAMPLES)
@given(case=token_cases(varlen=True))
def test_gather_scatter_tokens_varlen_torch(case):
    check_varlen_tokens(case, "torch")


@needs_triton
@examples(TRITON_EXAMPLES)
@given(case=token_cases(small=True, varlen=True))
def test_gather_scatter_tokens_varlen_triton(case):
    check_varlen_tokens(case, "triton")


# -----------------------------------------------------------------------------
# adaln_modulate / gated_residual_adaln
# -----------------------------------------------------------------------------


def ref_modulate(x, shift, scale, eps=EPS):
    """LayerNorm by its formula (biased variance, no affine), then (1 + scale) and shift."""
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None, :]) + shift[:, None, :]


def ln_scales(x, shift, scale, dh, eps=EPS):
    """Term sizes of adaln_modulate (see the module docstring), broadcastable to each result.

    cond = max|x_row| * rstd_row >= 1 is how much a row's mean subtraction amplifies rounding.
    Returns (h [B, L, 1], d(norm input) [B, L, 1], dshift [B, D], dscale [B, D]).
    """
    x, shift, scale, dh = (t.detach().double() for t in (x, shift, scale, dh))
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    cond = (x.abs().amax(-1, keepdim=True) * rstd).clamp(min=1)
    scale1 = (1 + scale).abs()[:, None, :]
    h = cond * scale1.amax(-1, keepdim=True) + shift.abs().amax(-1)[:, None, None]
    dnorm = cond * rstd * (dh.abs() * scale1).amax(-1, keepdim=True)
    return h, dnorm, dh.abs().sum(1), (dh.abs() * cond).sum(1)


def check_adaln(case, backend):
    B, L, D, dtype, mod_dtype = case["B"], case["L"], case["D"], case["dtype"], case["mod_dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = leaf(activation(B, L, D, dtype, case["layout"], gen, case["std"], case["mean"]))
    shift, scale = map(leaf, modulations(B, D, 2, mod_dtype, case["mod_layout"], gen))
    with use_backend(backend):
        h = adaln_modulate(x, shift, scale, eps=case["eps"])
        dh = cotangent((B, L, D), h.dtype, case["grad_layout"], gen)
        dx, dshift, dscale = torch.autograd.grad(h, (x, shift, scale), dh)

    refs = [f64(t) for t in (x, shift, scale)]
    h_ref = ref_modulate(*refs, eps=case["eps"])
    dx_ref, dshift_ref, dscale_ref = torch.autograd.grad(h_ref, refs, dh.double())
    assert h.dtype == dtype and h.is_contiguous()
    assert (dx.dtype, dshift.dtype, dscale.dtype) == (dtype, mod_dtype, mod_dtype)
    s_h, s_dx, s_dshift, s_dscale = ln_scales(x, shift, scale, dh, case["eps"])
    assert_close("h", h, h_ref, dtype, s_h)
    assert_close("dx", dx, dx_ref, dtype, s_dx)
    assert_close("dshift", dshift, dshift_ref, mod_dtype, s_dshift)
    assert_close("dscale", dscale, dscale_ref, mod_dtype, s_dscale)


@examples(TORCH_EXAMPLES)
@given(case=adaln_cases())
def test_adaln_modulate_torch(case):
    check_adaln(case, "torch")


@needs_triton
@examples(TRITON_EXAMPLES)
@given(case=adaln_cases(small=True))
def test_adaln_modulate_triton(case):
    check_adaln(case, "triton")


def coarser(*dtypes):
    """The dtype with the largest rounding error (its TOL applies to a result passing through all)."""
    return max(dtypes, key=TOL.__getitem__)


def check_gated(case, backend):
    B, L, D, dtype, mod_dtype = case["B"], case["L"], case["D"], case["dtype"], case["mod_dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = leaf(activation(B, L, D, dtype, case["layout"], gen, case["std"], case["mean"]))
    branch_dtype = case["branch_dtype"]
    branch_layout = ACT_LAYOUTS[(ACT_LAYOUTS.index(case["layout"]) + 1) % len(ACT_LAYOUTS)]  # differs from x's
    branch = leaf(activation(B, L, D, branch_dtype, branch_layout, gen))
    gate, shift, scale = map(leaf, modulations(B, D, 3, mod_dtype, case["mod_layout"], gen))
    # what x + gate[:, None] * branch gives in torch
    r_dtype = torch.promote_types(torch.promote_types(dtype, branch_dtype), mod_dtype)
    with use_backend(backend):
        r, h = gated_residual_adaln(x, branch, gate, shift, scale, eps=case["eps"])
        dr = cotangent((B, L, D), r_dtype, case["grad_layout"], gen)
        dh = cotangent((B, L, D), r_dtype, GRAD_LAYOUTS[GRAD_LAYOUTS.index(case["grad_layout"]) - 1], gen)
        grads = torch.autograd.grad((r, h), (x, branch, gate, shift, scale), (dr, dh))

    refs = [f64(t) for t in (x, branch, gate, shift, scale)]
    xr, br, gr, sr, cr = refs
    r_ref = xr + gr[:, None, :] * br
    # the contract: h is adaln_modulate of the r it *returns* (rounded to r's dtype); straight-through
    r_used = r_ref + (r.detach().double() - r_ref).detach()
    h_ref = ref_modulate(r_used, sr, cr, eps=case["eps"])
    ref_grads = torch.autograd.grad((r_ref, h_ref), refs, (dr.double(), dh.double()))

    assert r.dtype == h.dtype == r_dtype and r.is_contiguous() and h.is_contiguous()
    assert tuple(g.dtype for g in grads) == (dtype, branch_dtype, mod_dtype, mod_dtype, mod_dtype)
    assert_close("r", r, r_ref, r_dtype, xr.detach().abs() + (gr[:, None, :] * br).detach().abs())
    s_h, s_dnorm, s_dshift, s_dscale = ln_scales(r, shift, scale, dh, case["eps"])
    assert_close("h", h, h_ref, r_dtype, s_h)
    s_dres = dr.double().abs() + s_dnorm  # d r = dr + LayerNorm's input gradient
    gate_abs = gate.detach().double().abs()[:, None, :]
    names = ("dx", "dbranch", "dgate", "dshift", "dscale")
    scales = (s_dres, s_dres * gate_abs, (s_dres * branch.detach().double().abs()).sum(1), s_dshift, s_dscale)
    for name, g, ref, s in zip(names, grads, ref_grads, scales):
        assert_close(name, g, ref, coarser(g.dtype, r_dtype), s)


@examples(TORCH_EXAMPLES)
@given(case=adaln_cases())
def test_gated_residual_adaln_torch(case):
    check_gated(case, "torch")


@needs_triton
@examples(TRITON_EXAMPLES)
@given(case=adaln_cases(small=True))
@example(case=dict(B=2, L=3, D=300, dtype=torch.float16, mod_dtype=torch.float32, branch_dtype=torch.float16,
                   layout="d_major",
                   mod_layout="chunk6", mean=3.0, std=1.0, eps=EPS, grad_layout="expanded", seed=2))
def test_gated_residual_adaln_triton(case):
    check_gated(case, "triton")


# -----------------------------------------------------------------------------
# attention (no Triton path: CPU backends math and sdpa, flex forward-only on CPU)
#
# Half-precision attention kernels may round the probabilities to the input dtype before the
# P @ V product (flash-style), so there the absolute term uses TOL[dtype] instead of ACC_TOL.
# -----------------------------------------------------------------------------

ATTN_LAYOUTS = ("contiguous", "qkv_fused", "heads_first", "sliced")


def qkv(B, N, H, Dh, dtype, layout, gen, std=1.0):
    """q, k, v [B, N, H, Dh] stored as views: of one fused [B, N, 3, H, Dh], heads-first, or sliced."""
    def randn(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    if layout == "qkv_fused":  # what a fused qkv Linear gives after .view(B, N, 3, H, Dh)
        return randn(B, N, 3, H, Dh).unbind(2)
    if layout == "heads_first":
        return tuple(randn(B, H, N, Dh).transpose(1, 2) for _ in range(3))
    if layout == "sliced":
        return tuple(randn(B, N, H, Dh + 3)[..., 1:1 + Dh] for _ in range(3))
    return tuple(randn(B, N, H, Dh) for _ in range(3))


def ref_attention(q, k, v, bias=None):
    """softmax(q k^T / sqrt(Dh) + bias) v, softmax by its formula; q, k, v [B, N, H, Dh], bias [B, H, N, N]."""
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("bhij,bjhd->bihd", e / e.sum(-1, keepdim=True), v)


def gathered_bias(table, index, positions):
    """bias[b, h, i, j] = table[index[positions[b, i], positions[b, j]], h] -> [B, H, K, K]."""
    return table[index[positions[:, :, None], positions[:, None, :]]].permute(0, 3, 1, 2)


def attention_scales(q, k, v, do, bias=None):
    """Term sizes of out, dq, dk, dv and d(bias) (see the module docstring): S bounds |score|."""
    q, k, v, do = (t.detach().double().abs() for t in (q, k, v, do))
    N, Dh = q.shape[-3], q.shape[-1]
    S = torch.einsum("bihd,bjhd->bhij", q, k).max().item() * Dh ** -0.5
    if bias is not None and bias.numel():
        S += bias.detach().abs().max().item()
    G = 2 * torch.einsum("bihd,bjhd->bhij", do, v).max().item() if N else 0.0  # bounds |dp - delta|
    c = 1 + S
    return dict(out=v.max().item() * c if N else 0.0, dv=N * (do.max().item() if N else 0.0) * c,
                dq=Dh ** -0.5 * G * (k.max().item() if N else 0.0) * c,
                dk=Dh ** -0.5 * G * N * (q.max().item() if N else 0.0) * c,
                dbias=q.shape[0] * N * G * c)


def assert_attention_close(name, actual, ref, dtype, scale):
    acc = ACC_TOL if dtype == torch.float32 else TOL[dtype]
    assert_close(name, actual, ref, dtype, scale * acc / ACC_TOL)


@st.composite
def attention_cases(draw, max_n=12):
    return dict(
        B=draw(st.integers(1, 3)), N=draw(st.integers(1, max_n)), H=draw(st.integers(1, 3)),
        Dh=draw(st.integers(1, 40)), dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(ATTN_LAYOUTS)), std=draw(st.sampled_from((1.0, 1.0, 3.0))),
        grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)), seed=draw(seeds),
        # the math backend cuts queries into chunks of <= CHUNK_ELEMENTS scores: force several
        chunk_elements=draw(st.sampled_from((None, None, 1, 40, 300))),
    )


def run_attention(backend, q, k, v, grad_out=None, chunk_elements=None, **kw):
    """(out, grads) of the op on ``backend``; grads of q, k, v (and the bias table) when grad_out is
    given. ``chunk_elements`` overrides the math backend's chunk size (None: its default)."""
    table = kw["rel_pos_bias"][0] if kw.get("rel_pos_bias") is not None else None
    chunking = mock.patch.object(attention_math, "CHUNK_ELEMENTS", chunk_elements or attention_math.CHUNK_ELEMENTS)
    with use_attention_backend(backend), chunking:
        out = attention(q, k, v, **kw)
        if grad_out is None:
            return out, ()
        wrt = [t for t in (q, k, v, table) if t is not None and t.requires_grad]
        return out, torch.autograd.grad(out, wrt, grad_out)


@examples(TORCH_EXAMPLES)
@given(case=attention_cases(), backend=st.sampled_from(("math", "sdpa")))
def test_attention_dense(case, backend):
    """Dense attention, forward and backward, against the float64 reference."""
    B, N, H, Dh, dtype = case["B"], case["N"], case["H"], case["Dh"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v = map(leaf, qkv(B, N, H, Dh, dtype, case["layout"], gen, case["std"]))
    do = cotangent((B, N, H, Dh), dtype, case["grad_layout"], gen)
    out, (dq, dk, dv) = run_attention(backend, q, k, v, do, case["chunk_elements"])
    refs = [f64(t) for t in (q, k, v)]
    out_ref = ref_attention(*refs)
    ref_grads = torch.autograd.grad(out_ref, refs, do.double())
    sc = attention_scales(q, k, v, do)
    assert out.dtype == dtype and out.shape == q.shape
    assert_attention_close("out", out, out_ref, dtype, sc["out"])
    for name, g, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert g.dtype == dtype
        assert_attention_close(name, g, ref, dtype, sc[name])


@examples(40)
@given(case=attention_cases(), backend=st.sampled_from(("math", "sdpa")))
def test_attention_invariant_to_permuting_keys_and_values(case, backend):
    """Permuting keys and values together (per sample) leaves the output unchanged."""
    B, N, H, Dh, dtype = case["B"], case["N"], case["H"], case["Dh"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v = qkv(B, N, H, Dh, dtype, case["layout"], gen, case["std"])
    perm = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
    rows = torch.arange(B)[:, None]
    out, _ = run_attention(backend, q, k, v)
    out_perm, _ = run_attention(backend, q, k[rows, perm], v[rows, perm])
    # both are approximations of the same float64 value: compare each with it, then with each other
    out_ref = ref_attention(*(t.double() for t in (q, k, v)))
    sc = attention_scales(q, k, v, torch.ones_like(q))
    assert_attention_close("out", out, out_ref, dtype, sc["out"])
    assert_attention_close("out (keys permuted)", out_perm, out_ref, dtype, sc["out"])
    assert_attention_close("out vs out (keys permuted)", out_perm, out.double(), dtype, 2 * sc["out"])


@st.composite
def packed_cases(draw):
    case = draw(attention_cases(max_n=9))
    case["lengths"] = draw(st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(lambda ls: sum(ls) > 0))
    case["permute_keys"] = draw(st.booleans())
    case["max_seqlen_slack"] = draw(st.sampled_from((0, 0, 3)))  # max_seqlen is an upper bound
    return case


def packed_qkv(case, gen):
    lengths = case["lengths"]
    T, H, Dh, dtype = sum(lengths), case["H"], case["Dh"], case["dtype"]
    q, k, v = (t[0] for t in qkv(1, T, H, Dh, dtype, case["layout"], gen, case["std"]))
    cu_seqlens = torch.tensor([sum(lengths[:i]) for i in range(len(lengths) + 1)], dtype=torch.int32)
    return q, k, v, cu_seqlens


@examples(80)
@given(case=packed_cases())
def test_attention_packed_equals_per_segment_dense(case):
    """Packed attention == dense attention run on each segment alone (and == the float64 reference);
    permuting keys/values within each segment changes nothing; gradients match per segment."""
    lengths, dtype = case["lengths"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v, cu_seqlens = packed_qkv(case, gen)
    if case["permute_keys"]:  # a random permutation inside each segment
        perm = torch.cat([torch.randperm(n, generator=gen) + int(cu_seqlens[i]) for i, n in enumerate(lengths)])
        k, v = k[perm], v[perm]
    q, k, v = map(leaf, (q, k, v))
    do = cotangent(q.shape, dtype, case["grad_layout"], gen)
    out, grads = run_attention("math", q, k, v, do, case["chunk_elements"], cu_seqlens=cu_seqlens,
                               max_seqlen=max(lengths) + case["max_seqlen_slack"])
    assert out.shape == q.shape and out.dtype == dtype
    for i, n in enumerate(lengths):
        seg = slice(int(cu_seqlens[i]), int(cu_seqlens[i + 1]))
        if n == 0:
            continue
        parts = [t[seg].detach()[None] for t in (q, k, v)]
        dense, _ = run_attention("math", *parts)
        refs = [f64(t) for t in parts]
        out_ref = ref_attention(*refs)
        ref_grads = torch.autograd.grad(out_ref, refs, do[seg][None].double())
        sc = attention_scales(*parts, do[seg][None])
        assert_attention_close(f"segment {i} out", out[seg][None], out_ref, dtype, sc["out"])
        assert_attention_close(f"segment {i} out vs dense op", out[seg][None], dense.double(), dtype, 2 * sc["out"])
        for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_attention_close(f"segment {i} {name}", g[seg][None], ref, dtype, sc[name])


@st.composite
def bias_cases(draw):
    """MDT-style bias over kept tokens: a grid, per-sample keep counts (equal when dense)."""
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    case = draw(attention_cases())
    packed = draw(st.booleans())
    K = st.integers(1, h * w)
    counts = draw(st.lists(K, min_size=case["B"], max_size=case["B"])) if packed else [draw(K)] * case["B"]
    case.update(grid=(h, w), counts=counts, packed=packed)
    return case


def bias_problem(case, gen):
    """(inputs of the op, per-sample float64 references of out and grads, term scales)."""
    H, Dh, dtype, counts = case["H"], case["Dh"], case["dtype"], case["counts"]
    h, w = case["grid"]
    index = relative_position_index((h, w))
    table = leaf(torch.randn((2 * h - 1) * (2 * w - 1) + 3, H, generator=gen).to(dtype))
    positions = [torch.randperm(h * w, generator=gen)[:n] for n in counts]
    if case["packed"]:  # [T, H, Dh] views, sample b owns rows cu[b]:cu[b+1]
        q, k, v = map(leaf, (t[0] for t in qkv(1, sum(counts), H, Dh, dtype, case["layout"], gen, case["std"])))
        cu = torch.tensor([sum(counts[:b]) for b in range(len(counts) + 1)], dtype=torch.int32)
        kw = dict(cu_seqlens=cu, max_seqlen=max(counts), rel_pos_bias=(table, index), positions=torch.cat(positions))
        samples = [slice(int(cu[b]), int(cu[b + 1])) for b in range(len(counts))]
        per_sample = lambda t, b: t[samples[b]][None]  # noqa: E731
    else:
        q, k, v = map(leaf, qkv(len(counts), counts[0], H, Dh, dtype, case["layout"], gen, case["std"]))
        kw = dict(rel_pos_bias=(table, index), positions=torch.stack(positions))
        per_sample = lambda t, b: t[b:b + 1]  # noqa: E731
    do = cotangent(q.shape, dtype, case["grad_layout"], gen)

    refs = [f64(t) for t in (q, k, v, table)]
    outs, scales = [], []
    for b, pos in enumerate(positions):
        bias = gathered_bias(refs[3], index, pos[None])
        outs.append(ref_attention(*(per_sample(t, b) for t in refs[:3]), bias))
        scales.append(attention_scales(*(per_sample(t, b) for t in (q, k, v, do)), bias))
    cat = (lambda ts: torch.cat([t[0] for t in ts])) if case["packed"] else torch.cat
    out_ref = cat(outs)
    ref_grads = torch.autograd.grad(out_ref, refs, do.double())
    scale = {name: max(sc[name] for sc in scales) for name in scales[0]}
    scale["dtable"] = sum(sc["dbias"] for sc in scales)
    return (q, k, v), kw, do, out_ref, ref_grads, scale


@examples(80)
@given(case=bias_cases())
def test_attention_rel_pos_bias_equals_gathered_bias(case):
    """MDT bias over kept tokens == plain attention plus table[index[pos_i, pos_j]] gathered per
    sample; d(table) matches too. Dense [B, K] and packed with per-sample keep counts."""
    gen = torch.Generator().manual_seed(case["seed"])
    (q, k, v), kw, do, out_ref, ref_grads, scale = bias_problem(case, gen)
    out, grads = run_attention("math", q, k, v, do, case["chunk_elements"], **kw)
    assert out.dtype == case["dtype"] and out.shape == q.shape
    assert_attention_close("out", out, out_ref, case["dtype"], scale["out"])
    for name, g, ref in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert g.dtype == case["dtype"]
        assert_attention_close(name, g, ref, case["dtype"], scale[name])


@pytest.mark.skipif(not attention_flex.AVAILABLE, reason="FlexAttention needs torch >= 2.5")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@examples(8)  # FlexAttention's CPU fallback costs ~0.1-1 s a call
@given(case=bias_cases(), biased=st.booleans())
def test_attention_flex_forward(case, biased):
    """FlexAttention (forward only on CPU): score_mod bias and packed block mask vs the reference."""
    gen = torch.Generator().manual_seed(case["seed"])
    (q, k, v), kw, do, out_ref, _, scale = bias_problem(case, gen)
    if not biased:  # the same problem without the bias: per-sample plain attention
        kw = {key: val for key, val in kw.items() if key in ("cu_seqlens", "max_seqlen")}
        if "cu_seqlens" in kw:
            cu = kw["cu_seqlens"]
            out_ref = torch.cat([ref_attention(*(t[int(cu[b]):int(cu[b + 1])].double()[None] for t in (q, k, v)))[0]
                                 for b in range(cu.numel() - 1)])
        else:
            out_ref = ref_attention(*(t.double() for t in (q, k, v)))
    if "rel_pos_bias" in kw:
        kw["rel_pos_bias"] = tuple(t.detach() for t in kw["rel_pos_bias"])
    out, _ = run_attention("flex", *(t.detach() for t in (q, k, v)), **kw)
    assert_attention_close("flex out", out, out_ref, case["dtype"], scale["out"])


@examples(20)
@given(case=attention_cases(max_n=9), hw=st.tuples(st.integers(1, 4), st.integers(1, 4)))
def test_attention_full_grid_bias_is_positions_arange(case, hw):
    """Without positions the bias covers the full grid: the same as positions = arange(N)."""
    h, w = hw
    B, H, Dh, dtype = case["B"], case["H"], case["Dh"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    index = relative_position_index((h, w))
    table = torch.randn((2 * h - 1) * (2 * w - 1) + 3, H, generator=gen).to(dtype)
    q, k, v = qkv(B, h * w, H, Dh, dtype, case["layout"], gen, case["std"])
    out, _ = run_attention("math", q, k, v, rel_pos_bias=(table, index))
    out_pos, _ = run_attention("math", q, k, v, rel_pos_bias=(table, index),
                               positions=torch.arange(h * w).expand(B, -1))
    assert torch.equal(out, out_pos)
    bias = gathered_bias(table.double(), index, torch.arange(h * w).expand(B, -1))
    sc = attention_scales(q, k, v, torch.ones_like(q), bias)
    assert_attention_close("out", out, ref_attention(*(t.double() for t in (q, k, v)), bias), dtype, sc["out"])


@examples(25)
@given(h=st.integers(1, 7), w=st.integers(1, 7))
def test_relative_position_index(h, w):
    """index[i, j] depends only on the (dy, dx) offset of tokens i, j (row-major grid), is a bijection
    from offsets onto [0, (2h-1)(2w-1)), and the zero offset sits in the middle."""
    index = relative_position_index((h, w))
    assert index.shape == (h * w, h * w) and index.dtype == torch.int64
    seen = {}
    for i in range(h * w):
        for j in range(h * w):
            offset = (i // w - j // w, i % w - j % w)
            value = int(index[i, j])
            assert 0 <= value < (2 * h - 1) * (2 * w - 1)
            assert seen.setdefault(offset, value) == value, f"offset {offset} has two indices"
    assert len(set(seen.values())) == len(seen) == (2 * h - 1) * (2 * w - 1)
    assert seen[(0, 0)] == (h - 1) * (2 * w - 1) + (w - 1)
    if h == w:
        assert torch.equal(relative_position_index(h), index)
