"""Embedded default data: scikit-learn's bundled handwritten digits (no download).

1,797 real 8x8 grayscale scans (values 0..16) of the digits 0-9, upsampled to 16x16 or 32x32
and scaled to [-1, 1]. The train / held-out split is fixed (a seed-0 permutation; the last
297 images are held out) so every run and every evaluation sees the same images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NUM_HELD_OUT = 297
SPLITS = ("train", "heldout", "all")
SIZES = (8, 16, 32)


def load_digits_tensor(split: str = "train", image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(images [N, 1, S, S] float32 in [-1, 1], labels [N] int64)``."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; valid: {', '.join(SPLITS)}")
    if image_size not in SIZES:
        raise ValueError(f"digits image_size must be one of {SIZES} (got {image_size})")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(labels)))
    n_train = len(labels) - NUM_HELD_OUT
    if split == "train":
        order = order[:n_train]
    elif split == "heldout":
        order = order[n_train:]
    images, labels = images[order], labels[order]
    if image_size != 8:
        # Bilinear (not nearest) upsampling keeps strokes smooth instead of blocky.
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 2 - 1).contiguous(), labels


class DigitsDataset(torch.utils.data.Dataset):
    """In-memory digits; items are ``{'x': [1, S, S], 'y': int64}``."""

    num_classes = 10

    def __init__(self, split: str = "train", image_size: int = 16):
        self.images, self.labels = load_digits_tensor(split, image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        x = self.images[index]
        return {"x": x.flip(-1) if flip else x, "y": self.labels[index]}
