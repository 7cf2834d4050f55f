"""Property-based tests (hypothesis) of the token masks and KeptTokens (masked_dit/nn/masking.py).

Every property is checked against a plain statement of the MAE recipe written here (sorting,
loops over rows), not against the helpers' own code: ids_restore inverts the shuffle, the K
tokens with the smallest noise are kept in noise order, mask is 1 exactly where a token was
removed, packed masks equal the dense mask of each sample, and gather/scatter move rows exactly.
Deterministic: derandomized, no example database.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from masked_dit.nn.masking import (KeptTokens, packed_from_dense, packed_masking, random_masking,
                                   sample_mdt_mask_ratio)

settings.register_profile(
    "masked-dit-properties", database=None, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PROFILE = settings.get_profile("masked-dit-properties")


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=n)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds wake-up/spin time. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


seeds = st.integers(0, 2**31 - 1)
ratios = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)

# -----------------------------------------------------------------------------
# The MAE recipe, stated plainly
# -----------------------------------------------------------------------------


def expected_keep_count(N: int, ratio, float32: bool) -> int:
    """int(N * (1 - ratio)); MDT's sampled ratio is a float32 tensor, so that product is float32."""
    if float32:
        return int(np.float32(N) * (np.float32(1) - np.float32(ratio)))
    return int(N * (1 - ratio))


def ratio_keeping(n: int, N: int) -> float:
    """A mask ratio with int(N * (1 - ratio)) == n (n + 0.5 tokens before truncation; 0 keeps all)."""
    return 0.0 if n == N else 1 - (n + 0.5) / N


def check_dense_mask(ids_keep, ids_restore, mask, noise, K):
    """The MAE properties of one dense mask drawn from ``noise`` [B, N], keeping K per sample."""
    B, N = noise.shape
    assert ids_keep.shape == (B, K) and ids_keep.dtype == torch.int64
    assert ids_restore.shape == (B, N) and ids_restore.dtype == torch.int64
    assert mask.shape == (B, N) and mask.dtype == torch.float32
    for b in range(B):
        restore = ids_restore[b].tolist()
        keep = ids_keep[b].tolist()
        assert sorted(restore) == list(range(N)), "ids_restore is not a permutation"
        # ids_restore is the inverse of the shuffle, whose first K entries are ids_keep
        shuffle = [0] * N
        for n, rank in enumerate(restore):
            shuffle[rank] = n
        assert keep == shuffle[:K]
        assert len(set(keep)) == K and all(0 <= i < N for i in keep)
        # kept = the K smallest noise values, in ascending noise order (MAE's ids_keep is *not* sorted by position)
        order = sorted(range(N), key=lambda n: (noise[b, n].item(), n))
        assert sorted(keep) == sorted(order[:K])
        kept_noise = [noise[b, i].item() for i in keep]
        assert kept_noise == sorted(kept_noise)
        # mask: 1 = removed, exactly N - K per row, 0 at every kept position
        assert mask[b].tolist() == [0.0 if n in set(keep) else 1.0 for n in range(N)]
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - K)))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(B, K))
    # MAE's own formula: unshuffle [0]*K + [1]*(N-K) with ids_restore
    base = torch.cat([torch.zeros(B, K), torch.ones(B, N - K)], dim=1)
    assert torch.equal(torch.gather(base, 1, ids_restore), mask)


# -----------------------------------------------------------------------------
# random_masking / sample_mdt_mask_ratio
# -----------------------------------------------------------------------------


@examples(200)
@given(B=st.integers(1, 4), N=st.integers(1, 64), ratio=ratios, tensor_ratio=st.booleans(),
       coarse_noise=st.booleans(), seed=seeds)
def test_random_masking(B, N, ratio, tensor_ratio, coarse_noise, seed):
    K = expected_keep_count(N, ratio, float32=tensor_ratio)
    assume(K >= 1)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(B, N, generator=gen)
    if coarse_noise:  # many ties: argsort must still give a permutation
        noise = (noise * 4).floor() / 4
    mask_ratio = torch.tensor([ratio], dtype=torch.float32) if tensor_ratio else ratio
    ids_keep, ids_restore, mask = random_masking(B, N, mask_ratio, noise=noise)
    if coarse_noise:  # which of equal-noise tokens is kept is unspecified: check it as its own noise order
        noise = noise + torch.argsort(ids_restore, dim=1).argsort(dim=1) * 1e-6
    check_dense_mask(ids_keep, ids_restore, mask, noise, K)


@examples(50)
@given(B=st.integers(1, 3), N=st.integers(1, 40), ratio=st.floats(0.0, 0.9), seed=seeds)
def test_random_masking_generator_is_replayable_noise(B, N, ratio, seed):
    """Drawing from a generator == passing torch.rand(B, N) from the same generator as noise."""
    assume(expected_keep_count(N, ratio, float32=False) >= 1)
    got = random_masking(B, N, ratio, generator=torch.Generator().manual_seed(seed))
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(seed))
    for a, b in zip(got, random_masking(B, N, ratio, noise=noise)):
        assert torch.equal(a, b)
    check_dense_mask(*got, noise, expected_keep_count(N, ratio, float32=False))


