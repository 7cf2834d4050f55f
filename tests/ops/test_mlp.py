"""ops.mlp_gelu: the block MLP with a derivative as one op, its GELU in cuBLASLt epilogues on CUDA (opt-in).

On CPU the custom op runs its torch backend, whose hand-written backward (the formulas the cuda backend
shares) is checked against autograd of the reference; the cuBLASLt GEMMs themselves are the gpu tests."""
import threading

import pytest
import torch
import torch.nn.functional as F

from masked_dit import ops
from masked_dit.nn.block import Mlp
from masked_dit.ops import dispatch, mlp as mlp_op


def _weights(K=16, H=64, N=24, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((H, K), (H,), (N, H), (N,))
    return [(torch.randn(s, generator=g, dtype=torch.float64) * (K ** -0.5 if len(s) == 2 else 0.1))
            .to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _grads(fn, x, weights, dout):
    x = x.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in weights]
    out = fn(x, *ws)
    out.backward(dout)
    return out.detach(), [t.grad for t in (x, *ws)]


def _op(x, w1, b1, w2, b2):  # the custom op itself (torch backend on CPU), as the fused path calls it
    return mlp_op._mlp_gelu_op(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)[0].view(*x.shape[:-1], w2.shape[0])


@pytest.fixture
def fused(monkeypatch):
    """Make the public function and Mlp take the custom-op path (on CPU: its torch backend)."""
    monkeypatch.setattr(mlp_op, "_runs_fused", lambda device_type: True)
    monkeypatch.setattr(mlp_op, "_fusable", lambda dtype, w1, w2: True)  # fp32 too (the cuda backend: bf16/fp16)


def test_custom_op_gradients_match_autograd_of_the_reference():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weights = _weights()
    assert torch.autograd.gradcheck(_op, (x, *weights))
    dout = torch.randn(3, 5, 24, dtype=torch.float64)
    out, grads = _grads(_op, x, weights, dout)
    ref_out, ref_grads = _grads(mlp_op.reference, x, weights, dout)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_op_in_low_precision_tracks_float64(dtype):
    torch.manual_seed(0)
    x, dout = torch.randn(4, 7, 16), torch.randn(4, 7, 24)
    weights = _weights(dtype=dtype)
    out, grads = _grads(_op, x.to(dtype), weights, dout.to(dtype))
    ref_out, ref_grads = _grads(mlp_op.reference, x.double(), [w.double() for w in weights], dout.double())
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    for got, ref in zip([out, *grads], [ref_out, *ref_grads]):
        assert got.dtype == dtype
        assert (got.double() - ref).abs().max() <= tol * ref.abs().max(), (got, ref)


class _LtStandIn:
    """The extension's two ops as their contract states them (fp32 accumulation, one rounding), in torch."""

    def __init__(self):
        self.calls = []

    def linear_gelu_aux(self, x, w1, b1, algo):
        self.calls.append(("linear_gelu_aux", algo))
        pre = F.linear(x.float(), w1.float(), b1.float())
        return F.gelu(pre, approximate="tanh").to(x.dtype), pre.to(x.dtype)

    def dgelu_bgrad(self, dout, w2, pre, algo):
        self.calls.append(("dgelu_bgrad", algo))
        dpre = torch.ops.aten.gelu_backward(dout.float() @ w2.float(), pre.float(), approximate="tanh")
        return dpre.to(dout.dtype), dpre.sum(0).to(dout.dtype)


def test_cuda_backend_glue_with_a_stand_in_for_the_extension(monkeypatch):
    """The cuda backend's Python side (output order, the shared plain-GEMM gradients, the fallbacks)
    on CPU, with the two cuBLASLt calls replaced by torch code that follows their contract."""
    lt = _LtStandIn()
    monkeypatch.setattr(mlp_op, "_lt_ops", lambda: lt)
    torch.manual_seed(0)
    x, dout = torch.randn(6, 16, dtype=torch.bfloat16), torch.randn(6, 24, dtype=torch.bfloat16)
    weights = [w.detach() for w in _weights(dtype=torch.bfloat16)]
    out, pre, act = mlp_op._mlp_gelu_cuda(x, *weights)
    grads = mlp_op._mlp_gelu_backward_cuda(dout.t().contiguous().t(), x, weights[0], weights[2], pre, act, True, True)
    assert lt.calls == [("linear_gelu_aux", 0), ("dgelu_bgrad", 0)]
    ref_out, ref_grads = _grads(mlp_op.reference, x.double(), [w.double() for w in weights], dout.double())
    for got, ref in zip([out, *grads], [ref_out, *ref_grads]):
        assert got.dtype == torch.bfloat16 and got.shape == ref.shape
        assert _max_err(got, ref) <= 2e-2 * ref.abs().max()
    # what cuBLASLt cannot take runs the torch backend: fp32, a width that is not a multiple of 8
    lt.calls.clear()
    mlp_op._mlp_gelu_cuda(x.float(), *[w.float() for w in weights])
    mlp_op._mlp_gelu_cuda(x[:, :12], weights[0][:, :12], *weights[1:])
    mlp_op._mlp_gelu_backward_cuda(dout.float(), x.float(), weights[0].float(), weights[2].float(), pre.float(),
                                   act.float(), True, True)
    assert lt.calls == []
    # the heuristic candidate to run comes from the environment, checked in one line
    monkeypatch.setenv(mlp_op.ALGO_ENV_VAR, "3")
    mlp_op._mlp_gelu_cuda(x, *weights)
    assert lt.calls == [("linear_gelu_aux", 3)]
    monkeypatch.setenv(mlp_op.ALGO_ENV_VAR, "8")
    with pytest.raises(ValueError, match=r"MASKED_DIT_LT_ALGO='8' is not a cuBLASLt candidate index; valid: 0\.\.7"):
        mlp_op._mlp_gelu_cuda(x, *weights)


def test_custom_op_registrations():
    x = torch.randn(6, 16, dtype=torch.float64)
    w1, b1, w2, b2 = _weights()
    torch.library.opcheck(torch.ops.masked_dit.mlp_gelu.default, (x, w1, b1, w2, b2))
    out, pre, act = torch.ops.masked_dit.mlp_gelu(x, w1, b1, w2, b2)
    dout = torch.randn_like(out)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.masked_dit.mlp_gelu_backward.default,
                              (dout, x, w1.detach(), w2.detach(), pre.detach(), act.detach(), "torch", need_x, need_w),
                              test_utils=("test_schema", "test_faketensor"))


