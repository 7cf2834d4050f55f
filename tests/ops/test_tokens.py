"""Masked-token gather / scatter: every op, every backend, against a float64 reference.

Forward passes and all gradients except the [D] mask-token gradient are pure copies, so they
must match the reference *exactly* in every dtype. The [D] fill gradient is a sum over the
non-kept positions, accumulated in fp32 and rounded once to the dtype:

    dtype      rtol     atol      (about one ulp of the dtype at the sum's magnitude)
    float32    1e-5     1e-5
    float16    1e-3     1e-3
    bfloat16   8e-3     1e-3

CPU backends: ``torch`` and ``triton`` (Triton interpreter; TRITON_INTERPRET=1 comes from
tests/conftest.py). GPU tests (``@pytest.mark.gpu``) run torch / triton / cuda on CUDA.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch._dynamo.utils import counters

from masked_dit.ops import dispatch, gather_tokens, gather_tokens_varlen, scatter_tokens, scatter_tokens_varlen, use_backend
from masked_dit.ops import tokens as tok

HAS_TRITON = importlib.util.find_spec("triton") is not None
# on CPU tensors Triton runs through its interpreter (tests/conftest.py sets it only without a GPU)
CPU_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else [])
DIMS = (72, 384, 1152, 1000)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "strided_d")
FILL_SUM_TOL = {  # (rtol, atol) of the [D] fill gradient, see the module docstring
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 1e-3),
    torch.float64: (1e-12, 1e-12),
}
OPS = ("gather_tokens", "gather_tokens_backward", "scatter_tokens", "scatter_tokens_backward",
       "gather_tokens_varlen", "gather_tokens_varlen_backward", "scatter_tokens_varlen",
       "scatter_tokens_varlen_backward")

# -----------------------------------------------------------------------------
# Inputs and float64 references (loops over samples: independent of the backends)
# -----------------------------------------------------------------------------


def randn(shape, dtype, layout, gen, device="cpu"):
    """A [.., N, D]-shaped tensor in one of three memory layouts (all but the first non-contiguous)."""
    shape = tuple(shape)
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(device, dtype)
    if layout == "transposed":  # leading two dims swapped in memory
        perm = (1, 0) + tuple(range(2, len(shape)))
        return torch.randn(tuple(shape[i] for i in perm), generator=gen).to(device, dtype).permute(perm)
    # strided_d: features not unit-stride (a [.., D, N] buffer viewed as [.., N, D])
    t = torch.randn(shape[:-2] + (shape[-1], shape[-2]), generator=gen).to(device, dtype)
    return t.transpose(-1, -2)


def vector(D, dtype, layout, gen, device="cpu"):
    v = torch.randn(2 * D, generator=gen).to(device, dtype)
    return v[:D] if layout == "contiguous" else v[::2]


def random_ids(B, N, K, gen, device="cpu"):
    return torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]).to(device)


def random_varlen(lengths, N, gen, device="cpu"):
    ids = torch.cat([torch.randperm(N, generator=gen)[:k] for k in lengths])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return ids.to(device), cu.to(device)


def segments(ids_keep, cu_seqlens):
    """(b, slice of packed rows, ids of sample b) for dense [B, K] or varlen ids."""
    if cu_seqlens is None:
        K = ids_keep.shape[1]
        return [(b, slice(b * K, (b + 1) * K), ids_keep[b]) for b in range(ids_keep.shape[0])]
    cu = cu_seqlens.tolist()
    return [(b, slice(cu[b], cu[b + 1]), ids_keep[cu[b]:cu[b + 1]]) for b in range(len(cu) - 1)]


def ref_gather(x, ids_keep, cu_seqlens=None):
    x = x.double()
    rows = torch.cat([x[b, ids] for b, _, ids in segments(ids_keep, cu_seqlens)])
    return rows if cu_seqlens is not None else rows.view(ids_keep.shape[0], ids_keep.shape[1], -1)


def ref_scatter(x_keep, ids_keep, fill, N, cu_seqlens=None):
    B = ids_keep.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    D = x_keep.shape[-1]
    out = fill.double().expand(B, N, D).clone()
    rows = x_keep.double().reshape(-1, D)
    for b, rs, ids in segments(ids_keep, cu_seqlens):
        out[b, ids] = rows[rs]
    return out


def ref_scatter_grads(grad_out, ids_keep, fill_dense, cu_seqlens=None):
    """(grad_x_keep, grad_fill) in float64."""
    g = grad_out.double()
    kept = torch.zeros(g.shape[:2], dtype=torch.bool, device=g.device)
    for b, _, ids in segments(ids_keep, cu_seqlens):
        kept[b, ids] = True
    grad_keep = ref_gather(g, ids_keep, cu_seqlens)
    grad_fill = g.masked_fill(kept[..., None], 0)
    return grad_keep, grad_fill if fill_dense else grad_fill.sum((0, 1))


def assert_exact(actual, expected_f64, what):
    """Bitwise equal to the float64 reference rounded to actual's dtype (copies are exact)."""
    expected = expected_f64.to(actual.dtype)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    # op outputs are contiguous (a leaf's .grad follows the leaf's layout instead)
    assert what.startswith("grad") or actual.is_contiguous(), f"{what}: output is not contiguous"
    assert torch.equal(actual, expected), f"{what}: max abs diff {(actual.double() - expected_f64).abs().max()}"


