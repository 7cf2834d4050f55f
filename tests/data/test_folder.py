import numpy as np
import pytest
from PIL import Image

from masked_dit.data import BadImageError, ImageFolderDataset, center_crop_arr


def _img(path, w, h, value=128):
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[:, : w // 2] = 255 - value
    Image.fromarray(arr).save(path)


def test_class_per_subfolder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            _img(tmp_path / cls / f"{i}.png", 40, 30)
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    item = ds[3]
    assert item["x"].shape == (3, 16, 16) and int(item["y"]) == 1
    assert -1 <= float(item["x"].min()) and float(item["x"].max()) <= 1
    flipped = ds[(3, True)]["x"]
    assert np.allclose(flipped.numpy(), item["x"].flip(-1).numpy())


def test_adm_flat_naming(tmp_path):
    for name in ("n02_001.JPEG", "n01_002.png", "n02_003.png"):
        _img(tmp_path / name, 32, 32)
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert ds.classes == ["n01", "n02"]
    assert [ds.labels[i] for i in range(3)] == [0, 1, 1]  # sorted file names: n01_002, n02_001, n02_003


def test_center_crop_matches_adm():
    im = Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 520, 3), dtype=np.uint8))
    out = center_crop_arr(im, 64)
    assert out.shape == (64, 64, 3)
    # ADM: BOX-halve while the short side >= 128: 520x300 -> 260x150 -> 130x75, then bicubic to
    # short side 64 (111x64), center crop.
    half = im.resize((260, 150), resample=Image.BOX).resize((130, 75), resample=Image.BOX)
    ref = np.array(half.resize((round(130 * 64 / 75), 64), resample=Image.BICUBIC))
    left = (ref.shape[1] - 64) // 2
    assert np.array_equal(out, ref[:, left: left + 64])


def test_bad_images_stop_or_skip(tmp_path):
    (tmp_path / "a").mkdir()
    _img(tmp_path / "a" / "0_good.png", 32, 32)
    (tmp_path / "a" / "1_broken.png").write_bytes(b"not an image")
    _img(tmp_path / "a" / "2_small.png", 8, 8)
    ds = ImageFolderDataset(str(tmp_path), 16)
    with pytest.raises(BadImageError, match="unreadable image .*1_broken.png"):
        ds[1]
    with pytest.raises(BadImageError, match="2_small.png is 8x8, smaller than the required 16px"):
        ds[2]
    skip = ImageFolderDataset(str(tmp_path), 16, on_bad_image="skip")
    with pytest.warns(UserWarning, match="1_broken.png"):
        item = skip[1]
    assert item["x"].shape == (3, 16, 16)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"), 16)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path), 16)
    with pytest.raises(ValueError, match="on_bad_image must be"):
        ImageFolderDataset(str(tmp_path), 16, on_bad_image="ignore")


def test_adm_flat_naming_beside_a_folder_without_images(tmp_path):
    """An empty (or a tool's hidden) subfolder beside ADM-named files switched the listing to class
    subfolders: 'no images found', or the tool's cache taken for the only class."""
    for name in ("n02_001.png", "n01_002.png"):
        _img(tmp_path / name, 32, 32)
    (tmp_path / "empty").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _img(tmp_path / ".ipynb_checkpoints" / "n03_009.png", 32, 32)
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert ds.classes == ["n01", "n02"] and ds.labels == [0, 1]
    assert [p.rsplit("/", 1)[-1] for p in ds.files] == ["n01_002.png", "n02_001.png"]


def test_hidden_files_and_folders_are_not_images_or_classes(tmp_path):
    """macOS copies leave '._x.png' AppleDouble files (not images: BadImageError stopped the run) and
    tools leave hidden folders, which became class 0 and shifted every label."""
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        _img(tmp_path / cls / "0.png", 32, 32)
        (tmp_path / cls / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".thumbnails").mkdir()
    _img(tmp_path / ".thumbnails" / "0.png", 32, 32)
    (tmp_path / "dog" / ".cache").mkdir()
    _img(tmp_path / "dog" / ".cache" / "1.png", 32, 32)
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert ds.classes == ["cat", "dog"] and ds.labels == [0, 1] and len(ds) == 2
    assert int(ds[1]["y"]) == 1


def test_class_folder_order_and_empty_class_keep_their_index(tmp_path):
    """Labels are positions among the sorted folder names (torchvision's ImageFolder), nested
    folders included; an empty class folder keeps its index so later classes do not shift."""
    for cls in ("b", "a", "c"):
        (tmp_path / cls).mkdir()
    _img(tmp_path / "c" / "0.png", 32, 32)
    (tmp_path / "a" / "sub").mkdir()
    _img(tmp_path / "a" / "sub" / "1.png", 32, 32)
    _img(tmp_path / "a" / "2.png", 32, 32)
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert ds.classes == ["a", "b", "c"] and ds.labels == [0, 0, 2]
    assert [p[len(str(tmp_path)) + 1:] for p in ds.files] == ["a/2.png", "a/sub/1.png", "c/0.png"]


