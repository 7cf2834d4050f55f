"""adaln_modulate / gated_residual_adaln: every backend against a float64 reference.

CPU backends: torch (wide shape coverage) and triton under TRITON_INTERPRET=1 (set in
tests/conftest.py; few small shapes, the interpreter is slow). GPU tests run all three.

Tolerances (per dtype of the inputs/outputs), applied as
``|actual - ref| <= tol * |ref| + tol * max(max|ref|, natural scale)``: the second term because
dx and dshift/dscale/dgate are differences and sums whose terms can cancel to ~0 (e.g. D = 2, where
dx == 0 analytically), so the error floor is set by the size of the terms, ``max|dh * (1 + scale)| *
rstd`` for dx, not by the result:
  float32  2e-5   (fp32 statistics and sums over <= 4096 features / tokens)
  float16  2e-3   (output rounding 2^-11 relative, a few ulps of headroom)
  bfloat16 1.6e-2 (output rounding 2^-8 relative, 4 ulps)
  float64  1e-10  (the fp64 paths compute in fp64)
The absolute term is at least the rounding error of centring in the compute precision (fp32
statistics; fp64 for fp64): x - mean keeps about ``eps * kappa`` relative, kappa = max|x| * rstd of
the row, so the allowance is ``c = 4 * eps * kappa`` (measured need: 0.7 for h, 0.2 for the gradients)
times max|1 + scale| per row of h, and times the error floor above for each gradient (its largest
kappa). Ordinary rows have kappa 2-10, where c stays below the dtype term and nothing changes; only
rows whose elements nearly agree (std << |x|, e.g. D = 2) get more, because any implementation loses
there the digits that the subtraction cancels.
The reference rounds the residual r to its dtype before normalising it (straight-through for
gradients), which is the op's contract: h == adaln_modulate(r) for the r it returns.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from masked_dit.ops import adaln_modulate, gated_residual_adaln, use_backend
from masked_dit.ops import adaln as adaln_mod
from masked_dit.ops import dispatch

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "chunked", "strided_d")
EPS = 1e-6

CPU_BACKENDS = ["torch"]
if os.environ.get("TRITON_INTERPRET") == "1" and dispatch.triton_importable():
    CPU_BACKENDS.append("triton")
needs_triton = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not importable")

# -----------------------------------------------------------------------------
# inputs and float64 reference


def make_activation(B, L, D, dtype, layout, gen, device="cpu", magnitude=2.0):
    """[B, L, D] with the given memory layout: contiguous, batch-transposed, or feature-strided."""
    if layout == "contiguous":
        t = torch.randn(B, L, D, generator=gen)
    elif layout == "chunked":  # sequence-first storage seen batch-first
        t = torch.randn(L, B, D, generator=gen).transpose(0, 1)
    else:  # stride(-1) != 1
        t = torch.randn(B, D, L, generator=gen).transpose(1, 2)
    return (t * magnitude + 0.5).to(device=device, dtype=dtype)


def make_modulation(B, D, n, dtype, layout, gen, device="cpu"):
    """n [B, D] tensors; for non-contiguous layouts they are chunks of an adaLN Linear's [B, 6D]
    output (row stride 6D), picked at odd chunk positions so their storage offsets differ."""
    if layout == "contiguous":
        return [(0.5 * torch.randn(B, D, generator=gen)).to(device=device, dtype=dtype) for _ in range(n)]
    mod = (0.5 * torch.randn(B, 6 * D, generator=gen)).to(device=device, dtype=dtype)
    chunks = mod.chunk(6, dim=1)
    return [chunks[i] for i in (1, 3, 5, 0, 2, 4)[:n]]


def leaf(t):
    """A leaf that keeps t's strides (so the op sees the non-contiguous layout)."""
    return t.detach().requires_grad_()


def reference(kind, inputs, eps=EPS, stored_r=None):
    """float64 outputs of the op on float64 copies of ``inputs`` (which need not require grad).
    The op normalises the residual it stored, rounded: to ``stored_r`` when given (the backend's own
    rounding: on an exact tie the Triton interpreter rounds toward zero where torch and CUDA round to
    even, and at D = 2 with nearly equal elements one ulp of r moves the normalised row by tens of
    percent), else rounded to nearest even here."""
    d = [t.detach().double().requires_grad_() for t in inputs]
    if kind == "adaln":
        x, shift, scale = d
        return d, (_ref_modulate(x, shift, scale, eps),)
    x, branch, gate, shift, scale = d
    r = x + gate[:, None] * branch
    rounded = stored_r.detach().double() if stored_r is not None \
        else r.to(adaln_mod._residual_dtype(*inputs[:3])).double()
    r = r + (rounded - r).detach()
    return d, (r, _ref_modulate(r, shift, scale, eps))


def _ref_modulate(x, shift, scale, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]


def run_op(kind, inputs, eps=EPS):
    return (adaln_modulate(*inputs, eps=eps),) if kind == "adaln" else gated_residual_adaln(*inputs, eps=eps)


