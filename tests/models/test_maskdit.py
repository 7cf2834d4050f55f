"""MaskDiT (EDM-preconditioned, decoder with mask tokens) reproduces the official model and masks.

References: the shared MaskDiT fixture (Anima-Lab/MaskDiT at 73cfb96, decoder shrunk to 64/2/4) and
tests/models/data/maskdit_cfg.safetensors: the official ``EDMPrecond(..., cfg_scale=1.5)`` output on
that fixture's weights and inputs, with one scalar sigma per call as the EDM sampler passes it.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from masked_dit.models import MODEL_CONFIGS, build, build_model
from masked_dit.models.maskdit import MaskDiT
from masked_dit.nn.masking import packed_masking, random_masking
from tests.models.compile_check import check_masked_forwards_compile
from tests.models.zoo_fixtures import constructor_args, load_model_fixture, rel_err

DATA = Path(__file__).parent / "data"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            decoder_hidden_size=16, decoder_depth=2, decoder_num_heads=2)


def _fixture_model(fixtures_dir):
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, "maskdit")
    model = build("maskdit", **constructor_args(config), sigma_data=config["sigma_data"]).eval()
    model.load_state_dict(state, strict=True)  # keys carry the official `model.` prefix
    return model, config, inputs, outputs


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = MaskDiT(**{**TINY, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g) * 5 + 0.01,
            torch.randint(0, 10, (B,), generator=g))


#################################################################################
#                               Reference fixtures                              #
#################################################################################

def test_maskdit_fixture(fixtures_dir):
    model, config, inputs, outputs = _fixture_model(fixtures_dir)
    x, sigma, labels = inputs["x"], inputs["sigma"], inputs["class_labels"]
    with torch.no_grad():
        assert rel_err(model(x, sigma, labels), outputs["forward"]) <= 1e-5
        masked = model(x, sigma, labels, ids_keep=inputs["ids_keep"], ids_restore=inputs["ids_restore"])
        assert rel_err(masked, outputs["forward_masked"]) <= 1e-5
        # integer labels are one-hot encoded
        assert torch.equal(model(x, sigma, labels.argmax(1)), model(x, sigma, labels))


def test_maskdit_cfg_reference(fixtures_dir):
    model, _, inputs, _ = _fixture_model(fixtures_dir)
    ref = load_file(str(DATA / "maskdit_cfg.safetensors"))
    with torch.no_grad():
        for i in range(3):
            out = model.forward_with_cfg(inputs["x"], ref[f"input.cfg_sigma.{i}"], inputs["class_labels"], 1.5)
            assert rel_err(out, ref[f"output.forward_with_cfg.{i}"]) <= 1e-5


def test_official_state_dict_layout():
    """Key sets and sizes counted from the official EDMPrecond(DiT-XL/2, use_decoder, mae_loss_coef=0.1)."""
    with torch.device("meta"):
        model = build_model("MaskDiT-XL/2")
        no_mae = build_model("MaskDiT-S/2", mae_loss_coef=0.0)
    state = model.state_dict()
    assert len(state) == 378 and sum(p.numel() for p in model.parameters()) == 730_541_200
    assert all(k.startswith("model.") for k in state)
    assert state["model.mask_token"].shape == (1, 1, 512) and state["model.decoder_pos_embed"].shape == (1, 256, 512)
    assert state["model.decoder_blocks.7.adaLN_modulation.1.weight"].shape == (6 * 512, 1152)
    assert state["model.y_embedder.embedding_table.weight"].shape == (1152, 1000)
    assert not model.model.pos_embed.requires_grad and not model.model.decoder_pos_embed.requires_grad
    assert "model.mask_token" not in no_mae.state_dict()  # upstream creates it only with the MAE loss
    assert {f"MaskDiT-{s}/2" for s in ("S", "B", "L", "XL")} <= set(MODEL_CONFIGS)


#################################################################################
#                                   Masking                                     #
#################################################################################

def test_mask_ratio_zero_equals_unmasked():
    model = _tiny()
    x, sigma, y = _inputs(3)
    ids_keep, _, _ = random_masking(3, 16, 0.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(model(x, sigma, y, ids_keep=ids_keep), model(x, sigma, y)) <= 1e-5


def test_python_float_sigma_keeps_fp64_precision():
    """A Python-float sigma in an fp64 run is the fp64 number: it was made a float32 tensor first and
    widened (0.3 -> 0.30000001192...), so model(x, 0.3) differed from model(x, tensor(0.3, fp64))."""
    model = _tiny().double()
    x, _, y = _inputs(2)
    x = x.double()
    with torch.no_grad():
        assert torch.equal(model(x, 0.3, y), model(x, torch.tensor(0.3, dtype=torch.float64), y))


def test_self_drawn_mask_matches_given_ids():
    model = _tiny()
    x, sigma, y = _inputs(3)
    with torch.no_grad():
        out = model(x, sigma, y, mask_ratio=0.5, generator=torch.Generator().manual_seed(4))
        ids_keep, _, _ = random_masking(3, 16, 0.5, generator=torch.Generator().manual_seed(4))
        assert torch.equal(out, model(x, sigma, y, ids_keep=ids_keep))
        assert not torch.allclose(out, model(x, sigma, y))


@pytest.mark.parametrize("use_decoder", [True, False])
def test_packed_equals_per_sample_dense(use_decoder):
    model = _tiny(use_decoder=use_decoder)
    x, sigma, y = _inputs(4)
    pm = packed_masking([8, 16, 1, 5], 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x, sigma, y, ids_keep=pm.ids_keep, cu_seqlens=pm.cu_seqlens, segment_ids=pm.segment_ids,
                    max_seqlen=pm.max_seqlen)
        for b in range(4):
            ids_b = pm.ids_keep[pm.cu_seqlens[b]:pm.cu_seqlens[b + 1]][None]
            assert rel_err(out[b:b + 1], model(x[b:b + 1], sigma[b:b + 1], y[b:b + 1], ids_keep=ids_b)) <= 1e-5


def test_mask_token_variants():
    """Without the MAE loss the decoder fills zeros; without a decoder the removed patches are F = 0,
    so D = c_skip x there (both as upstream)."""
    x, sigma, y = _inputs(2)
    ids_keep, _, mask = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_token = _tiny(mae_loss_coef=0.1)
        zero_token = _tiny(mae_loss_coef=0.0)
        zero_token.model.load_state_dict({k: v for k, v in with_token.model.state_dict().items() if k != "mask_token"})
        with_token.model.mask_token.zero_()
        torch.testing.assert_close(with_token(x, sigma, y, ids_keep=ids_keep),
                                   zero_token(x, sigma, y, ids_keep=ids_keep))
        no_decoder = _tiny(use_decoder=False)
        out = no_decoder(x, sigma, y, ids_keep=ids_keep)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    removed = mask.reshape(2, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3).bool().expand(-1, 4, -1, -1)
    expected = (c_skip.view(-1, 1, 1, 1) * x)
    torch.testing.assert_close(out[removed], expected[removed])


def test_masked_training_backward():
    model = _tiny().train()
    x, sigma, y = _inputs(2)
    ids_keep, _, _ = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    model(x, sigma, y, ids_keep=ids_keep).square().mean().backward()
    for name in ("model.mask_token", "model.decoder_layer.linear.weight", "model.decoder_blocks.1.mlp.fc2.weight",
                 "model.blocks.0.attn.qkv.weight", "model.y_embedder.embedding_table.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.model.pos_embed.grad is None  # fixed sin-cos


#################################################################################
#                           Guidance and bad input                              #
#################################################################################

def test_cfg_all_channels():
    model = _tiny()
    x, sigma, y = _inputs(2)
    with torch.no_grad():
        cond, uncond = model(x, sigma, y), model(x, sigma, None)
        torch.testing.assert_close(model(x, sigma, torch.zeros(2, 10)), uncond)  # null label = zero vector
        out = model.forward_with_cfg(x, sigma, y, 1.5)
        torch.testing.assert_close(out, uncond + 1.5 * (cond - uncond))
        torch.testing.assert_close(model.forward_with_cfg(x, sigma, F.one_hot(y, 10).float(), 1.0), cond)
        assert torch.equal(model(x, sigma, y, 1.5), out)  # the official samplers' positional cfg_scale
        torch.testing.assert_close(model.forward_with_cfg(x, sigma[0], y, 1.5),  # scalar sigma, as EDM samplers
                                   model.forward_with_cfg(x, sigma[0].expand(2), y, 1.5))


def test_bad_input_errors():
    model = _tiny()
    x, sigma, y = _inputs(2)
    with pytest.raises(ValueError, match="16x16, the model expects input_size=8"):
        model(torch.randn(2, 4, 16, 16), sigma, y)
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(2, 3, 8, 8), sigma, y)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\]"):
        model(x, sigma, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="one-hot"):
        model(x, sigma, torch.zeros(2, 11))
    with pytest.raises(ValueError, match="sigma must be a scalar or have 2 entries"):
        model(x, torch.ones(3), y)
    with pytest.raises(ValueError, match="class_labels must be a torch.Tensor, got list"):
        model(x, sigma, [3, 1])
    with pytest.raises(ValueError, match="input x must be a torch.Tensor, got ndarray"):
        model(x.numpy(), sigma, y)
    for bad in (0.0, torch.tensor([1.0, -0.5]), float("nan")):  # the network would see ln(sigma) = -inf/NaN
        with pytest.raises(ValueError, match=r"sigma must be > 0 \(the network sees ln\(sigma\)\)"):
            model(x, bad, y)
    with pytest.raises(ValueError, match="learn_sigma"):
        MaskDiT(**{**TINY, "learn_sigma": True})
    with pytest.raises(ValueError, match="cu_seqlens needs ids_keep"):
        model(x, sigma, y, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))


#################################################################################
#                                torch.compile                                  #
#################################################################################

@pytest.mark.slow
def test_compile_fullgraph_no_graph_breaks():
    """Unmasked, dense-masked and packed forwards each trace to exactly one graph; training compiles."""
    model = _tiny()
    x, sigma, y = _inputs(2)
    check_masked_forwards_compile(model, x, sigma, y)
    assert model.model.mask_token.grad is not None


#################################################################################
#                                    CUDA                                       #
#################################################################################

@pytest.mark.gpu
def test_cuda_fixture_and_packed_bf16(fixtures_dir):
    """On the GPU backends: the fixture in float32 (TF32 off), and packed == per-sample dense in bf16."""
    model, config, inputs, outputs = _fixture_model(fixtures_dir)
    model = model.cuda()
    dev = {k: v.cuda() for k, v in inputs.items()}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            assert rel_err(model(dev["x"], dev["sigma"], dev["class_labels"]).cpu(), outputs["forward"]) <= 1e-5
            masked = model(dev["x"], dev["sigma"], dev["class_labels"], ids_keep=dev["ids_keep"])
            assert rel_err(masked.cpu(), outputs["forward_masked"]) <= 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    pm = packed_masking([8, 16, 1, 5], 16, generator=torch.Generator().manual_seed(5))
    ids, cu = pm.ids_keep.cuda(), pm.cu_seqlens.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(dev["x"], dev["sigma"], dev["class_labels"], ids_keep=ids, cu_seqlens=cu)
        for b in range(4):
            ids_b = ids[pm.cu_seqlens[b]:pm.cu_seqlens[b + 1]][None]
            ref = model(dev["x"][b:b + 1], dev["sigma"][b:b + 1], dev["class_labels"][b:b + 1], ids_keep=ids_b)
            assert rel_err(out[b:b + 1].float(), ref.float()) <= 2e-2


#################################################################################
#                          Every official model_type                           #
#################################################################################

# Anima-Lab/MaskDiT models/maskdit.py DiT_models (the --model_type choices): depth, width, heads.
OFFICIAL_MODEL_TYPES = {"H": (32, 1280, 16), "XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12),
                        "S": (12, 384, 6)}


def _official_param_count(depth, D, heads, p, N, num_classes=1000, d=512, dec_depth=8, C=4):
    """Parameters of EDMPrecond(DiT, use_decoder=True, mae_loss_coef > 0) counted layer by layer."""
    def block(w, cond):  # qkv, proj, fc1, fc2 (+ biases), adaLN Linear(cond -> 6w)
        return 3 * w * w + 3 * w + w * w + w + 4 * w * w + 4 * w + 4 * w * w + w + 6 * w * cond + 6 * w
    embed = C * p * p * D + D + 256 * D + D + D * D + D + num_classes * D + N * D
    decoder_layer = 2 * D * D + 2 * D + D * d + d
    head = 2 * d * D + 2 * d + d * p * p * C + p * p * C
    return embed + depth * block(D, D) + decoder_layer + N * d + d + dec_depth * block(d, D) + head


@pytest.mark.parametrize("size", sorted(OFFICIAL_MODEL_TYPES))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_every_official_model_type_is_registered(size, patch):
    """`--model_type DiT-H/4` (any of the official table) has a MaskDiT name with that shape; it was
    registered at patch 2 and without H only, so load_official/build_model refused the others."""
    depth, hidden, heads = OFFICIAL_MODEL_TYPES[size]
    name = f"MaskDiT-{size}/{patch}"
    assert MODEL_CONFIGS[name][0] == "maskdit"
    for res in (32, 64):  # 256 and 512 px latents
        with torch.device("meta"):
            model = build_model(name, input_size=res)
        net = model.model
        assert len(net.blocks) == depth and net.pos_embed.shape == (1, (res // patch) ** 2, hidden)
        assert net.blocks[0].attn.num_heads == heads and net.x_embedder.patch_size == patch
        n = sum(p.numel() for p in model.parameters())
        assert n == _official_param_count(depth, hidden, heads, patch, (res // patch) ** 2)
