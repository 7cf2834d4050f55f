"""Inception-V3 as the FID literature uses it: a PyTorch port of TensorFlow's 2015-12-05 graph.

FID, sFID, Inception Score and precision/recall in the diffusion literature (ADM, DiT, SiT, MDT,
MaskDiT, REPA) come from ADM's evaluator (guided-diffusion/evaluations/evaluator.py), which runs
``classify_image_graph_def.pb`` from ``inception-2015-12-05.tgz`` in TensorFlow. This module
rebuilds that network in PyTorch with the parameter names of pytorch-fid's ported checkpoint
``pt_inception-2015-12-05-6726825d.pth`` (torchvision's ``Inception3`` names), so that file
loads unchanged. The graph differs from torchvision's Inception-V3 in three ways, all kept here:

* average pools inside the Inception blocks ignore the zero padding (TF ``AvgPool`` semantics,
  ``count_include_pad=False``);
* the last block (``Mixed_7c``, TF ``mixed_10``) max-pools in its pool branch instead of
  averaging (a quirk of that graph);
* the classifier has 1008 outputs.

Outputs, named after the TF tensors ADM reads:

* ``pool``     ``pool_3:0`` [B, 2048]: FID, precision and recall;
* ``spatial``  ``mixed_6/conv:0`` [B, 7 * 17 * 17 = 2023]: sFID. ``mixed_6`` is the third 17x17
  block (``Mixed_6d``) and ``conv`` its 1x1 branch (after BN + ReLU); ADM keeps the first 7
  channels and flattens in TF's NHWC order, which we copy so ADM's precomputed ``mu_s`` /
  ``sigma_s`` (e.g. in ``VIRTUAL_imagenet256_labeled.npz``) line up feature by feature;
* ``logits``   ``pool @ W`` [B, 1008], *without* the classifier bias, exactly as ADM builds its
  softmax for the Inception Score (it multiplies by the ``softmax/logits/MatMul`` weight only).

Deviations from ADM's TF evaluator (numbers differ slightly, typically in the 2nd-3rd digit of FID;
report which evaluator produced a number):

* convolutions run in PyTorch (cuDNN / CPU) instead of TF, in float32 with TF32 disabled;
* ``preprocess="pytorch-fid"`` (default, as pytorch-fid): images in [0, 255] -> [0, 1], bilinear
  resize to 299 with half-pixel centres (``F.interpolate(..., align_corners=False)``), then
  ``2x - 1``. The TF graph instead resizes with TF1's legacy ``ResizeBilinear`` (no half-pixel
  offset) and scales with ``(x - 128) / 128``; ``preprocess="tf"`` reproduces those two steps
  (closer to ADM, not the pytorch-fid convention);
* the weights are pytorch-fid's conversion of the same graph (identical values up to layout).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
NUM_CLASSES = 1008          # the 2015 graph's classifier (1000 ImageNet classes + 8 unused)
POOL_DIM = 2048
SPATIAL_CHANNELS = 7        # ADM keeps mixed_6/conv[..., :7]
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023
INPUT_SIZE = 299
PREPROCESS_MODES = ("pytorch-fid", "tf")


# -----------------------------------------------------------------------------
# Building blocks (torchvision's Inception3 module names, so checkpoints load)

class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's value) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's AvgPool with SAME padding averages over the valid pixels only.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (TF mixed, mixed_1, mixed_2)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 grid reduction (TF mixed_3)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF mixed_4 .. mixed_7)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor, return_branch1x1: bool = False):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        out = torch.cat([branch1x1, branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))], 1)
        return (out, branch1x1) if return_branch1x1 else out


class InceptionD(nn.Module):
    """17x17 -> 8x8 grid reduction (TF mixed_8)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 convolutions (TF mixed_9, mixed_10).

    ``pool="max"`` is the 2015 graph's quirk in its last block (mixed_10 max-pools its pool branch).
    """

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


# -----------------------------------------------------------------------------
# Input preprocessing

def _tf_legacy_resize_matrix(in_size: int, out_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[out, in] interpolation weights of TF1 ``ResizeBilinear`` (align_corners=False, no half-pixel
    centres): output pixel i samples input coordinate i * in / out."""
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.double()
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights.to(device=device, dtype=dtype)


