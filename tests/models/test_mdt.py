"""MDTv2 and MDT (v1) reproduce the official models, mask in every supported way, and compile.

References: the shared MDTv2 fixture (sail-sg/MDT at 7d26c21) and tests/models/data/mdtv1.safetensors,
golden data from the official pre-v2 ``MDT`` class (sail-sg/MDT at 75ee9a9^; metadata in the file).
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from masked_dit.models import MODEL_CONFIGS, build, build_model
from masked_dit.models.mdt import MDT, MDTv2
from masked_dit.nn.masking import packed_masking, random_masking, sample_mdt_mask_ratio
from tests.models.compile_check import check_masked_forwards_compile
from tests.models.zoo_fixtures import constructor_args, load_model_fixture, rel_err

DATA = Path(__file__).parent / "data"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, num_heads=2, num_classes=10, mask_ratio=0.3)


def _tiny(cls, seed=0, **kw):
    """A small model with every weight perturbed (zero-init adaLN would hide most of the network)."""
    torch.manual_seed(seed)
    model = cls(**{**TINY, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(B, seed=1, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randint(0, num_classes, (B,), generator=g))


#################################################################################
#                               Reference fixtures                              #
#################################################################################

def test_mdtv2_fixture(fixtures_dir):
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, "mdtv2")
    model = build("mdtv2", **constructor_args(config)).eval()
    model.load_state_dict(state, strict=True)
    x, t, y = inputs["x"], inputs["t"], inputs["y"]
    with torch.no_grad():
        assert rel_err(model(x, t, y), outputs["forward"]) <= 1e-5
        masked = model(x, t, y, ids_keep=inputs["ids_keep"], ids_restore=inputs["ids_restore"])
        assert rel_err(masked, outputs["forward_masked"]) <= 1e-5
        # The official enable_mask path draws a ratio, then the noise: replay both draws.
        ratio = sample_mdt_mask_ratio(config["mask_ratio"], ratio_noise=inputs["ratio_noise"])
        ids_keep, _, _ = random_masking(4, model.num_patches, ratio, noise=inputs["mask_noise"])
        assert rel_err(model(x, t, y, ids_keep=ids_keep), outputs["forward_masked"]) <= 1e-5
        cfg = model.forward_with_cfg(inputs["cfg_x"], inputs["cfg_t"], inputs["cfg_y"], config["cfg_scale"],
                                     scale_pow=config["scale_pow"])
        assert rel_err(cfg, outputs["forward_with_cfg"]) <= 1e-5


def test_mdtv1_reference_data():
    with safe_open(str(DATA / "mdtv1.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    model = MDT(**config).eval()
    model.load_state_dict({k[11:]: v for k, v in tensors.items() if k.startswith("state_dict.")}, strict=True)
    x, t, y = tensors["input.x"], tensors["input.t"], tensors["input.y"]
    with torch.no_grad():
        assert rel_err(model(x, t, y), tensors["output.forward"]) <= 1e-5
        ids_keep, _, _ = random_masking(4, 16, config["mask_ratio"], noise=tensors["input.mask_noise"])
        assert rel_err(model(x, t, y, ids_keep=ids_keep), tensors["output.forward_masked"]) <= 1e-5
        cfg = model.forward_with_cfg(tensors["input.cfg_x"], tensors["input.cfg_t"], tensors["input.cfg_y"],
                                     float(meta["cfg_scale"]), scale_pow=float(meta["scale_pow"]))
        assert rel_err(cfg, tensors["output.forward_with_cfg"]) <= 1e-5


def test_official_state_dict_layout():
    """Key sets and sizes of the XL/2 models, counted from the official classes (mask_ratio=0.3)."""
    with torch.device("meta"):
        v2, v1 = build_model("MDTv2-XL/2", mask_ratio=0.3), build_model("MDTv1-XL/2", mask_ratio=0.3)
    assert len(v2.state_dict()) == 394 and sum(p.numel() for p in v2.parameters()) == 742_263_904
    assert len(v1.state_dict()) == 362 and sum(p.numel() for p in v1.parameters()) == 699_778_144
    keys = v2.state_dict().keys()
    assert {"mask_token", "decoder_pos_embed", "sideblocks.0.attn.qkv.weight", "de_blocks.3.skip_linear.weight",
            "en_outblocks.11.skip_linear.bias", "en_inblocks.0.attn.rel_pos_bias.relative_position_bias_table",
            "en_inblocks.0.attn.rel_pos_bias.relative_position_index"} <= set(keys)
    assert not any(k.startswith("en_inblocks.") and "skip_linear" in k for k in keys)
    assert v2.en_inblocks[0].attn.rel_pos_bias.relative_position_bias_table.shape == (31 ** 2 + 3, 16)
    for size in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            assert MODEL_CONFIGS[f"MDTv2-{size}/{p}"][0] == "mdtv2" and MODEL_CONFIGS[f"MDTv1-{size}/{p}"][0] == "mdtv1"
    assert v2.decode_layer == 4 and v1.decode_layer == 2  # upstream v2 default; v1 checkpoint and scripts
    assert v2.mask_token.requires_grad and not build_model("MDTv2-S/8").mask_token.requires_grad


#################################################################################
#                                   Masking                                     #
#################################################################################

@pytest.mark.parametrize("cls", [MDTv2, MDT])
def test_mask_ratio_zero_equals_unmasked(cls):
    model = _tiny(cls, depth=4, decode_layer=2)
    x, t, y = _inputs(3)
    ids_keep, _, _ = random_masking(3, 16, 0.0, generator=torch.Generator().manual_seed(3))  # a permutation
    with torch.no_grad():
        full = model(x, t, y)
        assert rel_err(model(x, t, y, ids_keep=ids_keep), full) <= 1e-5


@pytest.mark.parametrize("cls", [MDTv2, MDT])
def test_self_drawn_mask_matches_given_ids(cls):
    """enable_mask=True (the official training call) draws ratio and mask from the generator."""
    model = _tiny(cls, depth=4, decode_layer=2)
    x, t, y = _inputs(3)
    with torch.no_grad():
        out = model(x, t, y, enable_mask=True, generator=torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(11)
        ratio = sample_mdt_mask_ratio(0.3, generator=g) if cls is MDTv2 else 0.3  # v1: fixed ratio
        ids_keep, _, _ = random_masking(3, 16, ratio, generator=g)
        assert torch.equal(out, model(x, t, y, ids_keep=ids_keep))
        assert not torch.allclose(out, model(x, t, y))
        # without a mask_ratio the model was not trained with masks: enable_mask is a plain forward
        plain = _tiny(cls, depth=4, decode_layer=2, mask_ratio=None)
        assert torch.equal(plain(x, t, y, enable_mask=True), plain(x, t, y))


@pytest.mark.parametrize("cls", [MDTv2, MDT])
def test_packed_equals_per_sample_dense(cls):
    """Each sample keeps its own number of tokens, no padding: packed == dense masked forward per sample."""
    model = _tiny(cls, depth=4, decode_layer=2)
    x, t, y = _inputs(4)
    pm = packed_masking([5, 16, 1, 11], 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x, t, y, ids_keep=pm.ids_keep, cu_seqlens=pm.cu_seqlens, segment_ids=pm.segment_ids,
                    max_seqlen=pm.max_seqlen)
        for b in range(4):
            ids_b = pm.ids_keep[pm.cu_seqlens[b]:pm.cu_seqlens[b + 1]][None]
            assert rel_err(out[b:b + 1], model(x[b:b + 1], t[b:b + 1], y[b:b + 1], ids_keep=ids_b)) <= 1e-5


def test_masked_training_backward():
    """The masked path trains the mask token, side block, relative-position tables and decoder."""
    model = _tiny(MDTv2, depth=4, decode_layer=2).train()
    x, t, y = _inputs(2)
    ids_keep, _, _ = random_masking(2, 16, 0.4, generator=torch.Generator().manual_seed(0))
    model(x, t, y, ids_keep=ids_keep).square().mean().backward()
    for name in ("mask_token", "sideblocks.0.attn.qkv.weight", "de_blocks.1.skip_linear.weight",
                 "en_inblocks.0.attn.rel_pos_bias.relative_position_bias_table", "decoder_pos_embed", "pos_embed"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


#################################################################################
#                           Guidance and bad input                              #
#################################################################################

def test_cfg_schedule_and_channels():
    model = _tiny(MDTv2, depth=2, decode_layer=0)
    x, _, _ = _inputs(2)
    x = torch.cat([x, x])
    t = torch.tensor([100, 900, 100, 900])
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        raw = model(x, t, y)
        out = model.forward_with_cfg(x, t, y, 3.0, scale_pow=4.0)
        out_all = model.forward_with_cfg(x, t, y, 3.0, scale_pow=4.0, guide_channels="all")
        assert torch.equal(model.forward_with_cfg(x, t, y, None), raw)
    s = (1 - torch.cos((1 - t[:2] / 1000) ** 4.0 * torch.pi)) / 2
    scale = ((3.0 - 1) * s + 1).view(-1, 1, 1, 1)
    guided = raw[2:, :4] + scale * (raw[:2, :4] - raw[2:, :4])
    torch.testing.assert_close(out[:2, :3], guided[:, :3])
    torch.testing.assert_close(out[2:, :3], guided[:, :3])
    torch.testing.assert_close(out[:, 3:], raw[:, 3:])  # channel 3 and the sigma half unguided
    torch.testing.assert_close(out_all[:2, :4], guided)
    torch.testing.assert_close(out_all[:, 4:], raw[:, 4:])
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 3.0)


def test_bad_input_errors():
    model = _tiny(MDTv2, depth=2, decode_layer=0)
    x, t, y = _inputs(2)
    with pytest.raises(ValueError, match="16x16, the model expects input_size=8"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\]"):
        model(x, t, torch.tensor([3, 11]))  # 10 classes + null label (index 10) are valid
    with pytest.raises(ValueError, match="class labels"):
        model(x, t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integer"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="timesteps t must have shape"):
        model(x, t[:1].repeat(3), y)
    with pytest.raises(ValueError, match="cu_seqlens needs ids_keep"):
        model(x, t, y, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="ids_keep must be"):
        model(x, t, y, ids_keep=torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="depth - decode_layer to be even"):
        MDTv2(**{**TINY, "depth": 7, "decode_layer": 2})  # upstream silently drops a block here
    with pytest.raises(ValueError, match="decode_layer"):
        MDT(**{**TINY, "depth": 4, "decode_layer": 5})
    with pytest.raises(ValueError, match="mask_ratio"):
        MDTv2(**{**TINY, "depth": 2, "decode_layer": 0, "mask_ratio": 1.0})


#################################################################################
#                                torch.compile                                  #
#################################################################################

@pytest.mark.slow
def test_compile_fullgraph_no_graph_breaks():
    """Unmasked, dense-masked and packed forwards each trace to exactly one graph; training compiles."""
    model = _tiny(MDTv2, depth=2, decode_layer=2)
    x, t, y = _inputs(2)
    check_masked_forwards_compile(model, x, t, y)
    assert model.mask_token.grad is not None and model.sideblocks[0].attn.qkv.weight.grad is not None


#################################################################################
#                                    CUDA                                       #
#################################################################################

@pytest.mark.gpu
def test_cuda_fixture_and_packed_bf16(fixtures_dir):
    """On the GPU attention backends (relative-position bias over kept tokens): the fixture in float32
    (TF32 off), and packed == per-sample dense in bf16."""
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, "mdtv2")
    model = build("mdtv2", **constructor_args(config)).eval().cuda()
    model.load_state_dict(state, strict=True)
    dev = {k: v.cuda() for k, v in inputs.items()}
    x, t, y = dev["x"], dev["t"], dev["y"]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            assert rel_err(model(x, t, y).cpu(), outputs["forward"]) <= 1e-5
            assert rel_err(model(x, t, y, ids_keep=dev["ids_keep"]).cpu(), outputs["forward_masked"]) <= 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    pm = packed_masking([5, 16, 1, 11], 16, generator=torch.Generator().manual_seed(5))
    ids, cu = pm.ids_keep.cuda(), pm.cu_seqlens.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, y, ids_keep=ids, cu_seqlens=cu)
        for b in range(4):
            ids_b = ids[pm.cu_seqlens[b]:pm.cu_seqlens[b + 1]][None]
            ref = model(x[b:b + 1], t[b:b + 1], y[b:b + 1], ids_keep=ids_b)
            assert rel_err(out[b:b + 1].float(), ref.float()) <= 2e-2
