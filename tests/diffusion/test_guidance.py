"""Classifier-free guidance: DiT/MDT 3-channel quirk, power-cosine and interval schedules, batched wrapper."""
import functools
import math

import pytest
import torch

from masked_dit.diffusion import (ClassifierFreeGuidance, cfg_combine, create_diffusion, forward_with_cfg,
                                  in_guidance_interval, interval_scale, power_cosine_scale)

F64 = torch.float64
NULL = 10


def toy_model(x, t, y):
    """8 output channels (eps, var) depending on x, t and the label, so guidance changes every channel."""
    shift = (y.to(x.dtype) - 4.5).view(-1, 1, 1, 1) * 0.1
    out = torch.cat([0.5 * x + shift, torch.tanh(x) - shift], dim=1)
    return out + 1e-4 * t.to(x.dtype).view(-1, 1, 1, 1)


def official_forward_with_cfg(x, t, y, cfg_scale, pow_=None):
    """DiT's / MDTv2's forward_with_cfg written out literally (reference semantics)."""
    half = x[: len(x) // 2]
    model_out = toy_model(torch.cat([half, half], dim=0), t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    if pow_ is not None:   # MDTv2
        s = (1 - torch.cos(((1 - t / 1000) ** pow_) * math.pi)) * 1 / 2
        cfg_scale = ((cfg_scale - 1) * s + 1)[: len(x) // 2].view(-1, 1, 1, 1)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def _batch(B=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 2, 2, generator=g, dtype=F64)
    t = torch.tensor([999, 500, 3][:B])
    y = torch.tensor([1, 7, 3][:B])
    return x, t, y


def test_cfg_combine_three_channels_vs_all():
    cond = torch.randn(2, 8, 2, 2, dtype=F64)
    uncond = torch.randn(2, 8, 2, 2, dtype=F64)
    all_ch = cfg_combine(cond, uncond, 4.0)
    three = cfg_combine(cond, uncond, 4.0, guided_channels=3)
    torch.testing.assert_close(all_ch, uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(three[:, :3], all_ch[:, :3])
    assert torch.equal(three[:, 3:], cond[:, 3:])           # channel 3 of eps and the variance: cond only
    per_sample = cfg_combine(cond, uncond, torch.tensor([1.0, 2.0], dtype=F64))
    torch.testing.assert_close(per_sample[0], cond[0])
    torch.testing.assert_close(cfg_combine(cond, uncond, 4.0, guided_channels=8), all_ch)


@pytest.mark.parametrize("bad", [9, 0, -1, 2.5, True])
def test_guided_channels_out_of_range_is_named(bad):
    # 9 on an 8-channel (learned-sigma) output used to guide the sigma half silently.
    cond = uncond = torch.zeros(2, 8, 2, 2)
    with pytest.raises(ValueError, match="guided_channels must be None"):
        cfg_combine(cond, uncond, 4.0, guided_channels=bad)
    if bad != 9:
        with pytest.raises(ValueError, match="guided_channels must be None"):
            ClassifierFreeGuidance(lambda x, t, y: x, 4.0, null_label=NULL, guided_channels=bad)
        return
    # The output's width is known only at the call.
    guided = ClassifierFreeGuidance(lambda x, t, y: torch.cat([x, x], 1), 4.0, null_label=NULL, guided_channels=9)
    with pytest.raises(ValueError, match=r"\(the model outputs 8\), got 9"):
        guided(torch.zeros(2, 4, 2, 2), torch.zeros(2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("pow_", [None, 4.0])
def test_forward_with_cfg_matches_official(pow_):
    x, t, y = _batch()
    xx, tt, yy = torch.cat([x, x + 1]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)])
    ref = official_forward_with_cfg(xx, tt, yy, 3.8, pow_)
    schedule = None if pow_ is None else functools.partial(power_cosine_scale, scale_pow=pow_)
    ours = forward_with_cfg(toy_model, xx, tt, yy, 3.8, guided_channels=3, schedule=schedule)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("pow_", [None, 4.0])
def test_batched_wrapper_equals_cond_half(pow_):
    x, t, y = _batch()
    schedule = None if pow_ is None else functools.partial(power_cosine_scale, scale_pow=pow_)
    guided = ClassifierFreeGuidance(toy_model, 3.8, null_label=NULL, guided_channels=3, schedule=schedule)
    ref = official_forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]), 3.8, pow_)
    torch.testing.assert_close(guided(x, t, y), ref[:3], rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(guided(x, t, y=y), ref[:3], rtol=1e-15, atol=1e-15)   # keyword label


def test_wrapper_one_model_call():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return toy_model(x, t, y)

    x, t, y = _batch()
    ClassifierFreeGuidance(model, 1.5, null_label=NULL)(x, t, y)
    assert calls == [6]


def test_ddpm_with_wrapper_equals_official_doubled_batch_sampling():
    """DiT's sample.py: sample [z; z] with labels [y; null] through forward_with_cfg, keep the first half."""
    d = create_diffusion("5")
    x, _, y = _batch()
    g = torch.Generator().manual_seed(1)
    step_noise = [torch.randn(6, 4, 2, 2, generator=g, dtype=F64) for _ in range(5)]
    official = d.p_sample_loop(lambda z, t, y: official_forward_with_cfg(z, t, y, 1.5), (6, 4, 2, 2),
                               noise=torch.cat([x, x]), step_noise=step_noise, clip_denoised=False,
                               model_kwargs={"y": torch.cat([y, torch.full_like(y, NULL)])})[:3]
    ours = d.p_sample_loop(ClassifierFreeGuidance(toy_model, 1.5, null_label=NULL, guided_channels=3), (3, 4, 2, 2),
                           noise=x, step_noise=[n[:3] for n in step_noise], clip_denoised=False, model_kwargs={"y": y})
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-12)


def test_power_cosine_schedule():
    assert power_cosine_scale(0, 3.8) == pytest.approx(3.8)
    assert power_cosine_scale(1000, 3.8) == pytest.approx(1.0)
    t = torch.tensor([0.0, 250.0, 500.0, 999.0], dtype=F64)
    s = power_cosine_scale(t, 3.8, scale_pow=4.0)
    expected = [(3.8 - 1) * (1 - math.cos(((1 - v / 1000) ** 4) * math.pi)) / 2 + 1 for v in t.tolist()]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=F64))
    assert bool((s[1:] <= s[:-1]).all())                      # strongest guidance at the clean end


