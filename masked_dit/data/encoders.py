"""Frozen pretrained vision encoders for REPA's representation alignment (DINOv2 ViT-S/B/L/G-14).

REPA (sihyun-yu/REPA) aligns projector outputs to the patch features of a frozen encoder. For
DINOv2 it does, per training step::

    x = raw_uint8 / 255                                    # [0, 1]
    x = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(x)
    x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    z = encoder.forward_features(x)["x_norm_patchtokens"]  # final LayerNorm, CLS/registers dropped

with the hub model's position embeddings resampled once at load time to the 16x16 grid
(``timm.layers.resample_abs_pos_embed``: bicubic, antialiased). This file reproduces that with
DINOv2 loaded through transformers (``Dinov2Model``; hub ids and local ``save_pretrained``
folders) or timm (``vit_*_patch14_dinov2.lvd142m`` names and local weight files):

    load_encoder(spec)          -> PatchEncoder: normalised pixels [B,3,S,S] -> tokens [B, T_enc, z_dim]
    preprocess_images(images)   -> REPA's preprocessing (uint8 or [-1, 1] floats in)
    resample_token_grid(z, g)   -> encoder tokens on the diffusion model's g x g token grid
    EncoderFeatures(encoders)   -> the callable REPAObjective takes (``encoder=``): batch -> zs
    extract_encoder_features()  -> the same features cached beside extracted VAE latents
    LatentsWithFeatures(...)    -> LatentDataset items plus the cached ``'zs'``

Spec forms accepted by ``load_encoder``:

    dinov2-vit-b, dinov2reg-vit-l       REPA's names (s/b/l/g; "reg": the 4-register variants)
    facebook/dinov2-base                a Hugging Face hub id (transformers)
    /path/to/folder                     a local folder holding config.json (transformers)
    vit_base_patch14_dinov2.lvd142m     a timm name (also "timm/<name>" or "timm:<name>");
                                        ``weights=`` may name a local checkpoint file for it
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# REPA's model_config letter -> (hub id size word, timm architecture, feature width z_dim)
DINOV2_SIZES = {
    "s": ("small", "vit_small_patch14", 384),
    "b": ("base", "vit_base_patch14", 768),
    "l": ("large", "vit_large_patch14", 1024),
    "g": ("giant", "vit_giant_patch14", 1536),
}
_REPA_NAME = re.compile(r"^(?P<family>[a-z0-9]+)-(?P<arch>[a-z]+)-(?P<size>[a-z])$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TIMM_NAME = re.compile(r"^vit_\w+_patch14(_reg\d+)?_dinov2(\.\w+)?$")
_BACKENDS = ("transformers", "timm")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


#################################################################################
#                                 Spec resolution                               #
#################################################################################

def _repa_name(spec: str):
    """(size letter, registers) for REPA's ``dinov2-vit-b`` style names, else None."""
    m = _REPA_NAME.match(spec)
    if m is None:
        return None
    family, arch, size = m.group("family", "arch", "size")
    if family not in ("dinov2", "dinov2reg"):
        raise ValueError(f"encoder {spec!r}: only DINOv2 encoders are supported (dinov2-vit-s/b/l/g, "
                         f"dinov2reg-vit-s/b/l/g), not REPA's {family!r}")
    if arch != "vit" or size not in DINOV2_SIZES:
        raise ValueError(f"encoder {spec!r}: DINOv2 comes as vit-s, vit-b, vit-l or vit-g")
    return size, family == "dinov2reg"


def encoder_z_dim(spec: str) -> int:
    """Feature width of a REPA-named encoder without loading it (``dinov2-vit-b`` -> 768)."""
    named = _repa_name(spec)
    if named is None:
        raise ValueError(f"z_dim is known without loading only for REPA names like 'dinov2-vit-b', not {spec!r}; "
                         "load the encoder and read .z_dim")
    return DINOV2_SIZES[named[0]][2]


