"""EDM (MaskDiT): loss variants and the Heun sampler against official fixtures; preconditioning."""
import math

import pytest
import torch
from safetensors.torch import load_file

from masked_dit.diffusion import EDMPrecond, edm_loss, heun_sampler, karras_sigmas
from masked_dit.diffusion.edm import edm_precond_coefficients, patchify

F64 = torch.float64


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return lambda name: load_file(str(fixtures_dir / "diffusion" / f"{name}.safetensors"))


def loss_net(x, sigma, labels, mask=None):
    """The fixture's D(x; sigma) = x / (1 + sigma^2) + 0.1 sin(x); returns the mask like MaskDiT."""
    s = sigma.view(-1, 1, 1, 1)
    return {"x": x / (1 + s ** 2) + 0.1 * torch.sin(x), "mask": mask}


def heun_net(x, sigma, labels):
    """The fixture's D = x/(1+s^2) + 0.2 tanh(x) s/(1+s) + 0.05 (argmax(labels) - 2), float32 like the reference."""
    s = sigma.to(torch.float32).view(-1, 1, 1, 1)
    assert x.dtype == torch.float32
    return x / (1 + s ** 2) + 0.2 * torch.tanh(x) * s / (1 + s) + (0.05 * (labels.argmax(1) - 2)).view(-1, 1, 1, 1)


#################################################################################
#                                   Fixtures                                    #
#################################################################################

@pytest.mark.parametrize("variant, kwargs", [
    ("loss_plain", {}),
    ("loss_masked", {"mask": True}),
    ("loss_masked_mae", {"mask": True, "mae_loss_coef": 0.1}),
])
def test_edm_loss_fixture(fx, variant, kwargs):
    f = fx("edm_maskdit_loss")
    net_kwargs = {"mask": f["mask"]} if kwargs.pop("mask", False) else {}
    out = edm_loss(loss_net, f["images"], rnd_normal=f["rnd_normal"], noise=f["noise_unit"], patch_size=2,
                   net_kwargs=net_kwargs, **kwargs)
    assert out["loss"].shape == (3,)
    assert rel_err(out["loss"], f[variant]) <= 1e-6
    torch.testing.assert_close(out["sigma"], (f["rnd_normal"].flatten() * 1.2 - 1.2).exp())


def test_heun_sampler_fixture(fx):
    f = fx("edm_heun_sampler")
    sample = heun_sampler(heun_net, f["latents"], f["class_labels"], num_steps=12, sigma_min=0.002, sigma_max=80,
                          rho=7, S_churn=0)
    assert sample.dtype == F64
    assert rel_err(sample, f["sample"]) <= 1e-6


#################################################################################
#                                   Unit tests                                  #
#################################################################################

def test_karras_sigmas_endpoints():
    s = karras_sigmas(40, 0.002, 80.0, 7.0)
    assert s.shape == (41,) and s.dtype == F64
    assert math.isclose(s[0].item(), 80.0, rel_tol=1e-12) and math.isclose(s[-2].item(), 0.002, rel_tol=1e-12)
    assert s[-1] == 0 and bool((s[1:] < s[:-1]).all())
    # rho = 1 is linear in sigma.
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, 1.0)[:-1], torch.tensor([5.0, 4, 3, 2, 1], dtype=F64))
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(4, 0.0, 1.0)


def test_heun_one_step_is_euler_to_zero():
    # With one step there is no correction: x_0 = D(x_T; sigma_max).
    latents = torch.randn(2, 1, 2, 2, dtype=F64)
    net = lambda x, s, y: 0.5 * x
    out = heun_sampler(net, latents, None, num_steps=1, sigma_max=3.0)
    torch.testing.assert_close(out, 0.5 * latents * 3.0)


