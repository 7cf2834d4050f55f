"""REPA's SiT (sihyun-yu/REPA ``models/sit.py``): SiT plus projection heads for representation
alignment.

Each projector (Linear-SiLU-Linear-SiLU-Linear, one per pretrained encoder) maps the residual
stream after block ``encoder_depth`` to that encoder's feature width; ``forward`` returns
``(out, zs)`` with ``zs[i]`` of shape ``[B, N, z_dims[i]]``. REPA's time runs the other way from
SiT's (t = 0 data, t = 1 noise): the network does not care, the loss and samplers do.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from masked_dit.models.dit import DiT
from masked_dit.models.registry import SIZES, register_config, register_family
from masked_dit.nn import run_blocks


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """Linear(D, P) - SiLU - Linear(P, P) - SiLU - Linear(P, z): keys ``0``, ``2``, ``4``."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


@register_family("repa_sit")
class REPASiT(DiT):
    """SiT with REPA projection heads. Arguments as REPA's constructor; ``path_type`` and
    ``use_cfg`` are recorded only (the loss/sampler use them), ``fused_attn`` is ignored (our
    attention op picks its own kernel). ``qk_norm`` is REPA's ``--qk-norm``: timm's LayerNorm on q and
    k (REPA's own code needs a timm from before ``norm_layer`` lost its default to run it; here it runs)."""

    def __init__(self, path_type: str = "edm", input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, decoder_hidden_size: int | None = None, encoder_depth: int = 8,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, use_cfg: bool = False, z_dims=(768,), projector_dim: int = 2048,
                 learn_sigma: bool = False, qk_norm: bool = False, fused_attn: bool | None = None):
        if decoder_hidden_size not in (None, hidden_size):
            # REPA's final layer takes decoder_hidden_size inputs straight from a hidden_size stream:
            # only equal widths can run (its SiT-S configs get this wrong; we do not copy that).
            raise ValueError(f"decoder_hidden_size ({decoder_hidden_size}) must equal hidden_size ({hidden_size})")
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}], got {encoder_depth}")
        super().__init__(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                         hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                         qk_norm=qk_norm)
        z_dims = [int(z) for z in z_dims]
        self.config.update(path_type=path_type, encoder_depth=encoder_depth, use_cfg=use_cfg, z_dims=z_dims,
                           projector_dim=projector_dim)
        self.path_type, self.use_cfg, self.encoder_depth, self.z_dims = path_type, use_cfg, encoder_depth, z_dims
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in z_dims])
        for proj in self.projectors:  # REPA's init: xavier Linears, zero biases (as DiT's basic init)
            for layer in proj:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """x [B, C, H, W], t [B] in [0, 1], y [B] -> (out [B, in_channels, H, W], zs list of [B, N, z_dim])."""
        x, c = self.embed(x, t, y)
        x = run_blocks(self.blocks[:self.encoder_depth], x, c)
        zs = [proj(x) for proj in self.projectors]  # the stream after block encoder_depth
        out = self.head(run_blocks(self.blocks[self.encoder_depth:], x, c), c)
        return (out[:, : self.in_channels] if self.learn_sigma else out), zs

    def forward_with_cfg(self, *args, **kwargs):
        raise NotImplementedError("REPA guides in its sampler (with a guidance interval), not in the model; "
                                  "use masked_dit's REPA samplers")


# REPA trains with DINOv2-B features (768-d) aligned after block 8 by default.
for _size, (_depth, _hidden, _heads) in SIZES.items():
    for _p in (2, 4, 8):
        register_config(f"REPA-SiT-{_size}/{_p}", "repa_sit", depth=_depth, hidden_size=_hidden, num_heads=_heads,
                        patch_size=_p)
