"""A bf16 model output (autocast, FSDP2 bf16) meets fp32 arithmetic in the losses and samplers, and
the samplers hold only the states they return."""
import weakref

import pytest
import torch

from masked_dit.diffusion.guidance import cfg_combine
from masked_dit.diffusion.ode import integrate_ode, sample_ode
from masked_dit.diffusion.respace import create_diffusion
from masked_dit.diffusion.sde import sample_sde
from masked_dit.diffusion.transport import Transport


def _vb_output_grad(output, x0, noise, t):
    d = create_diffusion("", "linear", learn_sigma=True, diffusion_steps=1000)
    out = output.clone().requires_grad_(True)
    d.training_losses(lambda *a, **k: out, x0, t, noise=noise)["vb"].sum().backward()
    return out.grad.float()[:, x0.shape[1]:]  # the variance channels: only the VB term reaches them


def test_learned_range_vb_gradient_of_a_bf16_output_is_computed_in_fp32():
    """frac * max_log + (1 - frac) * min_log in bf16 cancels its own gradient at large t (measured: the
    variance-channel gradient 10x-200x off at t >= 300). With the output widened first, the gradient is
    that of fp32 arithmetic on the same rounded output, up to the bf16 rounding of the gradient itself."""
    torch.manual_seed(0)
    B = 200
    x0, noise = torch.randn(B, 4, 4, 4) * 0.8, torch.randn(B, 4, 4, 4)
    t = torch.arange(300, 1000, 700 // B)[:B]
    out = torch.cat([noise + 0.1 * torch.randn_like(noise), 0.3 * torch.randn_like(noise)], 1).bfloat16()
    want = _vb_output_grad(out.float(), x0, noise, t)
    got = _vb_output_grad(out, x0, noise, t)
    torch.testing.assert_close(got, want.bfloat16().float(), rtol=0, atol=0)


def test_a_float32_guidance_scale_keeps_a_bf16_combination_in_float32():
    """MDT's per-sample (tensor) scale promotes its combination to float32, as the official code's does."""
    cond, uncond = torch.randn(2, 8, 4, 4).bfloat16(), torch.randn(2, 8, 4, 4).bfloat16()
    scale = torch.tensor([1.5, 3.8])
    got = cfg_combine(cond, uncond, scale, guided_channels=3)
    assert got.dtype == torch.float32
    want = uncond[:, :3] + scale.view(-1, 1, 1, 1) * (cond[:, :3] - uncond[:, :3])  # the difference in bf16, as theirs
    torch.testing.assert_close(got[:, :3], want, rtol=0, atol=0)
    assert torch.equal(got[:, 3:], cond[:, 3:].float())
    assert cfg_combine(cond, uncond, 1.5).dtype == torch.bfloat16  # DiT's float scale: as theirs


def _live_states(run):
    """The most earlier states the drift was called on that were still alive at one of its calls."""
    seen, most = [], 0

    def model(x, t):
        nonlocal most
        most = max(most, sum(r() is not None for r in seen))
        seen.append(weakref.ref(x))
        return -x
    result = run(model)
    return most, result


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_sampler_holds_only_the_last_state(method):
    x = torch.randn(2, 3)
    alive, last = _live_states(lambda m: sample_ode(Transport("Linear"), m, x, method=method, num_steps=20))
    assert alive <= 2, alive  # the state in hand and its predecessor at most (was every one)
    traj = sample_ode(Transport("Linear"), lambda x, t: -x, x, method=method, num_steps=20, return_trajectory=True)
    torch.testing.assert_close(last, traj[-1], rtol=0, atol=0)


def test_native_dopri5_holds_only_the_last_state_when_asked():
    x = torch.randn(2, 3, dtype=torch.float64)
    states = integrate_ode(lambda t, y: -y, x, [0.0, 0.25, 0.5, 0.75, 1.0], backend="native", keep_all=False)
    every = integrate_ode(lambda t, y: -y, x, [0.0, 0.25, 0.5, 0.75, 1.0], backend="native")
    assert len(states) == 1 and len(every) == 5
    torch.testing.assert_close(states[0], every[-1], rtol=0, atol=0)


def test_sde_sampler_holds_only_the_last_state():
    x = torch.randn(2, 3)
    noise = [torch.randn(2, 3) for _ in range(29)]
    alive, last = _live_states(lambda m: sample_sde(Transport("Linear"), m, x, num_steps=30, noise=noise))
    assert alive <= 2, alive  # the state in hand and its predecessor at most (was every one)
    traj = sample_sde(Transport("Linear"), lambda x, t: -x, x, num_steps=30, noise=noise, return_trajectory=True)
    torch.testing.assert_close(last, traj[-1], rtol=0, atol=0)
