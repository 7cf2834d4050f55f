"""Encoder specs: REPA's ``--enc-type`` names, hub ids, local folders and files -> what to load.

Each REPA family is one ``Family`` row holding what REPA does with it (sources in the package
docstring). ``parse_encoder_spec`` turns a spec string into an ``EncoderSpec`` without loading
anything; ``encoder_z_dim`` and ``repa_encoder_image_size`` answer from the table (or a folder's
config.json).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
CLIP_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)  # REPA train.py:36-37 (OpenAI CLIP's)
CLIP_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
# REPA's model_config letter -> (hub id size word, timm architecture, feature width z_dim)
DINOV2_SIZES = {
    "s": ("small", "vit_small_patch14", 384),
    "b": ("base", "vit_base_patch14", 768),
    "l": ("large", "vit_large_patch14", 1024),
    "g": ("giant", "vit_giant_patch14", 1536),
}
BACKENDS = ("transformers", "timm")


@dataclass(frozen=True)
class Family:
    """One REPA encoder family: the sizes it comes in and how REPA feeds it and reads it out."""
    sizes: dict               # REPA size letter -> feature width z_dim
    hub: dict                 # size letter -> transformers hub id ({}: no hub model, a local checkpoint)
    model_types: tuple        # transformers config.model_type values that hold this family
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD
    native_input: bool = False   # True: REPA feeds the raw images (256 px) unresized; False: 224 * (R // 256)
    resize_first: bool = False   # CLIP: /255, resize, then normalise (the others normalise, then resize)
    final_norm: bool = True      # whether the features pass the backbone's final LayerNorm
    layer_norm_eps: Optional[float] = None  # the original model's eps, forced over a hub config's default


FAMILIES = {
    "dinov2": Family({s: z for s, (_, _, z) in DINOV2_SIZES.items()},
                     {s: f"facebook/dinov2-{w}" for s, (w, _, _) in DINOV2_SIZES.items()}, ("dinov2",)),
    "dinov2reg": Family({s: z for s, (_, _, z) in DINOV2_SIZES.items()},
                        {s: f"facebook/dinov2-with-registers-{w}" for s, (w, _, _) in DINOV2_SIZES.items()},
                        ("dinov2_with_registers",)),
    "dinov1": Family({"b": 768}, {"b": "facebook/dino-vitb16"}, ("vit",), native_input=True, layer_norm_eps=1e-6),
    "clip": Family({"L": 1024}, {"L": "openai/clip-vit-large-patch14"}, ("clip", "clip_vision_model"),
                   mean=CLIP_DEFAULT_MEAN, std=CLIP_DEFAULT_STD, resize_first=True, final_norm=False),
    "mocov3": Family({"s": 384, "b": 768, "l": 1024}, {}, (), native_input=True),
    "mae": Family({"l": 1024}, {"l": "facebook/vit-mae-large"}, ("vit_mae",), native_input=True, final_norm=False,
                  layer_norm_eps=1e-6),
    "jepa": Family({"h": 1280}, {"h": "facebook/ijepa_vith14_1k"}, ("ijepa",), layer_norm_eps=1e-6),
}
# transformers config.model_type -> REPA family (for hub ids and folders given without a REPA name)
MODEL_TYPE_FAMILY = {t: name for name, fam in FAMILIES.items() for t in fam.model_types}
REPA_NAMES = ", ".join(f"{name}-vit-{{{','.join(fam.sizes)}}}" if len(fam.sizes) > 1
                       else f"{name}-vit-{next(iter(fam.sizes))}" for name, fam in FAMILIES.items())
SPEC_FORMS = (f"a REPA name ({REPA_NAMES}; NAME:PATH for a local folder or MoCo v3 checkpoint), a hub id "
              "(facebook/dinov2-base), a local transformers folder, or a timm DINOv2 name "
              "(vit_base_patch14_dinov2.lvd142m)")

_REPA_NAME = re.compile(r"^(?P<family>[a-z0-9]+)-(?P<arch>[a-z]+)-(?P<size>[A-Za-z])$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TIMM_NAME = re.compile(r"^vit_\w+_patch14(_reg\d+)?_dinov2(\.\w+)?$")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed spec: load ``source`` (hub id, folder, timm name or checkpoint file) with ``backend``.

    ``family``/``size`` are REPA's when the spec names them; for hub ids and folders the family
    comes from config.json's model_type at load time.
    """
    spec: str
    backend: str
    source: str
    family: Optional[str] = None
    size: Optional[str] = None

    @property
    def repa_name(self) -> Optional[str]:
        return f"{self.family}-vit-{self.size}" if self.family else None


