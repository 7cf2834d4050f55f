"""GPU-only edge cases of the Triton and CUDA kernels (skipped without a CUDA device).

Each test targets a failure that only real hardware shows: 64-bit offsets past 2^31 elements,
unaligned (storage-offset) views on the 16-byte vector paths, zero-size launches, grid-y
limits (B > 65535 in the adaLN backward), and tensors on a device other than the current one.
"""
from __future__ import annotations

import pytest
import torch

from masked_dit.ops import adaln as adaln_mod
from masked_dit.ops import dispatch, use_backend
from masked_dit.ops import tokens as tok
from tests.ops.test_adaln import check_against_reference, make_activation, make_modulation

pytestmark = pytest.mark.gpu


def _backends(*names):
    """The given backends that can run on CUDA here (the cuda one only when masked_dit._C loaded)."""
    if not torch.cuda.is_available():
        return list(names)  # collected but skipped by the gpu marker
    return [n for n in names if dispatch.availability(n, "cuda")[0]]


def _exact(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual, expected), what


# -----------------------------------------------------------------------------
# tokens
# -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends("triton", "cuda"))
def test_tokens_offsets_past_2_pow_31(backend):
    """[B, N, D] with B*N*D > 2^31 elements (4.4 GB bf16): rows near the end use 64-bit offsets."""
    B, N, D, K = 4, 1 << 19, 1040, 64
    assert B * N * D > 2**31
    x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16)
    last = torch.full((1,), N - 1, device="cuda")  # the last row of every sample, ids stay unique
    ids = torch.stack([torch.cat([last, torch.randperm(N - 1, device="cuda")[:K - 1]]) for _ in range(B)])
    fill = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    b = torch.arange(B, device="cuda")[:, None]
    with use_backend(backend):
        kept = tok.gather_tokens(x, ids)
        _exact(kept, x[b, ids], f"{backend} gather")
        del x
        out = tok.scatter_tokens(kept, ids, fill, N)
        _exact(out[b, ids], kept, f"{backend} scatter kept rows")
        not_kept = torch.ones(B, N, dtype=torch.bool, device="cuda")
        not_kept[b, ids] = False
        assert torch.equal(out[not_kept][-1000:], fill.expand(1000, D)), f"{backend} scatter fill rows"
        grad_keep, grad_fill = tok._scatter_tokens_backward_op(out, ids, False)
        _exact(grad_keep, kept, f"{backend} scatter backward kept rows")
        ref_fill = out.masked_fill(~not_kept[..., None], 0).sum((0, 1), dtype=torch.float32)
        torch.testing.assert_close(grad_fill.float(), ref_fill, rtol=8e-3, atol=8.0)  # ~1 bf16 ulp at |sum| ~ 1e3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", _backends("triton", "cuda"))
