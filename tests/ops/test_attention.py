"""masked_dit.ops.attention against a float64 math reference: dense, packed, MDT bias, grads, compile."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from masked_dit.ops import attention
from masked_dit.ops import attention_math as math_mod
from masked_dit.ops.attention import (attention_backend, relative_position_index, relative_position_table_size,
                                      use_attention_backend)
from masked_dit.ops.attention_flex import document_block_mask, segment_ids

# Max abs error allowed against the float64 reference, per input dtype. Inputs are rounded to
# the dtype first and the reference runs on the rounded values, so the error is the kernel's
# own: fp32 accumulation order, and for half types the final rounding of an O(1) output
# (bf16 eps 2^-8, fp16 eps 2^-11) plus half-precision probabilities inside SDPA.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 9, 3, 72), (1, 17, 1, 64), (3, 5, 4, 64)]  # (B, N, H, Dh): odd N, Dh 72 and 64, H 1-4


@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


# ----------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------

def ref_attention(q, k, v, bias=None):
    """float64 softmax(q k^T / sqrt(Dh) + bias) v on [B, N, H, Dh]; bias [B or 1, H, N, N]."""
    q, k, v = (x.double() for x in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias.double()
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)


def mdt_bias(table, index, ids_keep=None):
    """The MDT reference recipe: full [H, N, N] bias, then gathered at kept rows and columns."""
    N = index.shape[0]
    full = table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()  # [H, N, N]
    if ids_keep is None:
        return full[None]
    B, K = ids_keep.shape
    bias = full[None].expand(B, -1, -1, -1)
    rows = ids_keep[:, None, :, None].expand(-1, full.shape[0], -1, N)
    bias = torch.gather(bias, 2, rows)
    cols = ids_keep[:, None, None, :].expand(-1, full.shape[0], K, -1)
    return torch.gather(bias, 3, cols)  # [B, H, K, K]


def qkv_views(B, N, H, Dh, dtype, seed=0):
    """Non-contiguous q, k, v as a model makes them: qkv.reshape(B, N, 3, H, Dh).unbind(2)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g).to(dtype)
    return qkv.reshape(B, N, 3, H, Dh).unbind(2)


def rel_pos(grid, H, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(relative_position_table_size(grid), H, generator=g).to(dtype)
    return table, relative_position_index(grid)


def kept_ids(B, N, K, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])


def packed_batch(lengths, H, Dh, dtype, seed=3):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(T, 3, H, Dh, generator=g).to(dtype).unbind(1)
    return q, k, v, cu, max(lengths)


def assert_close(out, ref, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g} for {dtype}"


# ----------------------------------------------------------------------------------------
# Relative-position index (MDT buffer)
# ----------------------------------------------------------------------------------------

def test_relative_position_index_matches_mdt_fixture(fixtures_dir):
    sd = load_file(str(fixtures_dir / "models" / "mdtv2.safetensors"))
    buf = sd["state_dict.en_inblocks.0.attn.rel_pos_bias.relative_position_index"]
    table = sd["state_dict.en_inblocks.0.attn.rel_pos_bias.relative_position_bias_table"]
    grid = int(buf.shape[0] ** 0.5)
    idx = relative_position_index(grid)
    assert idx.dtype == torch.int64 and torch.equal(idx, buf)
    assert table.shape[0] == relative_position_table_size(grid) == (2 * grid - 1) ** 2 + 3


@pytest.mark.parametrize("grid", [1, 3, 5])
def test_relative_position_index_recipe(grid):
    idx = relative_position_index(grid)
    N = grid * grid
    assert idx.shape == (N, N)
    # same offset <-> same index; the 3 extra table rows are never indexed
    for i in range(N):
        for j in range(N):
            dy, dx = i // grid - j // grid, i % grid - j % grid
            assert idx[i, j] == (dy + grid - 1) * (2 * grid - 1) + dx + grid - 1
    assert idx.max() == relative_position_table_size(grid) - 4
    assert torch.equal(relative_position_index((grid, grid)), idx)


# ----------------------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense(shape, dtype, backend):
    q, k, v = qkv_views(*shape, dtype)
    assert not q.is_contiguous()
    with use_attention_backend(backend):
        out = attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref_attention(q, k, v), dtype)