def preprocess_images(images: torch.Tensor, mode: str = "pytorch-fid") -> torch.Tensor:
    """uint8 (or float in [0, 255]) images [B, 3, H, W] -> float32 [B, 3, 299, 299] network input."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"Inception expects images [B, 3, H, W], got {list(images.shape)}")
    x = images.float()
    if mode == "pytorch-fid":
        x = x / 255.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if mode == "tf":
        h, w = x.shape[-2:]
        if (h, w) != (INPUT_SIZE, INPUT_SIZE):
            rh = _tf_legacy_resize_matrix(h, INPUT_SIZE, x.dtype, x.device)
            rw = _tf_legacy_resize_matrix(w, INPUT_SIZE, x.dtype, x.device)
            x = torch.einsum("oh,bchw,pw->bcop", rh, x, rw)
        return (x - 128.0) / 128.0
    raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")


# -----------------------------------------------------------------------------
# The network

class InceptionOutputs(NamedTuple):
    pool: torch.Tensor      # [B, 2048]  pool_3
    spatial: torch.Tensor   # [B, 2023]  mixed_6/conv[..., :7], NHWC-flattened
    logits: torch.Tensor    # [B, 1008]  pool_3 @ W (no bias, as ADM's Inception Score)


class FIDInceptionV3(nn.Module):
    """The FID Inception-V3 (TF 2015-12-05 graph). forward: uint8-range images [B, 3, H, W]."""

    def __init__(self, preprocess: str = "pytorch-fid"):
        super().__init__()
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        self.preprocess = preprocess
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)   # TF mixed_6: sFID taps its 1x1 branch
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        x = preprocess_images(images, self.preprocess)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))          # 147x147
        x = F.max_pool2d(x, kernel_size=3, stride=2)                                  # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                                 # 71x71
        x = F.max_pool2d(x, kernel_size=3, stride=2)                                  # 35x35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))                            # 17x17
        x, mixed_6_conv = self.Mixed_6d(x, return_branch1x1=True)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))             # 8x8
        pool = x.mean(dim=(2, 3))
        # TF is NHWC: ADM's spatial[..., :7].reshape(B, -1) flattens as (h, w, c).
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        logits = pool @ self.fc.weight.T
        return InceptionOutputs(pool=pool, spatial=spatial, logits=logits)


# -----------------------------------------------------------------------------
# Weights

def _randomly_initialise(model: FIDInceptionV3, seed: int) -> None:
    # He-normal keeps activations O(1) through ~50 ReLU layers (PyTorch's default init shrinks them
    # towards zero), so the random network still gives informative features for tests.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * POOL_DIM ** -0.5)
                m.bias.zero_()


def load_inception_state_dict(model: FIDInceptionV3, state_dict: dict) -> FIDInceptionV3:
    """Strict load of a pytorch-fid style state dict; checkpoints converted from TF carry no
    ``num_batches_tracked`` counters (unused in eval), so only those may be absent."""
    state_dict = dict(state_dict)
    for name, buf in model.named_buffers():
        if name.endswith("num_batches_tracked") and name not in state_dict:
            state_dict[name] = buf.detach().clone()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"Inception weights do not match the FID Inception-V3: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return model


def load_fid_inception(weights: str | Path | None = None, *, random_init: bool = False, seed: int = 0,
                       device: str | torch.device = "cpu", preprocess: str = "pytorch-fid") -> FIDInceptionV3:
    """The FID Inception-V3 in eval mode on ``device``.

    weights: a local ``pt_inception-2015-12-05-6726825d.pth``; None downloads it (once, into the
    torch hub cache) from pytorch-fid's GitHub release. ``random_init=True`` skips the weights and
    returns a seeded random network of the same architecture: for tests only, its metrics mean
    nothing.
    """
    model = FIDInceptionV3(preprocess=preprocess)
    if random_init:
        if weights is not None:
            raise ValueError("pass either Inception weights or random_init=True, not both")
        _randomly_initialise(model, seed)
    else:
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"Inception weights not found: {path}")
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        else:
            try:
                state_dict = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=True)
            except Exception as err:  # offline, proxy, TLS...: say what to do instead
                raise OSError(f"could not download the FID Inception weights from {FID_WEIGHTS_URL} "
                                   f"({type(err).__name__}: {err}); pass a local copy with "
                                   f"--inception-weights PATH") from None
        load_inception_state_dict(model, state_dict)
    return model.eval().requires_grad_(False).to(device)
