"""REPA's frozen DINOv2 encoders: loading by path, preprocessing numerics, token grids, caching.

Uses tiny randomly initialised DINOv2s of the real architecture (transformers ``Dinov2Model``
saved with ``save_pretrained`` and loaded back by path; timm when it is installed).
"""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")  # the "test" extra installs it

from masked_dit.data import LatentDataset, extract_latents  # noqa: E402
from masked_dit.data.encoders import (  # noqa: E402
    EncoderFeatureDataset, EncoderFeatures, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, LatentsWithFeatures,
    encoder_z_dim, extract_encoder_features, load_encoder, load_encoder_features, preprocess_images,
    repa_encoder_image_size, resample_pos_embed, resample_token_grid, resolve_encoder)
from tests.data.tiny_data import PoolVAE as _PoolVAE, TensorImages as _Images  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """(folder, model): a 2-layer 32-wide DINOv2 (patch 14, 56px -> 4x4 tokens) saved by path."""
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).eval()
    # random LayerNorm affines, so "final LayerNorm applied" is a real check
    with torch.no_grad():
        model.layernorm.weight.normal_(1.0, 0.5)
        model.layernorm.bias.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def encoder(tiny_dinov2):
    return load_encoder(str(tiny_dinov2[0]), image_size=56)


#################################################################################
#                                  Specs                                        #
#################################################################################

def test_repa_names_hub_ids_and_timm_names_resolve():
    assert [encoder_z_dim(f"dinov2-vit-{s}") for s in "sblg"] == [384, 768, 1024, 1536]
    assert resolve_encoder("dinov2-vit-b", "transformers") == ("transformers", "facebook/dinov2-base")
    assert resolve_encoder("dinov2-vit-l", "timm") == ("timm", "vit_large_patch14_dinov2.lvd142m")
    assert resolve_encoder("dinov2reg-vit-g", "timm") == ("timm", "vit_giant_patch14_reg4_dinov2.lvd142m")
    assert resolve_encoder("facebook/dinov2-giant") == ("transformers", "facebook/dinov2-giant")
    assert resolve_encoder("vit_base_patch14_dinov2.lvd142m") == ("timm", "vit_base_patch14_dinov2.lvd142m")
    assert resolve_encoder("timm/vit_small_patch14_dinov2.lvd142m") == ("timm", "vit_small_patch14_dinov2.lvd142m")
    assert repa_encoder_image_size(256) == 224 and repa_encoder_image_size(512) == 448


@pytest.mark.parametrize("spec, error, words", [
    ("simclr-vit-b", ValueError, "unknown REPA encoder family"),
    ("dinov2-vit-x", ValueError, "vit-s, vit-b"),
    ("resnet50", ValueError, "unknown encoder spec"),
    ("/no/such/dinov2", FileNotFoundError, "does not exist"),
])
def test_bad_specs_give_clear_errors(spec, error, words):
    with pytest.raises(error, match=words):
        load_encoder(spec)


def test_folder_without_config_and_non_vision_model_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a folder with config.json"):
        load_encoder(str(tmp_path))
    transformers.BertConfig().save_pretrained(tmp_path / "bert")  # config is enough
    with pytest.raises(ValueError, match="is a 'bert' model; supported"):
        load_encoder(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="timm encoders only"):
        load_encoder(str(tmp_path / "bert"), weights="x.pth")


#################################################################################
#                                  Encoder                                      #
#################################################################################

def test_patch_tokens_are_final_layernorm_without_cls(tiny_dinov2, encoder):
    _, model = tiny_dinov2
    assert (encoder.z_dim, encoder.patch_size, encoder.grid_size, encoder.num_prefix_tokens) == (32, 14, 4, 1)
    x = torch.randn(2, 3, 56, 56)
    z = encoder(x)
    assert z.shape == (2, 16, 32)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        expected = torch.nn.functional.layer_norm(hidden, (32,), model.layernorm.weight, model.layernorm.bias,
                                                  eps=model.config.layer_norm_eps)[:, 1:]
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