# ----------------------------------------------------------------------------------------
# Packed variable length: each sequence alone must equal dense attention of that sample
# ----------------------------------------------------------------------------------------

LENGTHS = [[5, 1, 7], [3, 0, 9, 2], [11]]


def _check_packed(out, q, k, v, cu, dtype, bias_of=None, tol=None):
    assert out.shape == q.shape
    for s in range(cu.numel() - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        if a == b:
            continue
        bias = bias_of(a, b) if bias_of else None
        assert_close(out[a:b], ref_attention(q[None, a:b], k[None, a:b], v[None, a:b], bias)[0], dtype, tol)


@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS)
def test_packed(lengths, dtype, backend):
    q, k, v, cu, max_len = packed_batch(lengths, 2, 72, dtype)
    with use_attention_backend(backend), torch.no_grad():
        out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len)
    _check_packed(out, q, k, v, cu, dtype)


def test_packed_does_not_cross_sequences():
    q, k, v, cu, max_len = packed_batch([4, 6], 1, 64, torch.float64)
    v2 = v.clone()
    v2[4:] += 100.0  # changing the second sequence must not move the first one's output
    a = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len)
    b = attention(q, k, v2, cu_seqlens=cu, max_seqlen=max_len)
    assert torch.equal(a[:4], b[:4]) and not torch.allclose(a[4:], b[4:])


