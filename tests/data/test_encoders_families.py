"""REPA's encoders beyond DINOv2: DINOv1, CLIP, MAE, I-JEPA (transformers) and MoCo v3 (timm).

Tiny randomly initialised models of the real classes, saved with ``save_pretrained`` (or as a
MoCo v3 style checkpoint) and loaded by path through REPA names (``clip-vit-L:<folder>``). Each
output is checked against the transformers/timm model run directly the documented way, on
pixels preprocessed here in float64 the way REPA's ``preprocess_raw_image`` does.
"""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # the "test" extra installs it

from masked_dit.data.encoders import (  # noqa: E402
    CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, EncoderFeatures, encoder_family,
    encoder_z_dim, feature_dir_name, load_encoder, load_encoder_features, mocov3_backbone_state, parse_encoder_spec,
    repa_encoder_image_size, resolve_encoder)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _images(size=256, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _repa_pixels(images, size, mean, std, resize_first=False, dtype=torch.float32):
    """REPA's preprocess_raw_image written out: /255, Normalize and bicubic resize in its order, in
    float32 as REPA runs it (PyTorch's float32 bicubic is off by ~3e-5 from float64's)."""
    x = images.to(dtype) / 255
    m, s = torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1), torch.tensor(std, dtype=dtype).view(1, 3, 1, 1)
    if resize_first:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = (x - m) / s
    if not resize_first and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.float()


