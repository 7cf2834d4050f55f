"""The baseline of the benchmarks: each network written the way its official repository runs it.

Same networks, same state_dict keys as :mod:`masked_dit.models` (a reference model loads our
model's ``state_dict()`` strictly, and the tests check the outputs agree), but built from the
official repos' plain pieces, eager and unfused:

- ``nn.LayerNorm`` + ``modulate`` (``x * (1 + scale) + shift``) and separate gated residuals;
- attention as the repos compute it: timm's ``Attention`` (DiT, SiT, MaskDiT, REPA import it;
  timm >= 0.9 calls ``F.scaled_dot_product_attention`` there, older timm an explicit softmax)
  and MDT's own explicit softmax with the relative-position bias materialised per block
  (gathered to ``[B, H, K, K]`` at the kept tokens); ``attention="softmax"`` forces the explicit
  softmax everywhere (the old-timm baseline);
- masked gathers ``torch.gather(x, 1, ids.unsqueeze(-1).repeat(1, 1, D))`` (an int64 index of
  B*K*D elements) and MAE-style unshuffles with ``ids_restore``;
- each repo's training precision and optimizer (``RECIPES``; the benchmark applies them);
- REPA's frozen DINOv2-B/14 encoder (:class:`RefDINOv2`), run on raw images every step as REPA's
  ``train.py`` does (the package trains on precomputed features instead).

The embedders (patch conv, timestep MLP, label table) are the official ones already, so they are
reused from :mod:`masked_dit.nn.embed`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from masked_dit.models.repa import build_projector
from masked_dit.nn.block import Mlp
from masked_dit.nn.embed import LabelEmbedder, OneHotLabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify

# How each official repo trains (NOTES.md "Reference-style baselines" cites the lines). precision: 'fp32'
# or 'fp16' (autocast + GradScaler); tf32: TF32 *matmuls* (cuDNN convolutions keep torch's default, TF32 on,
# which no repo turns off); cudnn_benchmark: the repo sets torch.backends.cudnn.benchmark = True;
# fused_optimizer: a single-kernel optimizer step (MaskDiT: apex FusedAdam -> torch's fused AdamW; MDT: sail-sg
# Adan(fused=True), a CUDA multi-tensor kernel -> our single-pass Triton Adan, which moves fewer bytes than
# theirs, so the baseline errs fast), else AdamW's default (foreach on CUDA).
RECIPES = {
    "dit": dict(precision="fp32", tf32=True, cudnn_benchmark=False, optimizer="adamw", fused_optimizer=False,
                grad_clip=0.0, attention="sdpa",
                source="DiT train.py: fp32 with TF32, AdamW (foreach), no clip, per-parameter EMA loop"),
    "sit": dict(precision="fp32", tf32=True, cudnn_benchmark=False, optimizer="adamw", fused_optimizer=False,
                grad_clip=0.0, attention="sdpa", source="SiT train.py (DiT's loop): fp32 with TF32, AdamW (foreach)"),
    "repa_sit": dict(precision="fp16", tf32=True, cudnn_benchmark=False, optimizer="adamw", fused_optimizer=False,
                     grad_clip=1.0, attention="sdpa",
                     source="REPA train.py: accelerate fp16 autocast + GradScaler, --allow-tf32, AdamW (foreach), "
                            "clip 1.0, fused_attn=True (SDPA); DINOv2-B/14 forward on the raw images every step "
                            "(no_grad, same autocast; off with --ref-no-encoder)"),
    "mdtv2": dict(precision="fp32", tf32=False, cudnn_benchmark=False, optimizer="adan", fused_optimizer=True,
                  grad_clip=1.0, attention="softmax",
                  source="MDT train_util.py: fp32 (no TF32 flag), two passes, Adan(fused=True, max_grad_norm=1), "
                         "explicit softmax + materialised relative-position bias"),
    "maskdit": dict(precision="fp16", tf32=False, cudnn_benchmark=True, optimizer="adamw", fused_optimizer=True,
                    grad_clip=0.0, attention="sdpa",
                    source="MaskDiT train_wds.py: accelerate fp16 + GradScaler, config tf32 False, cudnn.benchmark, "
                           "apex FusedAdam; the official run also torch.compiles the network, this baseline stays eager"),
}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gather_tokens(x, ids):
    """The official gather: an int64 index of x's batch x len(ids) x width elements."""
    return torch.gather(x, 1, ids.unsqueeze(-1).repeat(1, 1, x.shape[-1]))


#################################################################################
#                                 Blocks                                        #
#################################################################################

