"""REPA: loss and samplers against sihyun-yu/REPA fixtures, and the REPA <-> SiT time conventions."""
import pytest
import torch
from safetensors.torch import load_file

from masked_dit.diffusion.ode import sample_ode
from masked_dit.diffusion.repa import (projection_loss, repa_euler_maruyama_sampler, repa_euler_sampler,
                                       repa_interpolant, repa_to_sit_model, repa_training_losses, sit_to_repa_model)
from masked_dit.diffusion.sde import sample_sde
from masked_dit.diffusion.transport import LinearPath, Transport

from .test_transport import rel_err


def repa_fixture_velocity(x, t, y):
    """The analytic REPA-time velocity of diffusion_fixtures.json (label 1000 is the null label)."""
    t = t.view(-1, 1, 1, 1)
    yb = y.view(-1, 1, 1, 1).to(x.dtype)
    return torch.where(yb < 1000, 0.4 * x - 0.2 * t + 0.05 * (yb - 3), 0.4 * x - 0.2 * t - 0.3)


def repa_fixture_model(proj):
    """(velocity, projector outputs tanh(proj_k * (1 + t))) like REPA's SiT forward."""
    def model(x, t, y):
        zs_tilde = [torch.tanh(p * (1 + t.view(-1, 1, 1))) for p in proj]
        return repa_fixture_velocity(x, t, y), zs_tilde
    return model


@pytest.fixture(scope="module")
def loss_fixture(fixtures_dir):
    return load_file(str(fixtures_dir / "diffusion" / "repa_loss.safetensors"))


@pytest.fixture(scope="module")
def samplers_fixture(fixtures_dir):
    return load_file(str(fixtures_dir / "diffusion" / "repa_samplers.safetensors"))


#################################################################################
#                                    Fixtures                                   #
#################################################################################

def test_loss_matches_fixture(loss_fixture):
    d = loss_fixture
    model = repa_fixture_model([d["proj.0"], d["proj.1"]])
    out = repa_training_losses(model, d["images"], [d["zs.0"], d["zs.1"]], t=d["time_input"], noise=d["noises"],
                               model_kwargs=dict(y=d["y"]), proj_coeff=0.5)
    assert rel_err(out["denoising_loss"], d["denoising_loss"]) <= 1e-6
    assert rel_err(out["proj_loss"], d["proj_loss"]) <= 1e-6
    expected_total = d["denoising_loss"].mean() + 0.5 * d["proj_loss"]
    assert rel_err(out["loss"], expected_total) <= 1e-6


def test_euler_sampler_with_guidance_interval_matches_fixture(samplers_fixture):
    d = samplers_fixture
    out = repa_euler_sampler(lambda x, t, y: (repa_fixture_velocity(x, t, y), None), d["latents"], d["y"],
                             num_steps=10, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7)
    assert rel_err(out, d["euler_cfg_interval"]) <= 1e-6


def test_heun_sampler_with_cfg_matches_fixture(samplers_fixture):
    d = samplers_fixture
    out = repa_euler_sampler(repa_fixture_velocity, d["latents"], d["y"], num_steps=6, heun=True, cfg_scale=1.5)
    assert rel_err(out, d["heun_cfg"]) <= 1e-6


def test_guidance_interval_matters(samplers_fixture):
    d = samplers_fixture
    full = repa_euler_sampler(repa_fixture_velocity, d["latents"], d["y"], num_steps=10, cfg_scale=1.8)
    assert rel_err(full, d["euler_cfg_interval"]) > 1e-3


#################################################################################
#                                Projection loss                                #
#################################################################################

def test_projection_loss_is_mean_negative_cosine():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(3, 5, k, generator=g, dtype=torch.float64) for k in (4, 2)]
    assert abs(projection_loss(zs, zs).item() + 1) < 1e-12
    assert abs(projection_loss(zs, [-z for z in zs]).item() - 1) < 1e-12
    zt = [torch.randn(3, 5, k, generator=g, dtype=torch.float64) for k in (4, 2)]
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(zs, zt)]
    assert abs(projection_loss(zs, zt).item() + sum(cos).item() / 2) < 1e-12


def test_projection_loss_is_finite_in_fp16():
    # |z|^2 overflows fp16 (max 65504) here: REPA's fp16 normalisation turns this into NaN (issue #46).
    z = torch.full((2, 4, 8), 300.0, dtype=torch.float16)
    zt = torch.full((2, 4, 8), -200.0, dtype=torch.float16)
    loss = projection_loss([z], [zt])
    assert loss.dtype == torch.float32 and abs(loss.item() - 1) < 1e-6


def test_projection_loss_bad_shapes_raise():
    z = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="one projector output per encoder"):
        projection_loss([z, z], [z])
    with pytest.raises(ValueError, match="encoder 0"):
        projection_loss([z], [z[:, :, :4]])


