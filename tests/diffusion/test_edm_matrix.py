"""EDM Heun sampler (Karras et al. Algorithm 2, as EDM's generate.py / MaskDiT's sample.py edm_sampler) against an
independent float64 implementation written here: step counts 1 / 2 / odd, churn inside an [S_min, S_max]
window with S_noise, rho, the net's sigma range and round_sigma, and MaskDiT's guidance (all channels, the
null label the zero one-hot vector)."""
import math

import pytest
import torch

from masked_dit.diffusion import heun_sampler

F64 = torch.float64


def toy_net(x, sigma, labels):
    """D(x; sigma): smooth in x and sigma, label-dependent through the one-hot vector (zeros = null)."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    shift = (labels.to(x.dtype) @ torch.linspace(-1, 1, labels.shape[1], dtype=x.dtype)).view(-1, 1, 1, 1)
    return x / (1 + s ** 2) + 0.3 * torch.tanh(x) * s / (1 + s) + 0.2 * shift + 0.05 * torch.roll(x, 1, dims=1)


def ref_heun(net, latents, labels, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, noise,
             round_sigma=lambda s: s):
    """EDM Algorithm 2; a 1-step grid is {sigma_max, 0} (EDM's formula divides 0 by 0 there)."""
    sigmas = [(sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
              ** rho for i in range(num_steps)]
    t = [round_sigma(s) for s in sigmas] + [0.0]
    x = latents.to(F64) * t[0]
    for i in range(num_steps):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = round_sigma(t[i] + gamma * t[i])
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * S_noise * noise[i]
        d = (x_hat - net(x_hat, torch.full((x.shape[0],), t_hat, dtype=F64), labels)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if i < num_steps - 1:
            d2 = (x - net(x, torch.full((x.shape[0],), t[i + 1], dtype=F64), labels)) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    return x


def draws(num_steps, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(7)
    return torch.randn(shape, generator=g, dtype=F64), [torch.randn(shape, generator=g, dtype=F64)
                                                         for _ in range(num_steps)]


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7])
@pytest.mark.parametrize("churn", [
    dict(S_churn=0.0),
    dict(S_churn=5.0, S_noise=1.007),                        # every step, gamma = 5 / N
    dict(S_churn=80.0, S_min=0.05, S_max=10.0, S_noise=1.0),  # gamma capped at sqrt(2) - 1, inside the window only
])
@pytest.mark.parametrize("grid", [dict(), dict(sigma_min=0.01, sigma_max=20.0, rho=3.0)])
def test_heun_matches_algorithm_2(num_steps, churn, grid):
    latents, noise = draws(num_steps)
    labels = torch.eye(5, dtype=F64)[[1, 4]]
    opts = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0)
    opts.update(grid, **churn)
    got = heun_sampler(toy_net, latents, labels, num_steps=num_steps, step_noise=noise, **opts)
    want = ref_heun(toy_net, latents, labels, num_steps, noise=noise, **opts)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_heun_maskdit_guidance_all_channels_zero_null_label(num_steps):
    latents, noise = draws(num_steps)
    labels = torch.eye(5, dtype=F64)[[0, 3]]

    def guided(x, s, y):  # MaskDiT's forward_with_cfg: every output channel, null label = zeros_like(y)
        cond, uncond = toy_net(x, s, y), toy_net(x, s, torch.zeros_like(y))
        return uncond + 1.5 * (cond - uncond)

    opts = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=2.0, S_min=0.0, S_max=float("inf"), S_noise=1.0)
    got = heun_sampler(toy_net, latents, labels, num_steps=num_steps, cfg_scale=1.5, step_noise=noise, **opts)
    want = ref_heun(guided, latents, labels, num_steps, noise=noise, **opts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class RoundingNet:
    """A net with a supported sigma range and a discrete sigma grid (as EDM's iDDPMPrecond): the sampler
    clips its range to [net.sigma_min, net.sigma_max] and rounds every noise level through net.round_sigma."""

    sigma_min, sigma_max = 0.01, 30.0
    grid = torch.logspace(math.log10(0.01), math.log10(30.0), 50, dtype=F64)

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        index = (sigma.reshape(-1, 1).to(F64) - self.grid.reshape(1, -1)).abs().argmin(1)
        return self.grid[index].reshape(sigma.shape).to(sigma.dtype)

    def __call__(self, x, sigma, labels):
        return toy_net(x, sigma, labels)


@pytest.mark.parametrize("churn", [0.0, 10.0])
def test_heun_rounds_sigmas_through_the_net(churn):
    net = RoundingNet()
    latents, noise = draws(6)
    labels = torch.eye(5, dtype=F64)[[2, 2]]
    opts = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=churn, S_min=0.0, S_max=float("inf"), S_noise=1.0)
    got = heun_sampler(net, latents, labels, num_steps=6, step_noise=noise, **opts)
    rnd = lambda s: float(net.round_sigma(torch.tensor(s, dtype=F64)))  # noqa: E731
    want = ref_heun(net, latents, labels, 6, noise=noise, round_sigma=rnd,
                    **{**opts, "sigma_min": 0.01, "sigma_max": 30.0})
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opts", [dict(), dict(P_mean=-0.4, P_std=0.8, sigma_data=1.0, patch_size=4)])
@pytest.mark.parametrize("masked, mae_coef", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_edm_loss_matches_maskdit_formulas(opts, masked, mae_coef):
    from masked_dit.diffusion import edm_loss
    P_mean, P_std = opts.get("P_mean", -1.2), opts.get("P_std", 1.2)
    sd, p = opts.get("sigma_data", 0.5), opts.get("patch_size", 2)
    g = torch.Generator().manual_seed(11)
    N, C, H = 3, 4, 8
    images = torch.randn(N, C, H, H, generator=g, dtype=F64)
    rnd, unit = torch.randn(N, generator=g, dtype=F64), torch.randn(N, C, H, H, generator=g, dtype=F64)
    L = (H // p) ** 2
    mask = (torch.rand(N, L, generator=g) < 0.5).to(F64) if masked else None
    if masked:
        mask[:, 0], mask[:, 1] = 1.0, 0.0   # at least one removed and one kept patch

    def net(x, sigma, labels, **kw):
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + 0.1 * torch.sin(x)

    got = edm_loss(net, images, None, rnd_normal=rnd, noise=unit, mask=mask, mae_loss_coef=mae_coef, **opts)
    # EDMLoss: sigma = exp(P_mean + P_std n), weight (s^2 + sd^2) / (s sd)^2, D on y + sigma n.
    sigma = (rnd * P_std + P_mean).exp().view(-1, 1, 1, 1)
    w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    yn = images + unit * sigma
    D = net(yn, sigma.flatten(), None)
    loss = w * (D - images) ** 2
    if not masked:
        want = loss.mean(dim=(1, 2, 3))
    else:
        per_patch = torch.nn.functional.avg_pool2d(loss.mean(dim=1), p).flatten(1)
        want = (per_patch * (1 - mask)).sum(1) / (1 - mask).sum(1)
        if mae_coef > 0:
            def patchify(z):
                z = z.reshape(N, C, H // p, p, H // p, p)
                return torch.einsum("nchpwq->nhwpqc", z).reshape(N, L, p * p * C)
            tgt = patchify(yn)
            tgt = (tgt - tgt.mean(-1, keepdim=True)) / (tgt.var(-1, keepdim=True) + 1e-6) ** 0.5
            mae = ((patchify(D) - tgt) ** 2).mean(-1)
            want = want + mae_coef * (mae * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(got["loss"], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["sigma"], sigma.flatten(), rtol=1e-15, atol=0)