class RelPosBias(nn.Module):
    """MDT's BEiT bias: table ``[(2g-1)^2 + 3, H]`` and a fixed ``[N, N]`` index (both in the state_dict)."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        from masked_dit.ops.attention import relative_position_index

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=True)

    def forward(self, ids_keep=None):
        """[1, H, N, N], or gathered at the kept tokens [B, H, K, K] as MDT does (twice, via repeat)."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        bias = bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if ids_keep is None:
            return bias
        B, K = ids_keep.shape
        H = bias.shape[1]
        bias = bias.repeat(B, 1, 1, 1)
        bias = torch.gather(bias, 2, ids_keep[:, None, :, None].repeat(1, H, 1, n))
        return torch.gather(bias, 3, ids_keep[:, None, None, :].repeat(1, H, K, 1))


class Attention(nn.Module):
    """``scale_q``: the explicit softmax scales ``q`` before the product instead of the scores after it
    (DINOv2's form, see :class:`DinoBlock`)."""

    def __init__(self, dim: int, num_heads: int, rel_pos_grid: int | None = None, impl: str = "softmax",
                 scale_q: bool = False):
        super().__init__()
        if impl not in ("softmax", "sdpa"):
            raise ValueError(f"reference attention must be 'softmax' or 'sdpa', got {impl!r}")
        self.num_heads, self.head_dim, self.impl, self.scale_q = num_heads, dim // num_heads, impl, scale_q
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelPosBias(rel_pos_grid, num_heads) if rel_pos_grid else None

    def forward(self, x, ids_keep=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.impl == "sdpa" and self.rel_pos_bias is None:
            x = F.scaled_dot_product_attention(q, k, v)
        elif self.scale_q:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            # Scaled after the product, on the [B, H, N, N] scores, as MDT and timm < 0.9 do (one more
            # pass over the scores than scaling q, the cost the official step pays).
            attn = (q @ k.transpose(-2, -1)) * self.scale
            if self.rel_pos_bias is not None:
                attn = attn + self.rel_pos_bias(ids_keep)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """DiT's adaLN-Zero block (plus MDT's skip_linear and bias, MaskDiT's decoder cond width)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, *, cond_size=None, skip=False, rel_pos_grid=None,
                 attention="softmax"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, rel_pos_grid, attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 6 * hidden_size))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(self, x, c, skip=None, ids_keep=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, cond_size=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                          DiT, SiT, REPA-SiT                                   #
#################################################################################

class RefDiT(nn.Module):
    family = "dit"

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, attention="sdpa"):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.num_patches = self.x_embedder.num_patches
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, attention=attention)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)


class RefSiT(RefDiT):
    family = "sit"

    def forward(self, x, t, y):
        out = super().forward(x, t, y)
        return out[:, : self.in_channels] if self.learn_sigma else out


class RefREPASiT(RefDiT):
    family = "repa_sit"

    def __init__(self, path_type="edm", input_size=32, patch_size=2, in_channels=4, hidden_size=1152,
                 decoder_hidden_size=None, encoder_depth=8, depth=28, num_heads=16, mlp_ratio=4.0,
                 class_dropout_prob=0.1, num_classes=1000, use_cfg=False, z_dims=(768,), projector_dim=2048,
                 learn_sigma=False, qk_norm=False, fused_attn=None, attention="sdpa"):
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                         class_dropout_prob, num_classes, learn_sigma, attention)
        self.encoder_depth = encoder_depth
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in z_dims])

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == self.encoder_depth:
                N, D = x.shape[1], x.shape[2]
                # REPA's projector call: flattened to [B*N, D] and back.
                zs = [proj(x.reshape(-1, D)).reshape(x.shape[0], N, -1) for proj in self.projectors]
        out = unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)
        return (out[:, : self.in_channels] if self.learn_sigma else out), zs


#################################################################################
#                   REPA's online encoder: DINOv2 ViT-B/14                      #
#################################################################################
# REPA (train.py L295-303) runs the frozen torch.hub ``dinov2_vitb14`` on every step's raw uint8 images
# under torch.no_grad() and accelerate's autocast, and aligns to ``forward_features(x)['x_norm_patchtokens']``.
# Written here from DINOv2's description (dinov2/models/vision_transformer.py, dinov2/layers/) with
# the hub's settings (hub/backbones.py L19-31: img_size 518, LayerScale init 1.0, no registers,
# interpolate_offset 0.1, no antialias); weights are random (the timing does not depend on them).

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess_raw_image(x):
    """REPA's ``preprocess_raw_image`` for DINOv2 (train.py L48-51): uint8 [B, 3, R, R] -> /255, ImageNet
    normalisation, bicubic resize to 224 * R / 256 px. REPA writes ``224 * (R // 256)``: the same at 256
    and 512 px, but 0 at the toy's 64 px, hence the exact ratio."""
    x = x / 255.0
    # torchvision's Normalize builds its mean/std tensors on the input's device at every call, as here.
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, 224 * x.shape[-1] // 256, mode="bicubic")


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x):
        return x * self.gamma


class DinoBlock(nn.Module):
    """Pre-norm ViT block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), exact GELU.

    Attention: ``dinov2_vitb14`` builds ``MemEffAttention``, which without xFormers (REPA's
    requirements.txt does not install it) falls back to ``Attention.forward``: on dinov2 main (since
    12592a9, June 2025; what torch.hub fetches) that is ``F.scaled_dot_product_attention``
    (dinov2/layers/attention.py L69-79, fallback L82-87). Before, an explicit softmax with ``q`` scaled
    before the product (same file L56-69 at 81b2b64, what REPA's 2024 runs fetched): ``attention="softmax"``.
    qkv has a bias (qkv_bias=True in DinoVisionTransformer), as :class:`Attention`'s.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, impl=attention, scale_q=True)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RefDINOv2(nn.Module):
    """DINOv2 ViT (B/14 by default) returning ``x_norm_patchtokens`` [B, (H/14)(W/14), embed_dim].
    ``pos_grid``: the side of the learned position table (37: DINOv2's 518 px pretraining grid)."""

    def __init__(self, embed_dim=768, depth=12, num_heads=12, patch_size=14, pos_grid=37, mlp_ratio=4.0,
                 attention="sdpa", interpolate_offset=0.1):
        super().__init__()
        self.embed_dim, self.patch_size, self.interpolate_offset = embed_dim, patch_size, interpolate_offset
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + pos_grid ** 2, embed_dim))
        self.blocks = nn.ModuleList([DinoBlock(embed_dim, num_heads, mlp_ratio, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def pos_grid(self) -> int:
        return math.isqrt(self.pos_embed.shape[1] - 1)

    def interpolate_pos_encoding(self, h: int, w: int):
        """The table for an ``h x w`` patch grid, as DINOv2's ``interpolate_pos_encoding``
        (vision_transformer.py L180-212): itself when the grid matches, else the patch part resized
        bicubic in fp32 by scale factor (grid + offset) / table side, CLS entry kept."""
        M = self.pos_grid()
        if h == w == M:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        scale = ((h + self.interpolate_offset) / M, (w + self.interpolate_offset) / M)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patch], dim=1).to(self.pos_embed.dtype)

    @torch.no_grad()
    def resample_pos_embed(self, grid: int) -> None:
        """REPA's load-time resize of the table to the training grid (utils.py L95-98, timm's
        ``resample_abs_pos_embed``: bicubic, antialiased): done once, so at REPA's resolution the
        per-step ``interpolate_pos_encoding`` returns the table as it is."""
        from masked_dit.data.encoders.backbones import resample_pos_embed  # the package's load-time resize

        self.pos_embed = nn.Parameter(resample_pos_embed(self.pos_embed.data, grid),
                                      requires_grad=self.pos_embed.requires_grad)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        # Under autocast the fp16 patch tokens meet the fp32 CLS token: cat promotes, so the residual
        # stream stays fp32 (as in DINOv2) and only the Linear layers run in half precision.
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]

    def forward_flops(self, image_side: int) -> float:
        """Analytic FLOPs of one image's forward at ``image_side`` px (the convention of
        masked_dit.models.flops: 2 x MACs of the convs and matmuls; 46.3 G for B/14 at 224 px)."""
        d, n = self.embed_dim, (image_side // self.patch_size) ** 2
        hidden = self.blocks[0].mlp[0].out_features if len(self.blocks) else 0
        stem = n * d * 3 * self.patch_size ** 2
        block = (n + 1) * (4 * d * d + 2 * d * hidden) + 2 * (n + 1) ** 2 * d
        return 2.0 * (stem + len(self.blocks) * block)


def dinov2_for_repa(resolution: int, attention: str = "sdpa", **kwargs) -> RefDINOv2:
    """REPA's encoder as ``load_encoders`` leaves it (utils.py L88-101): frozen, eval, its table resampled
    to the encoder grid of ``resolution`` px training images (16 x 16 at 256 px: 224 px / 14)."""
    encoder = RefDINOv2(attention=attention, **kwargs).eval().requires_grad_(False)
    encoder.resample_pos_embed(resolution // 16)
    return encoder


def repa_features(encoder: RefDINOv2):
    """``batch -> zs`` for REPAObjective: its ``batch['raw_image']`` through preprocessing and the encoder
    (the objective calls it under torch.no_grad(), inside the step's autocast, before the model)."""
    def encode(batch):
        return [encoder(preprocess_raw_image(batch["raw_image"]))]
    return encode


#################################################################################
#                                   MDTv2                                       #
#################################################################################

class RefMDTv2(nn.Module):
    """MDTv2 as sail-sg/MDT runs it; the masked pass takes the objective's ``ids_keep``/``ids_restore``."""
    family = "mdtv2"

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, mask_ratio=None,
                 decode_layer=4, attention="softmax"):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.num_patches, grid = self.x_embedder.num_patches, self.x_embedder.grid_size
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=mask_ratio is not None)
        half = (depth - decode_layer) // 2

        def block(skip=False):
            return Block(hidden_size, num_heads, mlp_ratio, skip=skip, rel_pos_grid=grid, attention=attention)

        self.en_inblocks = nn.ModuleList([block() for _ in range(half)])
        self.en_outblocks = nn.ModuleList([block(skip=True) for _ in range(half)])
        self.de_blocks = nn.ModuleList([block(skip=True) for _ in range(decode_layer)])
        self.sideblocks = nn.ModuleList([block()])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def side_interpolater(self, x, c, ids_restore):
        B, K, D = x.shape
        x = torch.cat([x, self.mask_token.repeat(B, self.num_patches - K, 1)], dim=1)
        x = gather_tokens(x, ids_restore) + self.decoder_pos_embed
        x_before = x
        for block in self.sideblocks:
            x = block(x, c)
        mask = (ids_restore >= K).unsqueeze(-1).to(x.dtype)  # 1 = removed
        return x * mask + (1 - mask) * x_before

    def forward(self, x, t, y, ids_keep=None, ids_restore=None, **_):
        if (ids_keep is None) != (ids_restore is None):
            raise ValueError("the reference MDTv2 needs both ids_keep and ids_restore for a masked pass")
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        input_skip = x
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        skips = []
        for block in self.en_inblocks:
            x = block(x, c, ids_keep=ids_keep)
            skips.append(x)
        for block in self.en_outblocks:
            x = block(x, c, skip=skips.pop(), ids_keep=ids_keep)
        x = self.side_interpolater(x, c, ids_restore) if ids_keep is not None else x + self.decoder_pos_embed
        for block in self.de_blocks:
            x = block(x, c, skip=input_skip)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)


