"""ImageNet-scale sample evaluation as ADM's evaluator: FID, sFID, Inception Score, precision, recall.

Inputs follow ADM's conventions (guided-diffusion/evaluations): a *sample batch* is an ``.npz``
whose ``arr_0`` holds uint8 images [N, H, W, 3] (or [N, H, W, 1] grayscale, repeated to RGB; ``arr_1``,
the labels, is ignored) or a folder of
PNG/JPEG/WebP/... files; a *reference batch* is an ``.npz`` such as ``VIRTUAL_imagenet256_labeled.npz``
holding ``arr_0`` images and, optionally, precomputed ``mu``/``sigma`` (pool features) and
``mu_s``/``sigma_s`` (spatial features). Precomputed statistics are used instead of recomputing
them, as ADM does (for either batch); the reference images are still needed for precision/recall.

Metric definitions (all as ADM):

* FID / sFID: Fréchet distance of Gaussians fitted to pool / spatial features (``fid.py``);
* Inception Score: softmax of ``pool @ W`` (no bias), split into chunks of 5000 samples (the last
  one may be shorter), ``exp(mean KL(p(y|x) || p(y)))`` per chunk, mean over chunks (ADM's float32
  softmax is a float64 log-softmax here, so 0 * log 0 counts as 0 instead of NaN);
* precision / recall: k = 3 nearest-neighbour manifolds of pool features (``prdc.py``). ADM first
  tries float16 distances on the GPU; we use float32 throughout (differences are in the rounding
  of borderline points only).

The feature network (``inception.py``) is the PyTorch port of ADM's TF graph, so numbers differ
slightly from ADM's; see that module's docstring.
"""
from __future__ import annotations

import contextlib
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from masked_dit.data import folder as image_folder
from masked_dit.eval.fid import check_finite, feature_statistics, frechet_distance
from masked_dit.eval.inception import POOL_DIM, SPATIAL_DIM, InceptionOutputs
from masked_dit.eval.prdc import no_tf32, precision_recall

IMAGE_EXTENSIONS = image_folder.IMAGE_EXTENSIONS  # what the training folders read (pytorch-fid's netpbm formats too)
IS_SPLIT_SIZE = 5000
STATISTICS_KEYS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}
INCEPTION_DIMS = {"fid": POOL_DIM, "sfid": SPATIAL_DIM}  # feature sizes the statistics must have


# -----------------------------------------------------------------------------
# Image sources: stream uint8 NHWC batches without loading 50k images at once

def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of an .npy stream, or None for header versions we do not parse."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def _npz_members(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"batch file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive")
    with zipfile.ZipFile(path) as zf:
        return [name[:-4] for name in zf.namelist() if name.endswith(".npy")]


