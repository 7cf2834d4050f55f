"""REPA's SiT: fixture reproduction (output and projector features) and its argument checks."""
import pytest
import torch

from masked_dit.models import REPASiT, build, build_model
from tests.models.zoo_fixtures import constructor_args, load_model_fixture, rel_err


def test_fixture_forward_and_projectors(fixtures_dir):
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, "repa_sit")
    model = build("repa_sit", **constructor_args(config)).eval()
    model.load_state_dict(state, strict=True)
    assert set(model.state_dict()) == set(state)
    with torch.no_grad():
        out, zs = model(inputs["x"], inputs["t"], inputs["y"])
    assert len(zs) == len(config["z_dims"])
    assert out.shape == outputs["forward"].shape
    assert rel_err(out, outputs["forward"]) <= 1e-5
    for i, z in enumerate(zs):
        assert z.shape == outputs[f"zs.{i}"].shape
        assert rel_err(z, outputs[f"zs.{i}"]) <= 1e-5


def test_projectors_read_block_encoder_depth():
    """zs come from the residual stream after block `encoder_depth`, one head per encoder."""
    torch.manual_seed(0)
    m = REPASiT(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=4, z_dims=[8, 12],
                encoder_depth=2, projector_dim=16).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 4])
    with torch.no_grad():
        out, zs = m(x, t, y)
        h, c = m.embed(x, t, y)
        for block in m.blocks[:2]:
            h = block(h, c)
        expect = [proj(h) for proj in m.projectors]
    assert [z.shape for z in zs] == [(2, 16, 8), (2, 16, 12)]
    for z, e in zip(zs, expect):
        torch.testing.assert_close(z, e)
    assert out.shape == (2, 4, 8, 8)


def test_repa_argument_errors():
    kw = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match="encoder_depth"):
        REPASiT(encoder_depth=3, **kw)
    with pytest.raises(ValueError, match="decoder_hidden_size"):
        REPASiT(decoder_hidden_size=768, encoder_depth=1, **kw)
    m = REPASiT(decoder_hidden_size=32, encoder_depth=1, path_type="linear", fused_attn=True, **kw)
    assert m.path_type == "linear"
    with pytest.raises(NotImplementedError, match="sampler"):
        m.forward_with_cfg(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 4]), 1.5)
    with pytest.raises(ValueError, match="in_channels=4"):
        m(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]))


def test_qk_norm_checkpoint_loads_by_name(tmp_path):
    """REPA's --qk-norm: LayerNorm on q and k in every block (keys blocks.i.attn.{q,k}_norm.*, as timm's
    Attention); a training dict of such a run loads by its registered name, qk_norm read off the keys."""
    from masked_dit.models import load_official

    torch.manual_seed(0)
    kw = dict(input_size=8, hidden_size=384, num_classes=1000, z_dims=[768], encoder_depth=2)
    m = build_model("REPA-SiT-S/2", qk_norm=True, **kw).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert all(f"blocks.{i}.attn.{n}_norm.{w}" in m.state_dict()
               for i in range(len(m.blocks)) for n in "qk" for w in ("weight", "bias"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 7])
    with torch.no_grad():
        out, zs = m(x, t, y)
        plain = build_model("REPA-SiT-S/2", **kw).eval()
        plain.load_state_dict(m.state_dict(), strict=False)  # the same weights without the norms
        assert (plain(x, t, y)[0] - out).abs().max() > 1e-3  # the norms are in the forward
    torch.save({"model": m.state_dict(), "ema": m.state_dict(), "args": {"qk_norm": True, "encoder_depth": 2}},
               tmp_path / "0000100.pt")
    loaded = load_official(tmp_path / "0000100.pt", "REPA-SiT-S/2")
    assert loaded.config["qk_norm"] is True
    with torch.no_grad():
        out2, zs2 = loaded(x, t, y)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    torch.testing.assert_close(zs2[0], zs[0], rtol=0, atol=0)
