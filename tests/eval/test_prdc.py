"""Improved precision/recall (k = 3 manifolds, ADM) on synthetic sets with known answers."""
import numpy as np
import pytest

from masked_dit.eval.prdc import manifold_radii, precision_recall
import torch


def _adm_reference(ref, gen, k=3):
    """Brute force in float64, written from ADM's ManifoldEstimator definition: radius = squared
    distance to the k-th nearest other point; a point is covered if within some ball (<=)."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
    r_gen = np.sort(sq(gen, gen), axis=1)[:, k]
    precision = (sq(gen, ref) <= r_ref[None]).any(1).mean()
    recall = (sq(ref, gen) <= r_gen[None]).any(1).mean()
    return precision, recall


def test_identical_sets_give_one_one():
    x = np.random.default_rng(0).standard_normal((40, 16))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_far_disjoint_clusters_give_zero_zero():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((30, 8))
    gen = rng.standard_normal((30, 8)) + 100.0
    assert precision_recall(ref, gen) == (0.0, 0.0)


def test_subset_has_full_precision_partial_recall():
    # reference: two far clusters; samples: exactly the first cluster's points
    rng = np.random.default_rng(2)
    cluster_a = rng.standard_normal((25, 8))
    cluster_b = rng.standard_normal((25, 8)) + 50.0
    ref = np.concatenate([cluster_a, cluster_b])
    precision, recall = precision_recall(ref, cluster_a)
    assert precision == 1.0
    assert recall == 0.5   # cluster_b is 50 sigma away from every sample ball


def test_matches_brute_force_adm_definition_with_batching():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((57, 12))
    gen = rng.standard_normal((43, 12)) * 1.3 + 0.4
    expected = _adm_reference(ref, gen)
    got = precision_recall(ref.astype(np.float32), gen.astype(np.float32), batch_size=10)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1   # a non-trivial case


def test_radius_is_kth_neighbour_excluding_self():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # squared distances from 0: 1, 9, 36, 100 -> 3rd other neighbour 36
    assert manifold_radii(x, k=3)[0].item() == 36.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="equal F"):
        precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))


def test_non_finite_features_and_bad_options_are_clear_errors():
    # a NaN point is never inside a ball and has a NaN radius: (0.9, 0.9) came back silently
    x = np.random.default_rng(4).standard_normal((10, 4))
    y = x.copy()
    y[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(x, y)
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(y, x)
    with pytest.raises(ValueError, match="k must be >= 1"):   # k = 0: every radius is the self-distance 0
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        precision_recall(x, x, batch_size=0)


def test_distances_are_full_float32_even_when_tf32_is_on(monkeypatch):
    """A training script's TF32 switch (DiT's train.py turns it on) must not reach the distances: TF32
    keeps 10 mantissa bits, ADM's float16 level, and flips borderline points. Checked through the flag
    each distance batch sees (it only acts on CUDA, so this also runs on CPU), restored afterwards."""
    from masked_dit.eval import prdc

    seen = []
    real = prdc._pairwise_sq_dists

    def spy(a, b):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real(a, b)

    monkeypatch.setattr(prdc, "_pairwise_sq_dists", spy)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        x = np.random.default_rng(5).standard_normal((12, 4))
        precision_recall(x, x + 0.1, batch_size=5)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen and not any(flag for flags in seen for flag in flags)
