"""REPA-SiT with real DINOv2 features through the config/trainer path: on-the-fly on pixel data,
cached beside latents by ``masked-dit extract-features``.

The DINOv2 is a tiny randomly initialised transformers ``Dinov2Model`` saved with
``save_pretrained`` and passed by path (the same loading path as a hub download, no internet).
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # the "test" extra installs it
diffusers = pytest.importorskip("diffusers")

from masked_dit.cli import main  # noqa: E402
from masked_dit.configs import ConfigError  # noqa: E402
from masked_dit.data import ImageFolderDataset, build_dataset  # noqa: E402
from masked_dit.data.encoders import load_encoder, preprocess_images  # noqa: E402
from masked_dit.train import Trainer  # noqa: E402
from tests.data.tiny_data import save_tiny_vae, write_image_folder  # noqa: E402
from tests.train.tiny import tiny_config  # noqa: E402

Z_DIM = 32


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A 2-layer 32-wide DINOv2 (patch 14, 56px table) saved by path."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=Z_DIM, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       patch_size=14, image_size=56)
    path = tmp_path_factory.mktemp("dinov2")
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory):
    """(images folder, latents folder): 6 RGB images in 2 classes, tiny-VAE latents 4x8x8 with flips."""
    root = tmp_path_factory.mktemp("repa_data")
    write_image_folder(root / "images")
    save_tiny_vae(root / "vae")
    rc = main(["extract-latents", str(root / "images"), str(root / "latents"), "--vae", str(root / "vae"),
               "--image-size", "16", "--batch-size", "2", "--shard-size", "4", "--flip", "--device", "cpu"])
    assert rc == 0
    return root / "images", root / "latents"


def _latent_config(tmp_path, latents, **overrides):
    return tiny_config("digits-repa-sit", tmp_path, **{
        "data.source": "latents", "data.path": str(latents), "data.random_flip": True, "model.in_channels": 4,
        "model.input_size": 8, "model.num_classes": 2, "model.patch_size": 2, "train.global_batch": 2,
        "train.steps": 1, "objective.encoder": "none", **overrides})


#################################################################################
#                          On-the-fly features (pixels)                         #
#################################################################################

def test_repa_sit_trains_on_digits_with_a_local_dinov2(dinov2_dir, tmp_path):
    cfg = tiny_config("digits-repa-sit", tmp_path, **{"objective.encoder": str(dinov2_dir), "train.steps": 2,
                                                      "sample.eval_num": 0})
    trainer = Trainer(cfg)
    assert trainer.module.z_dims == [Z_DIM]  # read from the folder's config.json
    features = trainer.objective.encoder.features
    assert features.token_grid == 4 and features.encoders[0].image_size == 224  # REPA: 224 below 256px

    # The wiring: digits [-1, 1] -> RGB -> REPA preprocessing at 224 -> patch tokens 16x16 -> 4x4 model grid.
    x = trainer.dataset.images[:2]
    zs = trainer.objective.features({"x": x, "y": torch.zeros(2)})[0]
    enc = load_encoder(str(dinov2_dir), image_size=224)
    with torch.no_grad():
        tokens = enc(preprocess_images(x.expand(-1, 3, -1, -1), 224))  # [2, 256, 32]
    want = F.avg_pool2d(tokens.transpose(1, 2).reshape(2, Z_DIM, 16, 16), 4).reshape(2, Z_DIM, 16).transpose(1, 2)
    torch.testing.assert_close(zs, want, rtol=1e-5, atol=1e-5)

    result = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / cfg.run.name / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "proj_loss" in r]
    assert [r["step"] for r in losses] == [1, 2] and result["step"] == 2
    assert all(-1 <= r["proj_loss"] <= 1 and np.isfinite(r["loss"]) for r in losses)
    assert all(not p.requires_grad for p in features.encoders[0].parameters())


@pytest.mark.parametrize("value, words", [
    ("resnet50", "unknown encoder spec"),
    ("simclr-vit-b", "unknown REPA encoder family 'simclr'; valid: .*clip-vit-L"),
    ("mae-vit-b", "mae comes as vit-l"),
    ("dinov2-vit-x", "vit-s, vit-b"),
    ("none,dinov2-vit-b", "choose one of: none, patches, dinov2-vit"),
])
def test_bad_encoder_value_is_a_config_error(value, words, tmp_path, capsys):
    with pytest.raises(ConfigError, match=words):
        tiny_config("digits-repa-sit", tmp_path, **{"objective.encoder": value})
    assert main(["train", "--preset", "digits-repa-sit", f"--objective.encoder={value}"]) == 2
    err = capsys.readouterr().err
    assert "--objective.encoder=" in err and "dinov2reg-vit-{s,b,l,g}" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def dinov1_dir(tmp_path_factory):
    """A 2-layer 32-wide ViT (DINOv1's class; patch 16, 32px table) saved by path."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=Z_DIM, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, patch_size=16, image_size=32)
    path = tmp_path_factory.mktemp("dinov1")
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


def test_repa_sit_trains_with_a_repa_named_dinov1_at_its_raw_size(dinov1_dir, tmp_path):
    spec = f"dinov1-vit-b:{dinov1_dir}"  # REPA's DINOv1 recipe on a local folder
    cfg = tiny_config("digits-repa-sit", tmp_path, **{"objective.encoder": spec, "train.steps": 1})
    trainer = Trainer(cfg)
    assert trainer.module.z_dims == [Z_DIM]  # from the folder's config.json, not the ViT-B table
    enc = trainer.objective.encoder.features.encoders[0]
    assert (enc.family, enc.image_size, enc.grid_size) == ("dinov1", 256, 16)  # REPA feeds DINOv1 unresized 256px
    x = trainer.dataset.images[:2]
    zs = trainer.objective.features({"x": x, "y": torch.zeros(2)})[0]
    with torch.no_grad():
        tokens = enc(preprocess_images(x.expand(-1, 3, -1, -1), 256))
    want = F.avg_pool2d(tokens.transpose(1, 2).reshape(2, Z_DIM, 16, 16), 4).reshape(2, Z_DIM, 16).transpose(1, 2)
    torch.testing.assert_close(zs, want, rtol=1e-5, atol=1e-5)
    assert trainer.fit()["step"] == 1


def test_every_repa_name_is_a_valid_encoder_with_a_known_width(tmp_path):
    from masked_dit.train.build import encoder_z_dims

    names = ("dinov2-vit-b,dinov2reg-vit-l,dinov1-vit-b,clip-vit-L,mocov3-vit-s,mocov3-vit-b,mocov3-vit-l,mae-vit-l,"
             "jepa-vit-h")
    for name in names.split(","):
        assert tiny_config("digits-repa-sit", tmp_path, **{"objective.encoder": name}).objective.encoder == name
    assert encoder_z_dims(names) == [768, 1024, 768, 1024, 384, 768, 1024, 1024, 1280]  # no weights loaded


def test_missing_encoder_folder_is_reported_when_training(tmp_path):
    cfg = tiny_config("digits-repa-sit", tmp_path, **{"objective.encoder": str(tmp_path / "no_such_dinov2")})
    with pytest.raises(FileNotFoundError, match="no_such_dinov2.*does not exist"):
        Trainer(cfg)


#################################################################################
#                        Cached features beside latents                         #
#################################################################################

def test_extract_features_cli_then_train_on_latents(dinov2_dir, latents_dir, tmp_path, capsys):
    images, latents = latents_dir
    rc = main(["extract-features", str(images), str(latents), "--encoder", str(dinov2_dir), "--name", "tiny",
               "--token-grid", "4", "--batch-size", "2", "--dtype", "float32", "--device", "cpu"])
    assert rc == 0 and "--data.features=tiny" in capsys.readouterr().out
    manifest = json.loads((latents / "features" / "tiny" / "manifest.json").read_text())
    assert manifest["feature_shape"] == [16, Z_DIM] and manifest["image_size"] == 224 and manifest["flip"]
    assert manifest["num_images"] == 6 and manifest["complete"]

    # Row i holds image i as extract-latents saw it (same folder order and 16px crop), and its mirror.
    ds = ImageFolderDataset(str(images), 16)
    enc = load_encoder(str(dinov2_dir), image_size=224)
    x = torch.stack([ds[i]["x"] for i in range(6)])
    with torch.no_grad():
        tokens = enc(preprocess_images(x.flip(-1), 224))
    want = F.avg_pool2d(tokens.transpose(1, 2).reshape(6, Z_DIM, 16, 16), 4).reshape(6, Z_DIM, 16).transpose(1, 2)
    cfg = _latent_config(tmp_path, latents, **{"data.features": "tiny"})
    data = build_dataset(cfg.data, cfg.model)
    got = torch.stack([data[(i, True)]["zs"] for i in range(6)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    trainer = Trainer(cfg)
    assert trainer.module.z_dims == [Z_DIM] and trainer.objective.encoder is None  # features come as batch['zs']
    assert trainer.fit()["step"] == 1
    record = json.loads((tmp_path / cfg.run.name / "metrics.jsonl").read_text().splitlines()[0])
    assert -1 <= record["proj_loss"] <= 1 and np.isfinite(record["loss"])


def test_extract_features_cli_with_a_repa_named_clip(latents_dir, tmp_path, capsys):
    images, latents = latents_dir
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=Z_DIM, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, patch_size=14, image_size=224)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    spec = f"clip-vit-L:{tmp_path / 'clip'}"
    assert main(["extract-features", str(images), str(latents), "--encoder", spec, "--token-grid", "4",
                 "--batch-size", "2", "--dtype", "float32", "--device", "cpu"]) == 0
    assert "--data.features=clip-vit-L" in capsys.readouterr().out  # the folder is named after the REPA name
    manifest = json.loads((latents / "features" / "clip-vit-L" / "manifest.json").read_text())
    assert manifest["image_size"] == 224 and manifest["feature_shape"] == [16, Z_DIM] and manifest["complete"]
    ds = ImageFolderDataset(str(images), 16)
    enc = load_encoder(spec)
    x = torch.stack([ds[i]["x"] for i in range(2)])
    with torch.no_grad():  # CLIP: resize first, CLIP mean/std
        tokens = enc(preprocess_images(x, 224, enc.mean, enc.std, resize_first=True))
    want = F.avg_pool2d(tokens.transpose(1, 2).reshape(2, Z_DIM, 16, 16), 4).reshape(2, Z_DIM, 16).transpose(1, 2)
    got = np.load(latents / "features" / "clip-vit-L" / "shard_00000.npy")[:2]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def test_latent_feature_errors(latents_dir, tmp_path):
    _, latents = latents_dir
    with pytest.raises(FileNotFoundError, match="--data.features=nope: no cached features.*extract-features"):
        Trainer(_latent_config(tmp_path, latents, **{"data.features": "nope"}))
    with pytest.raises(ValueError, match="encodes raw images.*--data.features"):
        Trainer(_latent_config(tmp_path, latents, **{"objective.encoder": "dinov2-vit-b"}))
    with pytest.raises(ConfigError, match="needs --data.source=latents"):
        tiny_config("digits-repa-sit", tmp_path, **{"data.features": "tiny", "objective.encoder": "none"})
    with pytest.raises(ConfigError, match="--objective.kind=repa --objective.encoder=none"):
        _latent_config(tmp_path, latents, **{"data.features": "tiny", "objective.encoder": "patches"})
    assert main(["extract-features", str(tmp_path), str(tmp_path / "none"), "--encoder", "dinov2-vit-b"]) == 2


def test_cached_token_grid_must_match_the_model(dinov2_dir, latents_dir, tmp_path):
    images, latents = latents_dir
    assert main(["extract-features", str(images), str(latents), "--encoder", str(dinov2_dir), "--name", "grid2",
                 "--encoder-image-size", "28", "--batch-size", "4", "--device", "cpu"]) == 0  # 2x2 tokens
    with pytest.raises(ValueError, match="hold 4 tokens per image but the model has 4x4 tokens.*--token-grid=4"):
        Trainer(_latent_config(tmp_path, latents, **{"data.features": "grid2"}))