def test_encoder_is_frozen_and_stays_in_eval(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(encoder(x), encoder(x), rtol=0, atol=0)  # deterministic


def test_position_embeddings_resampled_once_like_repa(tiny_dinov2):
    path, model = tiny_dinov2
    enc = load_encoder(str(path), image_size=112)  # 4x4 table -> 8x8 grid
    table = enc.backbone.embeddings.position_embeddings
    assert enc.grid_size == 8 and table.shape == (1, 65, 32)
    original = model.embeddings.position_embeddings.detach()
    torch.testing.assert_close(table[:, :1], original[:, :1], rtol=0, atol=0)  # CLS untouched
    # REPA: timm.layers.resample_abs_pos_embed = bicubic, antialiased, float32, on the 2-D grid
    grid = original[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(table[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 64, 32), rtol=1e-6, atol=1e-6)
    assert enc(torch.randn(1, 3, 112, 112)).shape == (1, 64, 32)
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\]"):
        enc(torch.randn(1, 3, 56, 56))


def test_resample_pos_embed_shrinks_with_antialias():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_pos_embed(table, 16)
    assert out.shape == (1, 257, 8)
    plain = torch.nn.functional.interpolate(table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16),
                                            mode="bicubic", align_corners=False)
    # antialiasing matters when shrinking 37 -> 16 (transformers' on-the-fly path does not antialias)
    assert (out[:, 1:] - plain.permute(0, 2, 3, 1).reshape(1, 256, 8)).abs().max() > 0.1


#################################################################################
#                               Preprocessing                                   #
#################################################################################

