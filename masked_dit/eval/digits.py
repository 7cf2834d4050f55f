"""Offline quality metric for the embedded digits dataset (no download, runs in CI).

A small CNN trained on the real 8x8 digits (the training split of :mod:`masked_dit.data.digits`) scores generated
images, after area-downsampling them to 8x8:

* **conditional accuracy** - share of samples classified as the label they were asked for;
* **feature Fréchet distance** - FID-style distance in the classifier's penultimate features
  between generated and held-out real digits.

The classifier (about 40k parameters) ships with the package, made by :func:`train_classifier`
(fixed seed, seconds on CPU); without the file it is retrained and cached (``MASKED_DIT_CACHE``
or ``~/.cache/masked_dit``), its held-out accuracy checked (>= 97%) each time it is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from masked_dit.data.digits import load_digits_tensor
from masked_dit.eval.fid import frechet_distance_from_features

CLASSIFIER_VERSION = 2


def heldout_digits(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out real digits (the data module's fixed split), images in [-1, 1]."""
    return load_digits_tensor("heldout", image_size)


class DigitsClassifier(nn.Module):
    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, H, W] in [-1, 1], any H = W multiple of 8 (area-downsampled to 8x8)."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"digits classifier expects [B, 1, H, W] images, got {list(x.shape)}")
        if x.shape[-1] != 8 or x.shape[-2] != 8:
            x = F.adaptive_avg_pool2d(x, 8)
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.fc(F.max_pool2d(h, 2).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ASSET = Path(__file__).resolve().parents[1] / "assets" / f"digits_classifier_v{CLASSIFIER_VERSION}.pt"


def _cache_path() -> Path:
    root = Path(os.environ.get("MASKED_DIT_CACHE", Path.home() / ".cache" / "masked_dit"))
    return root / f"digits_classifier_v{CLASSIFIER_VERSION}.pt"


def _shift_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (zero = background -1 padding)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def train_classifier(epochs: int = 60, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Trains the classifier on the training split; returns it and its held-out accuracy."""
    x, y = load_digits_tensor("train", 8)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), 64):
            b = perm[start:start + 64]
            loss = F.cross_entropy(model(_shift_augment(x[b], g)), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    x_held, y_held = heldout_digits()
    with torch.no_grad():
        pred = model(x_held).argmax(1)
    return model, (pred == y_held).float().mean().item()


_MODEL: DigitsClassifier | None = None


def load_classifier() -> DigitsClassifier:
    """The shipped classifier (else a cached one, else trained now and cached)."""
    global _MODEL
    if _MODEL is not None:
        return _MODEL
    path = _cache_path()
    model = DigitsClassifier()
    for candidate in (ASSET, path):
        if not candidate.is_file():
            continue
        try:
            model.load_state_dict(torch.load(candidate, map_location="cpu", weights_only=True))
            model.eval()
            _MODEL = model
            return model
        except (RuntimeError, OSError, EOFError):
            pass  # corrupt or stale cache: retrain below
    model, accuracy = train_classifier()
    if accuracy < 0.97:
        raise RuntimeError(f"digits classifier reached only {accuracy:.3f} held-out accuracy (< 0.97)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: concurrent processes never see half a file
    _MODEL = model
    return model


@dataclass
class DigitsScore:
    conditional_accuracy: float
    feature_fd: float

    def as_dict(self) -> dict[str, float]:
        return {"digits_cond_acc": self.conditional_accuracy, "digits_fd": self.feature_fd}


_HELDOUT_FEATURES: dict[int, np.ndarray] = {}


@torch.no_grad()
def heldout_features(image_size: int = 8) -> np.ndarray:
    """Classifier features of the held-out digits at ``image_size``: the same upsample-then-
    downsample path as generated images take, so real digits score a distance of zero."""
    if image_size not in _HELDOUT_FEATURES:
        _HELDOUT_FEATURES[image_size] = load_classifier().features(heldout_digits(image_size)[0]).numpy()
    return _HELDOUT_FEATURES[image_size]


@torch.no_grad()
def score_digits(images: torch.Tensor, labels: torch.Tensor) -> DigitsScore:
    """Scores generated digits: images [B, 1 or C, H, W] in [-1, 1] (channels averaged), labels [B]."""
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got {list(images.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] < 2:
        raise ValueError("need at least 2 images for the feature Fréchet distance")
    x = images.detach().float().cpu().clamp(-1, 1).mean(1, keepdim=True)
    model = load_classifier()
    feats = model.features(x)
    pred = model.head(feats).argmax(1)
    acc = (pred == labels.cpu()).float().mean().item()
    fd = frechet_distance_from_features(feats.numpy(), heldout_features(images.shape[-1]))
    return DigitsScore(conditional_accuracy=acc, feature_fd=fd)