def assert_fill_sum(actual, expected_f64, what):
    rtol, atol = FILL_SUM_TOL[actual.dtype]
    torch.testing.assert_close(actual.double(), expected_f64, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# -----------------------------------------------------------------------------
# Forward + backward against the reference, CPU backends, all dtypes / widths / layouts
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gather_tokens(backend, layout):
    gen = torch.Generator().manual_seed(0)
    for i, D in enumerate(DIMS):
        for dtype in DTYPES:
            B, N, K = 2, 9 + 2 * i, 5 + i
            x = randn((B, N, D), dtype, layout, gen).requires_grad_()
            ids = random_ids(B, N, K, gen)
            grad_out = randn((B, K, D), dtype, layout, gen)
            with use_backend(backend):
                out = gather_tokens(x, ids)
                out.backward(grad_out)
            what = f"{backend} {layout} D={D} {dtype}"
            assert_exact(out, ref_gather(x.detach(), ids), f"forward {what}")
            # gather's gradient scatters grad_out into zeros
            assert_exact(x.grad, ref_scatter(grad_out, ids, torch.zeros(D), N), f"grad x {what}")


@pytest.mark.parametrize("fill_kind", ["vector", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scatter_tokens(backend, layout, fill_kind):
    gen = torch.Generator().manual_seed(1)
    for i, D in enumerate(DIMS):
        for dtype in DTYPES:
            B, N, K = 3, 7 + 2 * i, 3 + i
            x_keep = randn((B, K, D), dtype, layout, gen).requires_grad_()
            fill = (vector(D, dtype, layout, gen) if fill_kind == "vector" else randn((B, N, D), dtype, layout, gen))
            fill.requires_grad_()
            ids = random_ids(B, N, K, gen)
            grad_out = randn((B, N, D), dtype, layout, gen)
            with use_backend(backend):
                out = scatter_tokens(x_keep, ids, fill, N)
                out.backward(grad_out)
            what = f"{backend} {layout} {fill_kind} D={D} {dtype}"
            assert_exact(out, ref_scatter(x_keep.detach(), ids, fill.detach(), N), f"forward {what}")
            grad_keep, grad_fill = ref_scatter_grads(grad_out, ids, fill_kind == "dense")
            assert_exact(x_keep.grad, grad_keep, f"grad x_keep {what}")
            if fill_kind == "dense":
                assert_exact(fill.grad, grad_fill, f"grad fill {what}")
            else:
                assert_fill_sum(fill.grad, grad_fill, f"grad fill {what}")


# Samples keep different counts, including none and all of them.
VARLEN_LENGTHS = ([3, 0, 5], [1, 7, 2, 4])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gather_tokens_varlen(backend, layout):
    gen = torch.Generator().manual_seed(2)
    for i, D in enumerate(DIMS):
        for dtype in DTYPES:
            lengths = VARLEN_LENGTHS[i % 2]
            B, N = len(lengths), 7
            ids, cu = random_varlen(lengths, N, gen)
            x = randn((B, N, D), dtype, layout, gen).requires_grad_()
            grad_out = randn((sum(lengths), D), dtype, layout, gen)
            with use_backend(backend):
                out = gather_tokens_varlen(x, ids, cu)
                out.backward(grad_out)
            what = f"{backend} {layout} D={D} {dtype}"
            assert_exact(out, ref_gather(x.detach(), ids, cu), f"forward {what}")
            assert_exact(x.grad, ref_scatter(grad_out, ids, torch.zeros(D), N, cu), f"grad x {what}")


@pytest.mark.parametrize("fill_kind", ["vector", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scatter_tokens_varlen(backend, layout, fill_kind):
    gen = torch.Generator().manual_seed(3)
    for i, D in enumerate(DIMS):
        for dtype in DTYPES:
            lengths = VARLEN_LENGTHS[(i + 1) % 2]
            B, N = len(lengths), 9
            ids, cu = random_varlen(lengths, N, gen)
            x_keep = randn((sum(lengths), D), dtype, layout, gen).requires_grad_()
            fill = (vector(D, dtype, layout, gen) if fill_kind == "vector" else randn((B, N, D), dtype, layout, gen))
            fill.requires_grad_()
            grad_out = randn((B, N, D), dtype, layout, gen)
            with use_backend(backend):
                out = scatter_tokens_varlen(x_keep, ids, cu, fill, N)
                out.backward(grad_out)
            what = f"{backend} {layout} {fill_kind} D={D} {dtype}"
            assert_exact(out, ref_scatter(x_keep.detach(), ids, fill.detach(), N, cu), f"forward {what}")
            grad_keep, grad_fill = ref_scatter_grads(grad_out, ids, fill_kind == "dense", cu)
            assert_exact(x_keep.grad, grad_keep, f"grad x_keep {what}")
            if fill_kind == "dense":
                assert_exact(fill.grad, grad_fill, f"grad fill {what}")
            else:
                assert_fill_sum(fill.grad, grad_fill, f"grad fill {what}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scatter_without_fill_grad_uses_gather(backend):
    """Fill not requiring grad: x_keep's gradient still exact (the backward takes the gather path)."""
    gen = torch.Generator().manual_seed(4)
    B, N, K, D = 2, 9, 4, 72
    x_keep = torch.randn(B, K, D, generator=gen, requires_grad=True)
    fill = torch.randn(D, generator=gen)
    ids = random_ids(B, N, K, gen)
    grad_out = torch.randn(B, N, D, generator=gen)
    with use_backend(backend):
        scatter_tokens(x_keep, ids, fill, N).backward(grad_out)
    assert_exact(x_keep.grad, ref_scatter_grads(grad_out, ids, True)[0], "grad x_keep")


def check_scatter_backward_with_duplicate_ids(backend, device):
    """Duplicated ids (outside the contract for the forward) still give every x_keep row its gradient,
    the same on every backend: scatter's backward is a gather (the kernels used to write one row per
    position through the inverse map and leave the others' gradient uninitialised)."""
    gen = torch.Generator().manual_seed(12)
    B, N, D = 3, 10, 40
    ids = torch.tensor([[1, 4, 1, 7], [2, 2, 2, 9], [0, 5, 8, 3]], device=device)  # last row: no duplicate
    ids_v, cu = ids.reshape(-1), torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=device)
    for fill_dense in (False, True):
        grad_out = randn((B, N, D), torch.float32, "transposed", gen, device)
        ref_keep, ref_fill = ref_scatter_grads(grad_out, ids, fill_dense)
        with use_backend(backend):
            keep, fill = tok._scatter_tokens_backward_op(grad_out, ids, fill_dense)
            keep_v, fill_v = tok._scatter_tokens_varlen_backward_op(grad_out, ids_v, cu, fill_dense)
        assert_exact(keep, ref_keep, f"grad_keep fill_dense={fill_dense}")
        assert_exact(keep_v, ref_keep.reshape(-1, D), f"grad_keep varlen fill_dense={fill_dense}")
        for f in (fill, fill_v):
            (assert_exact if fill_dense else assert_fill_sum)(f, ref_fill, f"grad_fill fill_dense={fill_dense}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scatter_backward_with_duplicate_ids(backend):
    check_scatter_backward_with_duplicate_ids(backend, "cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_and_no_kept_tokens(backend):
    D = 8
    with use_backend(backend):
        out = scatter_tokens(torch.zeros(2, 0, D), torch.zeros(2, 0, dtype=torch.long), torch.ones(D), 5)
        assert torch.equal(out, torch.ones(2, 5, D))
        assert gather_tokens(torch.randn(2, 5, D), torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, D)
        g, f = tok._scatter_tokens_backward_op(torch.ones(2, 5, D), torch.zeros(2, 0, dtype=torch.long), False)
        assert g.shape == (2, 0, D) and torch.equal(f, torch.full((D,), 10.0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_feature_dim(backend):
    """D = 0: every op returns empty rows (Triton's scatter backward divided by a zero block width)."""
    B, N, K = 2, 5, 3
    ids = torch.stack([torch.randperm(N)[:K] for _ in range(B)])
    ids_v, cu = torch.tensor([1, 4, 0, 2]), torch.tensor([0, 2, 4], dtype=torch.int32)
    with use_backend(backend):
        for fill_dense in (False, True):
            g, f = tok._scatter_tokens_backward_op(torch.ones(B, N, 0), ids, fill_dense)
            assert g.shape == (B, K, 0) and f.shape == ((B, N, 0) if fill_dense else (0,))
            g, f = tok._scatter_tokens_varlen_backward_op(torch.ones(B, N, 0), ids_v, cu, fill_dense)
            assert g.shape == (4, 0) and f.shape == ((B, N, 0) if fill_dense else (0,))
        x_keep = torch.zeros(B, K, 0, requires_grad=True)
        fill = torch.zeros(0, requires_grad=True)
        scatter_tokens(x_keep, ids, fill, N).sum().backward()
        assert x_keep.grad.shape == (B, K, 0) and fill.grad.shape == (0,)


# -----------------------------------------------------------------------------
# gradcheck (float64), opcheck, torch.compile
# -----------------------------------------------------------------------------


def _tiny_inputs(gen, dtype=torch.float64):
    B, N, K, D = 2, 5, 3, 4
    ids = random_ids(B, N, K, gen)
    ids_v, cu = random_varlen([2, 0, 4], N, gen)
    t = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return dict(B=B, N=N, K=K, D=D, ids=ids, ids_v=ids_v, cu=cu, x=t(B, N, D), x_keep=t(B, K, D),
                x_packed=t(6, D), fill=t(D), fill_dense=t(B, N, D), fill_dense_v=t(3, N, D))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(5)
    a = _tiny_inputs(gen)
    req = lambda t: t.clone().requires_grad_()  # noqa: E731
    N = a["N"]
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: gather_tokens(x, a["ids"]), (req(a["x"]),))
        assert torch.autograd.gradcheck(lambda xk, f: scatter_tokens(xk, a["ids"], f, N), (req(a["x_keep"]), req(a["fill"])))
        if backend == "triton":  # the interpreter is slow; the exact-match tests above cover the rest
            return
        assert torch.autograd.gradcheck(lambda xk, f: scatter_tokens(xk, a["ids"], f, N),
                                        (req(a["x_keep"]), req(a["fill_dense"])))
        assert torch.autograd.gradcheck(lambda xp, f: scatter_tokens_varlen(xp, a["ids_v"], a["cu"], f, N),
                                        (req(a["x_packed"]), req(a["fill"])))
        assert torch.autograd.gradcheck(lambda xp, f: scatter_tokens_varlen(xp, a["ids_v"], a["cu"], f, N),
                                        (req(a["x_packed"]), req(a["fill_dense_v"])))
        x3 = torch.randn(3, N, a["D"], generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: gather_tokens_varlen(x, a["ids_v"], a["cu"]), (x3,))


def test_gradgradcheck():
    """The autograd rules close over each other, so second derivatives work (torch backend)."""
    gen = torch.Generator().manual_seed(6)
    a = _tiny_inputs(gen)
    req = lambda t: t.clone().requires_grad_()  # noqa: E731
    N = a["N"]
    with use_backend("torch"):
        assert torch.autograd.gradgradcheck(lambda x: gather_tokens(x, a["ids"]), (req(a["x"]),))
        assert torch.autograd.gradgradcheck(lambda xk, f: scatter_tokens(xk, a["ids"], f, N), (req(a["x_keep"]), req(a["fill"])))
        assert torch.autograd.gradgradcheck(lambda xp, f: scatter_tokens_varlen(xp, a["ids_v"], a["cu"], f, N),
                                            (req(a["x_packed"]), req(a["fill_dense_v"])))
        x3 = torch.randn(3, N, a["D"], generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda x: gather_tokens_varlen(x, a["ids_v"], a["cu"]), (x3,))


def _opcheck_cases():
    gen = torch.Generator().manual_seed(7)
    a = _tiny_inputs(gen, torch.float32)
    N, ids, ids_v, cu = a["N"], a["ids"], a["ids_v"], a["cu"]
    x3 = torch.randn(3, N, a["D"], generator=gen)
    g3 = torch.randn(3, N, a["D"], generator=gen)
    return {
        "gather_tokens": (tok._gather_tokens_op, (a["x"], ids)),
        "gather_tokens_backward": (tok._gather_tokens_backward_op, (a["x_keep"], ids, N)),
        "scatter_tokens[vector]": (tok._scatter_tokens_op, (a["x_keep"], ids, a["fill"], N)),
        "scatter_tokens[dense]": (tok._scatter_tokens_op, (a["x_keep"], ids, a["fill_dense"], N)),
        "scatter_tokens_backward[vector]": (tok._scatter_tokens_backward_op, (a["fill_dense"], ids, False)),
        "scatter_tokens_backward[dense]": (tok._scatter_tokens_backward_op, (a["fill_dense"], ids, True)),
        "gather_tokens_varlen": (tok._gather_tokens_varlen_op, (x3, ids_v, cu)),
        "gather_tokens_varlen_backward": (tok._gather_tokens_varlen_backward_op, (a["x_packed"], ids_v, cu, N)),
        "scatter_tokens_varlen[vector]": (tok._scatter_tokens_varlen_op, (a["x_packed"], ids_v, cu, a["fill"], N)),
        "scatter_tokens_varlen[dense]": (tok._scatter_tokens_varlen_op, (a["x_packed"], ids_v, cu, a["fill_dense_v"], N)),
        "scatter_tokens_varlen_backward[vector]": (tok._scatter_tokens_varlen_backward_op, (g3, ids_v, cu, False)),
        "scatter_tokens_varlen_backward[dense]": (tok._scatter_tokens_varlen_backward_op, (g3, ids_v, cu, True)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    args = tuple(t.clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
    with use_backend("torch"):
        torch.library.opcheck(op, args)


def test_every_op_has_all_backends():
    for op in OPS:
        assert set(dispatch._IMPLS[op]) == {"torch", "triton", "cuda"}, op


def _compiled_no_breaks(fn, *args, backend="aot_eager"):
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    return out


@pytest.mark.parametrize("op", ["gather_tokens", "scatter_tokens", "gather_tokens_varlen", "scatter_tokens_varlen"])
def test_compile_fullgraph_no_graph_breaks(op):
    """Forward and backward of each op traced as one graph (aot_eager: AOT autograd included)."""
    gen = torch.Generator().manual_seed(8)
    a = _tiny_inputs(gen, torch.float32)
    N = a["N"]
    x3 = torch.randn(3, N, a["D"], generator=gen)
    fns = {
        "gather_tokens": (lambda x: (gather_tokens(x, a["ids"]) * 2).sum(), a["x"]),
        "scatter_tokens": (lambda xk, f: (scatter_tokens(xk, a["ids"], f, N) ** 2).sum(), a["x_keep"], a["fill"]),
        "gather_tokens_varlen": (lambda x: (gather_tokens_varlen(x, a["ids_v"], a["cu"]) * 2).sum(), x3),
        "scatter_tokens_varlen": (lambda xp, f: (scatter_tokens_varlen(xp, a["ids_v"], a["cu"], f, N) ** 2).sum(),
                                  a["x_packed"], a["fill"]),
    }
    fn, *inputs = fns[op]
    eager_in = [t.clone().requires_grad_() for t in inputs]
    comp_in = [t.clone().requires_grad_() for t in inputs]
    fn(*eager_in).backward()
    _compiled_no_breaks(fn, *comp_in).backward()
    for e, c in zip(eager_in, comp_in):
        torch.testing.assert_close(c.grad, e.grad, rtol=0, atol=0)


@pytest.mark.slow
def test_compile_inductor_gather_scatter():
    """The MAE round trip (gather -> compute -> scatter with a mask token) under inductor."""
    gen = torch.Generator().manual_seed(9)
    a = _tiny_inputs(gen, torch.float32)
    N = a["N"]

    def roundtrip(x, mask_token):
        return (scatter_tokens(gather_tokens(x, a["ids"]).sin(), a["ids"], mask_token, N) * x).sum()

    e_in = [a["x"].clone().requires_grad_(), a["fill"].clone().requires_grad_()]
    c_in = [t.detach().clone().requires_grad_() for t in e_in]
    roundtrip(*e_in).backward()
    _compiled_no_breaks(roundtrip, *c_in, backend="inductor").backward()
    for e, c in zip(e_in, c_in):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs the Triton interpreter for an opaque CPU backend")
def test_backend_read_at_call_time_inside_compiled_graph(monkeypatch):
    """A non-torch backend stays an opaque custom op under compile: its choice is made when the graph runs."""
    calls = []
    original = dispatch._IMPLS["gather_tokens"]["triton"]
    monkeypatch.setitem(dispatch._IMPLS["gather_tokens"], "triton", lambda *args: calls.append(1) or original(*args))
    x, ids = torch.randn(2, 5, 4), torch.tensor([[0, 3], [4, 1]])
    fn = torch.compile(lambda x: gather_tokens(x, ids), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with use_backend("triton"):
        fn(x)
        calls.clear()  # tracing may have called it; the compiled graph must call it again
        torch.testing.assert_close(fn(x), x[torch.arange(2)[:, None], ids], rtol=0, atol=0)
    assert calls, "the triton backend was not called from the compiled graph"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_torch_backend_is_traced_inline(backend):
    """Under torch.compile the torch reference is traced inline (Inductor fuses the indexing with its
    neighbours), other backends stay opaque ops; values and gradients equal the eager ones exactly."""
    graphs = []

    def capture(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    gen = torch.Generator().manual_seed(10)
    a = _tiny_inputs(gen, torch.float32)
    N = a["N"]
    x3 = torch.randn(3, N, a["D"], generator=gen)

    def roundtrip(x, mask_token, x3, fill_dense_v):
        dense = scatter_tokens(gather_tokens(x, a["ids"]).sin(), a["ids"], mask_token, N)
        packed = scatter_tokens_varlen(gather_tokens_varlen(x3, a["ids_v"], a["cu"]).cos(), a["ids_v"], a["cu"],
                                       fill_dense_v, N)
        return (dense * x).sum() + (packed ** 2).sum()

    inputs = (a["x"], a["fill"], x3, torch.randn(3, N, a["D"], generator=gen))
    e_in = [t.clone().requires_grad_() for t in inputs]
    c_in = [t.clone().requires_grad_() for t in inputs]
    torch._dynamo.reset()
    with use_backend(backend):
        roundtrip(*e_in).backward()
        torch.compile(roundtrip, fullgraph=True, backend=capture)(*c_in).backward()
    (graph,) = graphs
    assert ("masked_dit." in graph) == (backend != "torch"), graph
    for e, c in zip(e_in, c_in):
        torch.testing.assert_close(c.grad, e.grad, rtol=0, atol=0)


# -----------------------------------------------------------------------------
# Validation: one clear ValueError per mistake
# -----------------------------------------------------------------------------


def test_validation_errors():
    x, ids = torch.randn(2, 5, 4), torch.tensor([[0, 3], [4, 1]])
    x_keep, fill = torch.randn(2, 2, 4), torch.randn(4)
    ids_v, cu = torch.tensor([0, 3, 4]), torch.tensor([0, 1, 3], dtype=torch.int32)
    cases = [
        (lambda: gather_tokens(x, ids.int()), "ids_keep must be int64"),
        (lambda: gather_tokens(x, ids[:1]), "batch mismatch"),
        (lambda: gather_tokens(x[0], ids), r"x must be \[B, N, D\]"),
        (lambda: gather_tokens(x.long(), ids), "dtype"),
        (lambda: scatter_tokens(x_keep, ids, torch.randn(5), 5), "D=5"),
        (lambda: scatter_tokens(x_keep, ids, fill.half(), 5), "fill dtype"),
        (lambda: scatter_tokens(x_keep, ids, torch.randn(2, 4, 4), 5), r"fill must be \[D\] or \[B, N, D\]"),
        (lambda: scatter_tokens(x_keep, ids, fill, 1), "num_tokens=1"),
        (lambda: scatter_tokens(x_keep, ids[:, :1], fill, 5), "does not match x_keep"),
        (lambda: gather_tokens_varlen(x, ids_v, cu.long()), "cu_seqlens must be int32"),
        (lambda: gather_tokens_varlen(x, ids_v, cu[:2]), "need B\\+1"),
        (lambda: gather_tokens_varlen(x, ids, cu), "ids_keep must be 1-D"),
        (lambda: scatter_tokens_varlen(x_keep, ids_v, cu, fill, 5), r"packed \[T, D\]"),
        (lambda: scatter_tokens_varlen(torch.randn(2, 4), ids_v, cu, fill, 5), "ids_keep has 3 rows"),
        (lambda: scatter_tokens_varlen(torch.randn(3, 4), ids_v, cu, torch.randn(3, 5, 4), 5), "fill must be"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_id_and_cu_seqlens_values_checked_on_cpu(backend):
    """On CPU tensors (no device sync) ids >= N and cu_seqlens that do not rise from 0 to T are one ValueError
    naming the argument, on every backend: Triton read or wrote past x (or failed in its inverse map), torch
    raised an IndexError naming no argument (still one: the error is both); a bad cu_seqlens failed in
    repeat_interleave; negative ids too (Triton read before x's row; torch took -1 as the last token)."""
    x, x_keep, fill = torch.randn(2, 5, 4), torch.randn(2, 2, 4), torch.randn(4)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    cases = [
        (lambda: gather_tokens(x, torch.tensor([[0, 5], [4, 1]])), r"ids_keep must lie in \[0, 5\)"),
        (lambda: scatter_tokens(x_keep, torch.tensor([[0, 6], [4, 1]]), fill, 5), r"ids_keep must lie in \[0, 5\)"),
        (lambda: gather_tokens_varlen(x, torch.tensor([0, 7, 4]), cu), r"ids_keep must lie in \[0, 5\)"),
        (lambda: gather_tokens(x, torch.tensor([[0, -1], [4, 1]])), r"ids_keep must lie in \[0, 5\), got min -1, max 4"),
        (lambda: scatter_tokens(x_keep, torch.tensor([[0, -2], [4, 1]]), fill, 5), r"\[0, 5\), got min -2, max 4"),
        (lambda: gather_tokens_varlen(x, torch.tensor([0, -1, 4]), cu), r"ids_keep must lie in \[0, 5\)"),
        (lambda: scatter_tokens_varlen(torch.randn(3, 4), torch.tensor([0, 5, 4]), cu, fill, 5), "ids_keep must lie"),
        (lambda: gather_tokens_varlen(x, torch.tensor([0, 3, 4]), torch.tensor([0, 1, 2], dtype=torch.int32)),
         r"cu_seqlens must rise from 0 to T=3, got \[0, 1, 2\]"),
        (lambda: gather_tokens_varlen(x, torch.tensor([0, 3, 4]), torch.tensor([1, 2, 3], dtype=torch.int32)),
         "cu_seqlens must rise from 0"),
        (lambda: scatter_tokens_varlen(torch.randn(3, 4), torch.tensor([0, 3, 4]), torch.tensor([0, 2, 1, 3],
                                       dtype=torch.int32), fill, 5), "cu_seqlens must rise from 0"),
    ]
    with use_backend(backend):
        for fn, match in cases:
            with pytest.raises(ValueError, match=match):
                fn()
        with pytest.raises(IndexError, match="ids_keep"):
            gather_tokens(x, torch.tensor([[0, 9], [4, 1]]))
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
            gather_tokens([[0.0]], torch.tensor([[0]]))
        # a list where ids go: was the op schema's error, without the argument's name
        with pytest.raises(TypeError, match="ids_keep must be a torch.Tensor, got list"):
            gather_tokens(x, [[0, 3], [4, 1]])
        with pytest.raises(TypeError, match="fill must be a torch.Tensor, got float"):
            scatter_tokens(torch.randn(2, 2, 4), torch.tensor([[0, 3], [4, 1]]), 0.0, 5)


def test_cuda_backend_unavailable_on_cpu_tensors():
    with use_backend("cuda"), pytest.raises(RuntimeError, match="unavailable"):
        gather_tokens(torch.randn(2, 5, 4), torch.tensor([[0, 3], [4, 1]]))


# -----------------------------------------------------------------------------
# GPU: every backend on CUDA tensors, DiT-sized rows
# -----------------------------------------------------------------------------


def _gpu_backends():
    names = ["torch"]
    if HAS_TRITON:
        names.append("triton")
    names.append("cuda")
    return names


def _require(backend):
    ok, why = dispatch.availability(backend, "cuda")
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_dense(backend, layout):
    _require(backend)
    gen = torch.Generator().manual_seed(10)
    for D in DIMS:
        for dtype in DTYPES + (torch.float64,):
            B, N, K = 4, 257, 129
            x = randn((B, N, D), dtype, layout, gen, "cuda").requires_grad_()
            ids = random_ids(B, N, K, gen, "cuda")
            for fill_kind in ("vector", "dense"):
                fill = vector(D, dtype, layout, gen, "cuda") if fill_kind == "vector" else randn((B, N, D), dtype, layout, gen, "cuda")
                fill.requires_grad_()
                g = randn((B, N, D), dtype, layout, gen, "cuda")
                x.grad = None
                with use_backend(backend):
                    out = scatter_tokens(gather_tokens(x, ids), ids, fill, N)
                    out.backward(g)
                what = f"{backend} {layout} {fill_kind} D={D} {dtype}"
                assert_exact(out, ref_scatter(ref_gather(x.detach(), ids), ids, fill.detach(), N), f"forward {what}")
                grad_keep, grad_fill = ref_scatter_grads(g, ids, fill_kind == "dense")
                assert_exact(x.grad, ref_scatter(grad_keep, ids, torch.zeros(D, device="cuda"), N), f"grad x {what}")
                (assert_exact if fill_kind == "dense" else assert_fill_sum)(fill.grad, grad_fill, f"grad fill {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_scatter_backward_with_duplicate_ids(backend):
    _require(backend)
    check_scatter_backward_with_duplicate_ids(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_varlen(backend):
    _require(backend)
    gen = torch.Generator().manual_seed(11)
    lengths = [100, 0, 256, 17, 129]
    N = 256
    for D in DIMS:
        for dtype in DTYPES:
            ids, cu = random_varlen(lengths, N, gen, "cuda")
            x = randn((len(lengths), N, D), dtype, "transposed", gen, "cuda").requires_grad_()
            fill = vector(D, dtype, "contiguous", gen, "cuda").requires_grad_()
            g = randn((len(lengths), N, D), dtype, "contiguous", gen, "cuda")
            with use_backend(backend):
                out = scatter_tokens_varlen(gather_tokens_varlen(x, ids, cu), ids, cu, fill, N)
                out.backward(g)
            what = f"{backend} D={D} {dtype}"
            assert_exact(out, ref_scatter(ref_gather(x.detach(), ids, cu), ids, fill.detach(), N, cu), f"forward {what}")
            grad_keep, grad_fill = ref_scatter_grads(g, ids, False, cu)
            assert_exact(x.grad, ref_scatter(grad_keep, ids, torch.zeros(D, device="cuda"), N, cu), f"grad x {what}")
            assert_fill_sum(fill.grad, grad_fill, f"grad fill {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_fill_gradient_over_many_partial_sums(backend):
    """The [D] mask-token gradient at training sizes: B*N rows reduce through hundreds of partial sums
    (the CUDA kernel's second stage: 16 slices per column, a remainder slice, D not a multiple of 32)."""
    _require(backend)
    gen = torch.Generator().manual_seed(12)
    for B, N, D, dtype in ((64, 1024, 1152, torch.bfloat16), (33, 257, 72, torch.float32), (16, 256, 1000, torch.float16)):
        K = N // 2
        ids = random_ids(B, N, K, gen, "cuda")
        x_keep = randn((B, K, D), dtype, "contiguous", gen, "cuda").requires_grad_()
        fill = vector(D, dtype, "contiguous", gen, "cuda").requires_grad_()
        g = randn((B, N, D), dtype, "contiguous", gen, "cuda")
        with use_backend(backend):
            scatter_tokens(x_keep, ids, fill, N).backward(g)
        grad_keep, grad_fill = ref_scatter_grads(g, ids, False)
        what = f"{backend} B={B} N={N} D={D} {dtype}"
        assert_exact(x_keep.grad, grad_keep, f"grad x_keep {what}")
        assert_fill_sum(fill.grad, grad_fill, f"grad fill {what}")


# -----------------------------------------------------------------------------
# Triton kernels compile for a real GPU (sm_90 PTX + cubin) even here without one
# -----------------------------------------------------------------------------

_AOT_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from masked_dit.ops.triton_kernels import tokens as tk

def compile_for_sm90(fn, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    consts = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))

i32 = "i32"
for dt in ("bf16", "fp32"):
    for varlen in (False, True):
        compile_for_sm90(tk._gather_rows_kernel, dict(x_ptr="*" + dt, ids_ptr="*i64", batch_ptr="*i64", out_ptr="*" + dt,
                         R=i32, K=i32, D=i32, sx_b=i32, sx_n=i32, sx_d=i32), dict(VARLEN=varlen, BLOCK_R=16, BLOCK_D=256))
        for fill_zero in (False, True):
            compile_for_sm90(tk._scatter_rows_kernel, dict(keep_ptr="*" + dt, inv_ptr="*i32", fill_ptr="*" + dt,
                             out_ptr="*" + dt, R=i32, N=i32, D=i32, sk_0=i32, sk_1=i32, sk_d=i32, sf_b=i32, sf_n=i32,
                             sf_d=i32), dict(VARLEN=varlen, FILL_ZERO=fill_zero, BLOCK_R=16, BLOCK_D=256))
    for dense in (False, True):
        compile_for_sm90(tk._scatter_backward_fill_kernel, dict(grad_ptr="*" + dt, inv_ptr="*i32",
                         gfill_ptr="*" + (dt if dense else "fp32"), R=i32, N=i32, D=i32, sg_b=i32, sg_n=i32, sg_d=i32),
                         dict(FILL_DENSE=dense, ROWS_PER_PROG=256, BLOCK_R=16, BLOCK_D=256))
print("compiled")
'''


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_compile_for_gpu():
    """The interpreter accepts code the GPU compiler may not: compile every kernel variant for sm_90."""
    import subprocess
    import sys

    from tests.ops.triton_aot import require_aot_api

    require_aot_api()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