def assert_close(name, actual, expected, dtype, natural_scale=0.0, conditioning=None):
    """``conditioning``: the least absolute allowance per element (broadcast), see the module docstring."""
    tol = TOL[dtype]
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    atol = tol * max(expected.abs().max().item(), natural_scale, 1e-12)
    if conditioning is not None:
        err = (actual.double() - expected.detach()).abs()
        excess = err - (tol * expected.detach().abs() + torch.clamp(conditioning, min=atol))
        assert (excess <= 0).all(), f"{name}: off by {err.max().item():.3g} (allowed {tol:g} rel, {atol:.3g} abs " \
                                    f"+ conditioning), worst excess {excess.max().item():.3g}"
        return
    torch.testing.assert_close(actual.double(), expected.detach(), rtol=tol, atol=atol, msg=lambda m: f"{name}: {m}")


def _centring_error(norm_in, dtype):
    """Per-row relative allowance for the rounding of x - mean in the compute precision (module docstring)."""
    eps = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    if norm_in.numel() == 0:
        return torch.zeros(norm_in.shape[:-1] + (1,), dtype=torch.float64)
    kappa = norm_in.abs().amax(-1, keepdim=True) * torch.rsqrt(norm_in.var(-1, unbiased=False, keepdim=True) + EPS)
    return 4 * eps * kappa


