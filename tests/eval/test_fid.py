"""Fréchet distance (FID / sFID core) against closed forms and an independent scipy computation."""
import numpy as np
import pytest
from scipy import linalg

from masked_dit.eval.fid import feature_statistics, frechet_distance, frechet_distance_from_features


def _random_spd(rng, n, scale=1.0):
    a = rng.standard_normal((n, n)) * scale
    return a @ a.T / n + 0.1 * np.eye(n)


def _reference_fd(mu1, s1, mu2, s2):
    """Independent: Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), both roots by scipy.linalg.sqrtm
    of symmetric positive definite matrices (well conditioned, no imaginary parts)."""
    r1 = linalg.sqrtm(s1).real
    inner = linalg.sqrtm(r1 @ s2 @ r1).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(inner))


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_diagonal_gaussians_closed_form(method):
    # diag covariances: d = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(0)
    n = 32
    mu1, mu2 = rng.standard_normal(n), rng.standard_normal(n)
    a, b = rng.uniform(0.1, 3.0, n), rng.uniform(0.1, 3.0, n)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_general_gaussians_match_independent_scipy(method):
    rng = np.random.default_rng(1)
    n = 48
    mu1, mu2 = rng.standard_normal(n), rng.standard_normal(n) * 2
    s1, s2 = _random_spd(rng, n), _random_spd(rng, n, scale=2.0)
    expected = _reference_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)
    # symmetric in its two arguments, zero against itself
    assert frechet_distance(mu2, s2, mu1, s1, method=method) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-9 * np.trace(s1)


def test_scalar_gaussians():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9.0 + 1.0)


def test_feature_statistics_are_float64_mean_and_unbiased_cov():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-14)
    centred = x64 - x64.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-12)


def test_singular_covariance_few_samples_is_exact():
    # 10 samples of 256-d features: rank-9 covariance. FD of a set with itself is 0, and of a shifted
    # copy exactly the squared shift (the eigh path stays exact where sqrtm loses digits).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 256))
    assert abs(frechet_distance_from_features(x, x)) < 1e-9
    shift = rng.standard_normal(256)
    assert frechet_distance_from_features(x, x + shift) == pytest.approx(shift @ shift, rel=1e-9)


def test_methods_agree_on_full_rank_statistics():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((400, 64))
    b = rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64)) * 0.3 + 0.5
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m1, s1, m2, s2, method="sqrtm"),
                                                             rel=1e-10)


def test_ill_conditioned_covariances_keep_their_small_terms():
    """Post-ReLU features with rarely active units give covariances of condition ~1e20: the trace of
    the root, from the eigenvalues of the product (condition squared), lost ~1e-5 absolute. Reference:
    Tr((S1 S2)^(1/2)) = nuclear norm of Ac Bc^T / sqrt((n1 - 1)(n2 - 1)) of the centred features."""
    rng = np.random.default_rng(0)
    f = 128
    offset = np.concatenate([np.zeros(f // 2), np.linspace(2.5, 4.0, f // 2)])  # half rarely fire
    scale = np.concatenate([np.full(f // 2, 3.0), np.full(f // 2, 0.05)])
    mix = rng.normal(size=(f, f)) * 0.05 + np.eye(f)
    a = np.maximum(rng.normal(size=(3000, f)) @ mix - offset, 0) * scale
    b = np.maximum(rng.normal(size=(2000, f)) @ mix * 1.02 - offset, 0) * scale
    ac, bc = a - a.mean(0), b - b.mean(0)
    nuclear = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    d = a.mean(0) - b.mean(0)
    want = d @ d + (ac ** 2).sum() / (len(a) - 1) + (bc ** 2).sum() / (len(b) - 1) - 2 * nuclear
    assert abs(frechet_distance_from_features(a, b) - want) < 1e-9


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="does not match mean"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")
    with pytest.raises(ValueError, match=r"\[N >= 2, F\]"):
        feature_statistics(np.zeros((1, 5)))


def test_one_feature_covariance_is_a_matrix():
    # np.cov of a single column is 0-d; the statistics promise [F, F] (callers compare shapes)
    x = np.random.default_rng(5).standard_normal((20, 1))
    mu, sigma = feature_statistics(x)
    assert mu.shape == (1,) and sigma.shape == (1, 1)
    assert sigma[0, 0] == pytest.approx(np.var(x[:, 0], ddof=1), rel=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_and_statistics_are_clear_errors(bad):
    # NaN/inf used to surface as numpy's "Eigenvalues did not converge" (or sqrtm's internal error)
    x = np.random.default_rng(6).standard_normal((10, 4))
    y = x.copy()
    y[3, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite value\(s\) \(first in row 3\)"):
        feature_statistics(y)
    mu, sigma = feature_statistics(x)
    for method in ("eigh", "sqrtm"):
        with pytest.raises(ValueError, match="non-finite"):
            frechet_distance(mu, np.where(np.eye(4) > 0, bad, sigma), mu, sigma, method=method)
