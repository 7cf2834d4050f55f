"""REPA's preprocessing and token grids, and ``EncoderFeatures``: images or a batch -> ``zs``.

Each encoder brings its family's preprocessing (mean/std, resize order); its tokens are then put
on the diffusion model's token grid.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from masked_dit.data.encoders.backbones import PatchEncoder, load_encoder
from masked_dit.data.encoders.specs import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, repa_encoder_image_size

#################################################################################
#                            Preprocessing and tokens                           #
#################################################################################

def preprocess_images(images: torch.Tensor, image_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                      std: Sequence[float] = IMAGENET_DEFAULT_STD, resize_first: bool = False) -> torch.Tensor:
    """REPA's preprocessing (``preprocess_raw_image``): images [B, 3, H, W] -> normalised [B, 3, S, S].

    uint8 images are divided by 255; float images are taken in [-1, 1] (the data pipeline's
    range) and mapped with (x + 1) / 2. Then mean/std normalisation and a bicubic resize to
    ``image_size`` (align_corners=False, no antialias) in REPA's order: normalise first (DINOv2,
    I-JEPA), or resize first (``resize_first``: CLIP); bicubic weights sum to one, so the order
    only matters to rounding. Images already at ``image_size`` are not resampled (REPA feeds MoCo
    v3, MAE and DINOv1 the raw 256 px images). Floats stay in their precision (at least float32).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"encoder input must be RGB images [B, 3, H, W], got {list(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float() / 255
    elif images.is_floating_point():
        lo, hi = torch.aminmax(images.detach())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"float encoder input must lie in [-1, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                             "pass uint8 for [0, 255] images")
        x = (images.to(torch.promote_types(images.dtype, torch.float32)) + 1) / 2
    else:
        raise ValueError(f"encoder input must be uint8 or floating point, got {images.dtype}")
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    resize = tuple(x.shape[-2:]) != (image_size, image_size)
    if resize and resize_first:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = (x - mean_t) / std_t
    if resize and not resize_first:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return x


def resample_token_grid(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Tokens [B, g*g, D] (row-major grid) -> [B, grid_size**2, D] on the diffusion model's token grid.

    Identity when the grids agree (DINOv2 at 224 and a /2 model on 32x32 latents: both 16x16).
    Shrinking by an integer factor averages each k x k block (the encoder tokens a model token
    covers); any other size is a bilinear resize (align_corners=False, antialiased when shrinking).
    """
    if tokens.dim() != 3:
        raise ValueError(f"encoder tokens must be [B, T, D], got {list(tokens.shape)}")
    B, T, D = tokens.shape
    g = int(round(T ** 0.5))
    if g * g != T:
        raise ValueError(f"{T} encoder tokens do not form a square grid")
    if g == grid_size:
        return tokens
    grid = tokens.transpose(1, 2).reshape(B, D, g, g)
    if g % grid_size == 0:
        grid = F.avg_pool2d(grid, g // grid_size)
    else:
        grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bilinear", align_corners=False,
                             antialias=grid_size < g)
    return grid.reshape(B, D, grid_size * grid_size).transpose(1, 2)


#################################################################################
#                              Features for training                            #
#################################################################################

_AUTOCAST = {None: None, "float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}


class EncoderFeatures:
    """``features(images or batch) -> zs``: frozen encoders' patch tokens on the model's token grid.

    One encoder gives a tensor [B, T, z_dim], several a list (REPA's ``zs``); either is what
    ``REPAObjective(encoder=features)`` accepts. Batches (dicts) are read at ``image_key``.
    Runs under no_grad (not inference_mode: the loss uses the features next to tensors that need
    grad), optionally under bf16/fp16 autocast (REPA runs its encoder under the training autocast);
    returns float32.
    """

    def __init__(self, encoders: Union[PatchEncoder, Sequence[PatchEncoder]], token_grid: Optional[int] = None,
                 autocast_dtype: Optional[str] = None, image_key: str = "image"):
        self.encoders = [encoders] if isinstance(encoders, nn.Module) else list(encoders)
        if not self.encoders:
            raise ValueError("EncoderFeatures needs at least one encoder")
        if autocast_dtype not in _AUTOCAST:
            raise ValueError(f"unknown autocast dtype {autocast_dtype!r}; valid: float32, bfloat16, float16")
        self.token_grid, self.autocast_dtype, self.image_key = token_grid, _AUTOCAST[autocast_dtype], image_key
        for enc in self.encoders:
            enc.requires_grad_(False).eval()

    @property
    def z_dims(self) -> list[int]:
        return [enc.z_dim for enc in self.encoders]

    @property
    def num_tokens(self) -> list[int]:
        return [(self.token_grid or enc.grid_size) ** 2 for enc in self.encoders]

    @property
    def name(self) -> str:
        return ",".join(enc.name for enc in self.encoders)

    def check_model(self, model) -> None:
        """Raise unless ``model`` (REPA-SiT) projects to these encoders' widths."""
        z_dims = list(getattr(model, "z_dims", []))
        if z_dims != self.z_dims:
            raise ValueError(f"model projects to z_dims={z_dims} but the encoders give {self.z_dims} "
                             f"({self.name}); set the model's z_dims to match")

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def __call__(self, images_or_batch):
        if isinstance(images_or_batch, dict):
            if self.image_key not in images_or_batch:
                raise ValueError(f"batch has no {self.image_key!r} images for the REPA encoder (keys: "
                                 f"{', '.join(images_or_batch)}); cache features with extract_encoder_features "
                                 "or load images with the batch")
            images = images_or_batch[self.image_key]
        else:
            images = images_or_batch
        zs = []
        for enc in self.encoders:
            param = next(enc.parameters())
            pixels = preprocess_images(images.to(param.device), enc.image_size, enc.mean, enc.std, enc.resize_first)
            with self._autocast(param.device):
                z = enc(pixels.to(param.dtype))
            z = z.float()
            zs.append(resample_token_grid(z, self.token_grid) if self.token_grid else z)
        return zs[0] if len(zs) == 1 else zs


def load_encoder_features(specs: Union[str, Sequence[str]], *, model=None, token_grid: Optional[int] = None,
                          device: Union[str, torch.device] = "cpu", image_size: Optional[int] = None,
                          resolution: Optional[int] = None, autocast_dtype: Optional[str] = None,
                          image_key: str = "image", backend: Optional[str] = None) -> EncoderFeatures:
    """``EncoderFeatures`` for comma-separated specs (REPA's ``--enc-type=dinov2-vit-b,...``).

    Each encoder's input side is ``image_size`` when given, else REPA's for ``resolution`` px
    images (``repa_encoder_image_size(resolution, spec)``: 224 at 256 px, 256 for MoCo v3, MAE,
    DINOv1), else its size at 256 px. With ``model`` (a REPA-SiT) the token grid is its
    ``input_size // patch_size`` and its ``z_dims`` are checked against the encoders'.
    """
    names = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    if model is not None and token_grid is None:
        token_grid = model.input_size // model.patch_size
    encoders = [load_encoder(s, device, backend=backend, image_size=image_size or (
        repa_encoder_image_size(resolution, s) if resolution else None)) for s in names if s]
    features = EncoderFeatures(encoders, token_grid, autocast_dtype, image_key)
    if model is not None:
        features.check_model(model)
    return features
