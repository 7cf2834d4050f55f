"""MaskDiT (Anima-Lab/MaskDiT): an EDM-preconditioned DiT whose encoder sees only the kept tokens.

Module structure mirrors the official ``EDMPrecond`` wrapping ``DiT`` as ``.model``, so released
checkpoints (keys ``model.*``) load strict into :class:`MaskDiT`.

- Encoder: DiT blocks (fixed sin-cos positions) on the kept tokens only (MAE recipe).
- ``decoder_layer``: LN + adaLN (shift, scale) + Linear(D -> decoder width) on the kept tokens.
- Learned ``mask_token`` inserted at the removed positions (the official model creates it only
  when ``mae_loss_coef > 0`` and uses zeros otherwise; the same here, so state_dicts match).
- Decoder: fixed sin-cos positions, ``decoder_depth`` blocks of ``decoder_hidden_size`` width
  conditioned on the encoder-wide embedding, final layer. Kept at inference (then unmasked).
- Labels: one-hot vectors through a bias-free Linear; the null label is the zero vector.
- EDM preconditioning: ``D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4)``.

The official model hard-codes the decoder at width 512, depth 8, 16 heads: those are the
defaults of the three constructor arguments here. Class-label dropout happens in the official
*training loop* (labels zeroed), not in the model; ``class_dropout_prob`` is stored for it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from masked_dit.models.registry import register_config, register_family, register_sizes
from masked_dit.nn.block import FinalLayer, FusedDiTBlock, init_dit_weights, run_blocks
from masked_dit.nn.embed import (OneHotLabelEmbedder, PatchEmbed, TimestepEmbedder, can_check_values, check_labels,
                                 sincos_pos_embed_2d, unpatchify)
from masked_dit.nn.masking import KeptTokens, random_masking


#################################################################################
#                        The network F (official ``DiT``)                       #
#################################################################################

class MaskDiTNet(nn.Module):
    """The official ``models/maskdit.py`` ``DiT`` (without its unused cls-token / feature options)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, learn_sigma=False, use_decoder=True, mae_loss_coef=0.1,
                 decoder_hidden_size=512, decoder_depth=8, decoder_num_heads=16):
        super().__init__()
        if use_decoder and (decoder_hidden_size % decoder_num_heads or decoder_hidden_size % 4):
            # (checked here so the message names the decoder, not the shared block's hidden_size)
            raise ValueError(f"decoder_hidden_size {decoder_hidden_size} must be divisible by decoder_num_heads "
                             f"{decoder_num_heads} and by 4 (2-D sin-cos decoder positions)")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.use_decoder = use_decoder
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = OneHotLabelEmbedder(num_classes, hidden_size) if num_classes else None
        self.num_patches = self.x_embedder.num_patches
        self.grid_size = self.x_embedder.grid_size
        # Fixed sin-cos positions, stored as frozen parameters (they are in the state_dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([FusedDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.mask_token = None
        final_hidden = hidden_size
        if use_decoder:
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, decoder_hidden_size),
                                                  requires_grad=False)
            # Per-token adaLN + Linear(D -> decoder width): a final layer with a 1x1 "patch".
            self.decoder_layer = FinalLayer(hidden_size, 1, decoder_hidden_size)
            self.decoder_blocks = nn.ModuleList([
                FusedDiTBlock(decoder_hidden_size, decoder_num_heads, mlp_ratio, cond_size=hidden_size)
                for _ in range(decoder_depth)])
            if mae_loss_coef > 0:
                self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
            final_hidden = decoder_hidden_size
        self.final_layer = FinalLayer(final_hidden, patch_size, self.out_channels, cond_size=hidden_size)
        self.initialize_weights()

    def initialize_weights(self):
        init_dit_weights(self)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)[None])
            if self.use_decoder:
                # (decoder_layer is a FinalLayer, so it is zeroed like one, as the reference does)
                dec_pos = sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size)
                self.decoder_pos_embed.copy_(dec_pos[None])
            if self.mask_token is not None:
                nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x, t, y, kept: KeptTokens | None = None):
        """x [B, C, H, W] (already scaled by c_in), t [B] (c_noise), y [B, num_classes] -> F [B, out, H, W]."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        block_kwargs = kept.block_kwargs() if kept is not None else {}
        h = kept.gather(tokens) if kept is not None else tokens
        h = run_blocks(self.blocks, h, c, **block_kwargs)
        if self.use_decoder:
            h = self.decoder_layer(h, c, segment_ids=block_kwargs.get("segment_ids"))
            if kept is not None:
                fill = self.mask_token if self.mask_token is not None else h.new_zeros(h.shape[-1])
                h = kept.scatter(h, fill)
            h = h + self.decoder_pos_embed
            h = run_blocks(self.decoder_blocks, h, c)
            out = self.final_layer(h, c)
        else:
            out = self.final_layer(h, c, segment_ids=block_kwargs.get("segment_ids"))
            if kept is not None:  # no decoder: removed patches predict zeros (as the reference)
                out = kept.scatter(out, out.new_zeros(out.shape[-1]))
        return unpatchify(out, self.patch_size, self.out_channels)


#################################################################################
#                       EDM preconditioning (``EDMPrecond``)                    #
#################################################################################

@register_family("maskdit")
class MaskDiT(nn.Module):
    """EDM-preconditioned MaskDiT denoiser ``D(x; sigma, labels)``; the network is ``self.model``.

    Constructor arguments are the network's (DiT names: ``input_size``, ``in_channels``, ...) plus
    the EDM ones (``sigma_data``, ``sigma_min``, ``sigma_max``).
    """
    preconditioned_network = "model"  # FSDP2 casts to bf16 at its input; the preconditioning stays fp32

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False, use_decoder=True,
                 mae_loss_coef=0.1, decoder_hidden_size=512, decoder_depth=8, decoder_num_heads=16,
                 mask_ratio=0.5, sigma_data=0.5, sigma_min=0.0, sigma_max=float("inf")):
        super().__init__()
        if learn_sigma:
            raise ValueError("MaskDiT's EDM preconditioning predicts the image only: learn_sigma must be False")
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.img_resolution, self.img_channels = input_size, in_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob  # applied by the training loop (labels zeroed)
        self.mask_ratio = float(mask_ratio)  # training default; forward masks only when asked
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.model = MaskDiTNet(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                                num_classes, learn_sigma, use_decoder, mae_loss_coef, decoder_hidden_size,
                                decoder_depth, decoder_num_heads)

    # ---------------------------------------------------------------- inputs

    def _check_inputs(self, x, sigma, class_labels):
        """-> (sigma [B] in float32 or wider, labels [B, num_classes] in x's dtype or None)."""
        name, size = type(self).__name__, self.img_resolution
        for arg, value in (("input x", x), ("class_labels", class_labels)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} {arg} must be a torch.Tensor, got {type(value).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} input x must be [B, C, H, W], got shape {list(x.shape)}")
        B, C, H, W = x.shape
        if C != self.img_channels:
            raise ValueError(f"{name} input x has {C} channels, the model expects in_channels={self.img_channels}")
        if H != size or W != size:
            raise ValueError(f"{name} input x is {H}x{W}, the model expects input_size={size} ({size}x{size})")
        # Preconditioning runs in float32 or wider, as the official EDMPrecond (only F sees x's dtype):
        # a bf16 sigma would round the noise level the network is told by up to 0.4%.
        # (A Python float goes straight to that dtype: as_tensor's float32 first would round an fp64 run's sigma.)
        sigma = torch.as_tensor(sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        if sigma.numel() not in (1, B):
            raise ValueError(f"{name} sigma must be a scalar or have {B} entries (one per sample), "
                             f"got {list(sigma.shape)}")
        sigma = sigma.reshape(-1).expand(B)
        # ln(sigma) is the noise input: sigma <= 0 would give the network -inf/NaN. The samplers never pass
        # it (EDM's last step uses the denoised value at sigma_min), so it is a caller's slip, named here.
        if can_check_values(sigma) and sigma.numel() and not bool((sigma > 0).all()):
            raise ValueError(f"{name} sigma must be > 0 (the network sees ln(sigma)), got min {float(sigma.min())}")
        if not self.num_classes:
            return sigma, None
        if class_labels is None:  # unconditional: the zero (null) label
            return sigma, x.new_zeros(B, self.num_classes)
        # One label for the whole batch (integer [1], one-hot [1, K] or [K]) is broadcast, as the official
        # EDMPrecond's reshape(-1, num_classes) broadcasts its embedding.
        if class_labels.dim() == 1 and not class_labels.dtype.is_floating_point:
            if class_labels.shape not in ((B,), (1,)):
                raise ValueError(f"{name} integer class_labels must have shape [{B}] or [1], "
                                 f"got {list(class_labels.shape)}")
            check_labels(class_labels, self.num_classes, f"{name} class_labels")
            return sigma, F.one_hot(class_labels.long(), self.num_classes).to(x.dtype).expand(B, -1)
        if class_labels.numel() not in (B * self.num_classes, self.num_classes):
            raise ValueError(f"{name} class_labels must be one-hot [{B}, {self.num_classes}] or integer [{B}], "
                             f"got {list(class_labels.shape)}")
        return sigma, class_labels.to(x.dtype).reshape(-1, self.num_classes).expand(B, -1)

    def _kept_tokens(self, B, device, mask_ratio, ids_keep, cu_seqlens, segment_ids, max_seqlen, generator):
        kept = KeptTokens.from_args(ids_keep, self.model.num_patches, B, cu_seqlens=cu_seqlens,
                                    segment_ids=segment_ids, max_seqlen=max_seqlen)
        if kept is not None or not mask_ratio:
            return kept
        ids_keep, _, _ = random_masking(B, self.model.num_patches, mask_ratio, generator=generator, device=device)
        return KeptTokens(ids_keep, self.model.num_patches, B)

    # ---------------------------------------------------------------- forward

    def _precondition(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (s ** 2 + self.sigma_data ** 2)
        c_out = s * self.sigma_data / (s ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + s ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x, sigma, class_labels=None, cfg_scale=None, *, ids_keep=None, ids_restore=None,
                cu_seqlens=None, segment_ids=None, max_seqlen=None, mask_ratio: float = 0.0, generator=None):
        """Denoised estimate D(x; sigma) [B, C, H, W].

        ``sigma`` scalar or [B]; ``class_labels`` one-hot [B, num_classes] (float, soft labels fine),
        integer [B], or None (unconditional). Masked when ``ids_keep`` is given (dense [B, K], or
        packed [T] with ``cu_seqlens`` [B+1] int32) or ``mask_ratio > 0`` (drawn from ``generator``):
        the encoder sees only the kept tokens and the decoder fills the rest with the mask token;
        the output is still a full image. ``ids_restore`` is accepted for MAE API symmetry.
        ``cfg_scale`` (positional, as the official EDM samplers pass it) means :meth:`forward_with_cfg`.
        Masks apply in train and eval mode alike: the official model ignores them in eval mode (it
        draws a mask and returns the unmasked output), which would make masked evaluation impossible.
        """
        if cfg_scale is not None:
            if ids_keep is not None or cu_seqlens is not None or mask_ratio:
                raise ValueError("MaskDiT guidance (cfg_scale) runs unmasked; do not pass masks with it")
            return self.forward_with_cfg(x, sigma, class_labels, cfg_scale)
        sigma, labels = self._check_inputs(x, sigma, class_labels)
        kept = self._kept_tokens(x.shape[0], x.device, mask_ratio, ids_keep, cu_seqlens, segment_ids, max_seqlen,
                                 generator)
        c_skip, c_out, c_in, c_noise = self._precondition(x, sigma)
        F_x = self.model((c_in * x).to(x.dtype), c_noise, labels, kept)
        return (c_skip * x + c_out * F_x.to(c_out.dtype)).to(x.dtype)

    def forward_with_cfg(self, x, sigma, class_labels, cfg_scale: float):
        """Guided D(x; sigma): conditional and unconditional (zero label) passes in one batch of 2B,
        ``uncond + cfg_scale (cond - uncond)`` on all channels (EDM sampling, e.g. scale 1.5).

        As the reference, guidance is applied to the network output F before preconditioning
        (D is affine in F, so this equals guiding D)."""
        sigma, labels = self._check_inputs(x, sigma, class_labels)
        if labels is None:
            raise ValueError("forward_with_cfg needs a class-conditional model (num_classes > 0)")
        c_skip, c_out, c_in, c_noise = self._precondition(x, sigma)
        x_in = (c_in * x).to(x.dtype)
        F_both = self.model(torch.cat([x_in, x_in]), torch.cat([c_noise, c_noise]),
                            torch.cat([labels, torch.zeros_like(labels)]))
        cond, uncond = F_both.to(c_out.dtype).chunk(2, dim=0)
        return (c_skip * x + c_out * (uncond + cfg_scale * (cond - uncond))).to(x.dtype)


#################################################################################
#                                   Configs                                     #
#################################################################################

# Anima-Lab/MaskDiT's ``--model_type`` choices are its ``DiT_models`` table: S/B/L/XL and H (depth 32,
# width 1280, 16 heads; MaskDiT only) at patch 2, 4 and 8, so every one of them has a name here.
register_sizes("MaskDiT", "maskdit", patch_sizes=(2, 4, 8))
for _p in (2, 4, 8):
    register_config(f"MaskDiT-H/{_p}", "maskdit", depth=32, hidden_size=1280, num_heads=16, patch_size=_p)
