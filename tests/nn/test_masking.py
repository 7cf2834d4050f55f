"""Masking helpers: MAE recipe (as MDT and MaskDiT draw masks), packed variable-length masks."""
import pytest
import torch

from masked_dit import ops
from masked_dit.nn.masking import (KeptTokens, keep_count, keep_counts_from_ratios, packed_from_dense, packed_masking,
                                   random_masking, sample_mdt_mask_ratio)
from tests.models.zoo_fixtures import load_model_fixture


def _is_perm(rows: torch.Tensor) -> bool:
    n = rows.shape[-1]
    return bool((rows.sort(dim=-1).values == torch.arange(n)).all())


#################################################################################
#                                 Dense masks                                   #
#################################################################################

@pytest.mark.parametrize("N,ratio", [(16, 0.3), (16, 0.5), (64, 0.75), (10, 0.0)])
def test_random_masking_properties(N, ratio):
    B = 5
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = random_masking(B, N, ratio, generator=g)
    K = int(N * (1 - ratio))
    assert ids_keep.shape == (B, K) and ids_keep.dtype == torch.int64
    assert ids_restore.shape == (B, N) and mask.shape == (B, N) and mask.dtype == torch.float32
    assert _is_perm(ids_restore)
    assert all(len(set(r.tolist())) == K for r in ids_keep)  # kept indices are distinct
    assert (mask.sum(1) == N - K).all()
    assert (mask.gather(1, ids_keep) == 0).all()  # 1 = removed, 0 = kept
    # ids_restore inverts the shuffle: shuffled order is ids_keep followed by the removed tokens.
    ids_shuffle = ids_restore.argsort(dim=1)
    assert torch.equal(ids_shuffle[:, :K], ids_keep)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(N).expand(B, N))