@pytest.mark.parametrize("lengths", [[100, 0, 150, 7, 200], [128, 128], [1, 300, 5]])
def test_document_block_mask(lengths):
    """Tiles with no shared sequence are skipped, 'full' tiles are entirely inside one sequence."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    seg = segment_ids(cu, T)
    assert torch.equal(seg, torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    bm = document_block_mask(seg, T, block=64)
    nb = -(-T // 64)
    pad = torch.full((nb * 64,), -1)
    pad[:T] = seg
    tok = pad[:, None] == pad[None, :]
    tok &= (pad[:, None] >= 0) & (pad[None, :] >= 0)
    tiles = tok.view(nb, 64, nb, 64)
    any_pair = tiles.any(3).any(1)
    all_pair = tiles.all(3).all(1)

    def dense(num, idx):
        m = torch.zeros(nb, nb, dtype=torch.bool)
        for i in range(nb):
            m[i, idx[0, 0, i, : num[0, 0, i]].long()] = True
        return m

    partial = dense(bm.kv_num_blocks, bm.kv_indices)
    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (partial & full).any()
    assert torch.equal(partial | full, any_pair)
    assert not (full & ~all_pair).any()
    assert full.any() or max(lengths) < 128


def test_flex_pads_head_dim_on_old_torch(monkeypatch):
    """torch <= 2.6 FlexAttention takes only power-of-two head dims: 72 is zero-padded to 128."""
    from masked_dit.ops import attention_flex

    monkeypatch.setattr(attention_flex, "ANY_HEAD_DIM", False)
    q, k, v = qkv_views(2, 9, 2, 72, torch.float32)
    table, index = rel_pos(3, 2)
    with use_attention_backend("flex"), torch.no_grad():
        out = attention(q, k, v, rel_pos_bias=(table, index))
    assert out.shape == q.shape
    assert_close(out, ref_attention(q, k, v, mdt_bias(table, index)), torch.float32)
    q, k, v = qkv_views(2, 9, 2, 1, torch.float32)  # head dim 1: padded to 2 (torch 2.6 takes 2, 4, ..., 1024)
    with use_attention_backend("flex"), torch.no_grad():
        out = attention(q, k, v, rel_pos_bias=(table, index))
    assert out.shape == q.shape
    assert_close(out, ref_attention(q, k, v, mdt_bias(table, index)), torch.float32)


# ----------------------------------------------------------------------------------------
# MDT relative-position bias over kept tokens (vs the MDT gathered-bias recipe)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid,H,Dh,K", [(3, 2, 72, 5), (4, 4, 64, 16), (5, 1, 64, 13)])
def test_rel_pos_bias_kept(grid, H, Dh, K, dtype, backend):
    N, B = grid * grid, 2
    q, k, v = qkv_views(B, K, H, Dh, dtype)
    table, index = rel_pos(grid, H)
    ids_keep = kept_ids(B, N, K)
    with use_attention_backend(backend), torch.no_grad():
        out = attention(q, k, v, rel_pos_bias=(table, index), positions=ids_keep)
    assert_close(out, ref_attention(q, k, v, mdt_bias(table, index, ids_keep)), dtype)


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_rel_pos_bias_unmasked(backend):
    q, k, v = qkv_views(2, 16, 3, 64, torch.float32)
    table, index = rel_pos(4, 3)
    with use_attention_backend(backend), torch.no_grad():
        out = attention(q, k, v, rel_pos_bias=(table, index))
        same = attention(q, k, v, rel_pos_bias=(table, index), positions=torch.arange(16).expand(2, 16))
    assert_close(out, ref_attention(q, k, v, mdt_bias(table, index)), torch.float32)
    assert_close(same, ref_attention(q, k, v, mdt_bias(table, index)), torch.float32)


@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rel_pos_bias_packed(dtype, backend):
    grid, H = 4, 3
    lengths = [5, 0, 16, 9]
    q, k, v, cu, max_len = packed_batch(lengths, H, 72, dtype)
    table, index = rel_pos(grid, H)
    g = torch.Generator().manual_seed(5)
    positions = torch.cat([torch.randperm(grid * grid, generator=g)[:n] for n in lengths])
    with use_attention_backend(backend), torch.no_grad():
        out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, rel_pos_bias=(table, index), positions=positions)
    _check_packed(out, q, k, v, cu, dtype, lambda a, b: mdt_bias(table, index, positions[None, a:b]))


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------

def _f64(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


def test_gradcheck_dense():
    q, k, v = _f64(*qkv_views(2, 5, 2, 8, torch.float64))
    for backend in ("auto", "math"):
        with use_attention_backend(backend):
            assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v), (q, k, v))


def test_gradcheck_rel_pos_bias_kept():
    q, k, v = _f64(*qkv_views(2, 5, 2, 8, torch.float64))
    table, index = rel_pos(3, 2, torch.float64)
    table.requires_grad_()
    ids_keep = kept_ids(2, 9, 5)
    fn = lambda q, k, v, t: attention(q, k, v, rel_pos_bias=(t, index), positions=ids_keep)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, table))


def test_gradcheck_rel_pos_bias_packed():
    q, k, v, cu, max_len = packed_batch([3, 0, 4], 2, 8, torch.float64)
    q, k, v = _f64(q, k, v)
    table, index = rel_pos(3, 2, torch.float64)
    table.requires_grad_()
    positions = torch.tensor([0, 4, 8, 1, 2, 3, 7])
    fn = lambda q, k, v, t: attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len,  # noqa: E731
                                      rel_pos_bias=(t, index), positions=positions)
    assert torch.autograd.gradcheck(fn, (q, k, v, table))


def test_grads_match_reference_with_many_chunks(monkeypatch):
    """fp32 grads of the chunked math op (forced into 1-row chunks) vs autograd of the reference."""
    monkeypatch.setattr(math_mod, "CHUNK_ELEMENTS", 1)
    B, K, H, grid = 2, 13, 3, 5
    q, k, v = (x.detach().requires_grad_() for x in qkv_views(B, K, H, 72, torch.float32))
    table, index = rel_pos(grid, H)
    table.requires_grad_()
    ids_keep = kept_ids(B, grid * grid, K)
    grad = torch.randn(B, K, H, 72)
    out = attention(q, k, v, rel_pos_bias=(table, index), positions=ids_keep)
    got = torch.autograd.grad(out, (q, k, v, table), grad)
    r = [x.detach().double().requires_grad_() for x in (q, k, v, table)]
    ref = ref_attention(*r[:3], mdt_bias(r[3], index, ids_keep))
    want = torch.autograd.grad(ref, r, grad.double())
    assert_close(out, ref, torch.float32)
    for g_, w_ in zip(got, want):
        assert (g_.double() - w_).abs().max() <= 1e-4 * max(1.0, w_.abs().max().item())


def test_opcheck_custom_ops():
    q, k, v = qkv_views(2, 5, 2, 8, torch.float32)
    table, index = rel_pos(3, 2)
    ids_keep = kept_ids(2, 9, 5)
    kv_len = torch.tensor([5, 3])
    cases = [(q, k, v, None, None, None, None, 0.3),
             (q, k, v, kv_len, table, index, ids_keep, 0.3),
             (q, k, v, None, table, index[:5, :5].contiguous(), None, 0.3)]
    for args in cases:
        grads = [x.detach().requires_grad_() if x is not None and x.is_floating_point() else x for x in args[:-1]]
        torch.library.opcheck(torch.ops.masked_dit.attention_math.default, (*grads, args[-1]))
        out, lse = torch.ops.masked_dit.attention_math(*args)
        torch.library.opcheck(torch.ops.masked_dit.attention_math_backward.default,
                              (torch.randn_like(out), q, k, v, out, lse, *args[3:]))


def test_table_gradient_of_a_transposed_table_under_inductor():
    """The backward's fake gave dtable the table's strides, the real op a contiguous tensor: a table seen
    through a transpose (an [H, R] parameter) failed Inductor's stride assertion in the backward."""
    q, k, v = qkv_views(2, 5, 2, 8, torch.float32)
    table, index = rel_pos(3, 2)
    table_t = table.t().contiguous().t()  # [R, H] with strides (1, R)
    ids_keep = kept_ids(2, 9, 5)
    out, lse = torch.ops.masked_dit.attention_math(q, k, v, None, table_t, index, ids_keep, 0.3)
    torch.library.opcheck(torch.ops.masked_dit.attention_math_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, None, table_t, index, ids_keep, 0.3))
    param = table.t().contiguous().requires_grad_()  # [H, R]

    def loss(q, param):
        return attention(q, k, v, rel_pos_bias=(param.t(), index), positions=ids_keep).square().sum()

    q = q.detach().requires_grad_()
    with use_attention_backend("math"):
        want = torch.autograd.grad(loss(q, param), (q, param))
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="inductor")(q, param), (q, param))
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): zero graph breaks, same numbers
# ----------------------------------------------------------------------------------------

