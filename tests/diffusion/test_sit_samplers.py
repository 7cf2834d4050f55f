"""SiT ODE / SDE samplers: fixture reproduction (willisma/SiT Sampler with torchdiffeq) and exact properties."""
import math

import pytest
import torch
from safetensors.torch import load_file

from masked_dit.diffusion.ode import integrate_ode, sample_ode
from masked_dit.diffusion.sde import sample_sde
from masked_dit.diffusion.transport import Transport, expand_t_like_x

from .test_transport import rel_err, sit_fixture_model

PAIRS = [("Linear", "velocity"), ("GVP", "score"), ("VP", "noise")]


@pytest.fixture(scope="module")
def samplers_fixture(fixtures_dir):
    return load_file(str(fixtures_dir / "diffusion" / "sit_samplers.safetensors"))


#################################################################################
#                                    Fixtures                                   #
#################################################################################

@pytest.mark.parametrize("path,prediction", PAIRS)
@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_fixed_step_ode_matches_fixture(samplers_fixture, path, prediction, method):
    d = samplers_fixture
    out = sample_ode(Transport(path, prediction), sit_fixture_model, d["noise"], method=method, num_steps=8)
    assert rel_err(out, d[f"{path}.ode_{method}8"]) <= 1e-6


def test_native_dopri5_matches_fixture(samplers_fixture):
    d = samplers_fixture
    out = sample_ode(Transport("Linear"), sit_fixture_model, d["noise"], method="dopri5", num_steps=8,
                     atol=1e-6, rtol=1e-3, backend="native")
    # The native solver repeats torchdiffeq's algorithm step for step; the brief's bar is 1e-4.
    assert rel_err(out, d["Linear.ode_dopri58"]) <= 1e-6


def test_torchdiffeq_dopri5_matches_fixture(samplers_fixture):
    pytest.importorskip("torchdiffeq")  # optional dependency (extra "ode")
    d = samplers_fixture
    out = sample_ode(Transport("Linear"), sit_fixture_model, d["noise"], method="dopri5", num_steps=8,
                     backend="torchdiffeq")
    assert rel_err(out, d["Linear.ode_dopri58"]) <= 1e-6
    # and the native solver follows torchdiffeq on a curved path, both directions
    for reverse in (False, True):
        kw = dict(method="dopri5", num_steps=5, reverse=reverse)
        ref = sample_ode(Transport("GVP", "score"), sit_fixture_model, d["noise"], backend="torchdiffeq", **kw)
        ours = sample_ode(Transport("GVP", "score"), sit_fixture_model, d["noise"], backend="native", **kw)
        assert rel_err(ours, ref) <= 1e-10


def test_sde_euler_maruyama_matches_fixture(samplers_fixture):
    d = samplers_fixture
    noise = [d[f"sde_noise.{i}"] for i in range(7)]
    kw = dict(method="Euler", diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean", last_step_size=0.04,
              num_steps=8)
    out = sample_sde(Transport("Linear", "velocity"), sit_fixture_model, d["noise"], noise=noise, **kw)
    assert rel_err(out, d["Linear.sde_euler8"]) <= 1e-6
    stacked = sample_sde(Transport("Linear", "velocity"), sit_fixture_model, d["noise"], noise=torch.stack(noise),
                         return_trajectory=True, **kw)
    assert stacked.shape == (8, *d["noise"].shape) and torch.equal(stacked[-1], out)


#################################################################################
#                          Exact properties of the samplers                     #
#################################################################################

