"""extract-latents with a tiny randomly initialised AutoencoderKL, and training on the result."""
import json
import os

import pytest
import torch

import diffusers  # CI installs it (the "vae" extra): these tests require it

from masked_dit.cli import main  # noqa: E402
from masked_dit.data import ImageFolderDataset, LatentDataset, extract_latents, sample_posterior  # noqa: E402
from tests.data.tiny_data import PoolEncoder as _PoolEncoder, save_tiny_vae, write_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def test_extract_verify_and_read(tiny_vae_dir, images_dir, tmp_path):
    out = tmp_path / "latents"
    rc = main(["extract-latents", str(images_dir), str(out), "--vae", str(tiny_vae_dir), "--image-size", "16",
               "--flip", "--shard-size", "4", "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 6 and manifest["latent_shape"] == [4, 8, 8]
    assert [s["count"] for s in manifest["shards"]] == [4, 2]
    ds = LatentDataset(out)
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    images = ImageFolderDataset(str(images_dir), 16)
    with torch.no_grad():
        x = images[5]["x"][None]
        dist = vae.encode(x).latent_dist
        dist_flip = vae.encode(x.flip(-1)).latent_dist
    item = ds[5]
    torch.testing.assert_close(item["mean"], dist.mean[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(item["std"], dist.std[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds[(5, True)]["mean"], dist_flip.mean[0], rtol=1e-5, atol=1e-5)
    assert int(item["y"]) == 1
    # each step draws a fresh posterior sample times 0.18215
    batch = {"mean": item["mean"][None], "std": item["std"][None], "y": item["y"][None]}
    torch.manual_seed(3)
    z = sample_posterior(batch, 0.18215)["x"]
    torch.manual_seed(3)
    eps = torch.randn_like(batch["mean"])
    torch.testing.assert_close(z, (batch["mean"] + batch["std"] * eps) * 0.18215)


def test_extract_with_min_image_size_records_it(tiny_vae_dir, tmp_path):
    """--min-image-size 0 extracts a folder with an image below --image-size (upscaled as ADM's crop);
    the manifest records it, so extract-features (same images, same order) takes it too."""
    from PIL import Image

    (tmp_path / "img" / "a").mkdir(parents=True)
    for i, side in enumerate((20, 9, 24, 16)):
        Image.new("RGB", (side, side + 3), (40 * i, 90, 200)).save(tmp_path / "img" / "a" / f"{i}.png")
    args = ["extract-latents", str(tmp_path / "img"), str(tmp_path / "lat"), "--vae", str(tiny_vae_dir),
            "--image-size", "16", "--batch-size", "2", "--shard-size", "4", "--device", "cpu"]
    assert main(args) == 2  # 9 px < 16 px: a bad image by default (one-line error; no shard counted as done)
    assert main(args + ["--min-image-size", "0"]) == 0
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 4 and manifest["min_image_size"] == 0
    # a resume with another minimum would put other images (upscaled, or a skip's neighbour) in rows
    (tmp_path / "lat" / "shard_00000.mean.npy").unlink()
    with pytest.raises(ValueError, match=r"different settings \(min_image_size\)"):
        extract_latents(ImageFolderDataset(str(tmp_path / "img"), 16, "skip"), tmp_path / "lat", None,
                        vae_name=str(tiny_vae_dir), shard_size=4, batch_size=2, progress=False)


def test_extraction_resumes(tiny_vae_dir, images_dir, tmp_path):
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    ds = ImageFolderDataset(str(images_dir), 16)
    out = tmp_path / "lat"
    extract_latents(ds, out, vae, shard_size=2, batch_size=2, progress=False)
    first = out / "shard_00000.mean.npy"
    stamp = os.stat(first).st_mtime_ns
    os.remove(out / "shard_00002.mean.npy")  # as if killed while writing the last shard
    manifest = extract_latents(ds, out, vae, shard_size=2, batch_size=2, progress=False)
    assert os.stat(first).st_mtime_ns == stamp  # done shards are not redone
    assert len(manifest["shards"]) == 3 and (out / "shard_00002.mean.npy").exists()
    with pytest.raises(ValueError, match="different settings \\(flip\\)"):
        extract_latents(ds, out, vae, shard_size=2, batch_size=2, flip=True, progress=False)


def test_non_finite_latents_are_rejected(images_dir, tmp_path):
    class NaNVAE:
        def encode(self, x):
            class D:
                mean = torch.full((x.shape[0], 4, 2, 2), float("nan"))
                std = torch.ones(x.shape[0], 4, 2, 2)
            return type("Out", (), {"latent_dist": D})
    with pytest.raises(ValueError, match="non-finite mean latents in shard 0"):
        extract_latents(ImageFolderDataset(str(images_dir), 16), tmp_path / "x", NaNVAE(), batch_size=2,
                        shard_size=2, progress=False)


def test_missing_latents_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `masked-dit extract-latents` first"):
        LatentDataset(tmp_path)


def test_train_on_latents(tiny_vae_dir, images_dir, tmp_path):
    from masked_dit.train import train
    from tests.train.tiny import tiny_config

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    extract_latents(ImageFolderDataset(str(images_dir), 16), tmp_path / "lat", vae, shard_size=4, batch_size=2,
                    flip=True, progress=False)
    cfg = tiny_config("digits-dit", tmp_path, **{"data.source": "latents", "data.path": str(tmp_path / "lat"),
                                                 "data.random_flip": True, "model.in_channels": 4,
                                                 "model.input_size": 8, "model.num_classes": 2,
                                                 "model.patch_size": 2, "train.global_batch": 2, "train.steps": 2})
    assert train(cfg)["step"] == 2
    bad = tiny_config("digits-dit", tmp_path, **{"data.source": "latents", "data.path": str(tmp_path / "lat"),
                                                 "run.name": "bad"})
    with pytest.raises(ValueError, match="data gives 4x8x8 inputs but the model expects"):
        train(bad)


def test_random_flip_on_latents_without_flipped_moments_warns(tiny_vae_dir, images_dir, tmp_path):
    """--data.random_flip is on by default (ImageNet presets) but latents extracted without --flip hold no
    mirrored moments: the flip keys were silently ignored and a whole run trained without its augmentation."""
    from masked_dit.configs import get_preset
    from masked_dit.data import build_dataset

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    extract_latents(ImageFolderDataset(str(images_dir), 16), tmp_path / "lat", vae, shard_size=4, batch_size=2,
                    flip=False, progress=False)
    data = get_preset("imagenet256-dit-xl2").data
    data.source, data.path = "latents", str(tmp_path / "lat")
    assert data.random_flip
    with pytest.warns(UserWarning, match="extracted without --flip"):
        build_dataset(data)
    data.random_flip = False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset(data)


def test_latent_scale_other_than_the_vaes_warns(tiny_vae_dir, images_dir, tmp_path):
    """The manifest records the VAE's scaling_factor; training latents of SDXL's VAE (0.13025) at the
    default --data.latent_scale (SD's 0.18215) would silently learn off-unit-variance latents."""
    import warnings

    from masked_dit.configs import get_preset
    from masked_dit.data import build_dataset

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir, scaling_factor=0.13025).eval()
    manifest = extract_latents(ImageFolderDataset(str(images_dir), 16), tmp_path / "lat", vae, shard_size=2,
                               batch_size=2, progress=False)
    assert manifest["scaling_factor"] == 0.13025
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text())["scaling_factor"] == 0.13025
    data = get_preset("imagenet256-dit-xl2").data
    data.source, data.path, data.random_flip = "latents", str(tmp_path / "lat"), False
    assert data.latent_scale == 0.18215
    with pytest.warns(UserWarning, match="scaling_factor is 0.13025 but --data.latent_scale=0.18215"):
        build_dataset(data)
    data.latent_scale = 0.13025
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset(data)


def test_other_images_of_the_same_count_are_refused(tiny_vae_dir, images_dir, tmp_path):
    """Resume, and extract-features (whose rows are matched to the latents by index), compared only
    the image count and size: a folder with other files, or classes named otherwise, was accepted."""
    from masked_dit.data.encoders import EncoderFeatures, extract_encoder_features
    from tests.data.tiny_data import write_image_folder

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    out = tmp_path / "lat"
    manifest = extract_latents(ImageFolderDataset(str(images_dir), 16), out, vae, shard_size=2, batch_size=2,
                               progress=False)
    assert len(manifest["images_sha1"]) == 40
    (out / "shard_00002.mean.npy").unlink()  # resume needs work
    other = write_image_folder(tmp_path / "other")
    os.rename(other / "a" / "2.png", other / "a" / "9.png")
    renamed = ImageFolderDataset(str(other), 16)
    assert len(renamed) == manifest["num_images"] and renamed.classes == manifest["classes"]
    with pytest.raises(ValueError, match="made from other images"):
        extract_latents(renamed, out, vae, shard_size=2, batch_size=2, progress=False)
    moved = tmp_path / "moved"
    os.rename(images_dir, moved)  # the same images elsewhere: relative paths, same digest
    try:
        extract_latents(ImageFolderDataset(str(moved), 16), out, vae, shard_size=2, batch_size=2, progress=False)
    finally:
        os.rename(moved, images_dir)
    pooled = EncoderFeatures(_PoolEncoder())
    for wrong in (renamed, ImageFolderDataset(str(write_image_folder(tmp_path / "classes", classes=("a", "c"))), 16)):
        with pytest.raises(ValueError, match="not the ones the latents .* were extracted from"):
            extract_encoder_features(wrong, out, pooled, name="pool", batch_size=2, progress=False)
    made = extract_encoder_features(ImageFolderDataset(str(images_dir), 16), out, pooled, name="pool", batch_size=2,
                                    progress=False)
    assert made["complete"]




def test_damaged_manifest_on_resume_is_a_one_line_error_naming_it(tiny_vae_dir, images_dir, tmp_path):
    """A cut-short or hand-edited manifest.json met on resume: JSON's message named no file (the CLI
    printed 'error: Expecting value: line 1 column 1'), a manifest without 'shards' was a KeyError."""
    from masked_dit.data.encoders import EncoderFeatures, extract_encoder_features

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    images = ImageFolderDataset(str(images_dir), 16)
    out = tmp_path / "lat"
    extract_latents(images, out, vae, shard_size=2, batch_size=2, progress=False)
    pooled = EncoderFeatures(_PoolEncoder())
    extract_encoder_features(images, out, pooled, name="pool", batch_size=2, progress=False)
    for manifest in (out / "features" / "pool" / "manifest.json", out / "manifest.json"):
        text = manifest.read_text()
        for damaged, words in ((text[: len(text) // 2], "is not valid JSON"), ("{}", "lists no shards")):
            manifest.write_text(damaged)
            with pytest.raises(ValueError, match=f"{manifest}.* {words}") as err:
                extract_latents(images, out, vae, shard_size=2, batch_size=2, progress=False)
                extract_encoder_features(images, out, pooled, name="pool", batch_size=2, progress=False)
            assert "\n" not in str(err.value)
        manifest.write_text(text)


@pytest.mark.parametrize("drop", ["flip", "feature_shape", "shards", "num_images"])
def test_foreign_features_manifest_is_a_one_line_error(tmp_path, drop):
    """A complete features manifest lacking a field was a bare KeyError ('flip') from training's
    --data.features; the latents' manifest already said which file is wrong."""
    from masked_dit.data.encoders import EncoderFeatureDataset

    manifest = {"complete": True, "flip": False, "feature_shape": [4, 3], "shards": [], "num_images": 0}
    del manifest[drop]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"features {tmp_path}: manifest.json is not one extract-features wrote"):
        EncoderFeatureDataset(tmp_path)


def test_image_size_off_the_vae_factor_is_refused(tiny_vae_dir, images_dir, tmp_path):
    """15 px images through a 2x VAE gave 7x7 latents decoding to 14 px: the last row and column of
    every image were never encoded (SD's 8x VAE at 250 px: 31x31 latents, 248 px)."""
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():  # the VAE itself: floor(15 / 2) latents, decoded to 14 px
        z = vae.encode(torch.zeros(1, 3, 15, 15)).latent_dist.mean
        assert z.shape[-1] == 7 and vae.decode(z).sample.shape[-1] == 14
    with pytest.raises(ValueError, match="--image-size 15 must be a multiple of the VAE's downsampling factor 2"):
        extract_latents(ImageFolderDataset(str(images_dir), 15), tmp_path / "lat", vae, shard_size=2, batch_size=2,
                        progress=False)
    assert not (tmp_path / "lat").exists()
    assert extract_latents(ImageFolderDataset(str(images_dir), 14), tmp_path / "ok", vae, shard_size=2,
                           batch_size=2, progress=False)["latent_shape"] == [4, 7, 7]