def check_against_reference(kind, backend, B, L, D, dtype, layout, seed=0, magnitude=2.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n_act, n_mod = (1, 2) if kind == "adaln" else (2, 3)
    acts = [make_activation(B, L, D, dtype, layout, gen, device, magnitude) for _ in range(n_act)]
    inputs = [leaf(t) for t in acts + make_modulation(B, D, n_mod, dtype, layout, gen, device)]
    with use_backend(backend):
        outs = run_op(kind, inputs)
        grad_outs = [torch.randn(o.shape, generator=gen).to(device=device, dtype=o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, inputs, grad_outs)
    # h and the gradients from the r the op stored; r itself against the exact residual rounded here
    ref_inputs, ref_outs = reference(kind, inputs, stored_r=outs[0] if kind == "gated" else None)
    ref_grads = torch.autograd.grad(ref_outs, ref_inputs, [g.double() for g in grad_outs])
    out_names = ("h",) if kind == "adaln" else ("r", "h")
    in_names = ("x", "shift", "scale") if kind == "adaln" else ("x", "branch", "gate", "shift", "scale")
    checked = ref_outs if kind == "adaln" else (reference(kind, inputs)[1][0], ref_outs[1])
    centring = _centring_error((ref_inputs[0] if kind == "adaln" else outs[0].double()).detach(), dtype)
    mod = (1 + ref_inputs[-1].detach()).abs().amax(-1)[:, None, None] if D else 0.0
    conditioning = {"h": centring * mod}
    for name, o, ref in zip(out_names, outs, checked):
        assert o.dtype == dtype and o.shape == (B, L, D), name
        assert_close(name, o, ref, dtype, conditioning=conditioning.get(name))
    floors = _gradient_scales(kind, ref_inputs, ref_outs, grad_outs)
    worst = centring.max().item() if centring.numel() else 0.0
    for name, g, inp, ref in zip(in_names, grads, inputs, ref_grads):
        assert g.dtype == inp.dtype and g.shape == inp.shape, f"d{name}"
        floor = max(ref.detach().abs().max().item() if ref.numel() else 0.0, floors[name])
        assert_close(f"d{name}", g, ref, dtype, floors[name], conditioning=torch.tensor(worst * floor))


def _gradient_scales(kind, ref_inputs, ref_outs, grad_outs):
    """Size of the terms each gradient is a difference/sum of (see the module docstring)."""
    amax = lambda t: t.detach().abs().max().item() if t.numel() else 0.0  # noqa: E731
    norm_in = ref_outs[-2] if kind == "gated" else ref_inputs[0]
    scale = ref_inputs[-1]
    var = norm_in.detach().var(dim=-1, unbiased=False)
    rstd = amax(torch.rsqrt(var + EPS)) if var.numel() else 0.0
    dh = amax(grad_outs[-1])
    dnorm = dh * amax(1 + scale) * rstd + (amax(grad_outs[0]) if kind == "gated" else 0.0)
    if kind == "adaln":
        return {"x": dnorm, "shift": dh, "scale": dh}
    _, branch, gate, _, _ = ref_inputs
    return {"x": dnorm, "branch": dnorm * amax(gate), "gate": dnorm * amax(branch), "shift": dh, "scale": dh}


# -----------------------------------------------------------------------------
# correctness on CPU


@pytest.mark.parametrize("kind", ["adaln", "gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B,L,D", [(2, 7, 72), (1, 33, 384), (3, 5, 1152), (2, 9, 1000)])
def test_torch_backend_matches_reference(kind, dtype, layout, B, L, D):
    check_against_reference(kind, "torch", B, L, D, dtype, layout)


@needs_triton
@pytest.mark.parametrize("kind", ["adaln", "gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,L,D,layout", [(2, 5, 72, "chunked"), (1, 5, 1000, "strided_d")])
def test_triton_backend_matches_reference(kind, dtype, B, L, D, layout):
    # (1, 5): 4 token chunks of 2 rows, the last one empty -- exercises the two-stage reduction
    check_against_reference(kind, "triton", B, L, D, dtype, layout)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_extreme_inputs_bf16(kind, backend):
    """|x| up to 1e4, D = 4096, bf16: finite and correct (two-pass statistics)."""
    check_against_reference(kind, backend, 2, 3, 4096, torch.bfloat16, "chunked", magnitude=3e3)
    # a row with a huge mean and tiny spread, and a constant row (var = 0 -> rstd = eps^-1/2)
    x = torch.full((1, 2, 4096), 1e4, dtype=torch.bfloat16)
    x[0, 0, ::2] = 9984.0
    shift, scale = torch.zeros(1, 4096, dtype=torch.bfloat16), torch.ones(1, 4096, dtype=torch.bfloat16)
    with use_backend(backend):
        h = adaln_modulate(x, shift, scale)
    _, (ref,) = reference("adaln", [x, shift, scale])
    assert_close("h", h, ref, torch.bfloat16)
    assert (h[0, 1] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_follow_torch_promotion(backend):
    """fp32 residual stream with bf16 branch and modulation (autocast): r is fp32, and every
    gradient comes back in its input's dtype."""
    gen = torch.Generator().manual_seed(1)
    x = leaf(make_activation(2, 3, 72, torch.float32, "contiguous", gen))
    branch = leaf(make_activation(2, 3, 72, torch.bfloat16, "contiguous", gen))
    gate, shift, scale = (leaf(t) for t in make_modulation(2, 72, 3, torch.bfloat16, "chunked", gen))
    inputs = [x, branch, gate, shift, scale]
    with use_backend(backend):
        r, h = gated_residual_adaln(*inputs)
        assert r.dtype == h.dtype == torch.float32
        grads = torch.autograd.grad((r, h), inputs, (torch.ones_like(r), torch.randn(h.shape, generator=gen)))
        assert [g.dtype for g in grads] == [t.dtype for t in inputs]
        h2 = adaln_modulate(branch, shift.float(), scale)
        assert h2.dtype == torch.bfloat16
    ref_inputs, ref_outs = reference("gated", inputs)
    assert_close("r", r, ref_outs[0], torch.float32)
    assert_close("h", h, ref_outs[1], torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unused_output_and_empty_batch(backend):
    gen = torch.Generator().manual_seed(2)
    x, branch = (leaf(make_activation(2, 3, 40, torch.float32, "contiguous", gen)) for _ in range(2))
    gate, shift, scale = (leaf(t) for t in make_modulation(2, 40, 3, torch.float32, "contiguous", gen))
    with use_backend(backend):
        _, h = gated_residual_adaln(x, branch, gate, shift, scale)  # gradient only through h
        h.square().sum().backward()
        empty = torch.zeros(2, 0, 40)
        r0, h0 = gated_residual_adaln(empty, empty, gate.detach(), shift.detach(), scale.detach())
    _, (_, ref_h) = reference("gated", [x, branch, gate, shift, scale])
    ref_h.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert r0.shape == h0.shape == (2, 0, 40)


# -----------------------------------------------------------------------------
# autograd, opcheck, torch.compile


def _small_inputs(kind, dtype=torch.float64, D=5, device="cpu"):
    gen = torch.Generator().manual_seed(3)
    n_act, n_mod = (1, 2) if kind == "adaln" else (2, 3)
    acts = [make_activation(2, 3, D, dtype, "chunked", gen, device) for _ in range(n_act)]
    return [leaf(t) for t in acts + make_modulation(2, D, n_mod, dtype, "chunked", gen, device)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_gradcheck_float64(kind, backend):
    inputs = _small_inputs(kind)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: run_op(kind, a, eps=1e-5), inputs, fast_mode=backend != "torch")


def _op_cases(kind, dtype, device="cpu"):
    """(custom op, args) for the forward op and its backward op."""
    inputs = _small_inputs(kind, dtype, D=24, device=device)
    eps = 1e-5
    if kind == "adaln":
        fwd = adaln_mod._adaln_modulate_op
        h, mean, rstd = fwd(*[t.detach() for t in inputs], eps)
        x, _, scale = (t.detach() for t in inputs)
        bwd_args = (torch.randn_like(h), x, scale, mean, rstd)
        return [(fwd, (*inputs, eps)), (adaln_mod._adaln_modulate_backward_op, bwd_args)]
    fwd = adaln_mod._gated_residual_adaln_op
    r, h, mean, rstd = fwd(*[t.detach() for t in inputs], eps)
    _, branch, gate, _, scale = (t.detach() for t in inputs)
    bwd_args = (torch.randn_like(r), torch.randn_like(h), r, branch, gate, scale, mean, rstd)
    return [(fwd, (*inputs, eps)), (adaln_mod._gated_residual_adaln_backward_op, bwd_args)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_opcheck(kind, backend):
    with use_backend(backend):
        for dtype in (torch.float32, torch.bfloat16):
            for op, args in _op_cases(kind, dtype):
                torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_opcheck_backward_with_wider_shift(kind, backend):
    """The backward ops take shift's dtype for dshift (fp32 shift, bf16 scale): the fake agrees."""
    with use_backend(backend):
        (_, _), (op, args) = _op_cases(kind, torch.bfloat16)
        torch.library.opcheck(op, (*args, torch.float32))
        assert op(*args, torch.float32)[-2].dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adaln", "gated"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_shift_gradient_keeps_its_own_dtype(kind, backend, scale_dtype):
    """An fp32 shift beside a half-precision scale gets its gradient summed and stored in fp32: it was
    rounded through scale's dtype (fp16: inf past 65504; bf16: 8 bits), unlike autograd of the reference."""
    torch.manual_seed(0)
    B, L, D = 2, 64, 8
    x = torch.randn(B, L, D)
    branch, gate = torch.randn(B, L, D), torch.rand(B, D)
    shift = torch.zeros(B, D, requires_grad=True)
    scale = torch.zeros(B, D, dtype=scale_dtype, requires_grad=True)
    weight = 2000 * (1 + torch.rand(B, L, D))  # dshift ~ 64 * 3000 = 1.9e5 > fp16's max

    def run(fn, *inputs):
        shift.grad = scale.grad = None
        h = fn(*inputs, shift, scale) if kind == "adaln" else fn(*inputs, gate, shift, scale)[1]
        (h.float() * weight).sum().backward()
        return shift.grad.clone(), scale.grad.clone()

    args = (x,) if kind == "adaln" else (x, branch)
    fn = adaln_modulate if kind == "adaln" else gated_residual_adaln
    with use_backend(backend):
        dshift, dscale = run(fn, *args)
    assert dshift.dtype == torch.float32 and dscale.dtype == scale_dtype
    torch.testing.assert_close(dshift, weight.sum(1), rtol=1e-6, atol=0)  # d(h)/d(shift) = 1
    assert torch.isfinite(dshift).all() and dshift.abs().max() > 65504


def _out_dtype_matches_cast(kind, backend, device="cpu", D=24, dtypes=(torch.bfloat16, torch.float16)):
    """out_dtype stores h as its cast would: the same values, and the same gradients for every input
    (dh then arrives in out_dtype; the kernels read it in fp32, as the cast's backward made it)."""
    gen = torch.Generator().manual_seed(11)
    n_act, n_mod = (1, 2) if kind == "adaln" else (2, 3)
    for out_dtype in dtypes:
        base = [make_activation(2, 5, D, torch.float32, "chunked", gen, device) for _ in range(n_act)]
        base += make_modulation(2, D, n_mod, torch.float32, "chunked", gen, device)
        weight = torch.randn(2, 5, D, generator=gen).to(device)
        results = []
        for fused in (True, False):
            inputs = [leaf(t) for t in base]
            with use_backend(backend):
                if kind == "adaln":
                    x, shift, scale = inputs
                    outs = [adaln_modulate(x, shift, scale, out_dtype=out_dtype if fused else None)]
                else:
                    outs = list(gated_residual_adaln(*inputs, out_dtype=out_dtype if fused else None))
                h = outs[-1] if fused else outs[-1].to(out_dtype)
                assert h.dtype == out_dtype and h.is_contiguous()
                loss = (h.float() * weight).sum() + (outs[0].float().sum() if kind == "gated" else 0.0)
                loss.backward()
            results.append(([h.detach(), *[o.detach() for o in outs[:-1]]], [t.grad for t in inputs]))
        (h1, *rest1), grads1 = results[0]
        (h2, *rest2), grads2 = results[1]
        if backend == "triton" and device == "cpu" and out_dtype == torch.bfloat16:
            # Triton's CPU interpreter rounds fp32 -> bf16 toward zero (compiled Triton rounds to nearest
            # even, as the cast does; the GPU test checks equality): h must be one of the two bf16
            # neighbours of the fp32 value
            with use_backend(backend):
                exact = (adaln_modulate(*[t.detach() for t in base]) if kind == "adaln"
                         else gated_residual_adaln(*[t.detach() for t in base])[1])
            ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
            assert ((h1.float() - exact).abs() <= ulp).all() and ((h1.float() - h2.float()).abs() <= ulp).all()
        else:
            assert torch.equal(h1, h2), (kind, backend, out_dtype)
        for a, b in zip(rest1, rest2):
            assert torch.equal(a, b)  # r keeps the residual dtype
        for i, (a, b) in enumerate(zip(grads1, grads2)):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), (kind, backend, out_dtype, i)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_out_dtype_is_the_cast_of_h(kind, backend):
    _out_dtype_matches_cast(kind, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_opcheck_with_out_dtype(kind, backend):
    with use_backend(backend):
        for op, args in _op_cases(kind, torch.float32):
            if op in (adaln_mod._adaln_modulate_op, adaln_mod._gated_residual_adaln_op):
                torch.library.opcheck(op, (*args, torch.bfloat16))
            else:  # the backward takes dh in the stored dtype
                dh_at = 0 if kind == "adaln" else 1
                args = list(args)
                args[dh_at] = args[dh_at].to(torch.bfloat16)
                torch.library.opcheck(op, tuple(args))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64_accumulators_stored_in_half_types(backend):
    """fp64 statistics stored into bf16/fp16 outputs (h with out_dtype, and the gated dbranch of a bf16 branch
    beside an fp64 residual) hold the values of torch's cast (Triton's direct fp64 -> bf16 conversion gave
    NaN and denormals under the interpreter)."""
    gen = torch.Generator().manual_seed(12)
    x, branch = (leaf(make_activation(2, 3, 24, dt, "chunked", gen)) for dt in (torch.float64, torch.bfloat16))
    gate, shift, scale = (leaf(t) for t in make_modulation(2, 24, 3, torch.float64, "chunked", gen))
    dr, dh = (torch.randn(2, 3, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    for out_dtype in (torch.bfloat16, torch.float16):
        results = {}
        for name in ("torch", backend):
            with use_backend(name):
                h = adaln_modulate(x, shift, scale, out_dtype=out_dtype)
                r, h2 = gated_residual_adaln(x, branch, gate, shift, scale, out_dtype=out_dtype)
                dbranch, = torch.autograd.grad((r, h2), branch, (dr, dh.to(out_dtype)))
            results[name] = (h, h2, dbranch)
        for got, ref in zip(results[backend], results["torch"]):
            assert got.dtype == ref.dtype and torch.isfinite(got).all()
            # one ulp: the interpreter rounds fp32 -> bf16 toward zero (see _out_dtype_matches_cast)
            ulp = torch.finfo(got.dtype).eps * ref.double().abs().clamp_min(torch.finfo(got.dtype).tiny)
            assert ((got.double() - ref.double()).abs() <= ulp).all(), (backend, out_dtype)


@needs_triton
def test_triton_backend_runs_rows_wider_than_a_block():
    """D past Triton's largest block (2^20 elements) runs the torch reference (it raised 'numel exceeds triton
    maximum tensor numel'), as the CUDA backend does past its kMaxD."""
    gen = torch.Generator().manual_seed(13)
    D = 2**20 + 3
    x, branch = (leaf(torch.randn(1, 2, D, generator=gen)) for _ in range(2))
    gate, shift, scale = (leaf(0.5 * torch.randn(1, D, generator=gen)) for _ in range(3))
    inputs = [x, branch, gate, shift, scale]
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            r, h = gated_residual_adaln(*inputs)
            h2 = adaln_modulate(h, shift, scale)
            results[backend] = (r, h, h2, *torch.autograd.grad((r, h2), inputs, (torch.ones_like(r), h2.detach())))
    for got, want in zip(results["triton"], results["torch"]):
        assert torch.equal(got, want)


def test_out_dtype_is_checked():
    x = torch.randn(2, 3, 8)
    ok = torch.randn(2, 8)
    with pytest.raises(ValueError, match="out_dtype must be None or float16/bfloat16/float32/float64, got torch.int8"):
        adaln_modulate(x, ok, ok, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="out_dtype must be None"):
        gated_residual_adaln(x, x, ok, ok, ok, out_dtype=torch.int64)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_gpu_out_dtype_is_the_cast_of_h(kind):
    """On CUDA every backend, the cuda one included (it hands another h dtype to the Triton kernel)."""
    for backend in _gpu_backends():
        _out_dtype_matches_cast(kind, backend, device="cuda", D=1152)


def _block_seam(x, branch, mod):
    """The DiT usage: six strided chunks of the adaLN output, seam op, then the next modulate."""
    shift1, scale1, gate1, shift2, scale2, _ = mod.chunk(6, dim=1)
    r, h = gated_residual_adaln(x, branch, gate1, shift1, scale1)
    return r, adaln_modulate(h, shift2, scale2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_no_graph_breaks(backend):
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(4)
    x, branch = (leaf(make_activation(2, 5, 72, torch.float32, "chunked", gen)) for _ in range(2))
    mod = leaf(0.5 * torch.randn(2, 6 * 72, generator=gen))
    with use_backend(backend):
        explanation = torch._dynamo.explain(_block_seam)(x, branch, mod)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(_block_seam, fullgraph=True, backend="aot_eager")
        r, h = compiled(x, branch, mod)
        (r.sum() + h.square().sum()).backward()
        assert sum(counters["graph_break"].values()) == 0
        grads = [t.grad.clone() for t in (x, branch, mod)]
        for t in (x, branch, mod):
            t.grad = None
        r_e, h_e = _block_seam(x, branch, mod)
        (r_e.sum() + h_e.square().sum()).backward()
    torch.testing.assert_close((r, h), (r_e, h_e))
    torch.testing.assert_close(grads, [t.grad for t in (x, branch, mod)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_torch_backend_is_traced_inline(backend):
    """Under torch.compile the torch backend is traced inline (Inductor can fuse it; an opaque op would
    run its separate kernels), other backends stay one opaque op; gradients equal the eager ones."""
    graphs = []

    def capture(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    gen = torch.Generator().manual_seed(6)
    x, branch = (leaf(make_activation(2, 5, 72, torch.float32, "chunked", gen)) for _ in range(2))
    mod = leaf(0.5 * torch.randn(2, 6 * 72, generator=gen))
    torch._dynamo.reset()
    with use_backend(backend):
        r, h = torch.compile(_block_seam, fullgraph=True, backend=capture)(x, branch, mod)
        (r.sum() + h.square().sum()).backward()
        grads = [t.grad.clone() for t in (x, branch, mod)]
        for t in (x, branch, mod):
            t.grad = None
        r_e, h_e = _block_seam(x, branch, mod)
        (r_e.sum() + h_e.square().sum()).backward()
    (graph,) = graphs
    opaque = ("masked_dit.adaln_modulate" in graph, "masked_dit.gated_residual_adaln" in graph)
    assert opaque == ((False, False) if backend == "torch" else (True, True)), graph
    torch.testing.assert_close((r, h), (r_e, h_e))
    torch.testing.assert_close(grads, [t.grad for t in (x, branch, mod)])


@pytest.mark.slow
def test_compile_inductor_torch_backend():
    gen = torch.Generator().manual_seed(5)
    x, branch = (leaf(make_activation(2, 5, 72, torch.float32, "contiguous", gen)) for _ in range(2))
    mod = leaf(0.5 * torch.randn(2, 6 * 72, generator=gen))
    torch._dynamo.reset()
    with use_backend("torch"):
        r, h = torch.compile(_block_seam, fullgraph=True)(x, branch, mod)
        r_e, h_e = _block_seam(x, branch, mod)
    torch.testing.assert_close((r, h), (r_e, h_e))


# -----------------------------------------------------------------------------
# the triton kernels compile for a GPU (the interpreter does not type-check like the compiler)

_COMPILE_SCRIPT = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from masked_dit.ops.triton_kernels import adaln as k

POINTERS = {  # kernel: (activation/modulation pointers, statistics/partial-sum pointers)
    k._adaln_fwd_kernel: ("X SHIFT SCALE H", "MEAN RSTD"),
    k._gated_fwd_kernel: ("X BR GATE SHIFT SCALE R H", "MEAN RSTD"),
    k._adaln_bwd_kernel: ("DH X SCALE DX", "MEAN RSTD DSHIFT_P DSCALE_P"),
    k._gated_bwd_kernel: ("DR DH R BR GATE SCALE DX DBR", "MEAN RSTD DGATE_P DSHIFT_P DSCALE_P"),
}
CASES = [("bf16", 2048, True), ("fp16", 32, False), ("fp32", 8192, True), ("fp64", 128, False)]
for (fn, (acts, stats)), (dt, block, unit_stride) in itertools.product(POINTERS.items(), CASES):
    sig, constexprs = {}, {"BLOCK_D": block, "ACC_F64": dt == "fp64"}
    for name in fn.arg_names:
        if name in acts.split():
            sig[name] = "*" + dt
        elif name in stats.split():
            sig[name] = "*fp64" if dt == "fp64" else "*fp32"
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name == "eps":
            sig[name] = "fp32"
        elif unit_stride and name.startswith("s") and name.endswith("_d"):  # as specialised at launch
            sig[name], constexprs[name] = "constexpr", 1
        else:
            sig[name] = "i32"
    warps = k._num_warps(block, 8 if "fwd" in fn.__name__ else 4)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"], fn.__name__
"""


@pytest.mark.slow
@needs_triton
def test_triton_kernels_compile_for_sm90():
    """Compiles every kernel for sm_90 (no GPU needed) in each dtype, incl. tiny and 8192-wide
    rows. On a GPU machine the GPU tests compile and run them instead."""
    import subprocess
    import sys

    from tests.ops.triton_aot import require_aot_api

    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile the kernels for the real device")
    require_aot_api()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# -----------------------------------------------------------------------------
# the cuda backend's Python side, against CPU stand-ins for torch.ops.masked_dit_C

_EXT_SCHEMAS = {  # as in csrc/bindings/adaln.cpp
    "adaln_modulate": "(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)",
    "adaln_modulate_backward": "(Tensor dh, Tensor x, Tensor scale, Tensor mean, Tensor rstd)"
                               " -> (Tensor, Tensor, Tensor)",
    "gated_residual_adaln": "(Tensor x, Tensor branch, Tensor gate, Tensor shift, Tensor scale, float eps)"
                            " -> (Tensor, Tensor, Tensor, Tensor)",
    "gated_residual_adaln_backward": "(Tensor dr, Tensor dh, Tensor r, Tensor branch, Tensor gate, Tensor scale,"
                                     " Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


@pytest.fixture
def cpu_extension_stand_in():
    """Registers CPU impls of the extension's ops that enforce the bindings' TORCH_CHECKs (one
    activation dtype, one modulation dtype, no fp64, fp32 statistics) and compute with the torch
    reference -- so the dtype plumbing of the cuda backend's wrappers runs on CPU."""
    from masked_dit import _ext

    if _ext.loaded():
        pytest.skip("the real extension is loaded; the GPU tests cover it")
    lib = torch.library.Library("masked_dit_C", "FRAGMENT")
    for name, schema in _EXT_SCHEMAS.items():
        lib.define(name + schema)

    def same(*ts):
        assert len({t.dtype for t in ts}) == 1 and ts[0].dtype != torch.float64, [t.dtype for t in ts]

    def adaln_fwd(x, shift, scale, eps):
        same(shift, scale)
        return adaln_mod._adaln_modulate_torch(x, shift, scale, eps)

    def adaln_bwd(dh, x, scale, mean, rstd):
        same(dh, x)
        assert mean.dtype == rstd.dtype == torch.float32
        return adaln_mod._adaln_modulate_backward_torch(dh, x, scale, mean, rstd)

    def gated_fwd(x, branch, gate, shift, scale, eps):
        same(x, branch)
        same(gate, shift, scale)
        return adaln_mod._gated_residual_adaln_torch(x, branch, gate, shift, scale, eps)

    def gated_bwd(dr, dh, r, branch, gate, scale, mean, rstd):
        same(dr, dh, r, branch)
        same(gate, scale)
        assert mean.dtype == rstd.dtype == torch.float32
        return adaln_mod._gated_residual_adaln_backward_torch(dr, dh, r, branch, gate, scale, mean, rstd)

    for name, fn in zip(_EXT_SCHEMAS, (adaln_fwd, adaln_bwd, gated_fwd, gated_bwd)):
        lib.impl(name, fn, "CPU")
    yield
    lib._destroy()


@pytest.mark.parametrize("mixed", [False, True])
def test_cuda_backend_wrappers_normalise_dtypes(cpu_extension_stand_in, mixed):
    gen = torch.Generator().manual_seed(6)
    bf16, f32 = torch.bfloat16, torch.float32
    x = make_activation(2, 3, 40, f32 if mixed else bf16, "chunked", gen)
    branch = make_activation(2, 3, 40, bf16, "strided_d", gen)
    gate, shift, scale = make_modulation(2, 40, 3, bf16, "chunked", gen)
    shift = shift.float() if mixed else shift
    fwd = adaln_mod._gated_residual_adaln_cuda(x, branch, gate, shift, scale, EPS)
    ref = adaln_mod._gated_residual_adaln_torch(x, branch, gate, shift, scale, EPS)
    torch.testing.assert_close(fwd, ref, rtol=TOL[bf16], atol=TOL[bf16])
    r, h, mean, rstd = fwd
    dr, dh = torch.randn(r.shape, generator=gen).to(r.dtype), torch.randn(h.shape, generator=gen).to(h.dtype)
    grads = adaln_mod._gated_residual_adaln_backward_cuda(dr, dh, r, branch, gate, scale, mean, rstd)
    ref_grads = adaln_mod._gated_residual_adaln_backward_torch(dr, dh, r, branch, gate, scale, mean, rstd)
    assert [g.dtype for g in grads] == [r.dtype, branch.dtype, gate.dtype, scale.dtype, scale.dtype]
    torch.testing.assert_close(grads, ref_grads, rtol=TOL[bf16], atol=TOL[bf16])
    h2, mean2, rstd2 = adaln_mod._adaln_modulate_cuda(branch, shift, scale, EPS)
    assert h2.dtype == bf16 and mean2.dtype == torch.float32
    dx, dshift, dscale = adaln_mod._adaln_modulate_backward_cuda(dh.to(bf16), branch, scale, mean2, rstd2)
    assert (dx.dtype, dshift.dtype, dscale.dtype) == (bf16, bf16, bf16)
    # a wider shift: its gradient leaves the extension in fp32 (the modulation cast to fp32), not bf16
    dx, dshift32, dscale32 = adaln_mod._adaln_modulate_backward_cuda(dh.to(bf16), branch, scale, mean2, rstd2,
                                                                     f32)
    assert (dx.dtype, dshift32.dtype, dscale32.dtype) == (bf16, f32, bf16)
    torch.testing.assert_close(dshift32, dh.to(bf16).float().sum(1), rtol=1e-6, atol=1e-6)
    grads32 = adaln_mod._gated_residual_adaln_backward_cuda(dr, dh, r, branch, gate, scale, mean, rstd, f32)
    assert grads32[3].dtype == f32
    torch.testing.assert_close(grads32[3], dh.to(r.dtype).float().sum(1), rtol=1e-6, atol=1e-6)
    # fp64 never reaches the extension (it has no fp64 kernels): the torch reference runs
    x64 = x.double()
    out64 = adaln_mod._adaln_modulate_cuda(x64, shift.double(), scale.double(), EPS)
    assert out64[0].dtype == torch.float64


@pytest.mark.parametrize("triton_there", [True, False])
def test_cuda_backend_wrappers_store_another_out_dtype(cpu_extension_stand_in, monkeypatch, triton_there):
    """The kernels store h in the activation dtype: another out_dtype runs the Triton kernel when triton
    is there (never the extension with a mixed set), else the extension and a cast."""
    if triton_there and "triton" not in CPU_BACKENDS:
        pytest.skip("triton (interpreter) not available")
    monkeypatch.setattr(dispatch, "triton_importable", lambda: triton_there)
    gen = torch.Generator().manual_seed(8)
    x, branch = (make_activation(2, 3, 40, torch.float32, "chunked", gen) for _ in range(2))
    gate, shift, scale = make_modulation(2, 40, 3, torch.float32, "chunked", gen)
    for out_dtype in (torch.float16, torch.bfloat16):
        h, mean, rstd = adaln_mod._adaln_modulate_cuda(x, shift, scale, EPS, out_dtype)
        h_ref, mean_ref, _ = adaln_mod._adaln_modulate_torch(x, shift, scale, EPS, out_dtype)
        assert h.dtype == out_dtype and mean.dtype == torch.float32
        torch.testing.assert_close(h, h_ref, rtol=TOL[out_dtype], atol=TOL[out_dtype])
        r, h, _, _ = adaln_mod._gated_residual_adaln_cuda(x, branch, gate, shift, scale, EPS, out_dtype)
        r_ref, h_ref, _, _ = adaln_mod._gated_residual_adaln_torch(x, branch, gate, shift, scale, EPS, out_dtype)
        assert r.dtype == torch.float32 and h.dtype == out_dtype
        torch.testing.assert_close((r, h), (r_ref, h_ref), rtol=TOL[out_dtype], atol=TOL[out_dtype])


# -----------------------------------------------------------------------------
# errors


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 8)
    ok = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"x must be \[B, L, D\]"):
        adaln_modulate(x[0], ok, ok)
    with pytest.raises(ValueError, match=r"shift must be \[B, D\] = \(2, 8\)"):
        adaln_modulate(x, torch.randn(2, 7), ok)
    with pytest.raises(ValueError, match=r"scale must be float16/bfloat16/float32/float64"):
        adaln_modulate(x, ok, ok.long())
    with pytest.raises(ValueError, match=r"branch shape \(2, 4, 8\) must equal x shape"):
        gated_residual_adaln(x, torch.randn(2, 4, 8), ok, ok, ok)
    with pytest.raises(ValueError, match=r"gate must be \[B, D\]"):
        gated_residual_adaln(x, x, ok[:1], ok, ok)


# -----------------------------------------------------------------------------
# property tests (hypothesis)

_shapes = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 300))


@pytest.mark.parametrize("kind", ["adaln", "gated"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=_shapes, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1))
@example(shape=(2, 4, 2), dtype=torch.float32, layout="strided_d", seed=1)  # a row with x0 ~ x1: centring
def test_property_torch_backend(kind, shape, dtype, layout, seed):
    check_against_reference(kind, "torch", *shape, dtype, layout, seed=seed)


@needs_triton
@pytest.mark.parametrize("kind", ["adaln", "gated"])
@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 200)), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1))
@example(shape=(1, 3, 2), dtype=torch.bfloat16, layout="contiguous", seed=343)  # gated: a tie in rounding r
def test_property_triton_backend(kind, shape, dtype, layout, seed):
    check_against_reference(kind, "triton", *shape, dtype, layout, seed=seed)


# -----------------------------------------------------------------------------
# GPU: all three backends


def _gpu_backends():
    backends = ["torch", "triton"]
    from masked_dit import _ext

    if _ext.loaded():
        backends.append("cuda")
    return backends


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adaln", "gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,L,D,layout", [(4, 257, 1152, "chunked"), (2, 63, 1000, "strided_d"),
                                          (3, 17, 72, "contiguous"), (2, 129, 4096, "chunked")])
def test_gpu_backends_match_reference(kind, dtype, B, L, D, layout):
    for backend in _gpu_backends():
        check_against_reference(kind, backend, B, L, D, dtype, layout, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_gpu_extreme_inputs_bf16(kind):
    for backend in _gpu_backends():
        check_against_reference(kind, backend, 2, 65, 4096, torch.bfloat16, "chunked", magnitude=3e3, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adaln", "gated"])
def test_gpu_opcheck_and_compile(kind):
    for backend in _gpu_backends():
        with use_backend(backend):
            for dtype in (torch.float32, torch.bfloat16):
                for op, args in _op_cases(kind, dtype, device="cuda"):
                    torch.library.opcheck(op, args)
            inputs = _small_inputs(kind, torch.float32, D=1152, device="cuda")
            torch._dynamo.reset()
            outs = torch.compile(lambda *a: run_op(kind, a), fullgraph=True)(*inputs)
            torch.testing.assert_close(outs, run_op(kind, inputs))


@pytest.mark.gpu
def test_gpu_cuda_extension_loaded():
    from masked_dit import _ext

    if not _ext.loaded():
        pytest.skip(f"masked_dit._C not built: {_ext.load_error()}")
    assert "cuda" in _gpu_backends()
