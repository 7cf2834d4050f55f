"""MDT (Masked Diffusion Transformer, sail-sg/MDT): MDTv2 and the original MDT (v1).

Official constructor arguments and state_dict keys, so released checkpoints load strict.

Both versions embed patches, run an *encoder* on the kept tokens only (the MAE recipe), put
mask tokens back at the removed positions and let a *side-interpolater* block predict them
(training only), then run the *decoder* on all tokens. Every block adds a BEiT relative-position
bias; over kept tokens the attention op reads the bias at the kept tokens' positions
(``ids_keep``) instead of materialising the official ``[B, H, K, K]`` gathered copy.

MDTv2 (``MDTv2``, family ``mdtv2``): U-Net-like encoder ``en_inblocks`` -> ``en_outblocks`` with
long skips (LIFO), decoder ``de_blocks`` each merging the patch embedding of the *whole* image
(the dense input shortcut) through ``skip_linear``; a training mask ratio of
``mask_ratio + 0.2 U(0, 1)`` drawn once per step.

MDT v1 (``MDT``, family ``mdtv1``; MDT before commit 75ee9a9 "mdtv2"): one plain stack
``blocks``; the first ``depth - decode_layer`` are the encoder, the side-interpolater (or, when
not masking, ``decoder_pos_embed``) sits in front of block ``depth - decode_layer``; no skips,
no input shortcut; the training mask ratio is exactly ``mask_ratio``.

Beyond the official code: masks may be given (``ids_keep``, dense ``[B, K]``), or be packed
with a different keep count per sample (``ids_keep [T]`` + ``cu_seqlens``) without padding.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from masked_dit.diffusion.guidance import forward_with_cfg, guided_channel_count, power_cosine_scale
from masked_dit.models.registry import register_family, register_sizes
from masked_dit.nn.block import FinalLayer, FusedDiTBlock, init_dit_weights, run_blocks
from masked_dit.nn.embed import (LabelEmbedder, PatchEmbed, TimestepEmbedder, check_model_inputs, sincos_pos_embed_2d,
                                 unpatchify)
from masked_dit.nn.masking import KeptTokens, random_masking, sample_mdt_mask_ratio


#################################################################################
#                       Shared pieces of both MDT versions                      #
#################################################################################

class _MDTBase(nn.Module):
    """Embeddings, positions, mask token, side-interpolater, head and guidance shared by v1 and v2."""

    # MDTv2 widens the sampled ratio by this much (0.3 -> U(0.3, 0.5)); v1 uses the ratio as is.
    mask_ratio_spread = 0.0

    def __init__(self, input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, class_dropout_prob,
                 num_classes, learn_sigma, mask_ratio, decode_layer):
        super().__init__()
        if mask_ratio is not None and not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be None or in [0, 1), got {mask_ratio}")
        self.learn_sigma = learn_sigma
        self.input_size, self.in_channels = input_size, in_channels  # as DiT's (sampling reads input_size)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.decode_layer = int(decode_layer)
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = self.x_embedder.num_patches
        self.grid_size = self.x_embedder.grid_size
        if self.mask_ratio is not None:
            # Training draws ratios up to mask_ratio + spread (v2: + 0.2 U); each draw must keep a token.
            # (The reference's int(L (1 - ratio)) goes negative past 1 and silently keeps L - 1 tokens.)
            top = self.mask_ratio + self.mask_ratio_spread
            if top >= 1.0 or self.num_patches * (1.0 - top) < 1.0:
                raise ValueError(f"mask_ratio={mask_ratio} (+ spread {self.mask_ratio_spread}) may keep no token of "
                                 f"the {self.num_patches} patches; {type(self).__name__} needs "
                                 f"mask_ratio + {self.mask_ratio_spread} <= 1 - 1/{self.num_patches}")
        # Both position tables are learnable (sin-cos init) in MDT, unlike DiT.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size))
        # Always in the state_dict; frozen (and zero) when the model is not trained with masks.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=mask_ratio is not None)

    def _block(self, hidden_size, mlp_ratio, skip=False):
        return FusedDiTBlock(hidden_size, self.num_heads, mlp_ratio, skip=skip, rel_pos_grid=self.grid_size)

    def _finish_init(self, hidden_size, mlp_ratio):
        self.sideblocks = nn.ModuleList([self._block(hidden_size, mlp_ratio)])
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        init_dit_weights(self)
        pos = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)[None]
        with torch.no_grad():
            self.pos_embed.copy_(pos)
            self.decoder_pos_embed.copy_(pos)
            if self.mask_ratio is not None:
                nn.init.normal_(self.mask_token, std=0.02)

    # ---------------------------------------------------------------- inputs

    def check_inputs(self, x, t, y):
        """Validates shapes and labels with one-line errors; returns t as a [B] tensor."""
        return check_model_inputs(x, t, y, in_channels=self.in_channels, input_size=self.x_embedder.img_size,
                                  num_label_rows=self.y_embedder.embedding_table.num_embeddings,
                                  name=type(self).__name__)

    def _kept_tokens(self, B, device, enable_mask, ids_keep, cu_seqlens, segment_ids, max_seqlen, generator):
        kept = KeptTokens.from_args(ids_keep, self.num_patches, B, cu_seqlens=cu_seqlens, segment_ids=segment_ids,
                                    max_seqlen=max_seqlen)
        if kept is not None or not enable_mask or self.mask_ratio is None:
            return kept  # as the official forward: enable_mask without a mask_ratio is a plain forward
        ratio = sample_mdt_mask_ratio(self.mask_ratio, generator, spread=self.mask_ratio_spread, device=device) \
            if self.mask_ratio_spread else self.mask_ratio
        ids_keep, _, _ = random_masking(B, self.num_patches, ratio, generator=generator, device=device)
        return KeptTokens(ids_keep, self.num_patches, B)

    # ---------------------------------------------------------------- pieces

    def embed(self, x, t, y, generator=None):
        """Patch tokens + positions [B, N, D] and the conditioning c = t_emb + y_emb [B, D]."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, generator=generator)
        return tokens, c

    def side_interpolate(self, x_keep, c, kept: KeptTokens):
        """Mask tokens at the removed positions, decoder positions, one side block whose output is
        used at the removed positions only (the kept ones pass through unchanged)."""
        x = kept.scatter(x_keep, self.mask_token) + self.decoder_pos_embed
        x_before = x
        for block in self.sideblocks:
            x = block(x, c)
        return torch.where(kept.removed().unsqueeze(-1), x, x_before)

    def unpatchify(self, x):
        """Tokens [B, N, p*p*out_channels] -> image [B, out_channels, H, W] (official method name)."""
        return unpatchify(x, self.patch_size, self.out_channels)

    def head(self, x, c):
        return self.unpatchify(self.final_layer(x, c))

    # ---------------------------------------------------------------- forward

    def forward(self, x, t, y, enable_mask: bool = False, *, ids_keep=None, ids_restore=None, cu_seqlens=None,
                segment_ids=None, max_seqlen=None, generator=None):
        """x [B, C, H, W], t [B] diffusion steps, y [B] labels -> [B, out_channels, H, W].

        Masked training path when ``ids_keep`` is given (dense [B, K], or packed [T] with
        ``cu_seqlens`` [B+1] int32 and optionally ``segment_ids``/``max_seqlen``), or when
        ``enable_mask`` is set and the model has a ``mask_ratio`` (the official training call:
        the model draws its ratio and mask from ``generator``). ``ids_restore`` is accepted for
        API symmetry with MAE; the mask tokens are placed from ``ids_keep`` alone. Under
        ``torch.compile`` pass the indices (and ``max_seqlen`` when packed): drawing a mask or
        deriving a packed length needs host values and would break the graph.
        """
        t = self.check_inputs(x, t, y)
        tokens, c = self.embed(x, t, y, generator)
        kept = self._kept_tokens(x.shape[0], x.device, enable_mask, ids_keep, cu_seqlens, segment_ids, max_seqlen,
                                 generator)
        return self.head(self.forward_tokens(tokens, c, kept), c)

    def forward_with_cfg(self, x, t, y, cfg_scale=None, diffusion_steps=1000, scale_pow=4.0,
                         guide_channels: int | str | None = None):
        """Classifier-free guidance with MDT's power-cosine schedule, as the official sampler calls it.

        The batch is ``[cond; uncond]`` (labels of the second half are the null class); the first
        half of ``x`` is used for both. The scale grows from 1 at t = T to ``cfg_scale`` at t = 0:
        ``s = (1 - cos((1 - t/T) ** scale_pow * pi)) / 2``, ``scale = (cfg_scale - 1) s + 1``.
        ``guide_channels=None`` (or 3) reproduces the official code (channels 0-2 of 4; all of
        them when the model has fewer than 3); ``"all"`` guides every predicted channel (never the
        learned-sigma half). ``cfg_scale=None``: plain forward.
        """
        if cfg_scale is None:
            return self.forward(x, t, y)
        t = torch.as_tensor(t, device=x.device)  # the schedule reads t: a Python number is fine too
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        schedule = functools.partial(power_cosine_scale, scale_pow=scale_pow, num_timesteps=diffusion_steps)
        return forward_with_cfg(self.forward, x, t, y, cfg_scale, schedule=schedule,
                                guided_channels=guided_channel_count(guide_channels, self.in_channels))