def resolve_encoder(spec: str, backend: Optional[str] = None) -> tuple[str, str]:
    """(backend, source) that ``load_encoder`` loads for ``spec`` (see the module docstring)."""
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; valid: {', '.join(_BACKENDS)}")
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").exists():
            return "transformers", str(path)
        raise ValueError(f"encoder path {spec!r} is not a folder with config.json (a transformers "
                         "save_pretrained folder); for a timm checkpoint file pass the timm name with weights=<file>")
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(("/", os.sep)):
        raise FileNotFoundError(f"encoder path {spec!r} does not exist")
    named = _repa_name(spec)
    if named is not None:
        size, registers = named
        word, arch, _ = DINOV2_SIZES[size]
        if backend is None:
            backend = "transformers" if _installed("transformers") or not _installed("timm") else "timm"
        if backend == "transformers":
            return backend, f"facebook/dinov2-{'with-registers-' if registers else ''}{word}"
        return backend, f"{arch}{'_reg4' if registers else ''}_dinov2.lvd142m"
    timm_name = spec.split(":", 1)[1] if spec.startswith("timm:") else spec
    timm_name = timm_name[len("timm/"):] if timm_name.startswith("timm/") else timm_name
    if _TIMM_NAME.match(timm_name):
        if backend == "transformers":
            raise ValueError(f"encoder {spec!r} is a timm name; it cannot load through transformers")
        return "timm", timm_name
    if _HUB_ID.match(spec):
        if backend == "timm":
            raise ValueError(f"encoder {spec!r} is a transformers hub id; it cannot load through timm")
        return "transformers", spec
    raise ValueError(f"unknown encoder spec {spec!r}; expected a REPA name (dinov2-vit-s/b/l/g), a hub id "
                     "(facebook/dinov2-base), a local transformers folder, or a timm name "
                     "(vit_base_patch14_dinov2.lvd142m)")


#################################################################################
#                                    Encoder                                    #
#################################################################################

def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[1, P + g0*g0, D] position embeddings resampled to a ``grid x grid`` patch grid.

    Bicubic with antialiasing, in float32, prefix (CLS) embeddings untouched: what REPA does with
    ``timm.layers.resample_abs_pos_embed`` at load time (transformers' on-the-fly interpolation
    does not antialias, which changes the features when shrinking DINOv2's 37x37 grid to 16x16).
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


class PatchEncoder(nn.Module):
    """A frozen DINOv2 returning ``x_norm_patchtokens``: normalised pixels [B, 3, S, S] -> [B, T_enc, z_dim].

    Always in eval mode with ``requires_grad=False``. ``image_size`` is the input it expects,
    ``grid_size = image_size // patch_size`` its token grid (T_enc = grid_size ** 2).
    """

    def __init__(self, backbone: nn.Module, backend: str, *, name: str, z_dim: int, patch_size: int,
                 image_size: int, num_prefix_tokens: int):
        super().__init__()
        self.backbone, self.backend, self.name = backbone, backend, name
        self.z_dim, self.patch_size, self.image_size = int(z_dim), int(patch_size), int(image_size)
        self.grid_size = self.image_size // self.patch_size
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PatchEncoder":
        # The encoder is a fixed target: a parent model's .train() must not switch it.
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"encoder {self.name!r} expects preprocessed images [B, 3, {self.image_size}, "
                             f"{self.image_size}], got {list(pixels.shape)}")
        if self.backend == "transformers":
            tokens = self.backbone(pixel_values=pixels).last_hidden_state  # final LayerNorm applied
        else:
            tokens = self.backbone.forward_features(pixels)  # timm: norm(x) over all tokens
        return tokens[:, self.num_prefix_tokens:]


def _load_transformers(source: str, spec: str, image_size: int):
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:
        raise ImportError(f"encoder {spec!r} loads through transformers: pip install transformers") from exc
    try:
        model_type = AutoConfig.from_pretrained(source).model_type  # checked before loading any weights
        if model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"encoder {spec!r} is a {model_type!r} model; only DINOv2 is supported")
        model = AutoModel.from_pretrained(source)
    except OSError as exc:
        raise OSError(f"could not load encoder {spec!r} from {source!r} (hub or local cache): {exc}. Without "
                      "internet, save it with save_pretrained elsewhere and pass the folder") from exc
    config = model.config
    patch = int(config.patch_size)
    emb = model.embeddings
    resampled = resample_pos_embed(emb.position_embeddings.data, image_size // patch)
    if resampled.shape != emb.position_embeddings.shape:
        emb.position_embeddings = nn.Parameter(resampled)
        config.image_size = image_size  # transformers then uses the resampled table as is
    prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return model.float(), int(config.hidden_size), patch, prefix


def _load_timm(source: str, spec: str, image_size: int, weights: Optional[str], timm_kwargs: dict):
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f"encoder {spec!r} loads through timm: pip install 'masked-dit[repa]'") from exc
    kwargs = dict(timm_kwargs)
    pretrained = kwargs.pop("pretrained", True)
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"encoder weights file {weights!r} does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        pretrained = True
    # timm resamples pretrained position embeddings to img_size on load (bicubic, antialiased), as REPA.
    model = timm.create_model(source, pretrained=pretrained, num_classes=0, img_size=image_size, **kwargs)
    return model.float(), int(model.embed_dim), int(model.patch_embed.patch_size[0]), int(model.num_prefix_tokens)