def test_guidance_interval():
    assert in_guidance_interval(0.7, 0.0, 0.7) and not in_guidance_interval(0.71, 0.0, 0.7)
    assert interval_scale(0.3, 1.8, 0.0, 0.7) == 1.8 and interval_scale(0.9, 1.8, 0.0, 0.7) == 1.0
    t = torch.tensor([0.0, 0.7, 0.8, 1.0], dtype=F64)
    torch.testing.assert_close(interval_scale(t, 1.8, 0.0, 0.7), torch.tensor([1.8, 1.8, 1.0, 1.0], dtype=F64))
    # Through the wrapper: outside the interval the output is the conditional prediction.
    x, _, y = _batch(2)
    tt = torch.tensor([0.5, 0.9], dtype=F64)
    wrapped = ClassifierFreeGuidance(toy_model, 1.8, null_label=NULL,
                                     schedule=functools.partial(interval_scale, low=0.0, high=0.7))(x, tt, y)
    cond, uncond = toy_model(x, tt, y), toy_model(x, tt, torch.full_like(y, NULL))
    torch.testing.assert_close(wrapped[0], (uncond + 1.8 * (cond - uncond))[0])
    torch.testing.assert_close(wrapped[1], cond[1])


def test_wrapper_output_kinds_and_errors():
    x, t, y = _batch(2)
    onehot = torch.eye(10, dtype=F64)[y]
    net = lambda x, s, labels: {"x": x * (1 + labels.sum(1)).view(-1, 1, 1, 1), "mask": None}
    out = ClassifierFreeGuidance(net, 2.0)(x, t, onehot)      # null = zero vector for one-hot labels
    torch.testing.assert_close(out, 3 * x)   # x + 2 (2x - x)
    out = ClassifierFreeGuidance(lambda x, t, y: (toy_model(x, t, y), "extra"), 2.0, null_label=NULL)(x, t, y)
    assert out.shape == (2, 8, 2, 2)
    with pytest.raises(ValueError, match="null_label is required"):
        ClassifierFreeGuidance(toy_model, 2.0)(x, t, y)
    with pytest.raises(ValueError, match="class label"):
        ClassifierFreeGuidance(toy_model, 2.0, null_label=NULL)(x, t)
    with pytest.raises(ValueError, match="needs class labels as a tensor, got NoneType"):
        ClassifierFreeGuidance(toy_model, 2.0, null_label=NULL)(x, t, None)
    with pytest.raises(ValueError, match="even batch"):
        forward_with_cfg(toy_model, x[:1], t[:1], y[:1], 2.0)
