"""DiT and SiT reproduce the official models (fixtures) and reject bad input clearly."""
import pytest
import torch

from masked_dit.models import DiT, SiT, build
from masked_dit.nn import sincos_pos_embed_2d
from tests.models.zoo_fixtures import constructor_args, load_model_fixture, rel_err

CASES = [("dit_sigma", "dit"), ("dit_nosigma", "dit"), ("sit_sigma", "sit"), ("sit_nosigma", "sit")]


def _fixture_model(fixtures_dir, name, family):
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, name)
    model = build(family, **constructor_args(config)).eval()
    model.load_state_dict(state, strict=True)
    return model, config, state, inputs, outputs


@pytest.mark.parametrize("name,family", CASES)
def test_fixture_forward_and_cfg(fixtures_dir, name, family):
    model, config, state, inputs, outputs = _fixture_model(fixtures_dir, name, family)
    assert set(model.state_dict()) == set(state)
    with torch.no_grad():
        out = model(inputs["x"], inputs["t"], inputs["y"])
        cfg = model.forward_with_cfg(inputs["cfg_x"], inputs["cfg_t"], inputs["cfg_y"], config["cfg_scale"])
    assert out.shape == outputs["forward"].shape
    assert rel_err(out, outputs["forward"]) <= 1e-5
    assert cfg.shape == outputs["forward_with_cfg"].shape
    assert rel_err(cfg, outputs["forward_with_cfg"]) <= 1e-5


@pytest.mark.parametrize("name,family", [("dit_sigma", "dit"), ("sit_sigma", "sit")])
def test_cfg_all_channels(fixtures_dir, name, family):
    """guide_channels='all' guides every eps channel (never sigma); 3 leaves channel 3 unguided."""
    model, config, _, inputs, _ = _fixture_model(fixtures_dir, name, family)
    x, t, y, s = inputs["cfg_x"], inputs["cfg_t"], inputs["cfg_y"], config["cfg_scale"]
    with torch.no_grad():
        raw = model(torch.cat([x[:2], x[:2]]), t, y)
        out3 = model.forward_with_cfg(x, t, y, s)
        out_all = model.forward_with_cfg(x, t, y, s, guide_channels="all")
    C = model.in_channels
    guided = raw[2:, :C] + s * (raw[:2, :C] - raw[2:, :C])
    torch.testing.assert_close(out_all[:2, :C], guided)
    torch.testing.assert_close(out_all[2:, :C], guided)
    torch.testing.assert_close(out_all[:, C:], raw[:, C:])  # sigma half (DiT) untouched
    torch.testing.assert_close(out3[:, :3], out_all[:, :3])
    torch.testing.assert_close(out3[:, 3], raw[:, 3])  # the official quirk: channel 3 unguided
    with pytest.raises(ValueError, match="guide_channels"):
        model.forward_with_cfg(x, t, y, s, guide_channels=5)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], s)


def test_sit_drops_sigma_half():
    torch.manual_seed(0)
    kw = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    sit, dit = SiT(learn_sigma=True, **kw).eval(), DiT(learn_sigma=True, **kw).eval()
    for p in sit.parameters():
        torch.nn.init.normal_(p, std=0.1)
    dit.load_state_dict(sit.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    with torch.no_grad():
        full, half = dit(x, t, y), sit(x, t, y)
    assert full.shape[1] == 8 and half.shape[1] == 4
    torch.testing.assert_close(half, full[:, :4])


def test_init_matches_official_recipe():
    """adaLN-Zero: zero modulation/final layers, sin-cos positions, frozen pos_embed."""
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=4)
    assert not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0], sincos_pos_embed_2d(32, 4))
    for b in m.blocks:
        assert b.adaLN_modulation[-1].weight.abs().sum() == 0
    assert m.final_layer.linear.weight.abs().sum() == 0
    with torch.no_grad():
        out = m(torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([0, 4]))
    assert out.abs().max() == 0  # zero-initialised output layer


# ------------------------------------------------------------------ bad input --

@pytest.fixture(scope="module")
def tiny():
    return DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()


@pytest.mark.parametrize("x_shape,match", [
    ((2, 4, 16, 16), "input_size=8"),
    ((2, 3, 8, 8), "in_channels=4"),
    ((4, 8, 8), r"\[B, C, H, W\]"),
])
def test_bad_image_raises(tiny, x_shape, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny(torch.randn(x_shape), torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("labels", [[0, 11], [-1, 3], [10_000, 0]])
def test_label_out_of_range_raises(tiny, labels):
    with pytest.raises(ValueError, match=r"labels y.*\[0, 10\]"):
        tiny(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor(labels))


def test_null_label_only_with_cfg_row():
    m = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10,
            class_dropout_prob=0.0).eval()
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        m(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 10]))


def test_bad_t_and_y_shapes_raise(tiny):
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="timesteps t"):
        tiny(x, torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels y must have shape"):
        tiny(x, torch.tensor([1, 2]), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="integer"):
        tiny(x, torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    # a list or an array where a tensor goes (was an AttributeError from inside the checks)
    with pytest.raises(ValueError, match="DiT labels y must be a torch.Tensor, got list"):
        tiny(x, torch.tensor([1, 2]), [1, 2])
    with pytest.raises(ValueError, match="DiT input x must be a torch.Tensor, got ndarray"):
        tiny(x.numpy(), torch.tensor([1, 2]), torch.tensor([1, 2]))
    out = tiny(x, torch.tensor(5), torch.tensor([1, 2]))  # a scalar t is broadcast over the batch
    assert out.shape == (2, 8, 8, 8)


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT(input_size=9, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiT(input_size=8, patch_size=2, hidden_size=30, depth=1, num_heads=4)