def test_random_masking_reference_recipe_and_generator():
    noise = torch.rand(3, 20)
    ids_keep, ids_restore, mask = random_masking(3, 20, 0.4, noise=noise)
    ref_shuffle = torch.argsort(noise, dim=1)
    ref_mask = torch.ones(3, 20)
    ref_mask[:, :12] = 0
    assert torch.equal(ids_keep, ref_shuffle[:, :12])
    assert torch.equal(ids_restore, torch.argsort(ref_shuffle, dim=1))
    assert torch.equal(mask, ref_mask.gather(1, ids_restore))
    a = random_masking(3, 20, 0.4, generator=torch.Generator().manual_seed(7))
    b = random_masking(3, 20, 0.4, generator=torch.Generator().manual_seed(7))
    c = random_masking(3, 20, 0.4, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_fixture_masks_replayed(fixtures_dir):
    """The fixtures' stored noise reproduces their ids exactly (MDTv2 float32 sampled ratio, MaskDiT 0.5)."""
    config, _, inputs, _ = load_model_fixture(fixtures_dir, "mdtv2")
    ratio = sample_mdt_mask_ratio(config["mask_ratio"], ratio_noise=inputs["ratio_noise"])
    assert abs(float(ratio) - config["effective_mask_ratio"]) < 1e-7
    assert keep_count(16, ratio) == config["len_keep"]
    ids_keep, ids_restore, _ = random_masking(4, 16, ratio, noise=inputs["mask_noise"])
    assert torch.equal(ids_keep, inputs["ids_keep"]) and torch.equal(ids_restore, inputs["ids_restore"])
    config, _, inputs, _ = load_model_fixture(fixtures_dir, "maskdit")
    ids_keep, ids_restore, mask = random_masking(4, 16, config["mask_ratio"], noise=inputs["mask_noise"])
    assert torch.equal(ids_keep, inputs["ids_keep"]) and torch.equal(ids_restore, inputs["ids_restore"])
    assert torch.equal(mask, inputs["mask"])


def test_sample_mdt_mask_ratio():
    g = torch.Generator().manual_seed(0)
    ratios = torch.cat([sample_mdt_mask_ratio(0.3, generator=g) for _ in range(200)])
    assert ratios.dtype == torch.float32 and ratios.shape == (200,)
    assert (ratios >= 0.3).all() and (ratios < 0.5).all() and ratios.std() > 0.04
    r = sample_mdt_mask_ratio(0.3, ratio_noise=torch.tensor([0.5]))
    assert torch.allclose(r, torch.tensor([0.4]))
    assert torch.allclose(sample_mdt_mask_ratio(0.1, ratio_noise=torch.tensor(1.0), spread=0.5), torch.tensor([0.6]))


def test_keep_count_reads_a_tensor_ratio_once():
    """MDTv2's sampled ratio lives on the device: the keep count reads it back once per step (it was
    read twice, two syncs between the full and the masked pass). ``OnDevice`` stands for a device
    tensor: what is computed from it stays "on the device" until ``.cpu()``; each read back is counted."""
    reads = []

    class OnDevice(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("cpu", "item", "__float__", "__int__", "__bool__", "tolist"):
                reads.append(name)
            out = super().__torch_function__(func, types, args, kwargs or {})
            return out.as_subclass(torch.Tensor) if name == "cpu" else out

    ratio = sample_mdt_mask_ratio(0.3, ratio_noise=torch.tensor([0.61])).as_subclass(OnDevice)
    got = keep_count(16, ratio)
    assert got == int(16 * (1 - torch.tensor(0.3 + 0.2 * 0.61, dtype=torch.float32))) and reads == ["cpu"], reads


def test_keep_count_matches_reference_truncation():
    assert keep_count(256, 0.5) == 128 and keep_count(256, 0.3) == int(256 * 0.7)
    r = torch.tensor([0.3 + 0.2 * 0.999], dtype=torch.float32)
    assert keep_count(16, r) == int(16 * (1 - r))  # float32 arithmetic like MDT's tensor ratio
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            keep_count(16, bad)
    with pytest.raises(ValueError, match="keeps no token"):
        keep_count(4, 0.9)


#################################################################################
#                          Kept tokens: gather / scatter                        #
#################################################################################

def test_scatter_after_gather_restores_kept_tokens():
    B, N, D = 3, 16, 8
    x = torch.randn(B, N, D)
    ids_keep, _, mask = random_masking(B, N, 0.5, generator=torch.Generator().manual_seed(1))
    kept = KeptTokens(ids_keep, N, B)
    x_keep = kept.gather(x)
    assert torch.equal(x_keep, torch.stack([x[b, ids_keep[b]] for b in range(B)]))
    fill = torch.randn(1, 1, D)
    back = kept.scatter(x_keep, fill)
    removed = kept.removed()
    assert torch.equal(removed, mask.bool())
    assert torch.equal(back[~removed], x[~removed])
    assert torch.equal(back[removed], fill.reshape(1, D).expand(int(removed.sum()), D))
    full = torch.randn(B, N, D)  # a full [B, N, D] fill keeps its values at the removed positions
    assert torch.equal(kept.scatter(x_keep, full)[removed], full[removed])
    assert kept.block_kwargs()["positions"] is ids_keep


#################################################################################
#                          Packed variable-length masks                         #
#################################################################################

def test_packed_masking_properties():
    N, counts = 16, [3, 16, 1, 9]
    noise = torch.rand(4, N)
    pm = packed_masking(counts, N, noise=noise)
    assert pm.cu_seqlens.dtype == torch.int32 and pm.cu_seqlens.tolist() == [0, 3, 19, 20, 29]
    assert pm.ids_keep.shape == (sum(counts),) and pm.ids_keep.dtype == torch.int64
    assert pm.segment_ids.tolist() == sum([[b] * k for b, k in enumerate(counts)], [])
    assert pm.max_seqlen == 16
    assert _is_perm(pm.ids_restore)
    assert pm.mask.sum(1).tolist() == [N - k for k in counts]
    for b, k in enumerate(counts):
        seg = pm.ids_keep[pm.cu_seqlens[b]:pm.cu_seqlens[b + 1]]
        assert torch.equal(seg, torch.argsort(noise[b])[:k])  # the dense recipe, sample by sample
        assert (pm.mask[b, seg] == 0).all()
    kept = KeptTokens(pm.ids_keep, N, 4, cu_seqlens=pm.cu_seqlens)  # segment_ids / max_seqlen derived
    assert torch.equal(kept.segment_ids, pm.segment_ids) and kept.max_seqlen == 16
    assert torch.equal(kept.removed(), pm.mask.bool())
    x = torch.randn(4, N, 5)
    x_keep = kept.gather(x)
    assert x_keep.shape == (29, 5)
    assert torch.equal(x_keep, x[pm.segment_ids, pm.ids_keep])
    back = kept.scatter(x_keep, torch.zeros(5))
    assert torch.equal(back[~kept.removed()], x[~kept.removed()])
    assert (back[kept.removed()] == 0).all()


def test_packed_equal_counts_match_dense():
    ids_keep, _, mask = random_masking(3, 16, 0.25, noise=(noise := torch.rand(3, 16)))
    pm = packed_masking([12, 12, 12], 16, noise=noise)
    flat, cu, seg, max_len = packed_from_dense(ids_keep)
    assert torch.equal(pm.ids_keep, flat) and torch.equal(pm.cu_seqlens, cu) and torch.equal(pm.segment_ids, seg)
    assert max_len == pm.max_seqlen == 12 and torch.equal(pm.mask, mask)


def test_keep_counts_from_ratios():
    assert keep_counts_from_ratios(16, [0.0, 0.3, 0.5, 0.9]).tolist() == [16, 11, 8, 1]
    with pytest.raises(ValueError, match="mask_ratio"):
        keep_counts_from_ratios(16, [0.2, 1.0])


def test_keep_counts_from_ratios_equal_the_dense_keep_count():
    """Each ratio keeps what random_masking keeps for it: a Python 0.3 in float64 (10 * 0.7 = 7 tokens; rounded
    to float32 first it kept 6), a float32 tensor's ratios in float32 like MDT's sampled ratio."""
    for N, r in [(10, 0.3), (20, 0.3), (100, 0.3), (10, 0.7)]:
        assert keep_counts_from_ratios(N, [r]).tolist() == [random_masking(1, N, r)[0].shape[1]] == [int(N * (1 - r))]
    ratios = torch.tensor([0.4074707329273224, 0.3, 0.5], dtype=torch.float32)  # 4096 (1 - r): float32 != float64
    expected = [random_masking(1, 4096, r.reshape(1), noise=torch.rand(1, 4096))[0].shape[1] for r in ratios]
    assert expected[0] == int(torch.tensor(4096.0) * (1 - ratios[0])) != int(4096 * (1 - float(ratios[0])))
    assert keep_counts_from_ratios(4096, ratios).tolist() == expected


def test_mask_errors():
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(2, 16, 0.5, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="keep_counts"):
        packed_masking([0, 4], 16)
    with pytest.raises(ValueError, match="keep_counts"):
        packed_masking([17, 4], 16)
    with pytest.raises(ValueError, match="ratio_noise"):
        sample_mdt_mask_ratio(0.3, ratio_noise=torch.rand(2))
    with pytest.raises(ValueError, match="int64"):
        KeptTokens(torch.zeros(2, 4, dtype=torch.int32), 16, 2)
    with pytest.raises(ValueError, match=r"ids_keep must be \[B=2, K\]"):
        KeptTokens(torch.zeros(3, 4, dtype=torch.int64), 16, 2)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        KeptTokens(torch.zeros(8, dtype=torch.int64), 16, 2, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="packed ids_keep must be 1-D"):
        KeptTokens(torch.zeros(2, 4, dtype=torch.int64), 16, 2, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))


def test_kept_tokens_reject_out_of_range_ids_and_bad_cu_seqlens():
    """One-line errors up front: ids outside [0, N) (unchecked, gather/scatter on a GPU read outside the sample) and
    cu_seqlens not rising from 0 to T (repeat_interleave's 'allocated size does not match required size')."""
    x = torch.randn(2, 16, 3)
    ids = torch.tensor([[0, -1], [1, 2]])
    with pytest.raises(ValueError, match=r"ids_keep must lie in \[0, 16\), got min -1, max 2"):
        ops.gather_tokens(x, ids)  # the op checks CPU ids only (on a GPU it would cost a sync per call)
    for bad in (ids, torch.tensor([[0, 16], [1, 2]])):
        with pytest.raises(ValueError, match=r"ids_keep must lie in \[0, 16\)"):
            KeptTokens(bad, 16, 2)
    with pytest.raises(ValueError, match=r"ids_keep must lie in \[0, 16\)"):
        KeptTokens(torch.tensor([0, 1, 2, -3]), 16, 2, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    for cu, T in [([0, 3, 5], 6), ([1, 3, 6], 6), ([0, 4, 2], 6), ([0, 2, 19], 19)]:
        with pytest.raises(ValueError, match=rf"cu_seqlens must rise from 0 to T={T} by at most num_tokens=16"):
            KeptTokens(torch.zeros(T, dtype=torch.int64), 16, 2, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_scheduled_mask_ratio_is_maskdits():
    """MaskDiT's get_mask_ratio_fn written out with numpy at (x, scale, min); clipped outside [0, 1]."""
    import numpy as np

    from masked_dit.nn.masking import MASK_RATIO_FNS, scheduled_mask_ratio

    def official(name, x, scale, lo):
        if name.startswith("cosine"):
            return (scale - lo) * np.cos(np.pi * x / 2) ** int(name[-1]) + lo
        return {"exp": (scale - lo) * np.exp(-x * 7) + lo, "linear": (scale - lo) * x + lo, "constant": scale}[name]

    for name in MASK_RATIO_FNS:
        for x in (0.0, 0.1, 0.37, 0.5, 0.99, 1.0):
            for scale, lo in ((0.5, 0.0), (0.75, 0.25)):
                assert scheduled_mask_ratio(x, name, scale, lo) == pytest.approx(official(name, x, scale, lo),
                                                                                  rel=1e-12, abs=1e-15)
    assert scheduled_mask_ratio(1.5, "cosine4", 0.5) == scheduled_mask_ratio(1.0, "cosine4", 0.5)
    assert scheduled_mask_ratio(-1.0, "linear", 0.5, 0.1) == 0.1
    with pytest.raises(ValueError, match="unknown mask ratio schedule 'cos4'"):
        scheduled_mask_ratio(0.5, "cos4")


def test_packed_segment_ids_must_follow_cu_seqlens():
    """Were taken as given: all-zero segment_ids gave every token sample 0's conditioning (an MDTv2 output off
    by 0.28), out-of-range ones an IndexError in the block."""
    ids = torch.tensor([0, 2, 1, 3, 0], dtype=torch.int64)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert KeptTokens(ids, 4, 2, cu_seqlens=cu).segment_ids.tolist() == [0, 0, 1, 1, 1]
    assert KeptTokens(ids, 4, 2, cu_seqlens=cu, segment_ids=torch.tensor([0, 0, 1, 1, 1])).max_seqlen == 3
    for bad in ([0, 0, 0, 0, 0], [0, 0, 1, 1, 7]):
        with pytest.raises(ValueError, match="segment_ids must be each token's sample index as cu_seqlens"):
            KeptTokens(ids, 4, 2, cu_seqlens=cu, segment_ids=torch.tensor(bad))
