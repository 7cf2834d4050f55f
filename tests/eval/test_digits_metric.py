"""The offline digits metric: real held-out digits score near-perfectly, noise scores badly."""
import pytest
import torch

from masked_dit.eval import digits


def _heldout(resolution: int):
    # exactly what training sees (bilinear upsampling); the metric area-downsamples back
    return digits.heldout_digits(resolution)


def test_shipped_classifier_heldout_accuracy():
    x, y = _heldout(8)
    acc = (digits.load_classifier()(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.97


@pytest.mark.parametrize("resolution", [16, 32])
def test_real_heldout_digits_score_near_perfectly(resolution):
    x, y = _heldout(resolution)
    score = digits.score_digits(x, y)
    assert score.conditional_accuracy >= 0.97
    # held-out vs itself: FD is zero up to sqrtm error
    assert score.feature_fd < 1e-3


def test_noise_scores_badly():
    x, y = _heldout(16)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(x.shape, generator=g) * 2 - 1
    score = digits.score_digits(noise, y)
    assert score.conditional_accuracy < 0.3
    real_half = digits.score_digits(x[::2], y[::2])
    assert score.feature_fd > 20 * max(real_half.feature_fd, 1e-2)


def test_wrong_labels_lower_accuracy():
    x, y = _heldout(16)
    assert digits.score_digits(x, (y + 1) % 10).conditional_accuracy < 0.05


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        digits.score_digits(torch.zeros(3, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected images \[B, C, H, W\]"):
        digits.score_digits(torch.zeros(3, 16, 16), torch.zeros(3, dtype=torch.long))


@pytest.mark.slow
def test_training_recipe_reproduces_accuracy():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _, acc = digits.train_classifier(epochs=60, seed=0)
    assert acc >= 0.97


def test_eval_digits_scores_a_sample_npz(tmp_path, capsys):
    """`masked-dit eval digits samples.npz`: the metric of the trainer's digits records for a sampled .npz
    (uint8 [N, H, W, 3] and its labels, as `masked-dit sample` writes them), no reference batch or download."""
    import json

    import numpy as np

    from masked_dit.eval.cli import main

    x, y = _heldout(16)
    uint8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    np.savez(tmp_path / "s.npz", uint8.numpy(), y.numpy())
    assert main(["digits", str(tmp_path / "s.npz"), "--out", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    want = digits.score_digits(uint8.permute(0, 3, 1, 2).float() / 127.5 - 1, y)
    assert got["digits_cond_acc"] == want.conditional_accuracy >= 0.97 and got["num_samples"] == len(y)
    assert got["digits_fd"] == pytest.approx(want.feature_fd) and got["digits_fd"] < 0.05  # real digits, 8-bit
    assert "Digits class accuracy" in capsys.readouterr().out
    np.savez(tmp_path / "nolabels.npz", uint8.numpy())
    assert main(["digits", str(tmp_path / "nolabels.npz")]) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit eval: error: {tmp_path / 'nolabels.npz'}: needs 'arr_0' "
                                               f"images and 'arr_1' labels (has ['arr_0'])")