#################################################################################
#                                  MaskDiT                                      #
#################################################################################

class RefMaskDiTNet(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, num_classes,
                 mae_loss_coef, decoder_hidden_size, decoder_depth, decoder_num_heads, attention):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.num_classes = patch_size, num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.num_patches = self.x_embedder.num_patches
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = OneHotLabelEmbedder(num_classes, hidden_size) if num_classes else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio, attention=attention)
                                     for _ in range(depth)])
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, decoder_hidden_size),
                                              requires_grad=False)
        self.decoder_layer = FinalLayer(hidden_size, 1, decoder_hidden_size)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_hidden_size, decoder_num_heads, mlp_ratio, cond_size=hidden_size, attention=attention)
            for _ in range(decoder_depth)])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size)) if mae_loss_coef > 0 else None
        self.final_layer = FinalLayer(decoder_hidden_size, patch_size, in_channels, cond_size=hidden_size)

    def forward(self, x, t, y, ids_keep=None, ids_restore=None):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        for block in self.blocks:
            x = block(x, c)
        x = self.decoder_layer(x, c)
        if ids_keep is not None:
            B, K, D = x.shape
            fill = self.mask_token.repeat(B, self.num_patches - K, 1) if self.mask_token is not None \
                else x.new_zeros(B, self.num_patches - K, D)
            x = gather_tokens(torch.cat([x, fill], dim=1), ids_restore)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x, c)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)