def _adm_reference(rgb: Image.Image, size: int) -> np.ndarray:
    """ADM's center_crop_arr written out: BOX halvings, bicubic to the short side, center crop."""
    while min(rgb.size) >= 2 * size:
        rgb = rgb.resize((rgb.size[0] // 2, rgb.size[1] // 2), resample=Image.BOX)
    s = size / min(rgb.size)
    arr = np.array(rgb.resize((round(rgb.size[0] * s), round(rgb.size[1] * s)), resample=Image.BICUBIC))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def test_16bit_grayscale_keeps_its_range(tmp_path):
    """PIL's convert('RGB') clips 16-bit grayscale ('I;16') values to 255: a 16-bit PNG loaded as an
    almost white image. It reads as the 8-bit image of its high byte (as a 16-bit RGB PNG does)."""
    (tmp_path / "a").mkdir()
    gray16 = (np.random.RandomState(1).rand(45, 37) * 65535).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "a" / "0.png")
    assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I;16")
    x = ImageFolderDataset(str(tmp_path), 16)[0]["x"]
    ref = _adm_reference(Image.fromarray((gray16 >> 8).astype(np.uint8)).convert("RGB"), 16)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref / 127.5 - 1, atol=1e-6)
    assert float(x.mean()) < 0.5  # not the clipped, nearly white image


def test_16bit_grayscale_opened_as_32bit_keeps_its_range(tmp_path):
    """PIL opens a 16-bit PGM (and, in older Pillow, a 16-bit PNG) as 32-bit 'I', which convert('RGB')
    clips the same way; an 'I' image of 8-bit values is left as convert reads it."""
    from masked_dit.data.folder import to_rgb

    (tmp_path / "a").mkdir()
    gray16 = (np.random.RandomState(1).rand(45, 37) * 65535).astype(np.uint16)
    as_int32 = Image.fromarray(gray16.astype(np.int32), mode="I")
    as_int32.save(tmp_path / "a" / "0.pgm")
    want = np.asarray(Image.fromarray((gray16 >> 8).astype(np.uint8)).convert("RGB"))
    assert np.array_equal(np.asarray(to_rgb(as_int32)), want)
    x = ImageFolderDataset(str(tmp_path), 16)[0]["x"]
    ref = _adm_reference(Image.fromarray((gray16 >> 8).astype(np.uint8)).convert("RGB"), 16)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref / 127.5 - 1, atol=1e-6)
    gray8 = Image.fromarray((gray16 >> 8).astype(np.int32), mode="I")
    assert np.array_equal(np.asarray(to_rgb(gray8)), np.asarray(gray8.convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK"])
def test_other_modes_read_as_rgb_then_crop(tmp_path, mode):
    """Grayscale, alpha, palette and CMYK files: converted to RGB as torchvision's loader, then
    ADM-cropped (odd, non-square sizes)."""
    (tmp_path / "a").mkdir()
    rgb = Image.fromarray(np.random.RandomState(2).randint(0, 255, (51, 70, 3), dtype=np.uint8))
    im = rgb.convert(mode)
    im.save(tmp_path / "a" / ("0.jpg" if mode == "CMYK" else "0.png"))
    with Image.open(tmp_path / "a" / ("0.jpg" if mode == "CMYK" else "0.png")) as f:
        ref = _adm_reference(f.convert("RGB"), 16)
    x = ImageFolderDataset(str(tmp_path), 16)[0]["x"]
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref / 127.5 - 1, atol=1e-6)


def test_min_image_size_zero_upscales_small_images_as_adm(tmp_path):
    """DiT's / fast-DiT's extraction runs ADM's crop on every ImageNet image, upscaling the few whose
    short side is below 256; min_image_size=0 does the same (by default they are bad images)."""
    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a" / "small.png")
    with pytest.raises(BadImageError, match="is 11x7, smaller than the required 16px"):
        ImageFolderDataset(str(tmp_path), 16)[0]
    with pytest.raises(BadImageError, match="smaller than the required 8px"):
        ImageFolderDataset(str(tmp_path), 16, min_image_size=8)[0]
    x = ImageFolderDataset(str(tmp_path), 16, min_image_size=0)[0]["x"]
    ref = _adm_reference(Image.fromarray(arr), 16)
    assert ref.shape == (16, 16, 3)
    np.testing.assert_array_equal(((x.permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8), ref)
    with pytest.raises(ValueError, match="min_image_size must be >= 0"):
        ImageFolderDataset(str(tmp_path), 16, min_image_size=-1)


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    """A link to a folder elsewhere is followed (as torchvision); a link back up (``cat/loop -> ..``) counted
    every image again at each level until the path grew too long (10 images became 409)."""
    root, extra = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (root / "cat", root / "dog", extra):
        folder.mkdir(parents=True)
    for i in range(2):
        _img(root / "cat" / f"{i}.png", 20, 20)
        _img(root / "dog" / f"{i}.png", 20, 20)
    _img(extra / "x.png", 20, 20)
    (root / "cat" / "more").symlink_to(extra, target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    (root / "dog" / "up").symlink_to(root, target_is_directory=True)  # reaches cat/ and dog/ again
    ds = ImageFolderDataset(str(root), 16)
    names = sorted(p.rsplit("/", 1)[-1] for p in ds.files)
    # cat: its 2 + more/x; dog: its 2 + up/cat's 2 + up/cat/more/x (each real folder once; not dog again)
    assert ds.classes == ["cat", "dog"] and len(ds) == 3 + 5
    assert names.count("x.png") == 2 and [int(y) for y in ds.labels].count(0) == 3