@examples(100)
@given(mask_ratio=st.floats(0.0, 0.7), spread=st.floats(0.0, 0.29), u=st.floats(0.0, 1.0, exclude_max=True),
       N=st.integers(1, 300))
def test_sample_mdt_mask_ratio(mask_ratio, spread, u, N):
    """ratio = u * spread + mask_ratio on a float32 [1] tensor, within [mask_ratio, mask_ratio + spread];
    random_masking with it keeps int(N * (1 - ratio)) tokens computed in float32."""
    r = sample_mdt_mask_ratio(mask_ratio, ratio_noise=torch.tensor(u), spread=spread)
    assert r.shape == (1,) and r.dtype == torch.float32
    # MDTv2's expression on its float32 torch.rand(1) draw
    assert torch.equal(r, torch.tensor([u], dtype=torch.float32) * spread + mask_ratio)
    assert np.float32(mask_ratio) <= r.item() <= np.float32(mask_ratio + spread) * (1 + 1e-6)
    K = expected_keep_count(N, r.item(), float32=True)
    assume(K >= 1)
    assert random_masking(1, N, r)[0].shape == (1, K)


# -----------------------------------------------------------------------------
# packed_masking
# -----------------------------------------------------------------------------


@st.composite
def packed_cases(draw):
    N = draw(st.integers(1, 48))
    counts = draw(st.lists(st.integers(1, N), min_size=1, max_size=5))
    return N, counts, draw(seeds)


@examples(200)
@given(case=packed_cases())
def test_packed_masking(case):
    N, counts, seed = case
    B = len(counts)
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(seed))
    pm = packed_masking(counts, N, noise=noise)
    T = sum(counts)
    # layout: cu_seqlens int32 [B+1] rising from 0 by the counts, segment ids, max_seqlen
    assert pm.cu_seqlens.dtype == torch.int32 and pm.cu_seqlens.tolist() == [sum(counts[:b]) for b in range(B + 1)]
    assert pm.cu_seqlens[-1].item() == T == pm.ids_keep.numel() and pm.ids_keep.dtype == torch.int64
    assert pm.segment_ids.tolist() == [b for b, n in enumerate(counts) for _ in range(n)]
    assert pm.max_seqlen == max(counts) and isinstance(pm.max_seqlen, int)
    assert torch.equal(pm.mask.sum(1), torch.tensor([float(N - n) for n in counts]))
    for b, n in enumerate(counts):
        ids = pm.ids_keep[pm.cu_seqlens[b]:pm.cu_seqlens[b + 1]]
        assert len(set(ids.tolist())) == n and all(0 <= i < N for i in ids.tolist())
        # each sample is the dense mask of its own noise row with its own keep count
        dense_keep, dense_restore, dense_mask = random_masking(1, N, ratio_keeping(n, N), noise=noise[b:b + 1])
        assert torch.equal(ids, dense_keep[0])
        assert torch.equal(pm.ids_restore[b], dense_restore[0]) and torch.equal(pm.mask[b], dense_mask[0])
        check_dense_mask(ids[None], pm.ids_restore[b:b + 1], pm.mask[b:b + 1], noise[b:b + 1], n)
    # KeptTokens agrees on which tokens are gone, with and without the precomputed pieces
    kept = KeptTokens(pm.ids_keep, N, B, cu_seqlens=pm.cu_seqlens)
    assert torch.equal(kept.segment_ids, pm.segment_ids) and kept.max_seqlen == pm.max_seqlen
    assert torch.equal(kept.removed(), pm.mask.bool())


# -----------------------------------------------------------------------------
# KeptTokens: gather / scatter, dense and packed
# -----------------------------------------------------------------------------


def loop_gather(x, ids_per_sample):
    return [torch.stack([x[b, i] for i in ids.tolist()]) for b, ids in enumerate(ids_per_sample)]


def loop_scatter(rows_per_sample, ids_per_sample, fill, B, N, D):
    """fill at every position ([D] broadcast or [B, N, D]), then each kept row put back in place."""
    out = fill.expand(B, N, D).clone()
    for b, (rows, ids) in enumerate(zip(rows_per_sample, ids_per_sample)):
        for row, i in zip(rows, ids.tolist()):
            out[b, i] = row
    return out


@st.composite
def kept_cases(draw):
    N, counts, seed = draw(packed_cases())
    return dict(N=N, counts=counts, seed=seed, D=draw(st.integers(1, 24)), packed=draw(st.booleans()),
                dtype=draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16))),
                fill=draw(st.sampled_from(("token", "token_1x1xD", "dense", "fp32_token"))))