#################################################################################
#                                   Parsing                                     #
#################################################################################

def _repa_name(name: str):
    """(family, size letter) for REPA's ``dinov2-vit-b`` style names, None for other forms."""
    m = _REPA_NAME.match(name)
    if m is None:
        return None
    family, arch, size = m.group("family", "arch", "size")
    if family not in FAMILIES:
        raise ValueError(f"encoder {name!r}: unknown REPA encoder family {family!r}; valid: {REPA_NAMES}")
    sizes = FAMILIES[family].sizes
    letter = next((s for s in sizes if s.lower() == size.lower()), None)  # clip-vit-L, also clip-vit-l
    if arch != "vit" or letter is None:
        raise ValueError(f"encoder {name!r}: {family} comes as {', '.join('vit-' + s for s in sizes)} "
                         f"(REPA names: {REPA_NAMES})")
    return family, letter


def _check_folder(path: Path, spec: str) -> str:
    if path.is_dir() and (path / "config.json").exists():
        return str(path)
    raise ValueError(f"encoder path {spec!r} is not a folder with config.json (a transformers save_pretrained "
                     "folder); for a timm DINOv2 checkpoint file pass the timm name with weights=<file>, for MoCo v3 "
                     "mocov3-vit-b:<file>")


def parse_encoder_spec(spec: str, backend: Optional[str] = None) -> EncoderSpec:
    """The ``EncoderSpec`` for ``spec`` (forms: see the package docstring); checks form, not weights."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; valid: {', '.join(BACKENDS)}")
    spec = str(spec).strip()
    name, _, local = spec.partition(":")
    if local and _REPA_NAME.match(name):  # NAME:PATH, REPA's recipe for a local copy of the weights
        return _repa_spec(spec, name, backend, os.path.expanduser(local))
    path = Path(spec).expanduser()
    if path.exists():
        if backend == "timm":
            raise ValueError(f"encoder {spec!r} is a local folder; it loads through transformers, not timm")
        return EncoderSpec(spec, "transformers", _check_folder(path, spec))
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(("/", os.sep)):
        raise FileNotFoundError(f"encoder path {spec!r} does not exist")
    if _repa_name(spec) is not None:
        return _repa_spec(spec, spec, backend, None)
    timm_name = spec.split(":", 1)[1] if spec.startswith("timm:") else spec
    timm_name = timm_name[len("timm/"):] if timm_name.startswith("timm/") else timm_name
    if _TIMM_NAME.match(timm_name):
        if backend == "transformers":
            raise ValueError(f"encoder {spec!r} is a timm name; it cannot load through transformers")
        return EncoderSpec(spec, "timm", timm_name, "dinov2reg" if "_reg" in timm_name else "dinov2")
    if _HUB_ID.match(spec):
        if backend == "timm":
            raise ValueError(f"encoder {spec!r} is a transformers hub id; it cannot load through timm")
        return EncoderSpec(spec, "transformers", spec)
    raise ValueError(f"unknown encoder spec {spec!r}; expected {SPEC_FORMS}")


def _repa_spec(spec: str, name: str, backend: Optional[str], local: Optional[str]) -> EncoderSpec:
    family, size = _repa_name(name)
    if family == "mocov3":  # no transformers model: the official checkpoint file into a timm ViT
        if backend == "transformers":
            raise ValueError(f"encoder {spec!r}: MoCo v3 loads from its checkpoint into a timm ViT, not transformers")
        file = local or f"ckpts/mocov3_vit{size}.pth"  # REPA's place for it (utils.py:77)
        if local is not None and not Path(local).is_file():
            raise FileNotFoundError(f"encoder {spec!r}: checkpoint file {local!r} does not exist")
        return EncoderSpec(spec, "timm", file, family, size)
    if family in ("dinov2", "dinov2reg") and local is None:
        if backend is None:
            backend = "transformers" if _installed("transformers") or not _installed("timm") else "timm"
        if backend == "timm":
            arch = DINOV2_SIZES[size][1]
            return EncoderSpec(spec, "timm", f"{arch}{'_reg4' if family == 'dinov2reg' else ''}_dinov2.lvd142m",
                               family, size)
    elif backend == "timm":
        raise ValueError(f"encoder {spec!r} loads through transformers only (backend 'timm' is for DINOv2 and MoCo v3)")
    if local is None:
        return EncoderSpec(spec, "transformers", FAMILIES[family].hub[size], family, size)
    path = Path(local)
    if not path.exists():
        raise FileNotFoundError(f"encoder {spec!r}: folder {local!r} does not exist")
    return EncoderSpec(spec, "transformers", _check_folder(path, spec), family, size)


def resolve_encoder(spec: str, backend: Optional[str] = None) -> tuple[str, str]:
    """(backend, source) that ``load_encoder`` loads for ``spec`` (see the package docstring)."""
    parsed = parse_encoder_spec(spec, backend)
    return parsed.backend, parsed.source


#################################################################################
#                           Answers without loading                             #
#################################################################################

def _read_config(source: str, spec: str) -> dict:
    """config.json of a local folder or hub id (the hub's through transformers' cache)."""
    path = Path(source) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise ImportError(f"encoder {spec!r} loads through transformers: pip install transformers") from exc
    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except OSError as exc:
        raise OSError(f"cannot read the config of encoder {spec!r} ({exc}); without internet pass a local "
                      "save_pretrained folder") from exc


def _config_family(config: dict, spec: str) -> str:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPE_FAMILY:
        raise ValueError(f"encoder {spec!r} is a {model_type!r} model; supported model types: "
                         f"{', '.join(MODEL_TYPE_FAMILY)} (REPA: {REPA_NAMES})")
    return MODEL_TYPE_FAMILY[model_type]


def _config_width(config: dict) -> int:
    vision = config.get("vision_config") or config  # a full CLIP model keeps its image tower's in vision_config
    return int(vision["hidden_size"])


def encoder_family(spec: str) -> str:
    """REPA family of ``spec`` ('dinov2', 'clip', ...); hub ids and folders: from config.json."""
    parsed = parse_encoder_spec(spec)
    if parsed.family is not None:
        return parsed.family
    return _config_family(_read_config(parsed.source, spec), spec)


def encoder_z_dim(spec: str) -> int:
    """Feature width of an encoder without loading its weights (``dinov2-vit-b`` -> 768).

    REPA names from the table (NAME:FOLDER from the folder's config.json), timm names from the
    architecture, hub ids and folders from config.json.
    """
    parsed = parse_encoder_spec(spec)
    if parsed.backend == "transformers" and (parsed.family is None or Path(parsed.source).is_dir()):
        return _config_width(_read_config(parsed.source, spec))  # a hub id or a folder (also NAME:FOLDER)
    if parsed.size is not None:
        return FAMILIES[parsed.family].sizes[parsed.size]
    return next(z for _, arch, z in DINOV2_SIZES.values() if parsed.source.startswith(arch + "_"))  # timm name


def repa_encoder_image_size(resolution: int, spec: Optional[str] = None) -> int:
    """REPA's encoder input side for ``resolution`` px images.

    224 * (resolution // 256) (224 below 512) for DINOv2, CLIP and I-JEPA, which REPA resizes to
    it; MoCo v3, MAE and DINOv1 take the raw images unresized (train.py:45-54), so their side is
    the resolution itself, 256 * (resolution // 256) here (256 below 512; REPA runs them at 256 only).
    Without ``spec``: the DINOv2 rule.
    """
    scale = max(1, int(resolution) // 256)
    if spec is not None and FAMILIES[encoder_family(spec)].native_input:
        return 256 * scale
    return 224 * scale