class RefMaskDiT(nn.Module):
    """MaskDiT's ``EDMPrecond``: fp32 preconditioning around the network ``.model``."""
    family = "maskdit"

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False, use_decoder=True,
                 mae_loss_coef=0.1, decoder_hidden_size=512, decoder_depth=8, decoder_num_heads=16,
                 mask_ratio=0.5, sigma_data=0.5, sigma_min=0.0, sigma_max=float("inf"), attention="sdpa"):
        super().__init__()
        if learn_sigma or not use_decoder:
            raise ValueError("the reference MaskDiT covers the released configuration (decoder, no learned sigma)")
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.model = RefMaskDiTNet(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                                   num_classes, mae_loss_coef, decoder_hidden_size, decoder_depth, decoder_num_heads,
                                   attention)

    def forward(self, x, sigma, class_labels=None, ids_keep=None, ids_restore=None, **_):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if class_labels is None:
            class_labels = x.new_zeros(x.shape[0], self.num_classes)
        elif not class_labels.dtype.is_floating_point:
            class_labels = F.one_hot(class_labels.long(), self.num_classes)
        class_labels = class_labels.to(torch.float32).reshape(-1, self.num_classes)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model(c_in * x, c_noise.flatten(), class_labels, ids_keep, ids_restore)
        return c_skip * x + c_out * F_x.to(torch.float32)


