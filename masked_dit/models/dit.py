"""DiT (facebookresearch/DiT) and SiT (willisma/SiT) on the fused block.

Constructor arguments and state_dict keys are the official ones, so official checkpoints load
unchanged (``load_official``) and the fixtures reproduce to float32 round-off.

DiT takes integer ADM timesteps (0..999) and, with ``learn_sigma``, outputs ``2 * in_channels``
channels (eps, then the variance interpolation). SiT is the same network with continuous
``t in [0, 1]`` (t = 0 noise, t = 1 data) whose ``forward`` drops the learned-sigma half.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from masked_dit.diffusion.guidance import forward_with_cfg, guided_channel_count
from masked_dit.models.flops import FlopsMixin
from masked_dit.models.registry import register_family, register_sizes
from masked_dit.nn import (FinalLayer, FusedDiTBlock, LabelEmbedder, PatchEmbed, TimestepEmbedder, check_model_inputs,
                           init_dit_weights, run_blocks, sincos_pos_embed_2d, unpatchify)


#################################################################################
#                                   DiT                                         #
#################################################################################

@register_family("dit")
class DiT(FlopsMixin, nn.Module):
    """Diffusion transformer with adaLN-Zero blocks (Peebles & Xie, 2023). ``qk_norm`` is not DiT's: REPA's
    option (LayerNorm on each head's q and k), off by default."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, qk_norm: bool = False):
        super().__init__()
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                           qk_norm=qk_norm)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.learn_sigma, self.num_classes, self.num_heads = learn_sigma, num_classes, num_heads
        self.out_channels = in_channels * 2 if learn_sigma else in_channels

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos positions, a frozen Parameter as in the official code (it is in the state_dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([FusedDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_dit_weights(self)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size)[None])

    # --------------------------------------------------------------- inputs --
    @property
    def num_label_rows(self) -> int:
        """Valid labels are ``0 .. num_label_rows - 1`` (the last is the null class when CFG is trained)."""
        return self.y_embedder.embedding_table.num_embeddings

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Validates shapes and labels with one-line errors; returns t as a [B] tensor."""
        return check_model_inputs(x, t, y, in_channels=self.in_channels, input_size=self.input_size,
                                  num_label_rows=self.num_label_rows, name=type(self).__name__)

    # -------------------------------------------------------------- forward --
    def embed(self, x, t, y):
        """Tokens ``[B, N, D]`` (patches + positions) and conditioning ``c [B, D]``."""
        t = self.check_inputs(x, t, y)
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        return tokens, c

    def head(self, x, c):
        """Final adaLN layer and unpatchify: tokens -> ``[B, out_channels, H, W]``."""
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], t [B] diffusion timesteps, y [B] class labels -> [B, out_channels, H, W]."""
        x, c = self.embed(x, t, y)
        return self.head(run_blocks(self.blocks, x, c), c)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_channels: int | str | None = None) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half repeats the first with null labels.

        ``guide_channels=None`` (or 3) reproduces the official code, which guides only channels 0-2
        of the 4 latent channels (kept for reproducing published FIDs; a model with fewer than 3
        channels guides them all); ``"all"`` guides every predicted channel (all ``in_channels``;
        never the learned-sigma half).
        """
        return forward_with_cfg(self.forward, x, t, y, cfg_scale,
                                guided_channels=guided_channel_count(guide_channels, self.in_channels))


#################################################################################
#                                   SiT                                         #
#################################################################################

@register_family("sit")
class SiT(DiT):
    """Scalable interpolant transformer (Ma et al., 2024): DiT's network and keys, continuous
    t in [0, 1], and ``forward`` returns only the first ``in_channels`` (the velocity/score/noise
    prediction); a learned-sigma half, if present, is dropped as in the official code."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, t, y)
        return out[:, : self.in_channels] if self.learn_sigma else out


#################################################################################
#                                   Configs                                     #
#################################################################################

register_sizes("DiT", "dit")
register_sizes("SiT", "sit")