def test_loss_bad_inputs_raise():
    x = torch.zeros(2, 4, 2, 2)
    model = lambda x, t: (x, [torch.zeros(2, 3, 5)])  # noqa: E731
    with pytest.raises(ValueError, match="one time per sample"):
        repa_training_losses(model, x, [torch.zeros(2, 3, 5)], t=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(prediction, zs_tilde\)"):
        repa_training_losses(lambda x, t: x, x, [torch.zeros(2, 3, 5)])
    with pytest.raises(ValueError, match="weighting"):
        repa_training_losses(model, x, [torch.zeros(2, 3, 5)], weighting="cosine")


def test_drawn_times_are_reproducible():
    x = torch.randn(16, 4, 2, 2, dtype=torch.float64)
    model = lambda x, t: (0.3 * x, [torch.ones(16, 3, 5, dtype=x.dtype)])  # noqa: E731
    for weighting in ["uniform", "lognormal"]:
        a = repa_training_losses(model, x, [torch.ones(16, 3, 5)], weighting=weighting,
                                 generator=torch.Generator().manual_seed(1))
        b = repa_training_losses(model, x, [torch.ones(16, 3, 5)], weighting=weighting,
                                 generator=torch.Generator().manual_seed(1))
        assert torch.equal(a["loss"], b["loss"]) and 0 < a["t"].min() and a["t"].max() < 1


#################################################################################
#                         REPA <-> SiT time conventions                         #
#################################################################################

def test_repa_path_is_sit_linear_path_in_reversed_time():
    """x_t^REPA = x_{1-t}^SiT and target_REPA = eps - x = -u_{1-t}^SiT, hence v_REPA(x, t) = -v_SiT(x, 1 - t)."""
    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(4, generator=g, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = repa_interpolant(t.view(-1, 1, 1, 1))
    xt_sit, ut_sit = LinearPath().plan(1 - t, eps, x)
    assert rel_err(alpha * x + sigma * eps, xt_sit) < 1e-14
    assert rel_err(d_alpha * x + d_sigma * eps, -ut_sit) < 1e-14
    # the wrappers implement that identity and are inverse to each other
    sit_model = repa_to_sit_model(lambda x, t: repa_fixture_velocity(x, t, torch.zeros(4)))
    assert rel_err(sit_model(x, 1 - t), -repa_fixture_velocity(x, t, torch.zeros(4))) < 1e-14
    assert rel_err(sit_to_repa_model(sit_model)(x, t), repa_fixture_velocity(x, t, torch.zeros(4))) < 1e-14


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_repa_ode_sampler_equals_sit_ode_on_the_converted_model(samplers_fixture, method):
    d = samplers_fixture
    repa = repa_euler_sampler(repa_fixture_velocity, d["latents"], d["y"], num_steps=7, heun=method == "heun")
    sit_model = repa_to_sit_model(repa_fixture_velocity)
    if method == "euler":
        sit = sample_ode(Transport("Linear"), sit_model, d["latents"], method="euler", num_steps=8,
                         model_kwargs=dict(y=d["y"]))
    else:  # REPA's Heun skips the corrector on the last step: SiT heun on 6 steps, then one Euler step
        traj = sample_ode(Transport("Linear"), sit_model, d["latents"], method="heun", num_steps=8,
                          model_kwargs=dict(y=d["y"]), return_trajectory=True)
        s = torch.linspace(0, 1, 8, dtype=torch.float64).tolist()
        x6 = traj[-2]
        sit = x6 + (s[-1] - s[-2]) * sit_model(x6, torch.full((3,), s[-2], dtype=torch.float64), y=d["y"])
    assert rel_err(repa, sit) < 1e-12


def test_repa_euler_maruyama_equals_sit_sde_on_the_converted_model(samplers_fixture):
    """REPA's SDE (diffusion 2t, last step 0.04 -> 0 without noise) is SiT's Euler-Maruyama with the
    "linear" diffusion form D(s) = 1 - s and the "Mean" last step of size 0.04."""
    d = samplers_fixture
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(d["latents"].shape, generator=g, dtype=torch.float64) for _ in range(7)]
    repa = repa_euler_maruyama_sampler(repa_fixture_velocity, d["latents"], d["y"], num_steps=8, noise=noise)
    sit = sample_sde(Transport("Linear"), repa_to_sit_model(repa_fixture_velocity), d["latents"], method="Euler",
                     diffusion_form="linear", last_step="Mean", last_step_size=0.04, num_steps=8, noise=noise,
                     model_kwargs=dict(y=d["y"]))
    assert rel_err(repa, sit) < 1e-12


def test_repa_euler_maruyama_guidance_and_generator(samplers_fixture):
    d = samplers_fixture
    kw = dict(num_steps=6, cfg_scale=1.8, guidance_high=0.7)
    def run(**kw):
        return repa_euler_maruyama_sampler(repa_fixture_velocity, d["latents"], d["y"],
                                           generator=torch.Generator().manual_seed(2), **kw)

    a, b, c = run(**kw), run(**kw), run(num_steps=6)
    assert torch.equal(a, b) and torch.isfinite(a).all() and rel_err(a, c) > 1e-3


@pytest.mark.parametrize("steps", [0, -1, 2.0])
def test_samplers_refuse_a_step_count_below_one(steps):
    """Were silent: 0 or -1 steps returned the input noise as samples (Euler), or an IndexError (SDE)."""
    x, y = torch.randn(1, 4, 2, 2), torch.zeros(1, dtype=torch.long)
    for sampler in (repa_euler_sampler, repa_euler_maruyama_sampler):
        with pytest.raises(ValueError, match=rf"^num_steps must be an integer >= 1 \(got {steps!r}\)$"):
            sampler(lambda x, t, y: x, x, y, num_steps=steps)
