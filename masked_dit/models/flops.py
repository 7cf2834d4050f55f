"""Analytic forward FLOPs of every family, for MFU and the README table.

Convention (DiT's paper): count **multiply-accumulates** (MACs) of the matmuls — Linear layers,
the patch-embedding conv and the two attention products ``QK^T`` and ``AV`` — per image.
Norms, activations, softmax and gathers are left out (they are memory-bound and < 1%).
``FLOPs = 2 x MACs``; a training step (forward + backward) is ``3 x`` the forward.

The count reads the model's modules, so it follows whatever a family builds: a per-block count
(:func:`block_macs`) composed per family by which blocks see how many tokens (all of them, or
the ``len_keep = int(N * (1 - mask_ratio))`` kept ones). Checked against DiT's published
numbers: S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64 GMACs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn


#################################################################################
#                                 Counting pieces                               #
#################################################################################

@dataclass
class FlopCount:
    """MACs per image of one forward, with a breakdown by part."""
    macs: float
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return 2.0 * self.macs

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def __add__(self, other: "FlopCount") -> "FlopCount":
        parts = dict(self.parts)
        for k, v in other.parts.items():
            parts[k] = parts.get(k, 0.0) + v
        return FlopCount(self.macs + other.macs, parts)


def linear_macs(layer: nn.Linear | None, tokens: int) -> float:
    return 0.0 if layer is None else float(tokens * layer.in_features * layer.out_features)


def block_macs(block: nn.Module, tokens: int) -> float:
    """MACs of one FusedDiTBlock over ``tokens`` tokens of one image.

    qkv (3 d^2 N) + attention products (2 N^2 d) + proj (d^2 N) + MLP (2 d h N)
    + adaLN modulation (c * 6d, once per image) + MDT skip merge (2d * d * N).
    """
    attn = block.attn
    d = attn.qkv.in_features
    macs = linear_macs(attn.qkv, tokens) + linear_macs(attn.proj, tokens)
    macs += 2.0 * tokens * tokens * d
    macs += linear_macs(block.mlp.fc1, tokens) + linear_macs(block.mlp.fc2, tokens)
    macs += linear_macs(block.adaLN_modulation[-1], 1)
    macs += linear_macs(getattr(block, "skip_linear", None), tokens)
    return macs


def _blocks_macs(blocks, tokens: int) -> float:
    return sum(block_macs(b, tokens) for b in (blocks or ()))


def _final_macs(layer: nn.Module | None, tokens: int) -> float:
    """FinalLayer-like head: adaLN modulation once per image + a Linear per token."""
    if layer is None:
        return 0.0
    return linear_macs(layer.adaLN_modulation[-1], 1) + linear_macs(layer.linear, tokens)


def _stem_macs(model: nn.Module) -> tuple[int, float]:
    """(number of patches, MACs of patch embedding + timestep/label embedders)."""
    pe = model.x_embedder
    conv = pe.proj
    n = pe.num_patches
    macs = float(n * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
    t_mlp = model.t_embedder.mlp
    macs += linear_macs(t_mlp[0], 1) + linear_macs(t_mlp[2], 1)
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)  # None: unconditional
    if isinstance(table, nn.Linear):  # MaskDiT's one-hot labels are a real matmul
        macs += linear_macs(table, 1)
    return n, macs


def kept_tokens(num_patches: int, mask_ratio: float) -> int:
    """Tokens kept by the MAE recipe (``int(N * (1 - mask_ratio))``, as MDT and MaskDiT do)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


#################################################################################
#                           Per-family composition                              #
#################################################################################

def _inner(model: nn.Module) -> nn.Module:
    # Wrappers (e.g. EDM preconditioning) keep the network in `.model`.
    return model if hasattr(model, "x_embedder") else getattr(model, "model", model)


def _dit_like(model, keep, masked=None) -> FlopCount:
    m = _inner(model)
    n, stem = _stem_macs(m)
    k = keep(n)
    blocks = _blocks_macs(m.blocks, k)
    parts = {"embed": stem, "blocks": blocks}
    projectors = getattr(m, "projectors", None)
    if projectors is not None:  # REPA's projection heads run in every forward (it returns zs)
        parts["projectors"] = sum(linear_macs(l, k) for p in projectors for l in p if isinstance(l, nn.Linear))
    # MaskDiT: a decoder (own width) over all tokens after the encoder on kept tokens.
    decoder = getattr(m, "decoder_blocks", None) is not None
    if decoder:
        parts["decoder"] = _final_macs(getattr(m, "decoder_layer", None), k) + _blocks_macs(m.decoder_blocks, n)
    # the head runs on all tokens after a decoder, else on the kept ones (the removed are zero-filled after it)
    parts["final"] = _final_macs(m.final_layer, n if decoder else k)
    return FlopCount(sum(parts.values()), parts)