def _timm_resample(table, grid, prefix=1):
    """timm.layers.resample_abs_pos_embed (REPA's call) written out: bicubic, antialiased, float32."""
    g0 = int((table.shape[1] - prefix) ** 0.5)
    patches = table[:, prefix:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    return torch.cat([table[:, :prefix], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def _randomise_norms(model):
    """Non-trivial LayerNorm affines, so "final norm applied or not" is a real check."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    return model


#################################################################################
#                                    Specs                                      #
#################################################################################

def test_repa_names_widths_sources_and_input_sizes():
    widths = {"dinov1-vit-b": 768, "clip-vit-L": 1024, "mocov3-vit-s": 384, "mocov3-vit-b": 768,
              "mocov3-vit-l": 1024, "mae-vit-l": 1024, "jepa-vit-h": 1280, "dinov2-vit-g": 1536}
    assert {name: encoder_z_dim(name) for name in widths} == widths
    assert resolve_encoder("dinov1-vit-b") == ("transformers", "facebook/dino-vitb16")
    assert resolve_encoder("clip-vit-L") == ("transformers", "openai/clip-vit-large-patch14")
    assert resolve_encoder("clip-vit-l") == resolve_encoder("clip-vit-L")
    assert resolve_encoder("mae-vit-l") == ("transformers", "facebook/vit-mae-large")
    assert resolve_encoder("jepa-vit-h") == ("transformers", "facebook/ijepa_vith14_1k")
    assert resolve_encoder("mocov3-vit-b") == ("timm", "ckpts/mocov3_vitb.pth")  # REPA's place for it
    # REPA: DINOv2, CLIP, I-JEPA resized to 224 * (R // 256); MoCo v3, MAE, DINOv1 fed the raw 256 px images
    assert [repa_encoder_image_size(256, n) for n in ("dinov2-vit-b", "clip-vit-L", "jepa-vit-h")] == [224] * 3
    assert [repa_encoder_image_size(256, n) for n in ("mocov3-vit-b", "mae-vit-l", "dinov1-vit-b")] == [256] * 3
    assert repa_encoder_image_size(512, "mae-vit-l") == 512 and repa_encoder_image_size(32, "mae-vit-l") == 256
    assert repa_encoder_image_size(512) == 448
    assert feature_dir_name("mocov3-vit-b:/ckpts/vit-b-300ep.pth.tar") == "mocov3-vit-b"


@pytest.mark.parametrize("spec, error, words", [
    ("simclr-vit-b", ValueError, r"unknown REPA encoder family 'simclr'; valid: dinov2-vit-\{s,b,l,g\}.*jepa-vit-h"),
    ("mae-vit-b", ValueError, "mae comes as vit-l .*clip-vit-L"),
    ("clip-vit-B", ValueError, "clip comes as vit-L"),
    ("jepa-resnet-h", ValueError, "jepa comes as vit-h"),
    ("mocov3-vit-x", ValueError, r"mocov3 comes as vit-s, vit-b, vit-l"),
    ("clip-vit-L:/no/such/clip", FileNotFoundError, "does not exist"),
    ("mocov3-vit-b:/no/such.pth.tar", FileNotFoundError, "does not exist"),
])
def test_bad_names_are_one_line_errors_listing_the_valid_ones(spec, error, words):
    with pytest.raises(error, match=words) as info:
        load_encoder(spec)
    assert "\n" not in str(info.value)


def test_backends_fit_the_family():
    with pytest.raises(ValueError, match="MoCo v3 loads from its checkpoint into a timm ViT"):
        parse_encoder_spec("mocov3-vit-b", backend="transformers")
    with pytest.raises(ValueError, match="loads through transformers only"):
        parse_encoder_spec("clip-vit-L", backend="timm")


def test_mocov3_without_its_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mocov3-vit-b:<vit-b-300ep.pth.tar> or put it at "
                                                r"ckpts/mocov3_vitb.pth \(REPA's place\)"):
        load_encoder("mocov3-vit-b")


#################################################################################
#                              transformers families                           #
#################################################################################

@pytest.fixture(scope="module")
def dinov1(tmp_path_factory):
    """A ViT (DINOv1's class) with a 2x2 position table (patch 16, 32 px), hub-default eps 1e-12."""
    torch.manual_seed(1)
    model = _randomise_norms(transformers.ViTModel(transformers.ViTConfig(**TINY, patch_size=16, image_size=32),
                                                   add_pooling_layer=False)).eval()
    path = tmp_path_factory.mktemp("dinov1")
    model.save_pretrained(path)
    return path, model


def test_dinov1_raw_256px_resampled_table_final_norm_no_cls(dinov1):
    path, model = dinov1
    enc = load_encoder(f"dinov1-vit-b:{path}")  # REPA's recipe on a local copy
    assert (enc.image_size, enc.grid_size, enc.z_dim, enc.num_prefix_tokens) == (256, 16, 32, 1)
    assert enc.backbone.config.layer_norm_eps == 1e-6  # DINO's own eps, not the hub config's 1e-12
    images = _images()
    z = EncoderFeatures(enc)(images)
    # reference: the same weights in a ViTModel built for 256 px with REPA's resampled table
    config = transformers.ViTConfig(**TINY, patch_size=16, image_size=256, layer_norm_eps=1e-6)
    ref = transformers.ViTModel(config, add_pooling_layer=False).eval()
    state = dict(model.state_dict())
    state["embeddings.position_embeddings"] = _timm_resample(state["embeddings.position_embeddings"], 16)
    ref.load_state_dict(state)
    with torch.no_grad():
        want = ref(pixel_values=_repa_pixels(images, 256, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    assert z.shape == (2, 256, 32)
    torch.testing.assert_close(z, want.last_hidden_state[:, 1:], rtol=1e-5, atol=1e-5)
    # a plain folder is the same family (model_type 'vit') but keeps its config's eps
    plain = load_encoder(str(path))
    assert plain.family == "dinov1" and plain.image_size == 256 and plain.backbone.config.layer_norm_eps == 1e-12
    assert encoder_family(str(path)) == "dinov1" and repa_encoder_image_size(256, str(path)) == 256


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A full CLIPModel (what openai/clip-vit-large-patch14 holds) with a native 16x16 table (patch 14, 224 px)."""
    torch.manual_seed(2)
    config = transformers.CLIPConfig(
        text_config=dict(**TINY, vocab_size=64, max_position_embeddings=8),
        vision_config=dict(**TINY, patch_size=14, image_size=224), projection_dim=16)
    model = _randomise_norms(transformers.CLIPModel(config)).eval()
    with torch.no_grad():  # O(1) embeddings: ln_pre then does not blow float32 rounding up
        emb = model.vision_model.embeddings
        emb.patch_embedding.weight.normal_(0.0, 0.1)
        emb.position_embedding.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return path, model


def test_clip_resize_then_clip_normalise_no_post_layernorm(clip):
    path, model = clip
    enc = load_encoder(f"clip-vit-L:{path}")
    assert (enc.image_size, enc.grid_size, enc.z_dim, enc.num_prefix_tokens) == (224, 16, 32, 1)
    assert (enc.mean, enc.std, enc.resize_first) == (CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD, True)
    images = _images()
    z = EncoderFeatures(enc)(images)
    pixels = _repa_pixels(images, 224, CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD, resize_first=True)
    with torch.no_grad():
        out = model.vision_model(pixel_values=pixels)
        post = model.vision_model.post_layernorm(out.last_hidden_state)
    torch.testing.assert_close(z, out.last_hidden_state[:, 1:], rtol=1e-5, atol=1e-5)
    assert (z - post[:, 1:]).abs().max() > 0.1  # REPA reads the transformer before ln_post
    # the order matters only to rounding: float64 either way agrees to float32 bicubic's accuracy
    exact = _repa_pixels(images, 224, CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD, resize_first=False, dtype=torch.float64)
    torch.testing.assert_close(pixels, exact, rtol=0, atol=2e-4)
    assert encoder_z_dim(str(path)) == 32 and encoder_z_dim(f"clip-vit-L:{path}") == 32  # vision_config's width


def test_clip_at_512px_resamples_its_table_and_position_ids(clip):
    path, model = clip
    enc = load_encoder(f"clip-vit-L:{path}", image_size=repa_encoder_image_size(512, "clip-vit-L"))
    assert (enc.image_size, enc.grid_size) == (448, 32)
    images = _images(size=512, n=1)
    z = EncoderFeatures(enc)(images)
    ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY, patch_size=14, image_size=448)).eval()
    state = {k: v for k, v in model.vision_model.state_dict().items() if "position_ids" not in k}
    table = state["embeddings.position_embedding.weight"]
    state["embeddings.position_embedding.weight"] = _timm_resample(table[None], 32)[0]
    ref.load_state_dict(state, strict=False)
    with torch.no_grad():
        want = ref(pixel_values=_repa_pixels(images, 448, CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD, True)).last_hidden_state
    torch.testing.assert_close(z, want[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mae(tmp_path_factory):
    """ViTMAEForPreTraining (facebook/vit-mae-large's class) with mask_ratio 0.75 and a 2x2 table."""
    torch.manual_seed(3)
    config = transformers.ViTMAEConfig(**TINY, patch_size=16, image_size=32, mask_ratio=0.75, decoder_hidden_size=16,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                       decoder_intermediate_size=32)
    model = _randomise_norms(transformers.ViTMAEForPreTraining(config)).eval()
    path = tmp_path_factory.mktemp("mae")
    model.save_pretrained(path)
    return path, model


def test_mae_keeps_every_token_in_order_without_final_norm(mae):
    path, model = mae
    enc = load_encoder(f"mae-vit-l:{path}")
    assert (enc.image_size, enc.grid_size, enc.z_dim, enc.num_prefix_tokens) == (256, 16, 32, 1)
    assert enc.backbone.config.mask_ratio == 0.0
    images = _images()
    z = EncoderFeatures(enc)(images)
    config = transformers.ViTMAEConfig(**TINY, patch_size=16, image_size=256, mask_ratio=0.0, layer_norm_eps=1e-6)
    ref = transformers.ViTMAEModel(config).eval()
    state = dict(model.vit.state_dict())
    state["embeddings.position_embeddings"] = _timm_resample(state["embeddings.position_embeddings"], 16)
    ref.load_state_dict(state)
    pixels = _repa_pixels(images, 256, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    in_order = torch.arange(256.0).expand(2, 256)  # argsort(noise) = identity: nothing shuffled
    with torch.no_grad():
        out = ref(pixel_values=pixels, noise=in_order, output_hidden_states=True)
        shuffled = ref(pixel_values=pixels)
    assert torch.equal(out.ids_restore, in_order.long()) and not out.mask.any()
    want = out.hidden_states[-1][:, 1:]  # the last block's output, before MAE's final LayerNorm
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5)
    assert (z - out.last_hidden_state[:, 1:]).abs().max() > 0.1  # the final norm is not applied
    # MAE's default random noise shuffles the tokens even at mask_ratio 0: the raster order matters
    assert (shuffled.last_hidden_state[:, 1:] - out.last_hidden_state[:, 1:]).abs().max() > 0.1


@pytest.fixture(scope="module")
def jepa(tmp_path_factory):
    """An IJepaModel (facebook/ijepa_vith14_1k's class) with its native 16x16 table (patch 14, 224 px)."""
    torch.manual_seed(4)
    model = _randomise_norms(transformers.IJepaModel(transformers.IJepaConfig(**TINY, patch_size=14,
                                                                               image_size=224))).eval()
    path = tmp_path_factory.mktemp("jepa")
    model.save_pretrained(path)
    return path, model


def test_ijepa_all_tokens_after_final_norm_at_224(jepa):
    path, model = jepa
    enc = load_encoder(f"jepa-vit-h:{path}")
    assert (enc.image_size, enc.grid_size, enc.z_dim, enc.num_prefix_tokens) == (224, 16, 32, 0)
    assert enc.backbone.config.layer_norm_eps == 1e-6
    images = _images()
    z = EncoderFeatures(enc)(images)
    model.config.layer_norm_eps = 1e-6
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = 1e-6
        want = model(pixel_values=_repa_pixels(images, 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    assert z.shape == (2, 256, 32)  # no CLS to drop
    torch.testing.assert_close(z, want.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_several_families_at_their_own_sizes_on_one_grid(clip, mae):
    feats = load_encoder_features(f"clip-vit-L:{clip[0]},mae-vit-l:{mae[0]}", resolution=256, token_grid=8)
    assert [e.image_size for e in feats.encoders] == [224, 256] and feats.z_dims == [32, 32]
    zs = feats(_images(n=1))
    assert [tuple(z.shape) for z in zs] == [(1, 64, 32)] * 2
    with pytest.raises(ValueError, match="a mae-vit-l needs vit_mae"):
        load_encoder(f"mae-vit-l:{clip[0]}")


#################################################################################
#                               MoCo v3 (timm)                                  #
#################################################################################

def test_mocov3_state_dict_is_the_base_encoder_with_repas_renames():
    t = torch.zeros(1)
    state = {"module.base_encoder.cls_token": t, "module.base_encoder.blocks.13.norm13.weight": t,
             "module.base_encoder.blocks.13.mlp.fc13.bias": t, "module.base_encoder.blocks.14.norm14.bias": t,
             "module.base_encoder.blocks.14.mlp.fc14.weight": t, "module.base_encoder.head.0.weight": t,
             "module.base_encoder.fc.weight": t, "module.momentum_encoder.cls_token": t, "module.predictor.0.weight": t}
    assert sorted(mocov3_backbone_state(state)) == ["blocks.13.mlp.fc1.bias", "blocks.13.norm1.weight",
                                                    "blocks.14.mlp.fc2.weight", "blocks.14.norm2.bias", "cls_token"]


def test_mocov3_without_timm_is_a_one_line_import_error(tmp_path, monkeypatch):
    torch.save({"state_dict": {}}, tmp_path / "vit-b-300ep.pth.tar")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ImportError, match=r"loads through timm: pip install 'masked-dit\[repa\]'"):
        load_encoder(f"mocov3-vit-b:{tmp_path / 'vit-b-300ep.pth.tar'}")


def test_mocov3_checkpoint_into_timm_vit_raw_256px(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    vit = _randomise_norms(VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                             num_classes=0)).eval()
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    state.update({"module.base_encoder.head.0.weight": torch.randn(8, 32),  # projector, momentum, predictor: dropped
                  "module.momentum_encoder.cls_token": torch.randn(1, 1, 32),
                  "module.predictor.0.weight": torch.randn(4)})
    file = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state}, file)

    enc = load_encoder(f"mocov3-vit-b:{file}", timm_kwargs={"num_heads": 2})
    assert (enc.backend, enc.image_size, enc.grid_size, enc.z_dim, enc.num_prefix_tokens) == ("timm", 256, 16, 32, 1)
    images = _images()
    z = EncoderFeatures(enc)(images)
    ref = VisionTransformer(img_size=256, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    base = dict(vit.state_dict())
    base["pos_embed"] = timm.layers.resample_abs_pos_embed(base["pos_embed"], [16, 16])  # REPA utils.py:46-49
    ref.load_state_dict(base)
    with torch.no_grad():
        want = ref.forward_features(_repa_pixels(images, 256, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))[:, 1:]
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5)
    same = load_encoder("mocov3-vit-b", weights=str(file), timm_kwargs={"num_heads": 2})
    torch.testing.assert_close(EncoderFeatures(same)(images), z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a mocov3-vit-b"):
        load_encoder(f"mocov3-vit-b:{file}")  # 32 wide with ViT-B's 12 heads
