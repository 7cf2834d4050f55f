"""ops.linear_gelu: Linear + GELU(tanh) as one GEMM for no-gradient forwards (cuBLASLt epilogue on CUDA),
the reference on CPU; the MLP takes it exactly when no gradient is needed."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from masked_dit import ops
from masked_dit.nn.block import Mlp


def _reference(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)])
def test_matches_the_reference_on_cpu(shape):
    torch.manual_seed(0)
    x, w, b = torch.randn(shape), torch.randn(40, 24), torch.randn(40)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_gelu(x, w, b), _reference(x, w, b), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # cast as nn.Linear is under autocast
            out = ops.linear_gelu(x, w, b)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, _reference(x, w, b), rtol=0, atol=0)


def test_custom_op_registrations():
    x, w, b = torch.randn(3, 4, 8), torch.randn(16, 8), torch.randn(16)
    torch.library.opcheck(torch.ops.masked_dit.linear_gelu.default, (x, w, b),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph():
    x, w, b = torch.randn(2, 6, 8), torch.randn(16, 8), torch.randn(16)
    with torch.no_grad():
        out = torch.compile(ops.linear_gelu, fullgraph=True, backend="aot_eager")(x, w, b)
    torch.testing.assert_close(out, _reference(x, w, b))


def test_bad_input_fails_clearly():
    x, w, b = torch.randn(2, 8), torch.randn(16, 8), torch.randn(16)
    with pytest.raises(ValueError, match=r"linear_gelu: x \[\.\.\., 9\]"):
        ops.linear_gelu(torch.randn(2, 9), w, b)
    with pytest.raises(ValueError, match="linear_gelu: .* weight \\(16,\\)"):
        ops.linear_gelu(x, torch.randn(16), b)
    with pytest.raises(ValueError, match="bias None"):
        ops.linear_gelu(x, w, None)
    with pytest.raises(RuntimeError, match="no derivative"):
        ops.linear_gelu(x.requires_grad_(), w, b)


def test_bad_dtypes_devices_and_types_name_the_argument():
    """Mismatched dtypes / devices failed inside the GEMM ('self and mat2 must have the same dtype'), a 0-d x
    with 'tuple index out of range', a non-tensor with an AttributeError: one line naming the argument now."""
    x, w, b = torch.randn(2, 8), torch.randn(16, 8), torch.randn(16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="linear_gelu: weight dtype torch.bfloat16 differs from x dtype"):
            ops.linear_gelu(x, w.bfloat16(), b)
        with pytest.raises(ValueError, match="linear_gelu: bias dtype torch.float64 differs from x dtype"):
            ops.linear_gelu(x, w, b.double())
        with pytest.raises(ValueError, match="linear_gelu: weight is on meta but x is on cpu"):
            ops.linear_gelu(x, w.to("meta"), b)
        with pytest.raises(ValueError, match=r"linear_gelu: x must have a feature dim \[\.\.\., K\]"):
            ops.linear_gelu(torch.tensor(1.0), w, b)
        with pytest.raises(TypeError, match="linear_gelu: x must be a torch.Tensor, got list"):
            ops.linear_gelu([1.0] * 8, w, b)
        with pytest.raises(TypeError, match="linear_gelu: weight must be a torch.Tensor, got NoneType"):
            ops.linear_gelu(x, None, b)
        with pytest.raises(ValueError, match="linear_gelu: x must be floating point, got torch.int64"):
            ops.linear_gelu(x.long(), w.long(), b.long())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts all three first: not a mismatch
            assert ops.linear_gelu(x, w, b).dtype == torch.bfloat16


def test_mlp_uses_it_only_without_gradient():
    torch.manual_seed(0)
    mlp, x = Mlp(8, 32), torch.randn(2, 5, 8)
    with _Ops() as mode:
        trained = mlp(x)
    assert not any("linear_gelu" in n for n in mode.names)
    with torch.no_grad(), _Ops() as mode:
        sampled = mlp(x)
    assert sum("linear_gelu" in n for n in mode.names) == 1  # (on the CPU its reference runs inside it)
    torch.testing.assert_close(sampled, trained.detach(), rtol=0, atol=0)
    for p in mlp.parameters():  # frozen weights and an input that needs no gradient: no gradient anywhere
        p.requires_grad_(False)
    with _Ops() as mode:
        mlp(x)
    assert any("linear_gelu" in n for n in mode.names)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_epilogue_matches_the_reference(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 256, 1152, device="cuda", dtype=dtype)
    w = torch.randn(4608, 1152, device="cuda", dtype=dtype) * 1152 ** -0.5
    b = torch.randn(4608, device="cuda", dtype=dtype)
    with torch.no_grad():
        out = ops.linear_gelu(x, w, b)
        ref = _reference(x.double(), w.double(), b.double())
        two_kernels = _reference(x, w, b).double()
    # one rounding (epilogue) is at least as close to the float64 result as two (addmm, then gelu)
    err, err_two = (out.double() - ref).abs().max().item(), (two_kernels - ref).abs().max().item()
    assert err <= 1.05 * err_two + 1e-6, (err, err_two)
    with torch.no_grad():
        compiled = torch.compile(ops.linear_gelu, fullgraph=True)(x, w, b)
    torch.testing.assert_close(compiled, out, rtol=0, atol=0)  # kept whole: the same cuBLASLt call