def load_encoder(spec: str, device: Union[str, torch.device] = "cpu", *, image_size: int = 224,
                 backend: Optional[str] = None, weights: Optional[str] = None,
                 timm_kwargs: Optional[dict] = None) -> PatchEncoder:
    """A frozen DINOv2 ``PatchEncoder`` for ``spec`` (REPA name, hub id, local folder or timm name).

    ``image_size``: the encoder's input side (REPA: ``repa_encoder_image_size(resolution)``, 224 for
    256px images); position embeddings are resampled once to its grid. ``backend`` forces
    transformers or timm for REPA names (default: transformers when installed). ``weights``: a
    local checkpoint file for a timm name; ``timm_kwargs`` go to ``timm.create_model``.
    """
    backend, source = resolve_encoder(spec, backend)
    if backend == "transformers" and (weights is not None or timm_kwargs):
        raise ValueError(f"weights= and timm_kwargs= apply to timm encoders only, and {spec!r} loads through "
                         "transformers (pass a local folder as the spec instead)")
    if backend == "transformers":
        model, z_dim, patch, prefix = _load_transformers(source, spec, image_size)
    else:
        model, z_dim, patch, prefix = _load_timm(source, spec, image_size, weights, timm_kwargs or {})
    if image_size % patch:
        raise ValueError(f"encoder image_size {image_size} must be a multiple of its patch size {patch}")
    return PatchEncoder(model, backend, name=str(spec), z_dim=z_dim, patch_size=patch, image_size=image_size,
                        num_prefix_tokens=prefix).to(device)