class NpzImages:
    """``arr_0`` of an .npz, read in batches straight from the archive (streams when the array is C-ordered)."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        keys = _npz_members(self.path)
        if key not in keys:
            raise ValueError(f"{self.path} has no '{key}' array (keys: {keys})")
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{key}.npy") as f:
            header = _read_npy_header(f)
        if header is None:  # unusual .npy version: read the whole array once
            arr = np.load(self.path)[key]
            header = (arr.shape, False, arr.dtype)
        self.shape, self._fortran, self.dtype = header
        if self.dtype != np.uint8:
            raise ValueError(f"{self.path}['{key}'] must be uint8 images, got dtype {self.dtype}")
        if len(self.shape) != 4 or self.shape[-1] not in (1, 3) or 0 in self.shape:
            raise ValueError(f"{self.path}['{key}'] must have shape [N > 0, H, W, 3] (or [N, H, W, 1] grayscale), "
                             f"got {list(self.shape)}")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        # grayscale becomes RGB by repeating the channel, as image_folder.to_rgb does for a folder of images
        try:
            for batch in self._stored_batches(batch_size):
                yield batch if batch.shape[-1] == 3 else np.repeat(batch, 3, axis=-1)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # damaged bytes: CRC / deflate / short member
            raise ValueError(f"{self.path}['{self.key}'] is corrupt ({type(err).__name__}: {err})") from None

    def _stored_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self._fortran:
            arr = np.load(self.path)[self.key]
            for start in range(0, len(arr), batch_size):
                yield np.ascontiguousarray(arr[start:start + batch_size])
            return
        row_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            _read_npy_header(f)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise ValueError(f"{self.path}['{self.key}'] is truncated at image {start}")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape[1:])


class FolderImages:
    """Image files of one folder (``IMAGE_EXTENSIONS``, sorted by name), all of one size, converted to RGB."""

    def __init__(self, path: str | Path, num_workers: int = 8):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.path}")
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"{self.path} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        self.num_workers = num_workers
        self.size = self._load(self.files[0]).shape

    @staticmethod
    def _load(file: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(file) as im:
                return np.asarray(image_folder.to_rgb(im), dtype=np.uint8)
        except (OSError, SyntaxError) as err:  # PIL's own messages do not say which of 50k files failed
            raise ValueError(f"{file} is not a readable image ({type(err).__name__}: {err})") from None

    def _checked(self, file: Path) -> np.ndarray:
        image = self._load(file)
        if image.shape != self.size:
            raise ValueError(f"{file} is {image.shape[1]}x{image.shape[0]} but the folder's images are "
                             f"{self.size[1]}x{self.size[0]}; all images must share one size")
        return image

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(self.num_workers) as pool:  # PIL decodes without the GIL
            for start in range(0, len(self.files), batch_size):
                yield np.stack(list(pool.map(self._checked, self.files[start:start + batch_size])))


def open_images(path: str | Path) -> NpzImages | FolderImages:
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.exists():
        raise FileNotFoundError(f"batch not found: {path}")
    return NpzImages(path)


# -----------------------------------------------------------------------------
# Features

@dataclass
class InceptionActivations:
    pool: np.ndarray     # [N, 2048] float32
    spatial: np.ndarray  # [N, 2023] float32
    logits: np.ndarray   # [N, 1008] float32


@torch.inference_mode()
def compute_activations(model: Callable[[torch.Tensor], InceptionOutputs], images: NpzImages | FolderImages,
                        batch_size: int = 64, device: str | torch.device = "cpu",
                        progress: bool = False, desc: str = "") -> InceptionActivations:
    """Runs ``model`` over all images (uint8 NHWC batches -> [B, 3, H, W] on ``device``)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    pool, spatial, logits = [], [], []
    with (no_tf32() if device.type == "cuda" else contextlib.nullcontext()):  # features at full float32
        for batch in tqdm(images.batches(batch_size), total=-(-len(images) // batch_size), desc=desc,
                          disable=not progress):
            x = torch.from_numpy(np.array(batch)).to(device, non_blocking=True).permute(0, 3, 1, 2)
            out = model(x)
            pool.append(out.pool.float().cpu().numpy())
            spatial.append(out.spatial.float().cpu().numpy())
            logits.append(out.logits.float().cpu().numpy())
    acts = InceptionActivations(np.concatenate(pool), np.concatenate(spatial), np.concatenate(logits))
    for name in ("pool", "spatial", "logits"):  # rows are image indices; NaN here means broken weights
        check_finite(getattr(acts, name), f"the network's {name} outputs for the {desc or 'images'}")
    return acts


# -----------------------------------------------------------------------------
# Metrics

def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score from logits [N, C]: mean over splits of exp(E_x KL(p(y|x) || p(y)))."""
    from scipy.special import logsumexp

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score needs logits [N > 0, C], got {list(logits.shape)}")
    if split_size < 1:
        raise ValueError(f"inception_score: split_size must be >= 1, got {split_size}")
    check_finite(logits, "inception_score: logits")
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    p = np.exp(log_p)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start:start + split_size], log_p[start:start + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_marginal = np.log(part.mean(axis=0, keepdims=True))
            # 0 * log 0 = 0: classes with vanishing probability contribute nothing
            kl = np.where(part > 0, part * (log_part - log_marginal), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def read_statistics(path: str | Path,
                    dims: dict[str, int] | None = INCEPTION_DIMS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Precomputed (mu, sigma) pairs an .npz holds: {'fid': (mu, sigma), 'sfid': (mu_s, sigma_s)}, each if
    present; ``dims`` are the feature sizes they must have (None: any consistent size)."""
    path = Path(path)
    if path.is_dir():
        return {}
    keys = set(_npz_members(path))
    stats = {}
    with np.load(path) as npz:
        for metric, (mu_key, sigma_key) in STATISTICS_KEYS.items():
            if mu_key not in keys and sigma_key not in keys:
                continue
            if mu_key not in keys or sigma_key not in keys:
                raise ValueError(f"{path} has '{mu_key if mu_key in keys else sigma_key}' but not "
                                 f"'{sigma_key if mu_key in keys else mu_key}'")
            mu, sigma = _read_member(npz, path, mu_key), _read_member(npz, path, sigma_key)
            dim = dims[metric] if dims else (mu.shape[0] if mu.ndim == 1 else -1)
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise ValueError(f"{path}: '{mu_key}' / '{sigma_key}' must have shapes ({dim},) / ({dim}, {dim}), "
                                 f"got {mu.shape} / {sigma.shape}")
            for key, value in ((mu_key, mu), (sigma_key, sigma)):
                check_finite(value, f"{path}: '{key}'")
            sigma = sigma.astype(np.float64)
            _check_covariance(sigma, f"{path}: '{sigma_key}'")
            stats[metric] = (mu.astype(np.float64), sigma)
    return stats


def _check_covariance(sigma: np.ndarray, what: str) -> None:
    """A covariance is symmetric and positive semi-definite; an edited or mixed-up one gave a negative
    FID (-1962.7) without a word. The tolerance (1e-4 of the largest eigenvalue) is far above rounding,
    float32 storage included."""
    scale = max(float(np.abs(sigma).max(initial=0.0)), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-4 * scale:
        raise ValueError(f"{what} is not symmetric, so not a covariance")
    w = np.linalg.eigvalsh(sigma)
    if w.size and w.min() < -1e-4 * max(w.max(), 0.0):
        raise ValueError(f"{what} is not positive semi-definite (eigenvalue {w.min():.4g}, largest {w.max():.4g}), "
                         f"so not a covariance")


def _read_member(npz, path: Path, key: str) -> np.ndarray:
    """A statistics array of the .npz: real numbers, one line naming it when damaged or of another type."""
    try:
        value = npz[key]
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # damaged bytes: CRC / deflate / short member
        raise ValueError(f"{path}['{key}'] is corrupt ({type(err).__name__}: {err})") from None
    except ValueError:  # numpy refuses pickled object arrays
        raise ValueError(f"{path}['{key}'] must hold real numbers, got pickled objects") from None
    if value.dtype.kind not in "biuf":  # complex would lose its imaginary part, strings cannot be read
        raise ValueError(f"{path}['{key}'] must hold real numbers, got dtype {value.dtype}")
    return value


@dataclass
class Batches:
    """Validated inputs: image sources (None: no images) and precomputed statistics of both batches."""
    ref_images: NpzImages | None
    ref_stats: dict
    sample_images: NpzImages | FolderImages
    sample_stats: dict


def open_batches(ref_batch: str | Path, sample_batch: str | Path,
                 dims: dict[str, int] | None = INCEPTION_DIMS) -> Batches:
    """Opens and checks both batches (headers and statistics only; no image is decoded yet).
    ``dims``: feature sizes precomputed statistics must have (None: checked against the features later)."""
    ref_path, sample_path = Path(ref_batch), Path(sample_batch)
    for role, path in (("reference", ref_path), ("sample", sample_path)):
        if not path.exists():
            raise FileNotFoundError(f"{role} batch not found: {path}")
    if ref_path.is_dir():
        raise ValueError(f"reference batch must be an .npz file (ADM layout), got the folder {ref_path}")
    ref_stats = read_statistics(ref_path, dims)
    ref_images = NpzImages(ref_path) if "arr_0" in _npz_members(ref_path) else None
    if ref_images is None and not ref_stats:
        raise ValueError(f"{ref_path} holds neither 'arr_0' images nor 'mu'/'sigma' statistics")
    if not sample_path.is_dir() and "arr_0" not in _npz_members(sample_path):
        raise ValueError(f"{sample_path} has no 'arr_0' images (the sample batch needs images)")
    sample_images = open_images(sample_path)
    # FID needs two images for a covariance; precision/recall (with reference images) k + 1 = 4 for
    # the 3rd-nearest-neighbour radii. Checked here, before the Inception pass, naming the file.
    need = 4 if ref_images is not None else 2
    for role, path, images in (("reference", ref_path, ref_images), ("sample", sample_path, sample_images)):
        if images is not None and len(images) < need:
            raise ValueError(f"{role} batch {path} holds {len(images)} image(s); the metrics need at least {need} "
                             f"(FID's covariance, precision/recall's 3 nearest neighbours)")
    return Batches(ref_images, ref_stats, sample_images, read_statistics(sample_path, dims))


def _statistics(acts: InceptionActivations | None, precomputed: dict, metric: str):
    if metric in precomputed:
        return precomputed[metric], "precomputed"
    if acts is None:
        return None, "unavailable"
    return feature_statistics(acts.pool if metric == "fid" else acts.spatial), "computed"


def evaluate(ref_batch: str | Path, sample_batch: str | Path, model: Callable[[torch.Tensor], InceptionOutputs],
             *, batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = False,
             split_size: int = IS_SPLIT_SIZE, dims: dict[str, int] | None = INCEPTION_DIMS) -> dict:
    """All metrics of ``sample_batch`` against ``ref_batch`` as a JSON-ready dict.

    ``model`` maps uint8 images [B, 3, H, W] on ``device`` to :class:`InceptionOutputs`
    (normally :func:`masked_dit.eval.inception.load_fid_inception`); ``dims`` are its feature sizes
    that precomputed statistics must match (None: whatever the model gives).
    """
    batches = open_batches(ref_batch, sample_batch, dims)
    ref_acts = None
    if batches.ref_images is not None:
        ref_acts = compute_activations(model, batches.ref_images, batch_size, device, progress, "reference")
    sample_acts = compute_activations(model, batches.sample_images, batch_size, device, progress, "samples")
    ref_stats, sample_stats = batches.ref_stats, batches.sample_stats

    metrics: dict = {"inception_score": inception_score(sample_acts.logits, split_size)}
    sources = {}
    for metric in ("fid", "sfid"):
        ref, sources[metric] = _statistics(ref_acts, ref_stats, metric)
        sample, _ = _statistics(sample_acts, sample_stats, metric)
        if ref is not None and ref[0].shape != sample[0].shape:
            raise ValueError(f"{metric}: reference statistics have {ref[0].shape[0]} features, "
                             f"the samples {sample[0].shape[0]}")
        metrics[metric] = None if ref is None else frechet_distance(*sample, *ref)
    if ref_acts is not None:
        metrics["precision"], metrics["recall"] = precision_recall(ref_acts.pool, sample_acts.pool, device=device)
    else:
        metrics["precision"] = metrics["recall"] = None
    metrics["num_samples"] = int(len(sample_acts.pool))
    metrics["num_reference"] = None if ref_acts is None else int(len(ref_acts.pool))
    metrics["reference_statistics"] = sources
    return metrics