def _forms():
    q, k, v = qkv_views(2, 7, 2, 72, torch.float32)
    table, index = rel_pos(3, 2)
    ids = kept_ids(2, 9, 7)
    pq, pk, pv, cu, max_len = packed_batch([3, 0, 6], 2, 72, torch.float32)
    positions = torch.tensor([0, 5, 8, 1, 2, 3, 4, 6, 7])
    return {
        "dense": ((q, k, v), {}),
        "packed": ((pq, pk, pv), dict(cu_seqlens=cu, max_seqlen=max_len)),
        "biased": ((q, k, v), dict(rel_pos_bias=(table, index), positions=ids)),
        "packed_biased": ((pq, pk, pv), dict(cu_seqlens=cu, max_seqlen=max_len, rel_pos_bias=(table, index),
                                             positions=positions)),
    }


@pytest.mark.parametrize("form", ["dense", "packed", "biased", "packed_biased"])
def test_compile_fullgraph(form):
    (q, k, v), kw = _forms()[form]
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    table = kw["rel_pos_bias"][0].requires_grad_() if "rel_pos_bias" in kw else None

    def fn(q, k, v):
        return attention(q, k, v, **kw)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out = fn(q, k, v)
    out = compiled(q, k, v)
    assert torch.allclose(out, eager_out, atol=1e-6)
    leaves = [q, k, v] + ([table] if table is not None else [])
    want = torch.autograd.grad(eager_out.sum(), leaves)
    got = torch.autograd.grad(out.sum(), leaves)
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_, w_, atol=1e-5)


def test_compile_dynamic_kept_count():
    """MDT keeps a different token count each step: one dynamic graph serves them all."""
    table, index = rel_pos(4, 2)
    fn = torch.compile(lambda q, k, v, ids: attention(q, k, v, rel_pos_bias=(table, index), positions=ids),
                       fullgraph=True, backend="aot_eager", dynamic=True)
    torch._dynamo.reset()
    for K in (7, 11):
        q, k, v = qkv_views(2, K, 2, 64, torch.float32)
        ids = kept_ids(2, 16, K)
        assert_close(fn(q, k, v, ids), ref_attention(q, k, v, mdt_bias(table, index, ids)), torch.float32)


