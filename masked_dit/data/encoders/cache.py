"""REPA features cached beside extracted VAE latents, and datasets reading them back."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from masked_dit.data.encoders.features import EncoderFeatures
from masked_dit.data.latents import ShardedRows, read_manifest
from masked_dit.data.shards import ShardProgress, read_own_manifest, save_npy_atomic
from masked_dit.data.encoders.specs import _REPA_NAME

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
    """A folder name for an encoder spec ('facebook/dinov2-base' -> 'facebook--dinov2-base',
    'mocov3-vit-b:/ckpts/vit-b-300ep.pth.tar' -> 'mocov3-vit-b', a folder -> its name)."""
    repa_name, _, local = spec.partition(":")
    if local and _REPA_NAME.match(repa_name):
        return repa_name
    name = Path(spec).name if Path(spec).expanduser().exists() else spec
    return re.sub(r"[^\w.-]+", "--", name).strip("-") or "encoder"


@torch.no_grad()
def extract_encoder_features(dataset, latents_dir, features: EncoderFeatures, *, name: Optional[str] = None,
                             batch_size: int = 32, dtype: str = "float16", progress: bool = True,
                             world=None) -> dict:
    """Caches ``features`` of ``dataset``'s images beside the latents extracted from the same dataset.

    ``dataset`` items ``{'x': [3, H, W] in [-1, 1] (or uint8), ...}`` in the order used by
    ``extract_latents``; ``features`` holds one encoder. Writes ``<latents_dir>/features/<name>``
    and returns its manifest. Re-running resumes; different settings are an error. Under torchrun
    (``world``: ``masked_dit.train.dist.World``) each rank computes its share of the shards.
    """
    if len(features.encoders) != 1:
        raise ValueError(f"cache one encoder at a time ({features.name} has {len(features.encoders)})")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"feature dtype must be float16 or float32 (got {dtype!r})")
    root = Path(latents_dir)
    latents = read_manifest(root, _MANIFEST, "latents", "extract-latents", "extract-latents")
    n = len(dataset)
    if n != latents["num_images"]:
        raise ValueError(f"dataset has {n} images but the latents were extracted from {latents['num_images']} images")
    image_size = int(dataset[0]["x"].shape[-1])
    if image_size != latents["image_size"]:
        raise ValueError(f"dataset images are {image_size}px but the latents were made from "
                         f"{latents['image_size']}px images")
    digest = dataset.digest() if hasattr(dataset, "digest") else None
    if digest and latents.get("images_sha1", digest) != digest:  # rows are matched to latents by index
        raise ValueError(f"the images in {getattr(dataset, 'root', 'the dataset')} are not the ones the latents in "
                         f"{str(root)!r} were extracted from (other files or order): pass that image folder")
    min_size = getattr(dataset, "min_image_size", None)  # which image a skip or an upscale put in each row
    if min_size is not None and latents.get("min_image_size", min_size) != min_size:
        raise ValueError(f"the dataset takes images of short side >= {min_size}px but the latents in {str(root)!r} "
                         f"took >= {latents['min_image_size']}px: pass min_image_size={latents['min_image_size']}")
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
    old = None
    if (out / _MANIFEST).exists():
        old = read_own_manifest(out / _MANIFEST)
        mismatched = [k for k in header if old.get(k) != header[k]]
        if mismatched:
            raise ValueError(f"{out / _MANIFEST} was made with different settings ({', '.join(mismatched)}); "
                             "pass another --name")
    done = ShardProgress(out / _MANIFEST, old, world)
    todo = done.share([s for s in latents["shards"] if s["index"] not in done.done])
    bar = done.progress_bar(f"extract-features {name}", todo) if progress else None
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
            save_npy_atomic(out / fname, arr)
            files[key] = fname
        done.add({"index": shard["index"], "start": start, "count": count, "files": files}, header)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return done.finish(lambda shards: header, len(latents["shards"]))


class EncoderFeatureDataset(ShardedRows):
    """Cached features, memory-mapped; ``ds[i]`` or ``ds[(i, flip)]`` -> float32 [T, z]."""
    what = "features"

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, _MANIFEST, "features", "extract_encoder_features",
                                      "extract_encoder_features")
        try:
            self.has_flip = bool(self.manifest["flip"])
            self.feature_shape = tuple(self.manifest["feature_shape"])
            self.shards = self.manifest["shards"]
            int(self.manifest["num_images"])
        except (KeyError, TypeError, ValueError) as exc:  # a hand-edited or foreign manifest.json, as LatentDataset
            raise ValueError(f"features {self.root}: {_MANIFEST} is not one extract-features wrote (bad or missing "
                             f"{exc}): re-run extract-features") from None
        # every shard file there and of the right shape now, not a missing or truncated one at some step
        keys = ["z"] + (["flip"] if self.has_flip else [])
        self._open_shards(dict.fromkeys(keys, list(self.feature_shape)))

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    def __getitem__(self, key) -> torch.Tensor:
        index, flip = key if isinstance(key, tuple) else (key, False)
        if not 0 <= index < len(self):
            raise IndexError(f"feature index {index} out of range for {len(self)} images")
        si, row = self._locate(index)
        return self._row(si, "flip" if flip and self.has_flip else "z", row)


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
