"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them.

Each set's manifold is the union of balls around its points with radius = distance to the k-th
nearest neighbour (k = 3, the point itself excluded). Precision: share of samples inside the
reference manifold; recall: share of references inside the sample manifold. Distances are
computed in batches on the given device (float32 squared-distance trick, as ADM), with TF32 off.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from masked_dit.eval.fid import check_finite


@contextlib.contextmanager
def no_tf32():
    """Full float32 CUDA convolutions/matmuls inside, the caller's settings restored after. TF32 (which
    training scripts switch on: DiT's train.py does) keeps 10 mantissa bits: Inception features move at
    the 1e-3 level and distances round like ADM's float16 ones, flipping borderline points."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point."""
    if features.shape[0] <= k:
        raise ValueError(f"need more than k={k} points to estimate a manifold, got {features.shape[0]}")
    radii = []
    for start in range(0, features.shape[0], batch_size):
        d = _pairwise_sq_dists(features[start:start + batch_size], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    inside = []
    for start in range(0, queries.shape[0], batch_size):
        d = _pairwise_sq_dists(queries[start:start + batch_size], points)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside).double().mean().item()  # float64 share, as ADM


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3, device: str | torch.device = "cpu",
                     batch_size: int = 10000) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference`` features, both [N, F]."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"precision_recall: k must be >= 1 and batch_size must be >= 1, "
                         f"got k={k}, batch_size={batch_size}")
    for name, features in (("reference", reference), ("sample", samples)):
        check_finite(np.asarray(features), f"precision_recall: the {name} features")
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32, device=device)
    gen = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"features must be [N, F] with equal F, got {list(ref.shape)} and {list(gen.shape)}")
    with no_tf32():
        precision = _coverage(gen, ref, manifold_radii(ref, k, batch_size), batch_size)
        recall = _coverage(ref, gen, manifold_radii(gen, k, batch_size), batch_size)
    return precision, recall