def test_tokens_unaligned_views(backend, dtype):
    """Storage offsets of one element (not 16-byte aligned) must take the scalar path, not fault."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, N, K, D = 3, 40, 11, 64
    buf = torch.randn(B * N * D + 1, device="cuda", generator=gen).to(dtype)
    x = buf[1:].view(B, N, D)
    ids = torch.stack([torch.randperm(N, device="cuda", generator=gen)[:K] for _ in range(B)])
    fill = torch.randn(D + 1, device="cuda", generator=gen).to(dtype)[1:]
    fill_dense = buf[1:].view(B, N, D)
    keep = torch.randn(B * K * D + 1, device="cuda", generator=gen).to(dtype)[1:].view(B, K, D)
    for fill_ in (fill, fill_dense):
        with use_backend("torch"):
            ref = (tok.gather_tokens(x, ids), tok.scatter_tokens(keep, ids, fill_, N),
                   tok._scatter_tokens_backward_op(x, ids, fill_.dim() == 3))
        with use_backend(backend):
            got = (tok.gather_tokens(x, ids), tok.scatter_tokens(keep, ids, fill_, N),
                   tok._scatter_tokens_backward_op(x, ids, fill_.dim() == 3))
        _exact(got[0], ref[0], f"{backend} gather")
        _exact(got[1], ref[1], f"{backend} scatter")
        _exact(got[2][0], ref[2][0], f"{backend} scatter backward keep")
        torch.testing.assert_close(got[2][1], ref[2][1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", _backends("torch", "triton", "cuda"))
def test_tokens_empty_tensors(backend):
    """Zero-size launches are invalid on a GPU: every op must return early with the right shapes."""
    dev = "cuda"
    D = 8
    with use_backend(backend):
        x = torch.randn(2, 5, D, device=dev)
        no_ids = torch.empty(2, 0, dtype=torch.long, device=dev)
        assert tok.gather_tokens(x, no_ids).shape == (2, 0, D)
        fill = torch.randn(D, device=dev)
        out = tok.scatter_tokens(torch.empty(2, 0, D, device=dev), no_ids, fill, 5)
        _exact(out, fill.expand(2, 5, D).contiguous(), f"{backend} scatter with nothing kept")
        keep, gfill = tok._scatter_tokens_backward_op(x, no_ids, False)
        assert keep.shape == (2, 0, D)
        torch.testing.assert_close(gfill, x.sum((0, 1)))
        empty_b = torch.randn(0, 5, D, device=dev)
        ids_b = torch.empty(0, 3, dtype=torch.long, device=dev)
        assert tok.gather_tokens(empty_b, ids_b).shape == (0, 3, D)
        keep, gfill = tok._scatter_tokens_backward_op(empty_b, ids_b, False)
        _exact(gfill, torch.zeros(D, device=dev), f"{backend} [D] fill grad of no rows")
        cu = torch.zeros(3, dtype=torch.int32, device=dev)
        no_packed = torch.empty(0, dtype=torch.long, device=dev)
        assert tok.gather_tokens_varlen(x, no_packed, cu).shape == (0, D)
        out = tok.scatter_tokens_varlen(torch.empty(0, D, device=dev), no_packed, cu, fill, 5)
        _exact(out, fill.expand(2, 5, D).contiguous(), f"{backend} varlen scatter with nothing kept")
        zero_d = torch.randn(2, 5, 0, device=dev)
        one_id = torch.zeros(2, 1, dtype=torch.long, device=dev)
        assert tok.gather_tokens(zero_d, one_id).shape == (2, 1, 0)
        for fill_dense in (False, True):
            keep, gfill = tok._scatter_tokens_backward_op(zero_d, one_id, fill_dense)
            assert keep.shape == (2, 1, 0) and gfill.shape == ((2, 5, 0) if fill_dense else (0,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", _backends("triton", "cuda"))
def test_tokens_strided_keep_and_dense_fill(backend, dtype):
    """Kept rows read through arbitrary strides (test_gpu_dense/varlen only scatter a gather's
    contiguous output), and the varlen [B, N, D]-fill backward (keep_row = packed row), against torch."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, N, K, lengths = 3, 40, 11, [7, 0, 40, 13]
    for D in (72, 1152):
        def rand(*shape):
            return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

        ids = torch.stack([torch.randperm(N, device="cuda", generator=gen)[:K] for _ in range(B)])
        ids_v = torch.cat([torch.randperm(N, device="cuda", generator=gen)[:k] for k in lengths])
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        T, Bv = ids_v.numel(), len(lengths)
        cases = [  # (op, args, fill_dense); x_keep: batch-transposed, feature-strided, packed feature-strided
            (tok.scatter_tokens, (rand(K, B, D).transpose(0, 1), ids, rand(D), N), False),
            (tok.scatter_tokens, (rand(B, D, K).transpose(1, 2), ids, rand(N, B, D).transpose(0, 1), N), True),
            (tok.scatter_tokens_varlen, (rand(D, T).t(), ids_v, cu, rand(2 * D)[::2], N), False),
            (tok.scatter_tokens_varlen, (rand(D, T).t(), ids_v, cu, rand(Bv, D, N).transpose(1, 2), N), True),
        ]
        for op, args, fill_dense in cases:
            grad = rand(N, len(args[1]) if op is tok.scatter_tokens else Bv, D).transpose(0, 1)
            bwd = tok._scatter_tokens_backward_op if op is tok.scatter_tokens else tok._scatter_tokens_varlen_backward_op
            index = args[1:2] if op is tok.scatter_tokens else args[1:3]
            what = f"{backend} {op.__name__} D={D} {dtype} fill_dense={fill_dense}"
            with use_backend("torch"):
                ref = (op(*args), *bwd(grad, *index, fill_dense))
            with use_backend(backend):
                got = (op(*args), *bwd(grad, *index, fill_dense))
            _exact(got[0], ref[0], f"{what}: scatter")
            _exact(got[1], ref[1], f"{what}: grad keep")
            if fill_dense:
                _exact(got[2], ref[2], f"{what}: grad fill")
            else:
                torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=1e-2, atol=1e-2, msg=what)


def test_cuda_varlen_gather_rejects_ids_without_samples():
    if not dispatch.availability("cuda", "cuda")[0]:
        pytest.skip("masked_dit._C not loaded")
    x = torch.randn(0, 4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="batch 0"):
        torch.ops.masked_dit_C.gather_tokens_varlen(x, torch.zeros(3, dtype=torch.long, device="cuda"),
                                                    torch.zeros(1, dtype=torch.int32, device="cuda"))