@examples(200)
@given(case=kept_cases())
def test_kept_tokens_gather_scatter(case):
    """gather takes exactly the kept rows; scatter puts them back and fill everywhere else; with
    fill = x the round trip is the identity; packed == per-sample dense; fill gets d(removed)."""
    N, D, dtype = case["N"], case["D"], case["dtype"]
    counts = case["counts"] if case["packed"] else [case["counts"][0]] * len(case["counts"])
    B = len(counts)
    gen = torch.Generator().manual_seed(case["seed"])
    noise = torch.rand(B, N, generator=gen)
    if case["packed"]:
        pm = packed_masking(counts, N, noise=noise)
        kept = KeptTokens(pm.ids_keep, N, B, cu_seqlens=pm.cu_seqlens, segment_ids=pm.segment_ids,
                          max_seqlen=pm.max_seqlen)
        ids = [pm.ids_keep[pm.cu_seqlens[b]:pm.cu_seqlens[b + 1]] for b in range(B)]
        mask = pm.mask
    else:
        ids_keep, _, mask = random_masking(B, N, ratio_keeping(counts[0], N), noise=noise)
        kept = KeptTokens(ids_keep, N, B)
        ids = list(ids_keep)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    fill = {"token": lambda: torch.randn(D, generator=gen).to(dtype),
            "token_1x1xD": lambda: torch.randn(1, 1, D, generator=gen).to(dtype),  # MAE's mask_token
            "dense": lambda: torch.randn(B, N, D, generator=gen).to(dtype),
            "fp32_token": lambda: torch.randn(1, 1, D, generator=gen)}[case["fill"]]()

    x_keep = kept.gather(x)
    rows = loop_gather(x, ids)
    assert torch.equal(x_keep, torch.cat(rows) if kept.packed else torch.stack(rows))
    assert torch.equal(kept.removed(), mask.bool())

    fill = fill.requires_grad_()
    out = kept.scatter(x_keep, fill)
    fill_rows = fill.detach().to(dtype)  # what removed positions must hold: [B, N, D] or a [D] token
    fill_rows = fill_rows if case["fill"] == "dense" else fill_rows.reshape(D)
    assert out.dtype == dtype
    assert torch.equal(out, loop_scatter(rows, ids, fill_rows, B, N, D))
    assert torch.equal(kept.scatter(x_keep, x), x), "scatter(gather(x), fill=x) must give x back"

    # packed == each sample on its own (dense, B = 1)
    for b in range(B):
        alone = KeptTokens(ids[b][None], N, 1)
        assert torch.equal(alone.gather(x[b:b + 1])[0], rows[b])
        sample_fill = fill_rows[b:b + 1] if fill_rows.dim() == 3 else fill_rows
        assert torch.equal(alone.scatter(rows[b][None], sample_fill)[0], out[b])

    # d fill: the upstream gradient at removed positions (summed over them for a mask token)
    grad = torch.randn(B, N, D, generator=gen).to(dtype)
    (dfill,) = torch.autograd.grad(out, fill, grad)
    removed_grad = grad.double() * mask[..., None].double()
    assert dfill.shape == fill.shape and dfill.dtype == fill.dtype
    if case["fill"] == "dense":
        assert torch.equal(dfill, removed_grad.to(dtype))
    else:
        expected = removed_grad.sum((0, 1))
        # summed in fp32, rounded once to the fill's dtype (then to the fp32 fill's own dtype)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # one subnormal step
        bound = tol * expected.abs() + 1e-5 * removed_grad.abs().sum((0, 1)) + tiny
        assert ((dfill.reshape(D).double() - expected).abs() <= bound).all()


@examples(50)
@given(B=st.integers(1, 4), N=st.integers(1, 30), ratio=st.floats(0.0, 0.95), D=st.integers(1, 9), seed=seeds)
def test_packed_from_dense_matches_dense(B, N, ratio, D, seed):
    """A dense mask repacked as varlen (equal counts) moves the same rows as the dense form."""
    assume(expected_keep_count(N, ratio, float32=False) >= 1)
    gen = torch.Generator().manual_seed(seed)
    ids_keep, _, mask = random_masking(B, N, ratio, generator=gen)
    K = ids_keep.shape[1]
    flat, cu_seqlens, segment_ids, max_seqlen = packed_from_dense(ids_keep)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [b * K for b in range(B + 1)]
    assert segment_ids.tolist() == [b for b in range(B) for _ in range(K)] and max_seqlen == K
    dense = KeptTokens(ids_keep, N, B)
    packed = KeptTokens(flat, N, B, cu_seqlens=cu_seqlens, segment_ids=segment_ids, max_seqlen=max_seqlen)
    x = torch.randn(B, N, D, generator=gen)
    assert torch.equal(packed.gather(x), dense.gather(x).reshape(B * K, D))
    token = torch.randn(D, generator=gen)
    assert torch.equal(packed.scatter(packed.gather(x), token), dense.scatter(dense.gather(x), token))
    assert torch.equal(packed.removed(), mask.bool()) and torch.equal(dense.removed(), mask.bool())
    assert torch.equal(dense.block_kwargs()["positions"], ids_keep)
    assert torch.equal(packed.block_kwargs()["positions"], flat)
