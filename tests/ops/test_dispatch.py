"""Backend selection: environment variable, context manager, auto rules, clear errors."""
import pytest
import torch

from masked_dit import ops  # noqa: F401  (registers backends)
from masked_dit.ops import dispatch


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    for op in dispatch.registered_ops():
        backend, why = dispatch.select(op, "cpu")
        assert backend == "torch", (op, why)


def test_env_var_read_at_call_time(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.requested() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="MASKED_DIT_BACKEND='bogus'.*valid: auto, torch, triton, cuda"):
        dispatch.requested()


def test_context_manager_nests_and_overrides_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    with dispatch.use_backend("triton"):
        assert dispatch.requested() == "triton"
        with dispatch.use_backend("auto"):
            assert dispatch.requested() == "auto"
        assert dispatch.requested() == "triton"
    assert dispatch.requested() == "torch"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with dispatch.use_backend("fast"):
            pass


def test_explicit_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops_with_cuda = [op for op in dispatch.registered_ops() if "cuda" in dispatch._IMPLS[op]]
    if not ops_with_cuda:
        pytest.skip("no op registers a cuda backend yet")
    with dispatch.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="unavailable"):
            dispatch.select(ops_with_cuda[0], "cpu")


def test_cuda_without_device_reports_why():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    ok, why = dispatch.availability("triton", "cuda")
    assert not ok and "no CUDA device" in why


def test_info_lists_every_op():
    from masked_dit.info import report

    text = report()
    assert "torch " in text and "masked_dit._C" in text
    for op in dispatch.registered_ops():
        assert op in text
    for op in ("attention (dense)", "attention (packed)", "attention (rel-pos bias)", "linear_gelu"):
        assert op in text  # the ops chosen outside the dispatcher too


@pytest.mark.parametrize("op", ["adaln_modulate", "gather_tokens"])
def test_backward_runs_under_the_forwards_request(monkeypatch, op):
    """``with use_backend(b): y = f(x)`` then ``y.backward()`` outside the block runs b's backward (it ran
    auto's before: on a GPU the CUDA kernels, on the CPU the reference)."""
    ok, why = dispatch.availability("triton", "cpu")
    if not ok:
        pytest.skip(why)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    calls = []
    real = dispatch._IMPLS[op + "_backward"]["triton"]
    monkeypatch.setitem(dispatch._IMPLS[op + "_backward"], "triton", lambda *a: calls.append(op) or real(*a))
    x = torch.randn(2, 6, 8, requires_grad=True)
    with dispatch.use_backend("triton"):
        if op == "adaln_modulate":
            y = ops.adaln_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8))
        else:
            y = ops.gather_tokens(x, torch.tensor([[0, 3], [5, 1]]))
    assert dispatch.requested() == "auto"
    y.square().sum().backward()
    assert calls == [op] and x.grad is not None


def test_backward_sees_the_forwards_request_and_opt_ins(monkeypatch):
    """The shared mechanism snapshots both parts of a request at the forward: the backend and the opt-ins."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.OPT_IN_ENV_VAR, raising=False)
    seen = []

    @torch.library.custom_op("masked_dit_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    twice.register_fake(lambda x: torch.empty_like(x))

    def backward(ctx, grad):
        seen.append((dispatch.requested(), dispatch.opted_in()))
        return 2 * grad

    dispatch.register_autograd_following_request(twice, backward, lambda ctx, inputs, output: None)
    x = torch.ones(3, requires_grad=True)
    with dispatch.use_backend("torch"), dispatch.opt_in("mlp_gelu"):
        y = twice(x)
    y.sum().backward()
    assert seen == [("torch", {"mlp_gelu"})] and (dispatch.requested(), dispatch.opted_in()) == ("auto", frozenset())
    assert torch.equal(x.grad, torch.full((3,), 2.0))