#################################################################################
#                                    MDTv2                                      #
#################################################################################

@register_family("mdtv2")
class MDTv2(_MDTBase):
    """Masked Diffusion Transformer v2 (sail-sg/MDT ``masked_diffusion/models.py``)."""

    mask_ratio_spread = 0.2

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, mask_ratio=None,
                 decode_layer=4):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, class_dropout_prob,
                         num_classes, learn_sigma, mask_ratio, decode_layer)
        encoder_depth = depth - self.decode_layer
        if self.decode_layer < 0 or encoder_depth < 0 or encoder_depth % 2:
            # The reference silently drops a block here ((depth - decode_layer) // 2 twice).
            raise ValueError(f"MDTv2 needs depth - decode_layer to be even and >= 0 (en_inblocks and en_outblocks "
                             f"are halves), got depth={depth}, decode_layer={decode_layer}")
        self.depth = depth
        self.half_depth = encoder_depth // 2
        self.en_inblocks = nn.ModuleList([self._block(hidden_size, mlp_ratio) for _ in range(self.half_depth)])
        self.en_outblocks = nn.ModuleList([self._block(hidden_size, mlp_ratio, skip=True)
                                           for _ in range(self.half_depth)])
        self.de_blocks = nn.ModuleList([self._block(hidden_size, mlp_ratio, skip=True)
                                        for _ in range(self.decode_layer)])
        self._finish_init(hidden_size, mlp_ratio)

    def forward_tokens(self, tokens, c, kept: KeptTokens | None):
        """Blocks on embedded tokens [B, N, D] -> decoder output [B, N, D]."""
        input_skip = tokens  # dense input shortcut: every decoder block sees the full embedding
        block_kwargs = kept.block_kwargs() if kept is not None else {}
        x = kept.gather(tokens) if kept is not None else tokens
        skips = []
        for block in self.en_inblocks:
            x = block(x, c, **block_kwargs)
            skips.append(x)
        for block in self.en_outblocks:
            x = block(x, c, skip=skips.pop(), **block_kwargs)
        x = self.side_interpolate(x, c, kept) if kept is not None else x + self.decoder_pos_embed
        for block in self.de_blocks:
            x = block(x, c, skip=input_skip)
        return x