def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 weights of PyTorch's bicubic (Keys A = -0.75, align_corners=False, clamped)."""
    A = -0.75
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        ws = [((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A,
              ((A + 2) * t - (A + 3)) * t * t + 1,
              ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1,
              ((A * (2 - t) - 5 * A) * (2 - t) + 8 * A) * (2 - t) - 4 * A]
        for k, w in zip(range(i0 - 1, i0 + 3), ws):
            W[i, min(max(k, 0), n_in - 1)] += w
    return W


def test_preprocessing_matches_hand_computation():
    rng = np.random.RandomState(0)
    raw = rng.randint(0, 256, (2, 3, 20, 20)).astype(np.uint8)
    out = preprocess_images(torch.from_numpy(raw), 14)
    assert out.shape == (2, 3, 14, 14) and out.dtype == torch.float32
    M = _bicubic_matrix(20, 14)
    mean = np.array(IMAGENET_DEFAULT_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_DEFAULT_STD).reshape(1, 3, 1, 1)
    want = np.einsum("ih,bchw,jw->bcij", M, (raw / 255.0 - mean) / std, M)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    # [-1, 1] floats (the data pipeline) give the same input as uint8 / 255
    as_float = torch.from_numpy(raw).double() / 127.5 - 1
    np.testing.assert_allclose(preprocess_images(as_float, 14).numpy(), want, rtol=1e-9, atol=1e-9)
    # resizing is affine-invariant: normalise-then-resize (REPA) == resize-then-normalise
    np.testing.assert_allclose(np.einsum("ih,bchw,jw->bcij", M, raw / 255.0, M), want * std + mean, atol=1e-9)


def test_preprocessing_rejects_bad_images():
    with pytest.raises(ValueError, match=r"RGB images \[B, 3, H, W\]"):
        preprocess_images(torch.zeros(3, 16, 16), 14)
    with pytest.raises(ValueError, match=r"RGB images \[B, 3, H, W\]"):
        preprocess_images(torch.zeros(2, 1, 16, 16), 14)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        preprocess_images(torch.full((1, 3, 16, 16), 255.0), 14)
    with pytest.raises(ValueError, match="uint8 or floating"):
        preprocess_images(torch.zeros(1, 3, 16, 16, dtype=torch.int32), 14)


#################################################################################
#                                 Token grids                                   #
#################################################################################

def test_token_grid_identity_average_and_bilinear():
    # tokens carry their own (row, col): raster order must survive resampling
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    tokens = torch.stack([rows, cols], -1).reshape(1, 16, 2)
    assert resample_token_grid(tokens, 4) is tokens
    pooled = resample_token_grid(tokens, 2)  # integer shrink: mean of each 2x2 block
    torch.testing.assert_close(pooled[0], torch.tensor([[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]))
    # 2x2 -> 3x3 bilinear (align_corners=False): edges copy, the middle averages
    small = torch.tensor([[[1.0], [2.0], [3.0], [5.0]]])  # grid [[1, 2], [3, 5]]
    up = resample_token_grid(small, 3).reshape(3, 3)
    torch.testing.assert_close(up, torch.tensor([[1.0, 1.5, 2.0], [2.0, 2.75, 3.5], [3.0, 4.0, 5.0]]))
    assert resample_token_grid(torch.randn(2, 256, 8), 12).shape == (2, 144, 8)  # non-integer shrink
    with pytest.raises(ValueError, match="square grid"):
        resample_token_grid(torch.randn(1, 15, 8), 3)


#################################################################################
#                           Features for the objective                          #
#################################################################################

def test_encoder_features_callable(encoder):
    feats = EncoderFeatures(encoder, token_grid=2)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.enable_grad():
        z = feats({"image": images, "x": torch.zeros(2, 4, 4, 4)})
    assert z.shape == (2, 4, 32) and z.dtype == torch.float32 and not z.requires_grad
    torch.testing.assert_close(z, resample_token_grid(encoder(preprocess_images(images, 56)), 2))
    torch.testing.assert_close(feats(images), z, rtol=0, atol=0)
    assert feats.z_dims == [32] and feats.num_tokens == [4]
    both = EncoderFeatures([encoder, encoder])
    assert [t.shape for t in both(images)] == [(2, 16, 32)] * 2
    bf16 = EncoderFeatures(encoder, autocast_dtype="bfloat16")(images)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, encoder(preprocess_images(images, 56)), rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="no 'image' images"):
        feats({"x": images})
    with pytest.raises(ValueError, match="autocast dtype"):
        EncoderFeatures(encoder, autocast_dtype="int8")


def test_repa_objective_trains_with_encoder_features(tiny_dinov2):
    from masked_dit.diffusion.objectives import REPAObjective
    from masked_dit.models.repa import REPASiT

    torch.manual_seed(0)
    model = REPASiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                    encoder_depth=1, num_classes=10, z_dims=(32,), projector_dim=16)
    feats = load_encoder_features(str(tiny_dinov2[0]), model=model, image_size=56)  # model grid 8 / 2 = 4
    assert feats.token_grid == 4
    batch = {"x": torch.randn(2, 4, 8, 8), "y": torch.tensor([1, 2]),
             "image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)}
    terms = REPAObjective(encoder=feats)(model, batch)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and -1 <= terms["proj_loss"].item() <= 1
    assert model.projectors[0][0].weight.grad is not None
    assert all(p.grad is None for p in feats.encoders[0].parameters())
    with pytest.raises(ValueError, match="z_dims"):
        EncoderFeatures(feats.encoders[0]).check_model(REPASiT(input_size=8, patch_size=2, hidden_size=32, depth=2,
                                                               num_heads=2, encoder_depth=1, z_dims=(768,),
                                                               projector_dim=16))


#################################################################################
#                              Cached features                                  #
#################################################################################





class _Counting(EncoderFeatures):
    calls = 0

    def __call__(self, images):
        type(self).calls += 1
        return super().__call__(images)


@pytest.fixture()
def latents_dir(tmp_path):
    extract_latents(_Images(), tmp_path / "latents", _PoolVAE(), shard_size=4, batch_size=2, flip=True,
                    progress=False)
    return tmp_path / "latents"


def test_extract_features_beside_latents_and_read_back(encoder, latents_dir):
    data = _Images()
    feats = EncoderFeatures(encoder, token_grid=2)
    manifest = extract_encoder_features(data, latents_dir, feats, name="tiny", batch_size=2, progress=False)
    out = latents_dir / "features" / "tiny"
    assert manifest["complete"] and manifest["feature_shape"] == [4, 32] and manifest["flip"]
    assert [s["count"] for s in manifest["shards"]] == [4, 2]
    assert np.load(out / "shard_00001.npy", mmap_mode="r").dtype == np.float16
    ds = LatentsWithFeatures(LatentDataset(latents_dir), out)
    for key, image in [(5, data.x[5]), ((5, True), data.x[5].flip(-1)), ((1, False), data.x[1])]:
        zs = ds[key]["zs"]  # as stored (float16): the trainer widens it on the device
        assert zs.dtype == torch.float16
        torch.testing.assert_close(zs.float(), feats(image[None])[0], rtol=2e-3, atol=2e-3)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["zs"].shape == (3, 4, 32) and batch["mean"].shape == (3, 3, 8, 8)
    assert isinstance(LatentsWithFeatures(LatentDataset(latents_dir), [out, out])[0]["zs"], list)


def test_features_take_the_images_the_latents_took(encoder, latents_dir):
    """Rows are matched to the latents by index: a dataset with another minimum image size (which image
    an upscale or a skip's neighbour puts in a row) is refused, naming the latents' value."""
    manifest = json.loads((latents_dir / "manifest.json").read_text())
    (latents_dir / "manifest.json").write_text(json.dumps({**manifest, "min_image_size": 0}))
    data = _Images()
    data.min_image_size = 16
    with pytest.raises(ValueError, match=r"short side >= 16px .* took >= 0px: pass min_image_size=0"):
        extract_encoder_features(data, latents_dir, EncoderFeatures(encoder, token_grid=2), progress=False)
    data.min_image_size = 0
    assert extract_encoder_features(data, latents_dir, EncoderFeatures(encoder, token_grid=2), name="t",
                                    batch_size=2, progress=False)["complete"]


def test_extraction_resumes_and_checks_settings(encoder, latents_dir):
    data = _Images()
    feats = _Counting(encoder, token_grid=2)
    extract_encoder_features(data, latents_dir, feats, name="tiny", batch_size=2, progress=False)
    out = latents_dir / "features" / "tiny"
    first = np.load(out / "shard_00000.npy")
    (out / "shard_00001.npy").unlink()
    _Counting.calls = 0
    extract_encoder_features(data, latents_dir, feats, name="tiny", batch_size=2, progress=False)
    assert _Counting.calls == 2  # only the missing shard: one batch of 2 images, plain + flipped
    np.testing.assert_array_equal(np.load(out / "shard_00000.npy"), first)
    assert EncoderFeatureDataset(out)[5].shape == (4, 32)
    with pytest.raises(ValueError, match="different settings .*dtype"):
        extract_encoder_features(data, latents_dir, feats, name="tiny", batch_size=2, dtype="float32", progress=False)
    with pytest.raises(ValueError, match="6 images"):
        extract_encoder_features(_Images(n=5), latents_dir, feats, name="other", progress=False)
    with pytest.raises(ValueError, match="16px"):
        extract_encoder_features(_Images(size=32), latents_dir, feats, name="other", progress=False)
    with pytest.raises(ValueError, match="one encoder at a time"):
        extract_encoder_features(data, latents_dir, EncoderFeatures([encoder, encoder]), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["flip"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="flipped"):
        LatentsWithFeatures(LatentDataset(latents_dir), out)
    with pytest.raises(FileNotFoundError, match="extract_encoder_features"):
        EncoderFeatureDataset(latents_dir / "features" / "missing")


#################################################################################
#                                    timm                                       #
#################################################################################

def test_timm_dinov2_from_local_weights(tmp_path):
    timm = pytest.importorskip("timm")  # the "repa" extra; loads through timm.create_model
    kw = dict(depth=2, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56, **kw).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    enc = load_encoder("vit_small_patch14_dinov2", weights=str(tmp_path / "w.pth"), image_size=56, timm_kwargs=kw)
    x = torch.randn(2, 3, 56, 56)
    assert enc.backend == "timm" and enc.z_dim == 32 and not any(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model.forward_features(x)[:, 1:])
    # timm resamples stored position embeddings on load exactly as resample_pos_embed (REPA's recipe)
    big = load_encoder("vit_small_patch14_dinov2", weights=str(tmp_path / "w.pth"), image_size=112, timm_kwargs=kw)
    torch.testing.assert_close(big.backbone.pos_embed, resample_pos_embed(model.pos_embed.detach(), 8))
    with pytest.raises(FileNotFoundError, match="weights file"):
        load_encoder("vit_small_patch14_dinov2", weights=str(tmp_path / "none.pth"), timm_kwargs=kw)