#################################################################################
#                      The official loops' per-step host reads                  #
#################################################################################

class OfficialHostReads:
    """What each official training loop reads back to the host every step, done at the same places.

    Each read (``.item()``, ``.cpu()``) waits for the GPU to drain its queue, so the CPU cannot launch the
    next kernels ahead: the GPU idles while the CPU catches up. Per step (NOTES "Reference-style baselines"):

    - DiT, SiT: ``running_loss += loss.item()`` after the EMA update; MaskDiT: ``loss_mean.item()`` after
      the optimizer step (1 read);
    - REPA: ``logs`` = the gathered means of loss, proj_loss and grad_norm, each ``.item()`` (3 reads);
    - MDT: ``log_loss_dict`` before backward, per pass and per key (loss, mse, vb) the mean's ``.item()``
      and the per-sample values' and timesteps' ``.cpu()`` (18 reads, done here on the pass's loss), and
      ``MixedPrecisionTrainer._compute_norms`` before the optimizer step: ``torch.norm(p).item()`` and
      ``torch.norm(p.grad).item()`` of every parameter (2 reads and 2 norm kernels per parameter).
    """

    def __init__(self, family: str, params):
        self.family, self.params = family, [p for p in params if p.requires_grad]

    def per_step(self) -> int:
        """Host reads per training step."""
        return {"mdtv2": 18 + 2 * len(self.params), "repa_sit": 3}.get(self.family, 1)

    def after_loss(self, out: dict) -> None:
        if self.family == "mdtv2":
            for key in ("loss_full", "loss_masked"):
                for _ in range(3 * 3):
                    out[key].detach().item()

    def before_step(self, out: dict, grad_norm) -> None:
        if self.family == "mdtv2":
            for p in self.params:
                torch.norm(p, p=2, dtype=torch.float32).item()
                if p.grad is not None:
                    torch.norm(p.grad, p=2, dtype=torch.float32).item()

    def after_step(self, out: dict, grad_norm) -> None:
        if self.family == "repa_sit":
            for value in (out["denoising_loss"], out["proj_loss"], grad_norm):
                if value is not None:
                    torch.as_tensor(value).detach().float().mean().item()
        elif self.family != "mdtv2":
            out["loss"].detach().item()


#################################################################################
#                                   Factory                                     #
#################################################################################

REFERENCE_FAMILIES = {"dit": RefDiT, "sit": RefSiT, "repa_sit": RefREPASiT, "mdtv2": RefMDTv2, "maskdit": RefMaskDiT}


def build_reference(family: str, attention: str | None = None, **kwargs) -> nn.Module:
    """The reference-style network of ``family`` with the official constructor's ``kwargs``.
    ``attention=None`` takes the repo's own (``RECIPES``); 'softmax' or 'sdpa' force one."""
    if family not in REFERENCE_FAMILIES:
        raise ValueError(f"no reference-style model for family {family!r}; valid: {', '.join(REFERENCE_FAMILIES)}")
    return REFERENCE_FAMILIES[family](attention=attention or RECIPES[family]["attention"], **kwargs)


def reference_like(model: nn.Module, kwargs: dict, attention: str | None = None) -> nn.Module:
    """A reference-style copy of our ``model`` (built with ``kwargs``) holding the same weights.
    Built directly on the model's device: at XL a CPU build (random init of ~700M parameters that
    load_state_dict overwrites at once) costs seconds of device time per benchmark variant."""
    family = getattr(model, "family", None)
    with torch.device(next(model.parameters()).device):
        ref = build_reference(family, attention=attention, **kwargs)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref
