"""Frozen backbones: load an encoder spec and read out REPA's tokens as ``PatchEncoder``.

transformers holds DINOv2 (``Dinov2Model``), DINOv1 (``ViTModel``), CLIP (``CLIPVisionModel``),
MAE (``ViTMAEModel``) and I-JEPA (``IJepaModel``); timm holds DINOv2 by name and MoCo v3 from its
checkpoint file. Position tables are resampled once at load time to the input's patch grid.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from masked_dit.data.encoders.specs import FAMILIES, MODEL_TYPE_FAMILY, REPA_NAMES, EncoderSpec, parse_encoder_spec

#################################################################################
#                               Position tables                                 #
#################################################################################


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[1, P + g0*g0, D] position embeddings resampled to a ``grid x grid`` patch grid.

    Bicubic with antialiasing, in float32, prefix (CLS) embeddings untouched: what REPA does with
    ``timm.layers.resample_abs_pos_embed`` at load time (transformers' on-the-fly interpolation
    does not antialias, which changes the features when shrinking DINOv2's 37x37 grid to 16x16;
    antialiased bicubic also uses a = -0.5 where plain uses -0.75, so it matters when growing too).
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    g0 = int(round(patches.shape[1] ** 0.5))
    if g0 * g0 != patches.shape[1]:
        raise ValueError(f"position embeddings of {patches.shape[1]} patches are not a square grid")
    if g0 == grid:
        return pos_embed
    dim = patches.shape[-1]
    patches = patches.reshape(1, g0, g0, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def _set_position_table(model: nn.Module, model_type: str, grid: int) -> None:
    """Resample a transformers model's position table to ``grid`` (forward then runs it as is)."""
    emb = model.embeddings
    if model_type in ("clip", "clip_vision_model"):  # an nn.Embedding over position ids [CLS, patches]
        table = resample_pos_embed(emb.position_embedding.weight.data[None], grid)[0]
        if table.shape[0] != emb.position_embedding.weight.shape[0]:
            emb.position_embedding = nn.Embedding.from_pretrained(table, freeze=True)
            emb.position_ids = torch.arange(table.shape[0])[None]
            emb.num_patches, emb.num_positions = grid * grid, table.shape[0]
        emb.image_size = grid * emb.patch_size
        return
    prefix = 0 if model_type == "ijepa" else 1  # I-JEPA has no CLS token
    table = resample_pos_embed(emb.position_embeddings.data, grid, prefix)
    if table.shape != emb.position_embeddings.shape:
        emb.position_embeddings = nn.Parameter(table, requires_grad=False)
    if model_type in ("dinov2", "dinov2_with_registers"):
        model.config.image_size = grid * model.config.patch_size  # transformers then uses the table as is


#################################################################################
#                                    Encoder                                    #
#################################################################################

