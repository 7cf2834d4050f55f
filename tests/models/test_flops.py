"""Analytic FLOPs: DiT's published GMACs, masking, MDT's two passes, the README table."""
import pytest
import torch

from masked_dit.models import flops_per_image, forward_flops, model_table
from masked_dit.models.flops import block_macs, kept_tokens, meta_model, mfu, num_params

# DiT paper, Table 4 ("Gflops" are multiply-accumulates per forward at 256x256)
PUBLISHED_GMACS = {"DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64,
                   "DiT-XL/4": 29.05, "DiT-XL/8": 7.39}


@pytest.mark.parametrize("name,gmacs", sorted(PUBLISHED_GMACS.items()))
def test_dit_published_numbers(name, gmacs):
    count = forward_flops(name)
    assert abs(count.gmacs / gmacs - 1) < 0.01
    assert count.flops == 2 * count.macs


def test_xl2_params_and_training_step():
    m = meta_model("DiT-XL/2")
    assert num_params(m) == 675_129_632 and len(m.state_dict()) == 292
    assert abs(m.flops_per_image(training=True) / 1e9 - 712) < 2  # 3 x 237 GFLOP
    assert m.flops_per_image(training=False) == forward_flops(m).flops
    assert forward_flops("SiT-XL/2").macs == forward_flops("DiT-XL/2").macs


def test_block_count_formula():
    """12 d^2 N + 2 N^2 d (+ adaLN 6 d^2) per block, MACs."""
    from masked_dit.nn import FusedDiTBlock

    d, n = 64, 10
    assert block_macs(FusedDiTBlock(d, 4), n) == 12 * d * d * n + 2 * n * n * d + 6 * d * d
    assert block_macs(FusedDiTBlock(d, 4, skip=True), n) == 14 * d * d * n + 2 * n * n * d + 6 * d * d


def test_masked_counts():
    assert kept_tokens(256, 0.5) == 128 and kept_tokens(256, 0.3) == 179
    with pytest.raises(ValueError, match="mask_ratio"):
        kept_tokens(256, 1.0)
    full, masked = forward_flops("MaskDiT-XL/2", 0.0), forward_flops("MaskDiT-XL/2", 0.5)
    assert 0.45 < masked.parts["blocks"] / full.parts["blocks"] < 0.5  # encoder roughly halves
    assert masked.parts["decoder"] > 0
    assert meta_model("MaskDiT-XL/2").flops_per_image(0.5) == pytest.approx(3 * masked.flops)  # method on every family
    # MDT trains with a full and a masked pass (plus the side-interpolater on the masked one)
    mdt = meta_model("MDTv2-XL/2")
    two = flops_per_image(mdt, 0.3, training=True)
    assert two == pytest.approx(3 * (forward_flops(mdt, 0.3).flops + forward_flops(mdt).flops))
    assert forward_flops(mdt, tokens_kept=179).macs == forward_flops(mdt, 0.3).macs
    with pytest.raises(ValueError, match="tokens_kept"):
        forward_flops(mdt, tokens_kept=0)
    assert forward_flops(mdt, 0.3).parts["side"] > 0 and "side" not in forward_flops(mdt).parts


def test_repa_projectors_counted():
    repa = forward_flops("REPA-SiT-XL/2")
    assert repa.parts["projectors"] == 256 * (1152 * 2048 + 2048 * 2048 + 2048 * 768)
    # REPA's SiT has no learned sigma: its head is half of SiT-XL/2's (p^2 * 4 vs p^2 * 8 outputs)
    sit = forward_flops("SiT-XL/2")
    assert sit.parts["final"] - repa.parts["final"] == 256 * 1152 * 16


def test_model_table_and_mfu():
    table = model_table(["DiT-XL/2", "SiT-B/2"])
    assert "| DiT-XL/2 | 675.13 | 118.62 | 237.24 |" in table
    assert mfu(100.0, 1e12, 1e15) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="family"):
        forward_flops(torch.nn.Linear(2, 2))