def test_heun_churn_uses_step_noise_and_generator():
    latents = torch.randn(2, 4, 4, 4)
    labels = torch.eye(10)[:2]
    opts = dict(num_steps=6, S_churn=40.0, S_min=0.05, S_max=50.0)
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(2, 4, 4, 4, generator=g, dtype=F64) for _ in range(6)]
    a = heun_sampler(heun_net, latents, labels, step_noise=noise, **opts)
    b = heun_sampler(heun_net, latents, labels, step_noise=noise, **opts)
    c = heun_sampler(heun_net, latents, labels, step_noise=[n * 0 for n in noise], **opts)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    d1 = heun_sampler(heun_net, latents, labels, generator=torch.Generator().manual_seed(5), **opts)
    d2 = heun_sampler(heun_net, latents, labels, generator=torch.Generator().manual_seed(5), **opts)
    assert torch.equal(d1, d2)
    # No churn: the draws are unused and the sampler is deterministic.
    e = heun_sampler(heun_net, latents, labels, num_steps=6, step_noise=noise)
    assert torch.equal(e, heun_sampler(heun_net, latents, labels, num_steps=6))


def test_heun_cfg_all_channels():
    latents = torch.randn(2, 4, 2, 2)
    labels = torch.eye(10)[[3, 7]]
    guided = heun_sampler(heun_net, latents, labels, num_steps=4, cfg_scale=1.5)

    def manual(x, s, y):
        cond, uncond = heun_net(x, s, y), heun_net(x, s, torch.zeros_like(y))
        return uncond + 1.5 * (cond - uncond)

    torch.testing.assert_close(guided, heun_sampler(manual, latents, labels, num_steps=4), rtol=1e-6, atol=1e-6)


def test_precond_coefficients_and_wrapper():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = edm_precond_coefficients(sigma, 0.5)
    torch.testing.assert_close(c_skip, 0.25 / (sigma ** 2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma ** 2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # EDM's design: unit-variance network input for data of std sd, and c_out^2 = sigma^2 c_skip.
    torch.testing.assert_close(c_in ** 2 * (0.25 + sigma ** 2), torch.ones_like(sigma))
    torch.testing.assert_close(c_out ** 2, sigma ** 2 * c_skip)

    seen = {}

    class Inner(torch.nn.Module):
        def forward(self, x, c_noise, labels):
            seen["x"], seen["c_noise"] = x, c_noise
            return {"x": torch.ones_like(x), "mask": "kept"}

    x = torch.randn(3, 4, 2, 2, dtype=F64)
    out = EDMPrecond(Inner())(x, sigma, None)
    view = lambda c: c.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], view(c_in) * x)
    torch.testing.assert_close(seen["c_noise"], c_noise)
    torch.testing.assert_close(out["x"], view(c_skip) * x + view(c_out))
    assert out["mask"] == "kept"
    # A scalar sigma is broadcast to the batch for the network's embedding.
    EDMPrecond(Inner())(x, torch.tensor(2.0), None)
    assert seen["c_noise"].shape == (3,)


def test_patchify_order_and_masked_loss_equals_plain_without_removal():
    x = torch.arange(2 * 1 * 4 * 4, dtype=F64).view(2, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 4) and p[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]   # row-major patches
    images, noise = torch.randn(2, 4, 4, 4, dtype=F64), torch.randn(2, 4, 4, 4, dtype=F64)
    rnd = torch.randn(2, dtype=F64)
    plain = edm_loss(loss_net, images, rnd_normal=rnd, noise=noise)["loss"]
    masked = edm_loss(loss_net, images, rnd_normal=rnd, noise=noise, net_kwargs={"mask": torch.zeros(2, 4)})["loss"]
    torch.testing.assert_close(masked, plain)
    with pytest.raises(ValueError, match="mask has shape"):
        edm_loss(loss_net, images, rnd_normal=rnd, noise=noise, net_kwargs={"mask": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="either sigma or rnd_normal"):
        edm_loss(loss_net, images, rnd_normal=rnd, sigma=rnd.exp())
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(edm_loss(loss_net, images, generator=g1)["loss"], edm_loss(loss_net, images, generator=g2)["loss"])
