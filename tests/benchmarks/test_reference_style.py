"""The reference-style baseline is the same network as ours: same keys, same outputs, same gradients."""
import pytest
import torch

from benchmarks.bench_train_step import TOY_KWARGS
from benchmarks.reference_style import RECIPES, build_reference, reference_like
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