def _mdt(model, keep, masked=None) -> FlopCount:
    """MDT: encoder blocks on the kept tokens, the side-interpolater (masked passes only) and the
    decoder blocks on all tokens. v2 splits its encoder into ``en_inblocks``/``en_outblocks``
    (long skips) and its decoder ``de_blocks``; v1 runs ``blocks[:depth - decode_layer]`` as the
    encoder and the rest as the decoder."""
    m = _inner(model)
    n, stem = _stem_macs(m)
    k = keep(n)
    if hasattr(m, "en_inblocks"):
        encoder = list(m.en_inblocks) + list(m.en_outblocks)
        decoder = list(m.de_blocks)
    else:
        split = len(m.blocks) - m.decode_layer
        encoder, decoder = list(m.blocks[:split]), list(m.blocks[split:])
    parts = {"embed": stem, "encoder": _blocks_macs(encoder, k), "decoder": _blocks_macs(decoder, n)}
    if (k < n) if masked is None else masked:  # the side-interpolater runs on masked forwards only
        parts["side"] = _blocks_macs(getattr(m, "sideblocks", None), n)
    parts["final"] = _final_macs(m.final_layer, n)
    return FlopCount(sum(parts.values()), parts)


_COMPOSE = {"dit": _dit_like, "sit": _dit_like, "repa_sit": _dit_like, "maskdit": _dit_like,
            "mdtv1": _mdt, "mdtv2": _mdt}


#################################################################################
#                                   Public API                                  #
#################################################################################

def forward_flops(model: nn.Module | str, mask_ratio: float = 0.0, *, tokens_kept: int | None = None,
                  masked: bool | None = None) -> FlopCount:
    """MACs/FLOPs of one forward of one image, masked at ``mask_ratio`` (or keeping exactly
    ``tokens_kept`` tokens, e.g. the mean of a variable-length batch). ``model`` is a module or a
    registered name (built on the ``meta`` device: no memory, no time). ``masked``: whether this is a
    masked training forward (MDT then runs its side-interpolater, even when it keeps every token);
    default: whenever tokens are dropped."""
    if isinstance(model, str):
        model = meta_model(model)
    family = getattr(model, "family", None)
    if family not in _COMPOSE:
        raise ValueError(f"no FLOP count for model family {family!r}; known: {', '.join(sorted(_COMPOSE))}")

    def keep(num_patches: int) -> int:
        if tokens_kept is None:
            return kept_tokens(num_patches, mask_ratio)
        if not 0 < tokens_kept <= num_patches:
            raise ValueError(f"tokens_kept must be in [1, {num_patches}], got {tokens_kept}")
        return int(tokens_kept)

    return _COMPOSE[family](model, keep, masked)


def flops_per_image(model: nn.Module | str, mask_ratio: float = 0.0, training: bool = True) -> float:
    """FLOPs per image: a forward, or (``training``) a whole training step ``= 3 x forward``.

    MDT trains with two forwards per step (full, and masked with its side-interpolater, same batch):
    both are counted, so ``mask_ratio`` is the masked pass's ratio (at 0 it keeps every token and still
    runs the side-interpolater). MaskDiT and the others: one forward at ``mask_ratio``. Frozen networks
    outside the model (VAE, REPA's DINOv2 encoder) are not counted.
    """
    if isinstance(model, str):
        model = meta_model(model)
    if not training:
        return forward_flops(model, mask_ratio).flops
    if getattr(model, "family", None) in ("mdtv1", "mdtv2"):
        return 3.0 * (forward_flops(model, mask_ratio, masked=True).flops + forward_flops(model, 0.0).flops)
    return 3.0 * forward_flops(model, mask_ratio).flops


class FlopsMixin:
    """Adds ``model.flops_per_image(mask_ratio, training)`` and ``model.forward_flops(...)``."""

    def flops_per_image(self, mask_ratio: float = 0.0, training: bool = True) -> float:
        return flops_per_image(self, mask_ratio, training)

    def forward_flops(self, mask_ratio: float = 0.0, *, tokens_kept: int | None = None,
                      masked: bool | None = None) -> FlopCount:
        return forward_flops(self, mask_ratio, tokens_kept=tokens_kept, masked=masked)


def meta_model(name: str, **overrides) -> nn.Module:
    """A registered model built on the ``meta`` device (shapes only, instant)."""
    from masked_dit.models.registry import build_model

    with torch.device("meta"):
        return build_model(name, **overrides)


def num_params(model: nn.Module) -> int:
    """Parameter count as the official scripts print it (includes the frozen pos_embed)."""
    return sum(p.numel() for p in model.parameters())


def model_table(names=None, mask_ratio: float = 0.0) -> str:
    """Markdown table (name, params, forward GMACs, forward GFLOPs) for the README."""
    from masked_dit.models.registry import MODEL_CONFIGS

    names = sorted(MODEL_CONFIGS) if names is None else list(names)
    rows = ["| model | params (M) | GMACs / fwd | GFLOPs / fwd |", "|---|---:|---:|---:|"]
    for name in names:
        m = meta_model(name)
        c = forward_flops(m, mask_ratio)
        rows.append(f"| {name} | {num_params(m) / 1e6:.2f} | {c.gmacs:.2f} | {c.gflops:.2f} |")
    return "\n".join(rows)


def mfu(images_per_second: float, flops_per_img: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over a peak (both in FLOP/s)."""
    if peak_flops <= 0 or not math.isfinite(peak_flops):
        raise ValueError(f"peak_flops must be a positive number, got {peak_flops}")
    return images_per_second * flops_per_img / peak_flops