#################################################################################
#                                  MDT (v1)                                     #
#################################################################################

@register_family("mdtv1")
class MDT(_MDTBase):
    """The original Masked Diffusion Transformer (sail-sg/MDT before the v2 commit 75ee9a9).

    ``decode_layer`` was a required argument upstream (``None`` crashed); the released MDT-XL/2
    checkpoint (``mdt_xl2_v1_ckpt.pt``) and the training scripts use 2, which is the default here.
    Upstream v1 trained with the plain ADM loss (no min-SNR weight; v2 added it) and evaluated with
    250 DDPM steps, cfg 3.8, ``scale_pow`` 4 (its demo: 500 steps, cfg 5.0, ``scale_pow`` 0.01).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, mask_ratio=None,
                 decode_layer=2):
        if decode_layer is None:
            raise ValueError("MDT (v1) needs decode_layer (the released checkpoint uses 2)")
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, class_dropout_prob,
                         num_classes, learn_sigma, mask_ratio, decode_layer)
        if not 1 <= self.decode_layer <= depth:
            raise ValueError(f"MDT (v1) needs 1 <= decode_layer <= depth, got decode_layer={decode_layer}, "
                             f"depth={depth}")
        self.depth = depth
        self.blocks = nn.ModuleList([self._block(hidden_size, mlp_ratio) for _ in range(depth)])
        self._finish_init(hidden_size, mlp_ratio)

    def forward_tokens(self, tokens, c, kept: KeptTokens | None):
        """Blocks on embedded tokens [B, N, D] -> decoder output [B, N, D]."""
        encoder_depth = self.depth - self.decode_layer
        block_kwargs = kept.block_kwargs() if kept is not None else {}
        x = kept.gather(tokens) if kept is not None else tokens
        x = run_blocks(self.blocks[:encoder_depth], x, c, **block_kwargs)
        x = self.side_interpolate(x, c, kept) if kept is not None else x + self.decoder_pos_embed
        return run_blocks(self.blocks[encoder_depth:], x, c)


#################################################################################
#                                   Configs                                     #
#################################################################################

# Upstream ships MDTv2 at patch 2 and MDT v1 at 2/4/8; the bias works on any grid, so both get all three.
register_sizes("MDTv2", "mdtv2", patch_sizes=(2, 4, 8))
register_sizes("MDTv1", "mdtv1", patch_sizes=(2, 4, 8))