@pytest.mark.parametrize("form", ["packed", "biased", "packed_biased"])
def test_compile_fullgraph_flex(form):
    """The FlexAttention path traces without breaks too (forward; CPU Flex has no backward)."""
    (q, k, v), kw = _forms()[form]
    torch._dynamo.reset()
    with use_attention_backend("flex"), torch.no_grad():
        explained = torch._dynamo.explain(lambda q, k, v: attention(q, k, v, **kw))(q, k, v)
        assert explained.graph_break_count == 0, explained.break_reasons
        out = torch.compile(lambda q, k, v: attention(q, k, v, **kw), fullgraph=True, backend="eager")(q, k, v)
    with use_attention_backend("math"):
        assert torch.allclose(out, attention(q, k, v, **kw), atol=1e-5)


# ----------------------------------------------------------------------------------------
# Backend choice and errors
# ----------------------------------------------------------------------------------------

def test_backend_choice_cpu(monkeypatch):
    q = torch.randn(1, 4, 2, 8)
    assert attention_backend(q)[0] == "sdpa"
    assert attention_backend(q, packed=True)[0] == "math"
    name, why = attention_backend(q, biased=True)
    assert name == "math" and "not flex" in why
    monkeypatch.setenv("MASKED_DIT_ATTENTION", "math")
    assert attention_backend(q)[0] == "math"
    monkeypatch.setenv("MASKED_DIT_ATTENTION", "auto")
    monkeypatch.setenv("MASKED_DIT_BACKEND", "torch")
    assert attention_backend(q)[0] == "math"
    with use_attention_backend("sdpa"), pytest.raises(RuntimeError, match="sdpa.*relative-position bias"):
        attention_backend(q, biased=True)
    with use_attention_backend("varlen"), pytest.raises(RuntimeError, match="varlen"):
        attention_backend(q, packed=True)
    monkeypatch.delenv("MASKED_DIT_BACKEND")
    assert attention_backend("cuda", biased=True)[0] == "flex"  # a device works too (masked-dit info)
    assert attention_backend(torch.device("cpu"), packed=True)[0] == "math"
    with pytest.raises(ValueError, match="unknown attention backend"):
        with use_attention_backend("cudnn"):
            pass


@pytest.mark.parametrize("backend", ["auto", "math", "flex"])
def test_packed_without_tokens(backend):
    """Every sequence empty (T = 0): an empty output on every backend (flex's block mask failed on it)."""
    from masked_dit.ops import attention_flex

    if backend == "flex" and not attention_flex.AVAILABLE:
        pytest.skip("FlexAttention not in this torch")
    q, k, v = (torch.randn(0, 2, 8, requires_grad=backend != "flex") for _ in range(3))
    table, index = rel_pos(2, 2)
    cu = torch.zeros(3, dtype=torch.int32)
    with use_attention_backend(backend):
        for bias in (None, (table, index)):
            pos = torch.zeros(0, dtype=torch.long) if bias else None
            out = attention(q, k, v, cu_seqlens=cu, max_seqlen=1, rel_pos_bias=bias, positions=pos)
            assert out.shape == (0, 2, 8)
            if q.requires_grad:
                out.sum().backward()
                assert q.grad.shape == q.shape


def test_flex_on_cpu_refuses_any_input_needing_a_gradient():
    """FlexAttention's CPU fallback has no backward: a k, v or bias table that needs a gradient (q not)
    gets the one-line refusal too, not torch's error from inside the backward."""
    from masked_dit.ops import attention_flex

    if not attention_flex.AVAILABLE:
        pytest.skip("FlexAttention not in this torch")
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    table, index = rel_pos(2, 2)
    with use_attention_backend("flex"):
        assert attention(q, k, v).shape == q.shape  # forward only: the fallback runs
        for grads in ((k,), (v,)):
            for t in grads:
                t.requires_grad_(True)
            with pytest.raises(RuntimeError, match="requested but unusable"):
                attention(q, k, v)
            for t in grads:
                t.requires_grad_(False)
        with pytest.raises(RuntimeError, match="requested but unusable"):
            attention(q, k, v, rel_pos_bias=(table.requires_grad_(True), index))