def test_public_function_is_the_reference_where_not_fused():
    torch.manual_seed(0)
    x, weights = torch.randn(2, 5, 16), [w.float() for w in _weights()]
    assert not ops.mlp_gelu_is_fused(x, weights[0], weights[2])
    torch.testing.assert_close(ops.mlp_gelu(x, *weights), mlp_op.reference(x, *weights), rtol=0, atol=0)
    with dispatch.use_backend("triton"):  # the MLP has no Triton backend: the reference, not an error
        assert not ops.mlp_gelu_is_fused(x, weights[0], weights[2])
        torch.testing.assert_close(ops.mlp_gelu(x, *weights), mlp_op.reference(x, *weights), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 16), (0, 3, 16)])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_path_matches_the_module_path(monkeypatch, shape, autocast):
    """Mlp through the custom op (autocast's casts done by the op's caller) against Mlp's own modules."""
    torch.manual_seed(0)
    mlp, x, dout = Mlp(16, 64), torch.randn(shape), torch.randn(*shape[:-1], 16)

    def run(fused):
        monkeypatch.setattr(mlp_op, "_runs_fused", lambda device_type: fused)
        monkeypatch.setattr(mlp_op, "_fusable", lambda dtype, w1, w2: True)
        mlp.zero_grad(set_to_none=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, (dx,) = _grads(lambda x: mlp(x), x, [], dout)
        return [out, dx] + [p.grad.clone() for p in mlp.parameters()]

    got, want = run(True), run(False)
    assert got[0].dtype == want[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert all(g.dtype == torch.float32 for g in got[2:])  # the parameters' own dtype, through autocast's cast
    tol = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("frozen", ["weights", "input"])
def test_backward_skips_the_gradients_nobody_needs(fused, monkeypatch, frozen):
    """A frozen MLP (fine-tuning around it) skips the weight-gradient GEMMs; an input that needs no
    gradient skips dx. What is computed equals autograd of the reference."""
    calls = []
    real = mlp_op._mlp_gelu_backward_torch
    monkeypatch.setitem(dispatch._IMPLS["mlp_gelu_backward"], "torch",
                        lambda *a: calls.append(a[-2:]) or real(*a))
    torch.manual_seed(0)
    mlp, x = Mlp(16, 64), torch.randn(3, 16, requires_grad=frozen == "weights")
    if frozen == "weights":
        mlp.requires_grad_(False)
    ref = Mlp(16, 64)
    ref.load_state_dict(mlp.state_dict())
    ref.requires_grad_(frozen != "weights")
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    mlp(x).sum().backward()
    ref.fc2(ref.act(ref.fc1(x_ref))).sum().backward()
    assert calls == [(frozen == "weights", frozen == "input")]
    if frozen == "weights":
        torch.testing.assert_close(x.grad, x_ref.grad)
        assert all(p.grad is None for p in mlp.parameters())
    else:
        for p, q in zip(mlp.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_backward_runs_the_forwards_backend(fused):
    """The backend is the forward's: a backward under another request (here one the MLP lacks, which made
    the backward op fail) runs what the forward ran."""
    mlp, x = Mlp(16, 64), torch.randn(3, 16, requires_grad=True)
    with dispatch.use_backend("torch"):
        out = mlp(x)
    with dispatch.use_backend("triton"):
        out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in mlp.parameters())


def test_mlp_calls_the_op_only_when_fused(fused, monkeypatch):
    calls = []
    real = mlp_op._mlp_gelu_op
    monkeypatch.setattr(mlp_op, "_mlp_gelu_op", lambda *a: calls.append(1) or real(*a))
    mlp, x = Mlp(16, 64), torch.randn(2, 3, 16)
    mlp(x).sum().backward()
    assert calls == [1]
    with torch.no_grad():  # sampling keeps ops.linear_gelu
        mlp(x)
    assert calls == [1]


def test_compiles_fullgraph_on_the_op_path(fused):
    torch.manual_seed(0)
    mlp, x = Mlp(16, 64), torch.randn(2, 5, 16, requires_grad=True)
    eager = mlp(x)
    eager.sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for got, ref in zip([x.grad] + [p.grad for p in mlp.parameters()], want):
        torch.testing.assert_close(got, ref)


def test_bad_input_fails_clearly():
    x, (w1, b1, w2, b2) = torch.randn(2, 16), [w.float().detach() for w in _weights()]
    with pytest.raises(ValueError, match=r"mlp_gelu: x \[\.\.\., 9\], w1 \(64, 16\)"):
        ops.mlp_gelu(torch.randn(2, 9), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"do not make fc1 \[H, K\] -> fc2 \[N, H\]"):
        ops.mlp_gelu(x, w1, b1, w2.t(), b2)
    with pytest.raises(ValueError, match="mlp_gelu: b2 dtype torch.float64 differs from x dtype torch.float32"):
        ops.mlp_gelu(x, w1, b1, w2, b2.double())
    with pytest.raises(ValueError, match="mlp_gelu: w2 is on meta but x is on cpu"):
        ops.mlp_gelu(x, w1, b1, w2.to("meta"), b2)
    with pytest.raises(TypeError, match="mlp_gelu: b1 must be a torch.Tensor, got NoneType"):
        ops.mlp_gelu(x, w1, None, w2, b2)
    with pytest.raises(ValueError, match="mlp_gelu: x must be floating point, got torch.int64"):
        ops.mlp_gelu(x.long(), w1.long(), b1.long(), w2.long(), b2.long())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts every operand: not a mismatch
        assert ops.mlp_gelu(x, w1, b1, w2.bfloat16(), b2).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------
# Dispatch: an opt-in backend, and contexts that reach autograd's threads
# ----------------------------------------------------------------------------------------

def test_cuda_backend_is_opt_in(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.OPT_IN_ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "availability", lambda backend, device_type: (True, f"{backend} usable"))
    for op in ("mlp_gelu", "mlp_gelu_backward"):
        backend, why = dispatch.select(op, "cuda")
        assert backend == "torch" and why.endswith("(cuda is opt-in: MASKED_DIT_OPT_IN=mlp_gelu)"), why
        with dispatch.opt_in("mlp_gelu"):
            assert dispatch.select(op, "cuda")[0] == "cuda"
        with dispatch.use_backend("cuda"):  # asked for by name: runs
            assert dispatch.select(op, "cuda")[0] == "cuda"
    assert dispatch.select("adaln_modulate", "cuda")[0] == "cuda"  # other ops: auto as before
    monkeypatch.setenv(dispatch.OPT_IN_ENV_VAR, " MLP_gelu ,")
    assert dispatch.select("mlp_gelu_backward", "cuda")[0] == "cuda"
    assert dispatch.opted_in() == {"mlp_gelu"}
    monkeypatch.setenv(dispatch.OPT_IN_ENV_VAR, "mlp-gelu")  # a typo is an error, not silently nothing
    with pytest.raises(ValueError, match="MASKED_DIT_OPT_IN names 'mlp-gelu', which has no opt-in backend; "
                                         "ops that have one: mlp_gelu"):
        dispatch.select("mlp_gelu", "cuda")
    with pytest.raises(ValueError, match="no opt-in backend for 'adaln_modulate'; ops that have one: mlp_gelu"):
        with dispatch.opt_in("adaln_modulate"):
            pass


def test_overlapping_contexts_of_two_threads_each_remove_their_own(monkeypatch):
    """Process-wide stacks: a context that ends removes its own entry, not the newest one (thread A's
    ``torch`` ending while thread B's ``triton`` is open must leave B on ``triton``)."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    b_entered, a_left, seen = threading.Event(), threading.Event(), []

    def thread_b():
        with dispatch.use_backend("triton"):
            b_entered.set()
            a_left.wait(5)
            seen.append(dispatch.requested())

    b = threading.Thread(target=thread_b)
    with dispatch.use_backend("torch"):
        b.start()
        b_entered.wait(5)
    a_left.set()
    b.join()
    assert seen == ["triton"] and dispatch.requested() == "auto"


def test_backend_contexts_reach_other_threads(monkeypatch):
    """Autograd runs CUDA backward ops on its own device threads: they must see the caller's
    ``use_backend`` / ``opt_in`` (thread-local stacks made every GPU backward run the default)."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.OPT_IN_ENV_VAR, raising=False)
    seen = []

    def look():
        seen.append((dispatch.requested(), dispatch.opted_in()))

    with dispatch.use_backend("torch"), dispatch.opt_in("mlp_gelu"):
        thread = threading.Thread(target=look)
        thread.start()
        thread.join()
    look()
    assert seen == [("torch", {"mlp_gelu"}), ("auto", frozenset())]


# ----------------------------------------------------------------------------------------
# GPU: the cuBLASLt epilogue GEMMs
# ----------------------------------------------------------------------------------------

def _max_err(got, ref):
    return (got.double() - ref).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,H,N", [(2 * 256, 1152, 4608, 1152), (130, 64, 256, 40)])
def test_cuda_epilogues_match_float64(dtype, M, K, H, N):
    """The cuBLASLt path (aux layout, transposes, bias gradient) against float64, no less accurate than
    the unfused torch backend at the same precision: one rounding where that has two or three."""
    from masked_dit import _ext

    if not _ext.loaded():
        pytest.skip(f"masked_dit._C not loaded: {_ext.load_error()}")
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    weights = [w.detach() for w in _weights(K, H, N, dtype=dtype, device="cuda")]
    assert mlp_op._cublaslt_ok(x, *weights[:3])
    dout = torch.randn(M, N, device="cuda", dtype=dtype)
    with dispatch.opt_in("mlp_gelu"):
        assert ops.mlp_gelu_is_fused(x, weights[0], weights[2])
        out, grads = _grads(ops.mlp_gelu, x, weights, dout)
    ref_out, ref_grads = _grads(mlp_op.reference, x.double(), [w.double() for w in weights], dout.double())
    with dispatch.use_backend("torch"):
        two_out, two_grads = _grads(mlp_op.reference, x, weights, dout)
    names = ("out", "dx", "dw1", "db1", "dw2", "db2")
    for name, got, two, ref in zip(names, [out, *grads], [two_out, *two_grads], [ref_out, *ref_grads]):
        err, err_two = _max_err(got, ref), _max_err(two, ref)
        assert err <= 1.25 * err_two + 1e-6 * ref.abs().max().item(), (name, err, err_two)


@pytest.mark.gpu
def test_cuda_path_under_compile_and_fallbacks():
    from masked_dit import _ext

    if not _ext.loaded():
        pytest.skip(f"masked_dit._C not loaded: {_ext.load_error()}")
    torch.manual_seed(0)
    mlp = Mlp(64, 256).cuda()
    x = torch.randn(4, 33, 64, device="cuda")
    with dispatch.opt_in("mlp_gelu"), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = mlp(x)
        compiled = torch.compile(mlp, fullgraph=True)(x)
    # the same cuBLASLt calls, kept whole (other buffer alignments may let the heuristic pick another algorithm)
    torch.testing.assert_close(compiled, eager)
    # fp32 and widths that are not multiples of 8 keep Mlp's own modules (compile fuses those); operands the
    # op gets that cuBLASLt cannot take (here: misaligned) run the reference inside it
    for mlp_, x_ in ((Mlp(64, 256).cuda(), torch.randn(3, 64, device="cuda")),
                     (Mlp(20, 84).cuda().bfloat16(), torch.randn(3, 20, device="cuda", dtype=torch.bfloat16))):
        with dispatch.opt_in("mlp_gelu"):
            assert not ops.mlp_gelu_is_fused(x_, mlp_.fc1.weight, mlp_.fc2.weight)
            out = mlp_(x_)
        with dispatch.use_backend("torch"):
            torch.testing.assert_close(out, mlp_(x_))
    mlp_ = Mlp(64, 256).cuda().bfloat16()
    x_ = torch.randn(3 * 64 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(3, 64)  # a 2-byte offset
    assert not mlp_op._cublaslt_ok(x_, mlp_.fc1.weight)
    with dispatch.opt_in("mlp_gelu"):
        assert ops.mlp_gelu_is_fused(x_, mlp_.fc1.weight, mlp_.fc2.weight)
        out = mlp_(x_)
        with dispatch.use_backend("torch"):
            torch.testing.assert_close(out, mlp_(x_))


@pytest.mark.gpu
def test_cuda_training_steps_track_the_unfused_ones():
    """A small DiT trained three AdamW steps in bf16 with and without the opt-in op: the same losses and
    weights to bf16 precision (the op reaches every block's MLP, forward and backward)."""
    from masked_dit import _ext
    from masked_dit.models import build

    if not _ext.loaded():
        pytest.skip(f"masked_dit._C not loaded: {_ext.load_error()}")

    def train(opted_in):
        torch.manual_seed(0)
        model = build("dit", input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10,
                      learn_sigma=False).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(1)
        losses = []
        context = dispatch.opt_in("mlp_gelu") if opted_in else dispatch.use_backend("auto")
        with context:
            for _ in range(3):
                x = torch.randn(16, 4, 8, 8, device="cuda", generator=gen)
                t = torch.randint(0, 1000, (16,), device="cuda", generator=gen)
                y = torch.randint(0, 10, (16,), device="cuda", generator=gen)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = (model(x, t, y).float() - x).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    (fused_losses, fused_w), (losses, w) = train(True), train(False)
    assert fused_losses == pytest.approx(losses, rel=2e-2)
    torch.testing.assert_close(fused_w, w, rtol=2e-2, atol=2e-3)


def test_empty_widths_are_not_given_to_cublaslt():
    """cuBLASLt refuses a zero dimension (an empty tensor's data_ptr is 0, so alignment alone passes it):
    such operands run the reference, which gives GELU of the bias for K = 0."""
    bf = dict(dtype=torch.bfloat16)
    full = (torch.zeros(16, 8, **bf), torch.zeros(32, 8, **bf), torch.zeros(32, **bf), torch.zeros(8, 32, **bf))
    assert mlp_op._cublaslt_ok(*full)
    for M, K, H in [(0, 8, 32), (16, 0, 32), (16, 8, 0)]:
        x, w1, b1 = torch.zeros(M, K, **bf), torch.zeros(H, K, **bf), torch.zeros(H, **bf)
        assert not mlp_op._cublaslt_ok(x, w1, b1), (M, K, H)
    assert not mlp_op._fusable(torch.bfloat16, torch.zeros(32, 0, **bf), torch.zeros(8, 32, **bf))
    assert not mlp_op._fusable(torch.bfloat16, torch.zeros(32, 8, **bf), torch.zeros(0, 32, **bf))
    assert mlp_op._fusable(torch.bfloat16, full[1], full[3])
