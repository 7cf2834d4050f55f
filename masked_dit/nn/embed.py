"""Embedding layers shared by every family: patches, timesteps, labels, 2-D sin-cos positions.

Parameter names follow facebookresearch/DiT so official state_dicts load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from masked_dit import rng


#################################################################################
#                                 Patch embedding                               #
#################################################################################

class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> tokens [B, (H/p)(W/p), D] with one strided conv (timm's layout)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"expected input of shape [B, {self.in_chans}, {self.img_size}, {self.img_size}], got {list(x.shape)}")
        # The samplers and losses keep x_t in float32; a model cast to bf16 (or float64) takes it in its own
        # dtype, as the timestep embedder takes its frequencies.
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens [B, T, p*p*C] -> image [B, C, H, W] (inverse of PatchEmbed's order)."""
    B, T, _ = x.shape
    h = w = int(math.isqrt(T))
    if h * w != T:
        raise ValueError(f"unpatchify needs a square token grid, got {T} tokens")
    x = x.reshape(B, h, w, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * patch_size, w * patch_size)


#################################################################################
#                          Timestep and label embedding                         #
#################################################################################

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, [cos, sin] order as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: 256 sinusoidal frequencies, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; with dropout > 0 a last 'null' row serves classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None, generator=None):
        if force_drop_ids is None:
            # rng: a CPU generator may seed labels on another device (torch.rand(generator=, device=) fails there)
            drop = rng.rand((labels.shape[0],), generator=generator, device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids=None, generator=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)


def can_check_values(t: torch.Tensor) -> bool:
    """Data-dependent checks only where they cost no device sync and no graph break (eager, CPU)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_labels(y: torch.Tensor, num_valid: int, what: str) -> None:
    """Raises ValueError (one line, naming ``what``) if a label of a CPU tensor is outside ``[0, num_valid)``.

    Labels on an accelerator get an async device assert instead: a host check there would sync every
    forward (every sampler step, every micro-step), so the host could never run ahead of the GPU. The
    package's own label sources are checked on the host where they are made (the data set against
    --model.num_classes, ``sample_labels``). While compiling, a Python ``if`` would break the graph, so
    the check is the same in-graph assert (a bad label fails as a RuntimeError with the same text).
    """
    if not can_check_values(y):
        torch._assert_async(((y >= 0) & (y < num_valid)).all(), f"{what}: label out of range [0, {num_valid})")
        return
    if bool(((y < 0) | (y >= num_valid)).any()):  # min/max only on failure
        raise ValueError(f"{what}: class labels must be in [0, {num_valid - 1}] "
                         f"(got min {int(y.min())}, max {int(y.max())})")


def check_model_inputs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, in_channels: int, input_size: int,
                       num_label_rows: int, name: str) -> torch.Tensor:
    """Validates ``forward(x, t, y)`` of a class-conditional model with one-line errors naming the
    model and the argument; returns ``t`` as a [B] tensor (a scalar t is broadcast)."""
    for arg, value in (("input x", x), ("labels y", y)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} {arg} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} input x must be [B, C, H, W], got shape {list(x.shape)}")
    B, C, H, W = x.shape
    if C != in_channels:
        raise ValueError(f"{name} input x has {C} channels, the model expects in_channels={in_channels}")
    if H != input_size or W != input_size:
        raise ValueError(f"{name} input x is {H}x{W}, the model expects input_size={input_size} "
                         f"({input_size}x{input_size})")
    if not isinstance(t, torch.Tensor):
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise ValueError(f"{name} timesteps t must be a tensor or a number, got {type(t).__name__}")
        t = torch.tensor(t, device=x.device)  # a Python number: one timestep for the whole batch
    # One timestep or one label (shape [1]) serves the whole batch: the official models broadcast its
    # embedding over the batch, so the same call works here (the label stays [1]: one dropout draw, as theirs).
    if t.dim() == 0 or t.shape == (1,):
        t = t.reshape(1).expand(B)
    if t.shape != (B,):
        raise ValueError(f"{name} timesteps t must have shape [{B}] (one per sample) or [1], got {list(t.shape)}")
    if y.shape != (B,) and y.shape != (1,):
        raise ValueError(f"{name} labels y must have shape [{B}] (one per sample) or [1], got {list(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{name} labels y must be an integer tensor, got {y.dtype}")
    # With label dropout the last row is the null class (CFG), a valid label too.
    check_labels(y, num_label_rows, f"{name} labels y")
    return t


class OneHotLabelEmbedder(nn.Module):
    """MaskDiT's label embedder: one-hot (or soft) labels [B, num_classes] through a bias-free Linear.

    The null label for guidance is the zero vector, so no extra table row is needed.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.0):
        super().__init__()
        self.embedding_table = nn.Linear(num_classes, hidden_size, bias=False)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool = False, generator=None) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            keep = rng.rand((labels.shape[0], 1), generator=generator, device=labels.device) >= self.dropout_prob
            labels = labels * keep.to(labels.dtype)
        return self.embedding_table(labels.to(self.embedding_table.weight.dtype))


#################################################################################
#                          2-D sine-cosine positions                            #
#################################################################################

def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, embed_dim] fixed positions (MAE/DiT recipe: first half from the column
    coordinate, second half from the row coordinate), float32."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos positions need the width (hidden_size) divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    return emb.float()