def _delta_model(c):
    """Exact Linear-path velocity when the data is the single point c: v = (c - x) / (1 - t)."""
    return lambda x, t: (c - x) / (1 - expand_t_like_x(t, x))


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_fixed_step_ode_is_exact_on_straight_paths(method):
    # For point data the flow moves on straight lines at constant speed, so every step is exact:
    # x(t) = t c + (1 - t) x(0).
    c = torch.full((2, 3), 0.7, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = _delta_model(c)
    times = torch.linspace(0, 0.999, 5, dtype=torch.float64).tolist()  # heun would evaluate 0/0 at t = 1
    out = integrate_ode(lambda t, y: model(y, torch.full((2,), t, dtype=torch.float64)), x, times, method)
    for t, y in zip(times, out):
        assert rel_err(y, t * c + (1 - t) * x) < 1e-12
    if method != "heun":  # euler and midpoint never evaluate t = 1: the sampler lands on c
        assert rel_err(sample_ode(Transport("Linear"), model, x, method=method, num_steps=5), c) < 1e-12


def test_tweedie_last_step_returns_the_posterior_mean():
    c = torch.full((2, 3), -0.4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    out = sample_sde(Transport("Linear"), _delta_model(c), x, num_steps=6, last_step="Tweedie",
                     generator=torch.Generator().manual_seed(0))
    assert rel_err(out, c) < 1e-10


@pytest.mark.parametrize("method,ode_method", [("Euler", "euler"), ("Heun", "heun")])
@pytest.mark.parametrize("path,prediction", PAIRS)
def test_sde_without_diffusion_is_the_ode(method, ode_method, path, prediction):
    """D = 0 (constant form, norm 0): the SDE steps are the ODE steps on the same grid, and the
    "Euler" last step is one more Euler step of size last_step_size."""
    tr = Transport(path, prediction)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_sde(tr, sit_fixture_model, x, method=method, diffusion_form="constant", diffusion_norm=0.0,
                     last_step="Euler", last_step_size=0.05, num_steps=6, generator=torch.Generator().manual_seed(1))
    t0, t1 = tr.interval(sde=True, eval=True, diffusion_form="constant", last_step_size=0.05)

    def drift(t, y):
        tb = torch.full((y.shape[0],), t, dtype=y.dtype)
        return tr.velocity(sit_fixture_model(y, tb), y, tb)

    y = integrate_ode(drift, x, torch.linspace(t0, t1, 6, dtype=torch.float64).tolist(), ode_method)[-1]
    expected = y + 0.05 * drift(t1, y)
    assert rel_err(out, expected) < 1e-12


@pytest.mark.parametrize("last_step", ["Mean", "Tweedie", "Euler", None])
@pytest.mark.parametrize("form", ["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"])
def test_sde_options_run_and_reproduce(form, last_step):
    tr = Transport("GVP", "score")
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = sample_sde(tr, sit_fixture_model, x, method="Heun", diffusion_form=form, last_step=last_step, num_steps=4,
                   generator=torch.Generator().manual_seed(5))
    b = sample_sde(tr, sit_fixture_model, x, method="Heun", diffusion_form=form, last_step=last_step, num_steps=4,
                   generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_sde_takes_sits_own_spelling_of_increasing_decreasing():
    """SiT's diffusion table keys the form "inccreasing-decreasing" (its only runnable spelling): the SDE
    sampler takes it as "increasing-decreasing", D(t) = norm sin(pi t)^2."""
    tr = Transport("Linear", "velocity")
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a, b = (sample_sde(tr, sit_fixture_model, x, diffusion_form=f, diffusion_norm=0.7, num_steps=4, noise=noise)
            for f in ("inccreasing-decreasing", "increasing-decreasing"))
    assert torch.equal(a, b)
    y, ts = x, torch.linspace(0, 0.96, 4, dtype=torch.float64).tolist()
    for i in range(3):  # Euler-Maruyama by hand, then the mean last step
        tb = torch.full((2,), ts[i], dtype=torch.float64)
        D = 0.7 * math.sin(math.pi * ts[i]) ** 2
        v = sit_fixture_model(y, tb)
        drift = v + D * tr.path.score_from_velocity(v, y, tb)
        y = y + drift * (ts[1] - ts[0]) + math.sqrt(2 * D) * noise[i] * math.sqrt(ts[1] - ts[0])
    tb = torch.full((2,), 0.96, dtype=torch.float64)
    v = sit_fixture_model(y, tb)
    D = 0.7 * math.sin(math.pi * 0.96) ** 2
    y = y + (v + D * tr.path.score_from_velocity(v, y, tb)) * 0.04
    assert rel_err(a, y) < 1e-12


def test_native_dopri5_accuracy_and_reverse():
    """dy/dt = -t y, y(t) = y0 exp(-t^2 / 2): the error at every output time (dense output included)
    stays within a few tolerances; integrating backwards recovers y0."""
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    times = torch.linspace(0, 2, 5, dtype=torch.float64).tolist()
    states = integrate_ode(lambda t, y: -t * y, y0, times, "dopri5", atol=1e-10, rtol=1e-10, backend="native")
    for t, y in zip(times, states):
        assert (y - y0 * math.exp(-t * t / 2)).abs().max() < 1e-8
    back = integrate_ode(lambda t, y: -t * y, states[-1], times[::-1], "dopri5", atol=1e-10, rtol=1e-10,
                         backend="native")
    assert (back[-1] - y0).abs().max() < 1e-8


def test_ode_reverse_round_trip():
    tr = Transport("Linear")
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = sample_ode(tr, sit_fixture_model, x, method="dopri5", atol=1e-9, rtol=1e-9, backend="native")
    noise = sample_ode(tr, sit_fixture_model, data, method="dopri5", atol=1e-9, rtol=1e-9, reverse=True,
                       backend="native")
    assert rel_err(noise, x) < 1e-6


@pytest.mark.parametrize("method", ["rk4", "bosh3", "dopri8"])
def test_other_torchdiffeq_methods_pass_through(method, monkeypatch):
    """SiT's sample.py hands --sampling-method to torchdiffeq, so rk4, bosh3, dopri8 ... work there;
    they were refused here. They run in torchdiffeq (dy/dt = -t y: exact solution y0 exp(-t^2/2));
    without torchdiffeq, or with backend='native', the error names what there is."""
    pytest.importorskip("torchdiffeq")
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    times = torch.linspace(0, 1.5, 16, dtype=torch.float64).tolist()
    states = integrate_ode(lambda t, y: -t * y, y0, times, method, atol=1e-10, rtol=1e-10)
    # (rk4 steps the 16 times, O(dt^4); dopri8 interpolates its output times at lower order)
    assert len(states) == 16 and (states[-1] - y0 * math.exp(-1.5 ** 2 / 2)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="backend='native' has only"):
        integrate_ode(lambda t, y: -t * y, y0, times, method, backend="native")
    import masked_dit.diffusion.ode as ode

    monkeypatch.setattr(ode, "_have_torchdiffeq", lambda: False)
    with pytest.raises(ValueError, match=r"without torchdiffeq \(pip install torchdiffeq\) there are only"):
        integrate_ode(lambda t, y: -t * y, y0, times, method)


def test_trajectory_shapes_and_progress_bar():
    x = torch.randn(2, 3, dtype=torch.float64)
    traj = sample_ode(Transport("Linear"), lambda x, t: -x, x, method="heun", num_steps=5, return_trajectory=True,
                      progress=True)
    assert traj.shape == (5, 2, 3) and torch.equal(traj[0], x)


def test_bad_options_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown ODE method 'rk45'; expected one of .* or a torchdiffeq method"):
        sample_ode(Transport(), lambda x, t: x, x, method="rk45")
    with pytest.raises(ValueError, match="num_steps"):
        sample_ode(Transport(), lambda x, t: x, x, method="euler", num_steps=1)
    with pytest.raises(ValueError, match="SDE method"):
        sample_sde(Transport(), lambda x, t: x, x, method="Milstein")
    with pytest.raises(ValueError, match="last_step"):
        sample_sde(Transport(), lambda x, t: x, x, last_step="mean")
    with pytest.raises(ValueError, match="noise must hold"):
        sample_sde(Transport(), lambda x, t: x, x, num_steps=4, noise=[x, x])
    with pytest.raises(ValueError, match=r"noise\[0\] has shape"):
        sample_sde(Transport(), lambda x, t: x, x, num_steps=3, noise=[x[:1], x[:1]])


@pytest.mark.gpu
def test_fixed_step_samplers_do_not_sync_the_host():
    """Fixed-step samplers keep their time grid on the host: no device->host synchronisation per step."""
    from masked_dit.diffusion.repa import repa_euler_maruyama_sampler, repa_euler_sampler

    from .test_repa import repa_fixture_velocity

    x = torch.randn(2, 4, 8, 8, device="cuda")
    y = torch.tensor([1, 2], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for method in ("euler", "midpoint", "heun"):
            sample_ode(Transport("GVP", "score"), sit_fixture_model, x, method=method, num_steps=4)
        for method in ("Euler", "Heun"):
            sample_sde(Transport("VP", "noise"), sit_fixture_model, x, method=method, num_steps=4, last_step="Tweedie")
        repa_euler_sampler(repa_fixture_velocity, x, y, num_steps=4, heun=True, cfg_scale=1.8, guidance_high=0.7)
        repa_euler_maruyama_sampler(repa_fixture_velocity, x, y, num_steps=4, cfg_scale=1.8, guidance_high=0.7)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("path,prediction", [("VP", "noise"), ("VP", "score"), ("VP", "velocity"),
                                             ("Linear", "score"), ("GVP", "velocity")])
def test_ode_reverse_stays_on_the_forward_interval(path, prediction):
    """reverse=True integrates data -> noise over the forward interval [t0, t1] backwards. VP's interval
    [0, 1 - eps] is not symmetric: its mirror [eps, 1] would evaluate a noise/score model at t = 1,
    where sigma_t = 0 (NaN), and stop short of the noise end."""
    tr = Transport(path, prediction)
    t0, t1 = tr.interval(eval=True)
    seen = []

    def model(x, t):
        seen.append(float(t[0]))
        return sit_fixture_model(x, t)

    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = sample_ode(tr, model, x, method="dopri5", atol=1e-10, rtol=1e-10, backend="native")
    seen.clear()
    noise = sample_ode(tr, model, data, method="dopri5", atol=1e-10, rtol=1e-10, reverse=True, backend="native")
    assert rel_err(noise, x) < 1e-6  # (dopri5 may step past the ends, as torchdiffeq: no range check)
    # Fixed-step: the reversed grid is the forward grid read backwards (float64, written here).
    seen.clear()
    sample_ode(tr, model, data, method="euler", num_steps=5, reverse=True)
    want = [t1 + i / 4 * (t0 - t1) for i in range(4)]
    assert seen == pytest.approx(want, abs=1e-12)


def test_native_dopri5_rejects_non_finite_trial_steps():
    """dopri5 steps past the last output time (outputs come from the interpolant). A drift that is NaN
    there (VP's sigma_t is NaN for t > 1) must make the step be rejected and shrunk, not grown: the
    solver then lands on y(1) = y0 exp(-1) instead of looping until max_num_steps."""
    calls = []

    def f(t, y):
        calls.append(t)
        return -y if t <= 1.0 else torch.full_like(y, float("nan"))

    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    out = integrate_ode(f, y0, [0.0, 0.5, 1.0], "dopri5", atol=1e-10, rtol=1e-10, backend="native")
    assert (out[-1] - y0 * math.exp(-1.0)).abs().max() < 1e-8
    assert len(calls) < 2000
    # A VP noise model under default tolerances finishes (it overshoots t = 1 near the end).
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tr = Transport("VP", "noise")
    got = sample_ode(tr, sit_fixture_model, x, method="dopri5", num_steps=9, atol=1e-9, rtol=1e-9, backend="native")
    ref = sample_ode(tr, sit_fixture_model, x, method="midpoint", num_steps=4000)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("backend,method", [("native", "dopri5"), ("torchdiffeq", "dopri5"), ("auto", "dopri5"),
                                            ("auto", "bosh3")])
def test_adaptive_solver_that_gives_up_names_its_tolerances(backend, method):
    """Tolerances no step can meet end in a FloatingPointError naming them (the command line prints it as
    one line), not the solver's RuntimeError / AssertionError."""
    from masked_dit.diffusion.ode import SolverGaveUp, integrate_ode

    if backend != "native" or method != "dopri5":
        pytest.importorskip("torchdiffeq")
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(SolverGaveUp, match=r"the ODE cannot be solved to atol=1e-300, rtol=1e-300; loosen them"):
        integrate_ode(lambda t, y: torch.sin(40 * y) + t, x, [0.0, 1.0], method=method, atol=1e-300, rtol=1e-300,
                      backend=backend)


def test_sit_sample_steps_need_two_time_points():
    from masked_dit.diffusion.sample_settings import check_sample_steps

    check_sample_steps("transport", "ode", 2, 1000, "--steps 2")
    with pytest.raises(ValueError, match=r"^--steps 1: SiT's samplers need at least 2 time points"):
        check_sample_steps("transport", "sde", 1, 1000, "--steps 1")


def test_options_nothing_reads_are_refused():
    """Given on purpose, an option the resolved settings never read is a one-line error (it was ignored)."""
    from masked_dit.diffusion.sample_settings import check_options_read

    flag = lambda key: "--" + key.replace("_", "-")  # noqa: E731
    guided = {"cfg_scale": 2.0}
    check_options_read("mdtv2", guided, ["scale_pow"], flag)
    check_options_read("repa", guided, ["guidance_low", "guidance_high"], flag)
    check_options_read("repa", {"cfg_scale": 1.0}, [], flag)
    for kind, options, given, message in [
            ("adm", guided, ["scale_pow"], "--scale-pow sets MDT's power-cosine schedule: it applies to that family"),
            ("mdtv2", {"cfg_scale": 1.0}, ["scale_pow"], "which --cfg-scale 1 \\(no guidance\\) never reads"),
            ("edm_maskdit", {**guided, "discretization": "edm", "S_churn": 0.0}, ["guidance_low"],
             "REPA's guidance interval: it applies to that family only \\(objective edm_maskdit\\)"),
            ("repa", {"cfg_scale": 0.5}, [], "REPA's sampler guides only for a scale > 1"),
            ("repa", {"cfg_scale": 0.0}, [], "REPA's sampler guides only for a scale > 1"),
            ("transport", {"cfg_scale": 1.0, "ode_method": "heun3"}, ["atol"], "--atol is a step-size tolerance"),
            ("edm_maskdit", {"cfg_scale": 1.0, "discretization": "iddpm", "S_churn": 0.0}, ["rho"], "--rho"),
            ("edm_maskdit", {"cfg_scale": 1.0, "discretization": "edm", "S_churn": 0.0}, ["S_max"], "--S-max")]:
        with pytest.raises(ValueError, match=message):
            check_options_read(kind, options, given, flag)
    check_options_read("transport", {"cfg_scale": 1.0, "ode_method": "dopri5"}, ["atol", "rtol"], flag)
    check_options_read("edm_maskdit", {"cfg_scale": 1.0, "discretization": "edm", "S_churn": 1.0},
                       ["rho", "S_min", "S_max", "S_noise"], flag)