def test_bad_inputs():
    q, k, v = qkv_views(2, 9, 2, 8, torch.float32)
    table, index = rel_pos(3, 2)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    cases = [
        (lambda: attention(q[0], k[0], v[0]), "packed input needs cu_seqlens"),
        (lambda: attention(q, k[:, :5], v), "shapes differ"),
        (lambda: attention(q[0], k[0], v[0], cu_seqlens=cu), "max_seqlen"),
        (lambda: attention(q[0], k[0], v[0], cu_seqlens=cu.long(), max_seqlen=5), "int32"),
        (lambda: attention(q[0], k[0], v[0], cu_seqlens=cu, max_seqlen=4), "below the longest"),
        (lambda: attention(q[0, :8], k[0, :8], v[0, :8], cu_seqlens=cu, max_seqlen=5), "cu_seqlens must rise"),
        (lambda: attention(q, k, v, positions=torch.zeros(2, 9, dtype=torch.long)), "without rel_pos_bias"),
        (lambda: attention(q, k, v, rel_pos_bias=(table[:, :1], index)), r"table must be \[R, 2\]"),
        (lambda: attention(q, k, v, rel_pos_bias=(table, index.float())), "index must be an int32/int64"),
        (lambda: attention(q, k, v, rel_pos_bias=(table, index.bool())), "index must be an int32/int64"),
        (lambda: attention(q, k, v, rel_pos_bias=(table, index.to(torch.int8))), "index must be an int32/int64"),
        (lambda: attention(q[0], k[0], v[0], cu_seqlens=cu[:0], max_seqlen=5), r"\[num_seqs \+ 1\]"),
        (lambda: attention(q[:, :5], k[:, :5], v[:, :5], rel_pos_bias=(table, index)), "pass positions"),
        (lambda: attention(q, k, v, rel_pos_bias=(table, index), positions=torch.zeros(2, 5, dtype=torch.long)),
         "positions must be int32/int64"),
        (lambda: attention(q, k, v, rel_pos_bias=(table, index), positions=torch.zeros(2, 9, dtype=torch.bool)),
         "positions must be int32/int64"),
        (lambda: attention(q, k, v, rel_pos_bias=(table, index), positions=torch.full((2, 9), 9)), r"\[0, 9\)"),
        (lambda: attention(q[0], k[0], v[0], cu_seqlens=cu, max_seqlen=5, rel_pos_bias=(table, index)),
         "needs positions"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_bad_dtypes_devices_and_table_rows(backend):
    """One line naming the argument where the math path ran silently (mixed q/k/v dtypes or devices, integer
    q returning integers, an integer table, a table on another device) or failed deep inside (head dim 0,
    index rows past the table, cu_seqlens on another device)."""
    q, k, v = qkv_views(2, 9, 2, 8, torch.float32)
    table, index = rel_pos(3, 2)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    empty = torch.zeros(2, 9, 2, 0)
    cases = [
        (lambda: attention(q, k.half(), v), r"attention: k dtype torch.float16 differs from q dtype torch.float32"),
        (lambda: attention(q, k, v.double()), "v dtype torch.float64 differs from q"),
        (lambda: attention(q, k.to("meta"), v), "k is on meta but q is on cpu"),
        (lambda: attention(q.long(), k.long(), v.long()), "q must be float16/bfloat16/float32/float64"),
        (lambda: attention(empty, empty, empty), "head dim"),
        (lambda: attention(q[0], k[0], v[0], cu_seqlens=cu.to("meta"), max_seqlen=5), "cu_seqlens is on meta"),
        (lambda: attention(q, k, v, rel_pos_bias=(table.long(), index)), "table must be floating"),
        (lambda: attention(q, k, v, rel_pos_bias=(table.to("meta"), index)), "table is on meta"),
        (lambda: attention(q, k, v, rel_pos_bias=(table, index.to("meta"))), "index is on meta"),
        (lambda: attention(q, k, v, rel_pos_bias=(table[:5], index)), r"index must lie in \[0, 5\)"),
    ]
    with use_attention_backend(backend):
        for call, message in cases:
            with pytest.raises(ValueError, match=message):
                call()
        with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
            attention([1.0], k, v)


# ----------------------------------------------------------------------------------------
# GPU: every CUDA backend vs the reference; the biased path never holds a [B, H, K, K] bias
# ----------------------------------------------------------------------------------------

def _cuda_backends(packed, biased, dtype):
    from masked_dit.ops.attention import BACKENDS, _usable
    return [b for b in BACKENDS if _usable(b, "cuda", dtype, 72, packed, biased)[0]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_every_backend(dtype):
    B, K, H, Dh, grid = 3, 37, 4, 72, 8
    q, k, v = (x.cuda() for x in qkv_views(B, K, H, Dh, dtype))
    table, index = (x.cuda() for x in rel_pos(grid, H))
    ids_keep = kept_ids(B, grid * grid, K).cuda()
    pq, pk, pv, cu, max_len = (x.cuda() if torch.is_tensor(x) else x for x in packed_batch([20, 0, 64, 1], H, Dh, dtype))
    positions = torch.cat([torch.randperm(grid * grid)[:n] for n in [20, 0, 64, 1]]).cuda()
    tol = max(TOL[dtype], 2e-3)  # TF32 / reduced-precision matmuls on GPU
    for backend in _cuda_backends(False, False, dtype) + ["math"]:
        with use_attention_backend(backend):
            out = attention(q, k, v)
        assert (out.double() - ref_attention(q, k, v)).abs().max() <= tol, backend
    for backend in _cuda_backends(True, False, dtype) + ["math"]:
        with use_attention_backend(backend):
            out = attention(pq, pk, pv, cu_seqlens=cu, max_seqlen=max_len)
        _check_packed(out.cpu(), pq.cpu(), pk.cpu(), pv.cpu(), cu.cpu(), dtype, tol=tol)
    assert "flex" in _cuda_backends(False, True, dtype)
    for backend in ("flex", "math"):
        with use_attention_backend(backend):
            out = attention(q, k, v, rel_pos_bias=(table, index), positions=ids_keep)
            pout = attention(pq, pk, pv, cu_seqlens=cu, max_seqlen=max_len, rel_pos_bias=(table, index),
                             positions=positions)
        assert (out.double() - ref_attention(q, k, v, mdt_bias(table, index, ids_keep))).abs().max() <= tol, backend
        _check_packed(pout.cpu(), pq.cpu(), pk.cpu(), pv.cpu(), cu.cpu(), dtype,
                      lambda a, b: mdt_bias(table.cpu(), index.cpu(), positions.cpu()[None, a:b]), tol=tol)


@pytest.mark.gpu
def test_gpu_flex_grads_match_math():
    B, K, H, Dh, grid = 2, 50, 4, 72, 8
    q, k, v = (x.cuda().requires_grad_() for x in qkv_views(B, K, H, Dh, torch.float32))
    table, index = (x.cuda() for x in rel_pos(grid, H))
    table.requires_grad_()
    ids_keep = kept_ids(B, grid * grid, K).cuda()
    grads = {}
    for backend in ("flex", "math"):
        with use_attention_backend(backend):
            out = attention(q, k, v, rel_pos_bias=(table, index), positions=ids_keep)
        grads[backend] = torch.autograd.grad(out.square().sum(), (q, k, v, table))
    for a, b in zip(grads["flex"], grads["math"]):
        assert (a - b).abs().max() <= 1e-2 * max(1.0, b.abs().max().item())


@pytest.mark.gpu
def test_gpu_biased_path_does_not_materialise_bias():
    B, K, H, Dh, grid = 8, 1024, 16, 64, 40  # a [B, H, K, K] fp32 bias would be 512 MiB
    dense_bias_bytes = B * H * K * K * 4
    q, k, v = (x.cuda().requires_grad_() for x in qkv_views(B, K, H, Dh, torch.bfloat16))
    table, index = (x.cuda() for x in rel_pos(grid, H))
    table.requires_grad_()
    ids_keep = kept_ids(B, grid * grid, K).cuda()
    assert attention_backend(q, biased=True)[0] == "flex"
    attention(q, k, v, rel_pos_bias=(table, index), positions=ids_keep).sum().backward()  # compile + warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attention(q, k, v, rel_pos_bias=(table, index), positions=ids_keep).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < dense_bias_bytes // 4


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["dense", "packed", "biased", "packed_biased"])
def test_gpu_compile_inductor(form):
    (q, k, v), kw = _forms()[form]
    q, k, v = (x.cuda().bfloat16().requires_grad_() for x in (q, k, v))
    kw = {n: (tuple(t.cuda() for t in x) if n == "rel_pos_bias" else x.cuda() if torch.is_tensor(x) else x)
          for n, x in kw.items()}
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: attention(q, k, v, **kw), fullgraph=True)
    out = fn(q, k, v)
    out.sum().backward()
    with use_attention_backend("math"):
        want = attention(q, k, v, **kw)
    assert (out.float() - want.float()).abs().max() < 3e-2
