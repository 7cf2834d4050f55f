"""Image-folder datasets: class-per-subfolder (ImageNet train layout) or ADM's flat
``ClassName_ImgID.jpg`` naming, with DiT/ADM's center crop.

Every image is center-cropped to ``image_size`` exactly as ADM does it (halve with BOX while the
short side is >= 2x the target, bicubic resize of the short side, center crop). An unreadable or
undersized image (short side below ``min_image_size``, by default ``image_size``) raises an error
naming the file, or (``on_bad_image='skip'``) is replaced by the next good image with a one-time
warning per file. ``min_image_size=0`` takes every image, upscaling small ones as ADM's crop does
(DiT's and fast-DiT's extraction: ImageNet's train split has images below 256 px).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")  # eval reads these too


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file."""


#################################################################################
#                                 Image helpers                                 #
#################################################################################

def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM/DiT center crop: BOX halvings, bicubic resize of the short side, center crop -> uint8 HWC."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def to_rgb(pil_image):
    """RGB as torchvision's loader (``convert('RGB')``), but 16-bit grayscale keeps its high byte:
    PIL's convert clips 'I;16' values to 255, so a 16-bit PNG/TIFF came out nearly all white. PIL
    opens some 16-bit files as 32-bit 'I' (PGM with maxval 65535; PNG in older Pillow), which does not
    say the bit depth: values above 255 are read as 16-bit (clipped to 65535), others as 8-bit."""
    from PIL import Image

    if pil_image.mode.startswith("I;16") or pil_image.mode == "I":
        arr = np.asarray(pil_image).astype(np.int64)  # native order whatever the file's ('I;16B')
        if pil_image.mode != "I" or arr.max(initial=0) > 255:
            pil_image = Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    return pil_image.convert("RGB")


def load_image(path: str, image_size: int, min_size: int | None = None) -> np.ndarray:
    """Reads ``path`` as RGB and center-crops it; raises BadImageError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            im = to_rgb(im)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadImageError(f"unreadable image {path}: {type(exc).__name__}: {exc}") from None
    need = image_size if min_size is None else min_size
    if min(im.size) < need:
        raise BadImageError(f"image {path} is {im.size[0]}x{im.size[1]}, smaller than the required {need}px short side")
    return center_crop_arr(im, image_size)


def _is_image(name: str) -> bool:
    # Hidden names are never the dataset's: '._x.JPEG' are macOS AppleDouble metadata files (not
    # images), '.ipynb_checkpoints' / '.thumbnails' folders are tools' caches, not classes.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_files(folder: str) -> list[str]:
    """Images anywhere under ``folder`` in sorted order (symlinked folders followed, as torchvision,
    each real folder once: a link back up, ``b/loop -> ..``, counted the images again at every level)."""
    found, seen = [], {os.path.realpath(folder)}
    for dirpath, dirnames, names in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):  # pruned while walking, in a fixed order so the first link wins
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        found.append((dirpath, sorted(n for n in names if _is_image(n))))
    return [os.path.join(dirpath, n) for dirpath, names in sorted(found) for n in names]


def list_images(root: str) -> tuple[list[str], list[int], list[str]]:
    """Files and labels under ``root``: class subfolders if any hold images, else ADM naming."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise NotADirectoryError(f"image folder {root!r} is a file; name the folder that holds the images")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    subdirs = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    per_class = [_class_files(os.path.join(root, d)) for d in subdirs]
    files, labels, classes = [], [], []
    if any(per_class):
        # Class index = position among the sorted folder names (an empty folder keeps its index).
        classes = subdirs
        for ci, names in enumerate(per_class):
            files += names
            labels += [ci] * len(names)
    else:  # no subfolder holds images (an empty or tool's folder beside ADM-named files)
        names = sorted(n for n in os.listdir(root) if _is_image(n) and os.path.isfile(os.path.join(root, n)))
        files = [os.path.join(root, n) for n in names]
        class_of = [n.split("_")[0] for n in names]  # ADM: the class is the name up to the first '_'
        classes = sorted(set(class_of))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[c] for c in class_of]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
    return files, labels, classes


#################################################################################
#                                    Dataset                                    #
#################################################################################

class ImageFolderDataset(torch.utils.data.Dataset):
    """Items ``{'x': [3, S, S] float32 in [-1, 1], 'y': int64}``; the key may be ``(index, flip)``."""

    def __init__(self, root: str, image_size: int = 256, on_bad_image: str = "stop", min_image_size: int | None = None):
        if on_bad_image not in ("stop", "skip"):
            raise ValueError(f"on_bad_image must be 'stop' or 'skip' (got {on_bad_image!r})")
        if min_image_size is not None and min_image_size < 0:
            raise ValueError(f"min_image_size must be >= 0, or none for image_size (got {min_image_size})")
        self.root, self.image_size, self.on_bad_image = root, image_size, on_bad_image
        self.min_image_size = image_size if min_image_size is None else min_image_size
        self.files, self.labels, self.classes = list_images(root)
        self.num_classes = len(self.classes)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def digest(self) -> str:
        """sha1 of the image list (paths relative to the root, in order, with labels): extract-latents
        records it so a resume, and extract-features (rows matched by index), can tell other images."""
        import hashlib

        h = hashlib.sha1()
        for file, label in zip(self.files, self.labels):
            h.update(f"{os.path.relpath(file, self.root).replace(os.sep, '/')}\t{label}\n".encode())
        return h.hexdigest()

    def read(self, index: int) -> np.ndarray:
        return load_image(self.files[index], self.image_size, self.min_image_size)

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            try:
                arr = self.read(i)
                break
            except BadImageError as err:
                if self.on_bad_image == "stop":
                    raise
                if self.files[i] not in self._warned:
                    self._warned.add(self.files[i])
                    warnings.warn(f"skipping {err}", stacklevel=2)
        else:
            raise BadImageError(f"no readable image under {self.root!r}")
        if flip:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1
        return {"x": x, "y": torch.tensor(self.labels[i], dtype=torch.int64)}