# -----------------------------------------------------------------------------
# adaLN
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adaln", "gated"])
@pytest.mark.parametrize("backend", _backends("triton", "cuda"))
def test_adaln_batch_beyond_grid_y_limit(backend, kind):
    """B = 70000 > 65535: the Triton backward grid was (chunks, B) and failed to launch."""
    check_against_reference(kind, backend, 70000, 2, 32, torch.bfloat16, "chunked", device="cuda")


@pytest.mark.parametrize("backend", _backends("torch", "triton", "cuda"))
def test_adaln_empty_batch_and_sequence(backend):
    for B, L in ((0, 4), (3, 0)):
        x = torch.randn(B, L, 16, device="cuda", requires_grad=True)
        mod = torch.randn(B, 16, device="cuda", requires_grad=True)
        with use_backend(backend):
            r, h = adaln_mod.gated_residual_adaln(x, x, mod, mod, mod)
            (h.sum() + r.sum()).backward()
        assert h.shape == (B, L, 16) and x.grad.shape == x.shape
        _exact(mod.grad, torch.zeros_like(mod), f"{backend} B={B} L={L} modulation grads of no tokens")


@pytest.mark.parametrize("backend", _backends("triton", "cuda"))
def test_adaln_mixed_dtypes_and_odd_widths(backend):
    """Activation and modulation dtypes that differ (the cuda wrappers cast a mixed modulation
    set to fp32 and x/branch to the residual dtype: kernels <float, bf16>, <bf16, float>,
    <half, bf16>), at widths that are no multiple of 32 or straddle an ITEMS step, against torch."""
    gen = torch.Generator().manual_seed(7)
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    combos = [  # (x, branch, gate, shift, scale) dtypes
        (f32, bf16, bf16, bf16, bf16),
        (bf16, bf16, bf16, f32, bf16),
        (f16, f16, bf16, bf16, bf16),
    ]
    for D in (1, 33, 1152, 2049):
        for dtypes in combos:
            acts = [make_activation(3, 5, D, dt, "chunked", gen, "cuda") for dt in dtypes[:2]]
            mods = [make_modulation(3, D, 1, dt, "chunked", gen, "cuda")[0] for dt in dtypes[2:]]  # strided chunks
            inputs = [t.detach().requires_grad_() for t in acts + mods]
            x, branch, gate, shift, scale = inputs
            grads_out = None
            results = {}
            for name in ("torch", backend):
                with use_backend(name):
                    r, h = adaln_mod.gated_residual_adaln(x, branch, gate, shift, scale)
                    h2 = adaln_mod.adaln_modulate(x, shift, scale)
                    outs = (r, h, h2)
                    if grads_out is None:
                        grads_out = [torch.randn(o.shape, generator=gen).to("cuda", o.dtype) for o in outs]
                    results[name] = (*outs, *torch.autograd.grad(outs, inputs, grads_out))
            for i, (got, ref) in enumerate(zip(results[backend], results["torch"])):
                what = f"{backend} D={D} {dtypes} output {i}"
                assert got.dtype == ref.dtype and got.shape == ref.shape, what
                tol = 1.6e-2  # bf16/fp16 inputs or outputs in every combination (4 bf16 ulps)
                atol = tol * max(ref.abs().max().item(), 1.0)
                torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=atol, msg=what)


@pytest.mark.parametrize("D", [4100, 8192, 16384])
@pytest.mark.parametrize("kind", ["adaln", "gated"])
@pytest.mark.parametrize("backend", _backends("triton", "cuda"))
def test_adaln_wide_rows(backend, kind, D):
    """Wide rows up to the CUDA kernels' kMaxD (16 and 32 values per thread; the gated backward
    reads dr/branch after its block reduction there), bf16, strided layout."""
    check_against_reference(kind, backend, 2, 3, D, torch.bfloat16, "chunked", device="cuda")


# -----------------------------------------------------------------------------
# tensors on a device other than the current one
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends("triton", "cuda"))
def test_tensors_on_a_non_current_device(backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", 1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 64, generator=gen).to(dev)
    ids = torch.stack([torch.randperm(16, generator=gen)[:5] for _ in range(2)]).to(dev)
    mod = torch.randn(2, 64, generator=gen).to(dev)
    with torch.cuda.device(0):
        with use_backend("torch"):
            ref = (tok.gather_tokens(x, ids), adaln_mod.adaln_modulate(x, mod, mod))
        with use_backend(backend):
            got = (tok.gather_tokens(x, ids), adaln_mod.adaln_modulate(x, mod, mod))
    torch.cuda.synchronize(dev)
    _exact(got[0], ref[0], f"{backend} gather on cuda:1")
    torch.testing.assert_close(got[1], ref[1], rtol=2e-5, atol=2e-5)