class PatchEncoder(nn.Module):
    """A frozen encoder returning REPA's patch features: normalised pixels [B, 3, S, S] -> [B, T_enc, z_dim].

    Always in eval mode with ``requires_grad=False``. ``image_size`` is the input it expects,
    ``grid_size = image_size // patch_size`` its token grid (T_enc = grid_size ** 2); ``mean``,
    ``std`` and ``resize_first`` are its family's preprocessing (``preprocess_images``).
    """

    def __init__(self, backbone: nn.Module, backend: str, *, name: str, z_dim: int, patch_size: int,
                 image_size: int, num_prefix_tokens: int, family: str = "dinov2", model_type: str = "dinov2"):
        super().__init__()
        self.backbone, self.backend, self.name = backbone, backend, name
        self.family, self.model_type = family, model_type
        self.z_dim, self.patch_size, self.image_size = int(z_dim), int(patch_size), int(image_size)
        self.grid_size = self.image_size // self.patch_size
        self.num_prefix_tokens = int(num_prefix_tokens)
        fam = FAMILIES[family]
        self.mean, self.std, self.resize_first = fam.mean, fam.std, fam.resize_first
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PatchEncoder":
        # The encoder is a fixed target: a parent model's .train() must not switch it.
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"encoder {self.name!r} expects preprocessed images [B, 3, {self.image_size}, "
                             f"{self.image_size}], got {list(pixels.shape)}")
        if self.backend == "timm":
            tokens = self.backbone.forward_features(pixels)  # norm(x) over all tokens
        elif self.model_type in ("dinov2", "dinov2_with_registers"):
            tokens = self.backbone(pixel_values=pixels).last_hidden_state  # final LayerNorm applied
        elif self.model_type == "vit_mae":
            # MAE shuffles tokens by argsort(noise) even at mask_ratio 0: increasing noise keeps raster order.
            B, L = pixels.shape[0], self.grid_size ** 2
            noise = torch.arange(L, device=pixels.device, dtype=torch.float32).expand(B, L)
            tokens = self.backbone(pixel_values=pixels, noise=noise, interpolate_pos_encoding=True).last_hidden_state
        else:  # the table already fits, so "interpolate" takes it as is and skips the size check
            tokens = self.backbone(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        return tokens[:, self.num_prefix_tokens:]


#################################################################################
#                                   Loaders                                     #
#################################################################################

def _load_transformers(parsed: EncoderSpec, image_size: Optional[int]):
    spec, source = parsed.spec, parsed.source
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"encoder {spec!r} loads through transformers: pip install transformers") from exc
    try:
        model_type = transformers.AutoConfig.from_pretrained(source).model_type  # checked before loading weights
    except OSError as exc:
        raise OSError(f"could not load encoder {spec!r} from {source!r} (hub or local cache): {exc}. Without "
                      "internet, save it with save_pretrained elsewhere and pass the folder") from exc
    family = MODEL_TYPE_FAMILY.get(model_type)
    if family is None or (parsed.family is not None and family != parsed.family):
        want = (f"a {parsed.repa_name} needs {' or '.join(FAMILIES[parsed.family].model_types)}" if parsed.family
                else f"supported: {', '.join(MODEL_TYPE_FAMILY)} (REPA: {REPA_NAMES})")
        raise ValueError(f"encoder {spec!r} is a {model_type!r} model; {want}")
    fam = FAMILIES[family]
    if image_size is None:
        image_size = 256 if fam.native_input else 224
    kwargs = {}
    if parsed.family is not None and fam.layer_norm_eps is not None:
        kwargs["layer_norm_eps"] = fam.layer_norm_eps  # the original model's, not the hub config's 1e-12
    if model_type == "vit":
        model_class, kwargs["add_pooling_layer"] = transformers.ViTModel, False
    elif model_type == "vit_mae":
        model_class, kwargs["mask_ratio"] = transformers.ViTMAEModel, 0.0  # keep every token
    elif model_type == "ijepa":
        model_class = getattr(transformers, "IJepaModel", None)
        if model_class is None:
            raise ImportError(f"encoder {spec!r} needs transformers with IJepaModel (>= 4.48): "
                              "pip install -U transformers")
    elif model_type in ("clip", "clip_vision_model"):
        model_class = transformers.CLIPVisionModel  # a full CLIP folder loads its image tower
    else:
        model_class = transformers.AutoModel
    verbosity = transformers.logging.get_verbosity()
    if model_type == "clip":  # a full CLIP checkpoint: its text tower is unused, not worth a report of every key
        transformers.logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise OSError(f"could not load encoder {spec!r} from {source!r}: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    if model_type == "vit_mae":
        model.layernorm = nn.Identity()  # REPA's MAE forward_features stops before the final norm
    config = model.config
    patch = int(config.patch_size)
    _check_patch(spec, image_size, patch)
    _set_position_table(model, model_type, image_size // patch)
    prefix = 0 if model_type == "ijepa" else 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return model.float(), int(config.hidden_size), patch, prefix, family, model_type, image_size


def _load_timm_dinov2(parsed: EncoderSpec, image_size: int, weights: Optional[str], timm_kwargs: dict):
    timm = _import_timm(parsed.spec)
    kwargs = dict(timm_kwargs)
    pretrained = kwargs.pop("pretrained", True)
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"encoder weights file {weights!r} does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        pretrained = True
    # timm resamples pretrained position embeddings to img_size on load (bicubic, antialiased), as REPA.
    model = timm.create_model(parsed.source, pretrained=pretrained, num_classes=0, img_size=image_size, **kwargs)
    return model.float(), int(model.embed_dim), int(model.patch_embed.patch_size[0]), int(model.num_prefix_tokens)


def _import_timm(spec: str):
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f"encoder {spec!r} loads through timm: pip install 'masked-dit[repa]'") from exc
    return timm


# MoCo v3 ViT heads per REPA size (mocov3_vit.py:151-173: s 384/12, b 768/12, l 1024/16); the
# width, depth and patch are read from the checkpoint.
MOCOV3_HEADS = {"s": 12, "b": 12, "l": 16}
# RCG's ViT-L checkpoint misnames two blocks' layers; REPA renames them (utils.py:33-40).
_MOCOV3_RENAMES = {"blocks.13.norm13": "blocks.13.norm1", "blocks.13.mlp.fc13": "blocks.13.mlp.fc1",
                   "blocks.14.norm14": "blocks.14.norm2", "blocks.14.mlp.fc14": "blocks.14.mlp.fc2"}
_MOCOV3_PREFIX = "module.base_encoder."


def mocov3_backbone_state(state: dict) -> dict:
    """The ViT backbone of a MoCo v3 ``state_dict``: ``module.base_encoder.*`` without the projection
    head (``head``/``fc``) and with RCG's misnamed keys fixed, as REPA's ``fix_mocov3_state_dict``."""
    out = {}
    for key, value in state.items():
        if not key.startswith(_MOCOV3_PREFIX):
            continue  # momentum encoder, predictor
        key = key[len(_MOCOV3_PREFIX):]
        for bad, good in _MOCOV3_RENAMES.items():
            key = key.replace(bad, good)
        if "head" not in key and key.split(".")[0] != "fc":
            out[key] = value
    return out


def _load_mocov3(parsed: EncoderSpec, image_size: int, weights: Optional[str], timm_kwargs: dict):
    spec = parsed.spec
    file = weights or parsed.source
    if not Path(file).is_file():
        raise FileNotFoundError(f"encoder {spec!r} loads a local MoCo v3 checkpoint (there is no hub model) and "
                                f"{file!r} does not exist; pass {parsed.repa_name}:<vit-{parsed.size}-300ep.pth.tar> "
                                f"or put it at ckpts/mocov3_vit{parsed.size}.pth (REPA's place)")
    _import_timm(spec)  # MoCo v3 goes into a timm ViT
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles of other objects, truncated files
        raise ValueError(f"encoder {spec!r}: cannot read {file!r} as a weights-only checkpoint "
                         f"({type(exc).__name__}); re-save just its state_dict") from None
    state = mocov3_backbone_state(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {})
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"encoder {spec!r}: {file!r} holds no MoCo v3 ViT (no '{_MOCOV3_PREFIX}cls_token' "
                         "under 'state_dict')")
    kwargs = dict(timm_kwargs)
    embed_dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_heads = kwargs.pop("num_heads", MOCOV3_HEADS[parsed.size])
    if embed_dim % num_heads:
        raise ValueError(f"encoder {spec!r}: checkpoint width {embed_dim} is not a {parsed.repa_name} "
                         f"({FAMILIES['mocov3'].sizes[parsed.size]} wide, {num_heads} heads)")
    _check_patch(spec, image_size, patch)
    from timm.models.vision_transformer import VisionTransformer

    # MoCo v3's ViT is timm's (qkv bias, mlp 4, LayerNorm eps 1e-6, CLS token): mocov3_vit.py:52-173.
    model = VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, num_classes=0, **kwargs)
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], image_size // patch)  # REPA: utils.py:46-49
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        reason = str(exc).splitlines()[-1].strip()
        raise ValueError(f"encoder {spec!r}: {file!r} does not fit a ViT: {reason}") from None
    if missing or unexpected:
        raise ValueError(f"encoder {spec!r}: {file!r} does not fit a ViT (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.float(), embed_dim, patch, int(model.num_prefix_tokens)


def _check_patch(spec: str, image_size: int, patch: int) -> None:
    if image_size % patch:
        raise ValueError(f"encoder image_size {image_size} must be a multiple of its patch size {patch} ({spec!r})")


def load_encoder(spec: str, device: Union[str, torch.device] = "cpu", *, image_size: Optional[int] = None,
                 backend: Optional[str] = None, weights: Optional[str] = None,
                 timm_kwargs: Optional[dict] = None) -> PatchEncoder:
    """A frozen ``PatchEncoder`` for ``spec`` (REPA name, NAME:PATH, hub id, local folder or timm name).

    ``image_size``: the encoder's input side (REPA: ``repa_encoder_image_size(resolution, spec)``;
    default its size at 256 px: 224, or 256 for MoCo v3, MAE and DINOv1); position embeddings are
    resampled once to its grid. ``backend`` forces transformers or timm for DINOv2 REPA names
    (default: transformers when installed). ``weights``: a local checkpoint file for a timm name
    or MoCo v3; ``timm_kwargs`` go to the timm model (``num_heads`` too for MoCo v3).
    """
    parsed = parse_encoder_spec(spec, backend)
    if parsed.backend == "transformers":
        if weights is not None or timm_kwargs:
            raise ValueError(f"weights= and timm_kwargs= apply to timm encoders only, and {spec!r} loads through "
                             "transformers (pass a local folder as the spec instead)")
        model, z_dim, patch, prefix, family, model_type, image_size = _load_transformers(parsed, image_size)
    else:
        family, model_type = parsed.family, "timm"
        if image_size is None:
            image_size = 256 if FAMILIES[family].native_input else 224
        if family == "mocov3":
            model, z_dim, patch, prefix = _load_mocov3(parsed, image_size, weights, timm_kwargs or {})
        else:
            model, z_dim, patch, prefix = _load_timm_dinov2(parsed, image_size, weights, timm_kwargs or {})
        _check_patch(spec, image_size, patch)
    return PatchEncoder(model, parsed.backend, name=str(spec), z_dim=z_dim, patch_size=patch, image_size=image_size,
                        num_prefix_tokens=prefix, family=family, model_type=model_type).to(device)
