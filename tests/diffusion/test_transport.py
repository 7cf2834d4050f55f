"""SiT interpolants: fixture reproduction (willisma/SiT training_losses / path plan) and path identities."""
import math

import pytest
import torch
from safetensors.torch import load_file

from masked_dit.diffusion.transport import (DIFFUSION_FORMS, GVPPath, LinearPath, Transport, VPPath,
                                            create_transport, expand_t_like_x)

PATHS = [LinearPath(), GVPPath(), VPPath()]


def sit_fixture_model(x, t):
    """The analytic 'model' of diffusion_fixtures.json (SiT entries)."""
    return 0.5 * x - 0.25 * expand_t_like_x(t, x) + 0.1 * torch.cos(2 * x)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def losses_fixture(fixtures_dir):
    return load_file(str(fixtures_dir / "diffusion" / "sit_transport_losses.safetensors"))


#################################################################################
#                                    Fixtures                                   #
#################################################################################

@pytest.mark.parametrize("path", ["Linear", "GVP", "VP"])
def test_plan_matches_fixture(losses_fixture, path):
    d = losses_fixture
    out = Transport(path).training_losses(sit_fixture_model, d["x1_data"], t=d["t"], x0=d["x0_noise"])
    assert rel_err(out["xt"], d[f"{path}.xt"]) <= 1e-6
    assert rel_err(out["ut"], d[f"{path}.ut"]) <= 1e-6


@pytest.mark.parametrize("path", ["Linear", "GVP", "VP"])
@pytest.mark.parametrize("prediction,loss_weight", [("velocity", None), ("noise", None), ("score", None),
                                                    ("score", "velocity"), ("score", "likelihood")])
def test_losses_match_fixture(losses_fixture, path, prediction, loss_weight):
    d = losses_fixture
    transport = create_transport(path, prediction, loss_weight)
    out = transport.training_losses(sit_fixture_model, d["x1_data"], t=d["t"], x0=d["x0_noise"])
    assert out["loss"].shape == (3,)
    assert rel_err(out["loss"], d[f"{path}.{prediction}.{loss_weight}.loss"]) <= 1e-6


#################################################################################
#                                 Path identities                               #
#################################################################################

