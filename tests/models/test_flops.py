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
    # a masked training pass that keeps every token (ratio 0) still runs the side-interpolater
    assert forward_flops(mdt, masked=True).parts["side"] == forward_flops(mdt, 0.3).parts["side"]
    assert "side" not in forward_flops(mdt, 0.3, masked=False).parts


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


def _hand_block(d, n, cond=None, skip=False, mlp=4):
    """Independent closed form of one adaLN-Zero block (MACs): qkv + proj + MLP per token, the two
    attention products, the 6-way modulation Linear once per image, MDT's skip Linear per token."""
    return (4 * d * d + 2 * mlp * d * d + (2 * d * d if skip else 0)) * n + 2 * n * n * d + (cond or d) * 6 * d


def test_mdtv2_xl2_training_step_hand_count():
    """MDTv2-XL/2 (12 in + 12 out with skips, 4 decoder blocks with skips, 1 side block): full pass +
    masked pass at the mean ratio 0.4 (153 kept of 256), each x 3 for forward + backward."""
    d, n, k = 1152, 256, int(256 * 0.6)
    stem = n * d * 4 * 2 * 2 + 256 * d + d * d
    final = d * 2 * d + n * d * 2 * 2 * 8

    def pass_macs(tokens, side):
        enc = 12 * _hand_block(d, tokens) + 12 * _hand_block(d, tokens, skip=True)
        return stem + enc + 4 * _hand_block(d, n, skip=True) + (_hand_block(d, n) if side else 0) + final

    expected = 3 * 2 * (pass_macs(n, False) + pass_macs(k, True))
    assert meta_model("MDTv2-XL/2").flops_per_image(0.4) == pytest.approx(expected, rel=1e-12)
    assert expected / 1e9 == pytest.approx(1309.5, abs=0.1)


def test_maskdit_xl2_training_step_hand_count():
    """MaskDiT-XL/2 at mask 0.5: 28 encoder blocks on the 128 kept tokens, the D -> 512 decoder_layer on
    the kept tokens, 8 decoder blocks of width 512 (conditioned on the 1152-wide embedding) and the
    final layer on all 256 tokens; one-hot label Linear; x 3 for forward + backward."""
    d, dd, n, k = 1152, 512, 256, 128
    stem = n * d * 4 * 2 * 2 + 256 * d + d * d + 1000 * d
    enc = 28 * _hand_block(d, k)
    decoder_layer = d * 2 * d + k * d * dd
    dec = 8 * _hand_block(dd, n, cond=d)
    final = d * 2 * dd + n * dd * 2 * 2 * 4
    expected = 3 * 2 * (stem + enc + decoder_layer + dec + final)
    assert meta_model("MaskDiT-XL/2").flops_per_image(0.5) == pytest.approx(expected, rel=1e-12)
    # the encoder halves, the decoder does not: 55% of DiT-XL/2's 712 GFLOP per training image
    assert expected / meta_model("DiT-XL/2").flops_per_image() == pytest.approx(0.552, abs=0.002)


def test_dit_xl2_attention_share_matches_the_notes():
    """performance-facts.md: attention products are ~3.6% of DiT-XL/2's FLOPs at 256 tokens."""
    d, n = 1152, 256
    share = 28 * 2 * n * n * d / forward_flops("DiT-XL/2").macs
    assert share == pytest.approx(0.0356, abs=0.0005)


def test_mdt_step_at_ratio_zero_counts_both_passes():
    """MDTv2 masks at ratio 0 too (it draws 0 + 0.2 U): a training step is still a full and a masked pass."""
    mdt = meta_model("MDTv2-S/2")
    both = 3 * (forward_flops(mdt, masked=True).flops + forward_flops(mdt).flops)
    assert flops_per_image(mdt, 0.0, training=True) == pytest.approx(both, rel=1e-12)
    assert flops_per_image(mdt, 0.0, training=False) == forward_flops(mdt).flops


def test_maskdit_without_decoder_and_unconditional():
    """Without a decoder the head runs on the kept tokens only (removed ones are zero-filled after it);
    an unconditional MaskDiT (num_classes=0, no label embedder) is counted without the label matmul."""
    kw = dict(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=4)
    plain = meta_model("MaskDiT-S/2", **kw, num_classes=10, use_decoder=False)
    n, k = 64, kept_tokens(64, 0.5)
    head = plain.model.final_layer.linear
    per_token = head.in_features * head.out_features
    full, masked = forward_flops(plain, 0.0), forward_flops(plain, 0.5)
    assert full.parts["final"] - masked.parts["final"] == (n - k) * per_token
    uncond = meta_model("MaskDiT-S/2", **kw, num_classes=0, use_decoder=False)
    assert uncond.model.y_embedder is None
    assert forward_flops(uncond, 0.5).macs == masked.macs - 10 * 64  # one-hot labels: a [10 -> 64] matmul
    assert uncond.flops_per_image(0.5) == pytest.approx(3 * forward_flops(uncond, 0.5).flops)
