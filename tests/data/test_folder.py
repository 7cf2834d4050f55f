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