def _draw(seed=0, shape=(5, 2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    x1 = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x0, x1, t


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_ut_is_time_derivative_of_xt(path):
    x0, x1, t = _draw()
    xt, ut = path.plan(t, x0, x1)
    h = 1e-6
    fd = (path.plan(t + h, x0, x1)[0] - path.plan(t - h, x0, x1)[0]) / (2 * h)
    assert rel_err(ut, fd) < 1e-7


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_endpoints(path):
    x0, x1, _ = _draw()
    zero, one = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    assert (path.plan(one, x0, x1)[0] - x1).abs().max() < 1e-12
    if path.name == "VP":  # VP's t = 0 keeps alpha = exp(-(s_max - s_min) / 4 - s_min / 2) of the data
        alpha0 = math.exp(-(20.0 - 0.1) / 4 - 0.1 / 2)
        expected = alpha0 * x1 + math.sqrt(1 - alpha0 ** 2) * x0
    else:
        expected = x0
    assert (path.plan(zero, x0, x1)[0] - expected).abs().max() < 1e-12


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_conversions_recover_the_conditional_noise_and_score(path):
    """For the conditional velocity u_t the conversions must give the drawn noise x0 and score -x0/sigma."""
    x0, x1, t = _draw(1)
    xt, ut = path.plan(t, x0, x1)
    sigma = path.sigma(expand_t_like_x(t, xt))[0]
    assert rel_err(path.noise_from_velocity(ut, xt, t), x0) < 1e-10
    assert rel_err(path.score_from_velocity(ut, xt, t), -x0 / sigma) < 1e-10
    assert rel_err(path.velocity_from_score(-x0 / sigma, xt, t), ut) < 1e-10
    assert rel_err(path.velocity_from_noise(x0, xt, t), ut) < 1e-10
    assert rel_err(path.noise_from_score(path.score_from_noise(x0, xt, t), xt, t), x0) < 1e-14


@pytest.mark.parametrize("path", [GVPPath(), VPPath()], ids=lambda p: p.name)
def test_closed_forms_match_generic_formulas(path):
    x0, x1, t = _draw(2)
    tx = expand_t_like_x(t, x0)
    alpha, d_alpha = path.alpha(tx)
    assert rel_err(path.d_log_alpha(tx), d_alpha / alpha) < 1e-12
    # VP overrides the drift with beta_t / 2; it must equal the generic alpha/sigma expression.
    for mine, generic in zip(path.drift(x0, t), LinearPath.drift(path, x0, t)):
        assert rel_err(mine, generic) < 1e-10


def test_diffusion_forms():
    path, x = LinearPath(), torch.zeros(2, 3, dtype=torch.float64)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    tx = t[:, None]
    expected = {
        "constant": 2.0 * torch.ones_like(tx),
        "SBDM": 2.0 * (1 - tx) / tx,  # score_coeff = (1-t)^2/t + (1-t) = (1-t)/t for Linear
        "sigma": 2.0 * (1 - tx),
        "linear": 2.0 * (1 - tx),
        "decreasing": 0.25 * (2.0 * torch.cos(math.pi * tx) + 1) ** 2,
        "increasing-decreasing": 2.0 * torch.sin(math.pi * tx) ** 2,
    }
    assert set(expected) == set(DIFFUSION_FORMS)
    for form, value in expected.items():
        assert rel_err(path.diffusion(x, t, form, 2.0), value) < 1e-14, form
    with pytest.raises(ValueError, match="diffusion_form"):
        path.diffusion(x, t, "cosine")


#################################################################################
#                         Transport defaults and errors                         #
#################################################################################

@pytest.mark.parametrize("path,prediction,train_eps,sample_eps", [
    ("Linear", "velocity", 0.0, 0.0), ("GVP", "velocity", 0.0, 0.0), ("Linear", "score", 1e-3, 1e-3),
    ("GVP", "noise", 1e-3, 1e-3), ("VP", "velocity", 1e-5, 1e-3), ("VP", "noise", 1e-5, 1e-3)])
def test_eps_defaults_follow_create_transport(path, prediction, train_eps, sample_eps):
    tr = Transport(path, prediction)
    assert (tr.train_eps, tr.sample_eps) == (train_eps, sample_eps)


def test_intervals():
    assert Transport("Linear").interval() == (0.0, 1.0)
    assert Transport("Linear").interval(sde=True, eval=True, diffusion_form="sigma", last_step_size=0.04) == (0.0, 0.96)
    assert Transport("Linear", "score").interval(eval=True) == (1e-3, 1 - 1e-3)
    assert Transport("VP", "noise").interval(eval=True) == (0.0, 1 - 1e-3)
    assert Transport("VP").interval() == (0.0, 1 - 1e-5)
    assert Transport("GVP", "score").interval(eval=True, reverse=True) == (1 - 1e-3, 1 - (1 - 1e-3))


def test_drawn_time_and_noise_are_reproducible_and_in_range():
    tr = Transport("GVP", "score")
    x1 = torch.randn(64, 2, 2, 2, dtype=torch.float64)
    a = tr.training_losses(sit_fixture_model, x1, generator=torch.Generator().manual_seed(3))
    b = tr.training_losses(sit_fixture_model, x1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])
    assert a["t"].min() >= 1e-3 and a["t"].max() <= 1 - 1e-3


def test_bad_inputs_raise():
    x1 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="path"):
        Transport("Cosine")
    with pytest.raises(ValueError, match="prediction"):
        Transport("Linear", "x0")
    with pytest.raises(ValueError, match="loss_weight"):
        Transport("Linear", "score", "snr")
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \["):
        Transport().training_losses(sit_fixture_model, x1, t=torch.zeros(3))
    with pytest.raises(ValueError, match="noise x0"):
        Transport().training_losses(sit_fixture_model, x1, x0=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="model output shape"):
        Transport().training_losses(lambda x, t: x[:, :1], x1)


def test_low_precision_data_keeps_float32_times():
    x1 = torch.randn(8, 2, 2, 2).bfloat16()
    out = Transport().training_losses(lambda x, t: x, x1, generator=torch.Generator().manual_seed(0))
    assert out["t"].dtype == torch.float32 and torch.isfinite(out["loss"]).all()
