"""Datasets: embedded digits, image folders, extracted VAE latents; resumable batch streams."""
from __future__ import annotations

from masked_dit.data.digits import DigitsDataset, load_digits_tensor
from masked_dit.data.folder import BadImageError, ImageFolderDataset, center_crop_arr
from masked_dit.data.latents import LatentDataset, extract_latents, sample_posterior
from masked_dit.data.loader import BatchStream, ResumableBatchSampler


def build_dataset(data_cfg, model_cfg=None):
    """The training dataset a ``DataConfig`` names, checked against the model's input shape."""
    if data_cfg.source == "digits":
        ds = DigitsDataset("train", data_cfg.image_size)
        shape = (1, data_cfg.image_size)
    elif data_cfg.source == "folder":
        if not data_cfg.path:
            raise ValueError("--data.source=folder needs --data.path=<image folder>")
        ds = ImageFolderDataset(data_cfg.path, data_cfg.image_size, data_cfg.on_bad_image, data_cfg.min_image_size)
        shape = (3, data_cfg.image_size)
    elif data_cfg.source == "latents":
        if not data_cfg.path:
            raise ValueError("--data.source=latents needs --data.path=<folder made by masked-dit extract-latents>")
        ds = LatentDataset(data_cfg.path)
        shape = (ds.latent_shape[0], ds.latent_shape[-1])
        if data_cfg.random_flip and not ds.has_flip:
            # A latent cannot be mirrored after the VAE: without the flipped moments the flip keys
            # select nothing, and a run believed augmented would silently train without it.
            import warnings

            warnings.warn(f"--data.random_flip=true but the latents in {data_cfg.path} were extracted without "
                          "--flip: no flipped copies, training without flips (re-extract with --flip, or pass "
                          "--data.random_flip=false)", stacklevel=2)
        warn_latent_scale(ds.manifest, data_cfg)
        if getattr(data_cfg, "features", None):
            from masked_dit.data.encoders import LatentsWithFeatures

            ds = LatentsWithFeatures(ds, feature_dirs(data_cfg))  # items gain REPA's 'zs'
    else:
        raise ValueError(f"unknown data source {data_cfg.source!r}; valid: digits, folder, latents")
    if model_cfg is not None and (model_cfg.in_channels, model_cfg.input_size) != shape:
        raise ValueError(f"data gives {shape[0]}x{shape[1]}x{shape[1]} inputs but the model expects "
                         f"--model.in_channels={model_cfg.in_channels} --model.input_size={model_cfg.input_size}")
    # Labels out of the class embedding's range would index past it (a CUDA assert, not an error).
    # An unconditional model (MaskDiT, num_classes=0) ignores the labels.
    if model_cfg is not None and model_cfg.num_classes == 0:
        return ds
    if model_cfg is not None and data_cfg.source == "digits" and ds.num_classes > model_cfg.num_classes:
        raise ValueError(f"digits hold {ds.num_classes} classes (labels 0-{ds.num_classes - 1}) but the model has "
                         f"--model.num_classes={model_cfg.num_classes}")
    if model_cfg is not None and data_cfg.source == "folder" and ds.num_classes > model_cfg.num_classes:
        raise ValueError(f"image folder {data_cfg.path} has {ds.num_classes} classes but the model has "
                         f"--model.num_classes={model_cfg.num_classes}")
    if model_cfg is not None and data_cfg.source == "latents" and ds.max_label >= model_cfg.num_classes:
        raise ValueError(f"latents {data_cfg.path} hold labels up to {ds.max_label} but the model has "
                         f"--model.num_classes={model_cfg.num_classes}")
    return ds


def warn_latent_scale(manifest: dict, data_cfg) -> None:
    """Warns when --data.latent_scale is not the scaling_factor of the VAE that made the latents: the
    model would silently learn latents off unit variance (SDXL's VAE at SD's 0.18215: 1.4x too wide)."""
    import math
    import warnings

    factor = manifest.get("scaling_factor")
    if factor is not None and not math.isclose(factor, data_cfg.latent_scale, rel_tol=1e-4):
        warnings.warn(f"latents {data_cfg.path} were extracted with a VAE whose scaling_factor is {factor} but "
                      f"--data.latent_scale={data_cfg.latent_scale}: pass --data.latent_scale={factor}", stacklevel=3)


def feature_dirs(data_cfg) -> list:
    """The cached encoder-feature folders ``--data.features`` names: ``<path>/features/<name>``."""
    from pathlib import Path

    from masked_dit.data.encoders import FEATURES_DIR

    if not data_cfg.path:
        raise ValueError("--data.features needs --data.path=<folder made by masked-dit extract-latents>")
    root = Path(data_cfg.path) / FEATURES_DIR
    dirs = []
    for name in (n.strip() for n in data_cfg.features.split(",") if n.strip()):
        if not (root / name / "manifest.json").exists():
            found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(f"--data.features={name}: no cached features in {root / name} (found: "
                                    f"{', '.join(found) or 'none'}); run `masked-dit extract-features <images> "
                                    f"{data_cfg.path} --encoder <spec>` first")
        dirs.append(root / name)
    return dirs


__all__ = ["DigitsDataset", "load_digits_tensor", "ImageFolderDataset", "BadImageError", "center_crop_arr",
           "LatentDataset", "extract_latents", "sample_posterior", "BatchStream", "ResumableBatchSampler",
           "build_dataset", "feature_dirs", "warn_latent_scale"]