def repa_encoder_image_size(resolution: int) -> int:
    """REPA's encoder input side for ``resolution`` px images: 224 * (resolution // 256) (224 below 512)."""
    return 224 * max(1, resolution // 256)


#################################################################################
#                            Preprocessing and tokens                           #
#################################################################################

def preprocess_images(images: torch.Tensor, image_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                      std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """REPA's DINOv2 preprocessing: images [B, 3, H, W] -> normalised [B, 3, image_size, image_size].

    uint8 images are divided by 255; float images are taken in [-1, 1] (the data pipeline's
    range) and mapped with (x + 1) / 2. Then ImageNet mean/std normalisation and a bicubic resize
    (align_corners=False, no antialias), in REPA's order; bicubic weights sum to one, so the order
    only matters to rounding. Floats stay in their precision (at least float32).
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
    x = (x - mean_t) / std_t
    return F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)


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
            pixels = preprocess_images(images.to(param.device), enc.image_size, enc.mean, enc.std)
            with self._autocast(param.device):
                z = enc(pixels.to(param.dtype))
            z = z.float()
            zs.append(resample_token_grid(z, self.token_grid) if self.token_grid else z)
        return zs[0] if len(zs) == 1 else zs


def load_encoder_features(specs: Union[str, Sequence[str]], *, model=None, token_grid: Optional[int] = None,
                          device: Union[str, torch.device] = "cpu", image_size: int = 224,
                          autocast_dtype: Optional[str] = None, image_key: str = "image",
                          backend: Optional[str] = None) -> EncoderFeatures:
    """``EncoderFeatures`` for comma-separated specs (REPA's ``--enc-type=dinov2-vit-b,...``).

    With ``model`` (a REPA-SiT) the token grid is its ``input_size // patch_size`` and its
    ``z_dims`` are checked against the encoders'.
    """
    names = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    if model is not None and token_grid is None:
        token_grid = model.input_size // model.patch_size
    encoders = [load_encoder(s, device, image_size=image_size, backend=backend) for s in names if s]
    features = EncoderFeatures(encoders, token_grid, autocast_dtype, image_key)
    if model is not None:
        features.check_model(model)
    return features


#################################################################################
#                          Cached features beside latents                       #
#################################################################################
# <latents>/features/<name>/manifest.json and shard_00000.npy [n, T, z] (plus shard_00000.flip.npy
# when the latents have flipped moments): one shard per latent shard, same rows, so a latent index
# finds its features directly. Shards are written under a temporary name, checked (shape,
# finiteness) and renamed, then the manifest is rewritten: an interrupted run resumes at the first
# missing shard. Size: ImageNet-1k with DINOv2-B at 16x16 tokens is 1.28M x 256 x 768 x 2 bytes
# ~ 500 GB in float16; computing features on the fly (EncoderFeatures) costs no disk.

FEATURES_DIR = "features"
_MANIFEST = "manifest.json"


def feature_dir_name(spec: str) -> str:
    """A folder name for an encoder spec ('facebook/dinov2-base' -> 'facebook--dinov2-base')."""
    name = Path(spec).name if Path(spec).expanduser().exists() else spec
    return re.sub(r"[^\w.-]+", "--", name).strip("-") or "encoder"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _save_shard(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


@torch.no_grad()
def extract_encoder_features(dataset, latents_dir, features: EncoderFeatures, *, name: Optional[str] = None,
                             batch_size: int = 32, dtype: str = "float16", progress: bool = True) -> dict:
    """Caches ``features`` of ``dataset``'s images beside the latents extracted from the same dataset.

    ``dataset`` items ``{'x': [3, H, W] in [-1, 1] (or uint8), ...}`` in the order used by
    ``extract_latents``; ``features`` holds one encoder. Writes ``<latents_dir>/features/<name>``
    and returns its manifest. Re-running resumes; different settings are an error.
    """
    if len(features.encoders) != 1:
        raise ValueError(f"cache one encoder at a time ({features.name} has {len(features.encoders)})")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"feature dtype must be float16 or float32 (got {dtype!r})")
    root = Path(latents_dir)
    if not (root / _MANIFEST).exists():
        raise FileNotFoundError(f"no {_MANIFEST} in {str(root)!r}: extract the latents first")
    latents = json.loads((root / _MANIFEST).read_text())
    if not latents.get("complete"):
        raise ValueError(f"latents in {str(root)!r} are incomplete: finish extract-latents first")
    n = len(dataset)
    if n != latents["num_images"]:
        raise ValueError(f"dataset has {n} images but the latents were extracted from {latents['num_images']} images")
    image_size = int(dataset[0]["x"].shape[-1])
    if image_size != latents["image_size"]:
        raise ValueError(f"dataset images are {image_size}px but the latents were made from "
                         f"{latents['image_size']}px images")
    if batch_size < 1 or latents["shard_size"] % batch_size:
        raise ValueError(f"batch_size ({batch_size}) must divide the latents' shard_size ({latents['shard_size']})")
    enc = features.encoders[0]
    name = name or feature_dir_name(enc.name)
    out = root / FEATURES_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    shape = [features.num_tokens[0], features.z_dims[0]]
    header = {"encoder": enc.name, "image_size": enc.image_size, "token_grid": int(shape[0] ** 0.5 + 0.5),
              "feature_shape": shape, "dtype": dtype, "num_images": n, "shard_size": latents["shard_size"],
              "flip": bool(latents["flip"]), "autocast": str(features.autocast_dtype or "float32")}
    shards = []
    if (out / _MANIFEST).exists():
        old = json.loads((out / _MANIFEST).read_text())
        mismatched = [k for k in header if old.get(k) != header[k]]
        if mismatched:
            raise ValueError(f"{out / _MANIFEST} was made with different settings ({', '.join(mismatched)}); "
                             "pass another name=")
        shards = [s for s in old["shards"] if all((out / f).exists() for f in s["files"].values())]
    done = {s["index"] for s in shards}
    todo = [s for s in latents["shards"] if s["index"] not in done]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(latents["shards"]), initial=len(done), desc=f"extract-features {name}", unit="shard")
    for shard in todo:
        start, count = shard["start"], shard["count"]
        views = {"z": []}
        if header["flip"]:
            views["flip"] = []
        for b in range(start, start + count, batch_size):
            x = torch.stack([torch.as_tensor(dataset[i]["x"]) for i in range(b, min(start + count, b + batch_size))])
            views["z"].append(features(x).cpu())
            if header["flip"]:
                views["flip"].append(features(x.flip(-1)).cpu())
        files = {}
        for key, chunks in views.items():
            arr = torch.cat(chunks).numpy().astype(dtype)
            if list(arr.shape) != [count] + shape:
                raise ValueError(f"shard {shard['index']} {key} features have shape {list(arr.shape)}, "
                                 f"expected {[count] + shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"non-finite {key} features in shard {shard['index']} (images {start}.."
                                 f"{start + count - 1}; float16 overflow? use dtype='float32')")
            fname = f"shard_{shard['index']:05d}.{'npy' if key == 'z' else 'flip.npy'}"
            _save_shard(out / fname, arr)
            files[key] = fname
        shards.append({"index": shard["index"], "start": start, "count": count, "files": files})
        shards.sort(key=lambda s: s["index"])
        _write_json(out / _MANIFEST, {**header, "shards": shards})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    manifest = {**header, "shards": shards, "complete": True}
    _write_json(out / _MANIFEST, manifest)
    return manifest


class EncoderFeatureDataset(torch.utils.data.Dataset):
    """Cached features, memory-mapped; ``ds[i]`` or ``ds[(i, flip)]`` -> float32 [T, z]."""

    def __init__(self, root):
        self.root = Path(root)
        path = self.root / _MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"no {_MANIFEST} in {str(root)!r}: run extract_encoder_features first")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"features in {str(root)!r} are incomplete: re-run extract_encoder_features")
        self.has_flip = bool(self.manifest["flip"])
        self.feature_shape = tuple(self.manifest["feature_shape"])
        self.shards = self.manifest["shards"]
        self.starts = np.array([s["start"] for s in self.shards])
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    def _array(self, si: int, key: str) -> np.ndarray:
        if (si, key) not in self._maps:  # opened lazily so DataLoader workers each map their own
            arr = np.load(self.root / self.shards[si]["files"][key], mmap_mode="r")
            if arr.shape != (self.shards[si]["count"], *self.feature_shape):
                raise ValueError(f"{self.shards[si]['files'][key]} holds {list(arr.shape)}, expected "
                                 f"{[self.shards[si]['count'], *self.feature_shape]}")
            self._maps[(si, key)] = arr
        return self._maps[(si, key)]

    def __getitem__(self, key) -> torch.Tensor:
        index, flip = key if isinstance(key, tuple) else (key, False)
        if not 0 <= index < len(self):
            raise IndexError(f"feature index {index} out of range for {len(self)} images")
        si = int(np.searchsorted(self.starts, index, side="right") - 1)
        row = index - self.shards[si]["start"]
        arr = self._array(si, "flip" if flip and self.has_flip else "z")
        return torch.from_numpy(np.array(arr[row], dtype=np.float32))


class LatentsWithFeatures(torch.utils.data.Dataset):
    """A ``LatentDataset`` whose items also carry ``'zs'``: cached features of the same image (and
    flip), a tensor [T, z] for one feature folder or a list for several (collates to REPA's zs)."""

    def __init__(self, latents, feature_dirs: Union[str, os.PathLike, Sequence]):
        dirs = [feature_dirs] if isinstance(feature_dirs, (str, os.PathLike)) else list(feature_dirs)
        self.latents = latents
        self.features = [EncoderFeatureDataset(d) for d in dirs]
        for d, f in zip(dirs, self.features):
            if len(f) != len(latents):
                raise ValueError(f"features in {str(d)!r} cover {len(f)} images, the latents {len(latents)}")
            if f.has_flip != bool(getattr(latents, "has_flip", False)):
                raise ValueError(f"features in {str(d)!r} {'have' if f.has_flip else 'lack'} flipped copies but "
                                 "the latents do not match; re-extract them beside these latents")

    def __getattr__(self, name):
        # Everything else the training code asks a latent dataset (num_classes, latent_shape,
        # max_label, ...) is the wrapped dataset's. Guard 'latents' itself: during unpickling in a
        # DataLoader worker it is not set yet, and looking it up here would recurse.
        if name == "latents":
            raise AttributeError(name)
        return getattr(self.latents, name)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, key) -> dict:
        item = dict(self.latents[key])
        zs = [f[key] for f in self.features]
        item["zs"] = zs[0] if len(zs) == 1 else zs
        return item
