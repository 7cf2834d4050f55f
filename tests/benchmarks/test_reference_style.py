"""The reference-style baseline is the same network as ours: same keys, same outputs, same gradients."""
import pytest
import torch

from benchmarks.bench_train_step import TOY_KWARGS
from benchmarks.reference_style import (RECIPES, RefDINOv2, build_reference, dinov2_for_repa,
                                        preprocess_raw_image, reference_like)
from masked_dit.models import build
from masked_dit.nn.masking import random_masking
from masked_dit.ops import use_backend


def _perturbed(family):
    """Our toy model with every weight moved off its (often zero) init, so each path matters."""
    torch.manual_seed(0)
    model = build(family, **TOY_KWARGS[family]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(family, B=3):
    x = torch.randn(B, 4, 8, 8)
    y = torch.randint(0, 10, (B,))
    t = torch.randint(0, 1000, (B,)) if family in ("dit", "mdtv2") else torch.rand(B) + 0.1
    return x, t, y


@pytest.mark.parametrize("attention", ["softmax", "sdpa"])
@pytest.mark.parametrize("family", sorted(RECIPES))
def test_reference_matches_ours(family, attention):
    model = _perturbed(family)
    ref = reference_like(model, TOY_KWARGS[family], attention=attention).eval()
    x, t, y = _inputs(family)
    calls = [{}]
    if family in ("mdtv2", "maskdit"):  # also the masked pass, same kept tokens
        ids_keep, ids_restore, _ = random_masking(3, 16, 0.4 if family == "mdtv2" else 0.5)
        calls.append({"ids_keep": ids_keep, "ids_restore": ids_restore})
    with use_backend("torch"), torch.no_grad():
        for kw in calls:
            ours = model(x, t, y, **({"ids_keep": kw["ids_keep"]} if kw else {}))
            theirs = ref(x, t, y, **kw)
            if family == "repa_sit":
                torch.testing.assert_close(theirs[1][0], ours[1][0], rtol=1e-5, atol=1e-5)
                ours, theirs = ours[0], theirs[0]
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_reference_gradients_match_mdtv2_masked():
    model = _perturbed("mdtv2").train()
    model.y_embedder.dropout_prob = 0.0  # no random label drop: both see the same labels
    ref = reference_like(model, TOY_KWARGS["mdtv2"], attention="softmax").train()
    x, t, y = _inputs("mdtv2")
    ids_keep, ids_restore, _ = random_masking(3, 16, 0.4)
    with use_backend("torch"):
        model(x, t, y, ids_keep=ids_keep).square().mean().backward()
    ref(x, t, y, ids_keep=ids_keep, ids_restore=ids_restore).square().mean().backward()
    theirs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert theirs[name].grad is None or not theirs[name].grad.any(), name
            continue
        torch.testing.assert_close(theirs[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="family 'mdtv1'"):
        build_reference("mdtv1")
    with pytest.raises(ValueError, match="'flash'"):
        build_reference("dit", attention="flash", **TOY_KWARGS["dit"])
    ref = build_reference("mdtv2", **TOY_KWARGS["mdtv2"])
    x, t, y = _inputs("mdtv2")
    with pytest.raises(ValueError, match="ids_restore"):
        ref(x, t, y, ids_keep=torch.zeros(3, 8, dtype=torch.long))


def test_recipes_record_the_official_steps():
    """Facts read from the official training scripts (benchmarks/NOTES.md cites the lines)."""
    assert RECIPES["mdtv2"]["fused_optimizer"]  # sail-sg Adan(fused=True): a CUDA kernel, not foreach
    assert not RECIPES["mdtv2"]["tf32"] and not RECIPES["maskdit"]["tf32"]  # neither sets a TF32 matmul flag
    assert RECIPES["maskdit"]["cudnn_benchmark"]
    assert not any(RECIPES[f]["cudnn_benchmark"] for f in ("dit", "sit", "repa_sit", "mdtv2"))
    assert RECIPES["repa_sit"]["grad_clip"] == RECIPES["mdtv2"]["grad_clip"] == 1.0
    assert RECIPES["dit"]["grad_clip"] == RECIPES["sit"]["grad_clip"] == RECIPES["maskdit"]["grad_clip"] == 0.0


#################################################################################
#                         REPA's online DINOv2 encoder                          #
#################################################################################

def test_dinov2_returns_the_normalised_patch_tokens():
    """B/14 at REPA's 256 px images: [B, 256, 768] (shapes only, on the meta device); a toy one at the toy's
    64 px images: the 16 tokens of width 32 the toy REPA-SiT's projector is aligned to."""
    with torch.device("meta"):
        full = dinov2_for_repa(256)
        assert full(preprocess_raw_image(torch.empty(2, 3, 256, 256, dtype=torch.uint8))).shape == (2, 256, 768)
    torch.manual_seed(0)
    toy = dinov2_for_repa(64, embed_dim=32, depth=2, num_heads=2)
    assert not any(p.requires_grad for p in toy.parameters()) and not toy.training  # frozen, as REPA loads it
    out = toy(preprocess_raw_image(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)))
    assert out.shape == (3, 16, 32)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)  # the final LayerNorm's output


def test_preprocess_is_repa_dinov2_branch():
    """x / 255, ImageNet mean/std, bicubic to 224 * R / 256 px (224 at REPA's 256 px, 56 for the toy's 64)."""
    x = torch.full((1, 3, 256, 256), 255, dtype=torch.uint8)
    out = preprocess_raw_image(x)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 100, 100], expected)  # a constant image stays constant
    assert preprocess_raw_image(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 3, 56, 56)


def test_position_table_interpolation():
    """DINOv2's interpolate_pos_encoding: the table itself at its own grid, else [1, 1 + h*w, D] with the CLS
    entry kept; REPA resamples it once to the training grid, after which a step's forward takes it as is."""
    torch.manual_seed(0)
    enc = RefDINOv2(embed_dim=8, depth=0, num_heads=2, pos_grid=37)
    assert enc.interpolate_pos_encoding(37, 37) is enc.pos_embed
    for h, w in ((16, 16), (4, 6)):
        table = enc.interpolate_pos_encoding(h, w)
        assert table.shape == (1, 1 + h * w, 8)
        torch.testing.assert_close(table[:, 0], enc.pos_embed[:, 0])
    enc.resample_pos_embed(16)
    assert enc.pos_embed.shape == (1, 257, 8) and enc.interpolate_pos_encoding(16, 16) is enc.pos_embed


def test_dinov2_attention_forms_agree():
    """SDPA (dinov2 main) and the explicit softmax with q scaled first (its 2024 code) compute the same."""
    torch.manual_seed(0)
    sdpa = RefDINOv2(embed_dim=32, depth=2, num_heads=4, pos_grid=5, attention="sdpa").eval()
    softmax = RefDINOv2(embed_dim=32, depth=2, num_heads=4, pos_grid=5, attention="softmax").eval()
    softmax.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        torch.testing.assert_close(softmax(x), sdpa(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'flash'"):
        RefDINOv2(embed_dim=8, depth=1, num_heads=2, attention="flash")


def test_dinov2_flops_are_notes_estimate():
    """NOTES.md: the B/14 forward at 224 px is about 46 GFLOP per image (2 x MACs)."""
    with torch.device("meta"):
        assert RefDINOv2().forward_flops(224) == pytest.approx(46.3e9, rel=1e-3)
