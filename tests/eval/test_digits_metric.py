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
