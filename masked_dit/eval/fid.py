"""Fréchet distance between Gaussians fitted to features (FID, sFID, digits-feature FD).

Definitions follow ADM's evaluator (guided-diffusion/evaluations/evaluator.py): float64 mean and
``np.cov`` covariance, d = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). ADM takes the trace of
``scipy.linalg.sqrtm(S1 @ S2)`` (``method="sqrtm"`` here, with its ``eps * I`` retry for singular
products); by default we take the same trace from the covariances' symmetric eigendecompositions
and one SVD (``method="eigh"``): equal to rounding on full-rank statistics, faster, and exact when
few samples make S singular or rarely active features make it ill-conditioned.
"""
from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], covariance [F, F]) of features [N, F] in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics needs features of shape [N >= 2, F], got {list(features.shape)}")
    check_finite(features, "feature_statistics: features")
    # np.cov of one column is 0-d: keep the promised [F, F]
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def check_finite(values: np.ndarray, what: str) -> None:
    """One-line error for NaN/inf, which the eigensolvers report as non-convergence and the
    nearest-neighbour / softmax metrics would silently miscount."""
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{what} hold {int(bad.sum())} non-finite value(s) (first in row {first})")


def _scipy_sqrtm_has_disp() -> bool:
    import inspect

    from scipy import linalg

    return "disp" in inspect.signature(linalg.sqrtm).parameters


_SQRTM_HAS_DISP = _scipy_sqrtm_has_disp()


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's matrix square root; its ``disp`` flag (what ADM passes) is deprecated from scipy 1.16."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():
        # singular products are handled by the caller (eps offset), as ADM does
        warnings.simplefilter("ignore", getattr(linalg, "LinAlgWarning", RuntimeWarning))
        warnings.simplefilter("ignore", DeprecationWarning)
        out = linalg.sqrtm(matrix, disp=False) if _SQRTM_HAS_DISP else linalg.sqrtm(matrix)
    return out[0] if isinstance(out, tuple) else out


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: the sum of the singular values of R1^T R2.

    With S = R R^T (R = V sqrt(W) from S's eigenpairs, null space dropped), S1 S2 = R1 R1^T R2 R2^T has
    the nonzero eigenvalues of (R1^T R2)(R1^T R2)^T, the squared singular values of R1^T R2. Same
    quantity as ADM's ``trace(sqrtm(S1 @ S2))``, several times faster at 2048-d, and exact for the
    singular covariances of few samples, where ``sqrtm`` loses digits. Singular values (not the
    eigenvalues of the product) keep small terms accurate: the product's eigenvalues square the
    condition number, and their rounding noise (~eps * the largest) would add or drop sqrt(noise) each.
    """
    product = _psd_root(sigma1).T @ _psd_root(sigma2)
    return float(np.linalg.svd(product, compute_uv=False).sum())


def _psd_root(sigma: np.ndarray) -> np.ndarray:
    """R with R R^T = sigma, without the null space (eigenvalues within rounding of zero)."""
    w, v = np.linalg.eigh(sigma)
    keep = _drop_rounding_noise(w) > 0
    return v[:, keep] * np.sqrt(w[keep])


def _drop_rounding_noise(eigenvalues: np.ndarray) -> np.ndarray:
    # Eigenvalues within rounding of zero (numpy's matrix_rank tolerance) are zero: a singular
    # covariance's null space would otherwise add sqrt(1e-16)-sized terms per dimension.
    tol = eigenvalues.max(initial=0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh") -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    method "eigh" (default): the trace of the square root from eigendecompositions and an SVD (see
    :func:`_trace_sqrt_product`); "sqrtm": ADM's exact computation with ``scipy.linalg.sqrtm``, its
    ``eps * I`` retry for singular products and its imaginary-part check. Both agree to ~1e-12
    relative on full-rank covariances (e.g. 10k+ samples of 2048-d features).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mean {mu1.shape} vs {mu2.shape}, cov {sigma1.shape} vs {sigma2.shape}")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariance shape {sigma1.shape} does not match mean shape {mu1.shape}")
    for name, value in (("mean", mu1), ("covariance", sigma1), ("mean", mu2), ("covariance", sigma2)):
        check_finite(value, f"frechet_distance: the {name} statistics")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    else:
        raise ValueError(f"frechet_distance method must be 'eigh' or 'sqrtm', got {method!r}")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
