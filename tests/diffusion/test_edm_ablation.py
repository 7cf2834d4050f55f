"""EDM's generalised sampler (Karras et al. 2022, Table 1; EDM's / MaskDiT's ``ablation_sampler``), which
``edm_sampler`` runs for a solver / discretization / schedule / scaling other than Algorithm 2's:

- against the algorithm written out here in float64 tensors, for every combination, with and without churn;
- against the exact answer on Gaussian data (the probability-flow ODE then has a closed form), so each
  sigma(t), s(t) and their derivatives are right, not only transcribed alike;
- the grids' end points and the one-line errors for settings that cannot work.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from masked_dit.diffusion.edm_sampling import (edm_grid, edm_sampler, heun_sampler, iddpm_sigmas, noise_levels,
                                               time_schedule, vp_sigma)

F64 = torch.float64


def toy_net(x, sigma, labels):
    """D(x; sigma): smooth in x and sigma, label-dependent."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    shift = (labels.to(x.dtype) @ torch.linspace(-1, 1, labels.shape[1], dtype=x.dtype)).view(-1, 1, 1, 1)
    return x / (1 + s ** 2) + 0.3 * torch.tanh(x) * s / (1 + s) + 0.2 * shift + 0.05 * torch.roll(x, 1, dims=1)


def ref_iddpm_levels(num_steps, sigma_min, sigma_max, M=1000, C_1=0.001, C_2=0.008):
    """EDM's iddpm discretization step for step as its ablation sampler writes it: alpha_bar of integer
    tensors (so float32), the float64 recursion on 0-dim tensors, and the grid index
    ((len - 1) / (num_steps - 1)) * i rounded in float64."""
    u = torch.zeros(M + 1, dtype=F64)
    abar = lambda j: (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2  # noqa: E731
    for j in torch.arange(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (abar(j - 1) / abar(j)).clip(min=C_1) - 1).sqrt()
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    return u[((len(u) - 1) / max(num_steps - 1, 1) * torch.arange(num_steps, dtype=F64)).round().long()]


def ref_ablation(net, latents, labels, noise, num_steps, solver, discretization, schedule, scaling, sigma_min=None,
                 sigma_max=None, rho=7.0, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, alpha=1.0,
                 epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000):
    """Table 1 of the EDM paper with its general 2nd-order step, in float64 tensors. A step without churn
    keeps t_hat = t_i (the paper's gamma = 0); a one-step grid is {sigma_max}."""
    tt = lambda v: torch.as_tensor(v, dtype=F64)  # noqa: E731
    vp_s = lambda bd, bm: lambda t: (torch.exp(0.5 * bd * tt(t) ** 2 + bm * tt(t)) - 1).sqrt()  # noqa: E731
    if sigma_min is None:
        sigma_min = {"vp": float(vp_s(19.1, 0.1)(epsilon_s)), "ve": 0.02, "iddpm": 0.002, "edm": 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {"vp": float(vp_s(19.1, 0.1)(1.0)), "ve": 100.0, "iddpm": 81.0, "edm": 80.0}[discretization]
    bd = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    bm = np.log(sigma_max ** 2 + 1) - 0.5 * bd
    i = torch.arange(num_steps, dtype=F64) / max(num_steps - 1, 1)
    if discretization == "vp":
        levels = vp_s(bd, bm)(1 + i * (epsilon_s - 1))
    elif discretization == "ve":
        levels = (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** i).sqrt()
    elif discretization == "iddpm":
        levels = ref_iddpm_levels(num_steps, sigma_min, sigma_max, M, C_1, C_2)
    else:
        levels = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if schedule == "vp":
        sig = vp_s(bd, bm)
        dsig = lambda t: 0.5 * (bm + bd * tt(t)) * (sig(t) + 1 / sig(t))  # noqa: E731
        inv = lambda s: ((bm ** 2 + 2 * bd * (tt(s) ** 2 + 1).log()).sqrt() - bm) / bd  # noqa: E731
    elif schedule == "ve":
        sig, dsig, inv = (lambda t: tt(t).sqrt()), (lambda t: 0.5 / tt(t).sqrt()), (lambda s: tt(s) ** 2)
    else:
        sig, dsig, inv = (lambda t: tt(t)), (lambda t: tt(1.0)), (lambda s: tt(s))
    if scaling == "vp":
        sc = lambda t: 1 / (1 + sig(t) ** 2).sqrt()  # noqa: E731
        dsc = lambda t: -sig(t) * dsig(t) * sc(t) ** 3  # noqa: E731
    else:
        sc, dsc = (lambda t: tt(1.0)), (lambda t: tt(0.0))
    t = torch.cat([inv(levels), torch.zeros(1, dtype=F64)])

    def slope(x, tv):
        D = net(x / sc(tv), torch.full((x.shape[0],), float(sig(tv)), dtype=F64), labels)
        return (dsig(tv) / sig(tv) + dsc(tv) / sc(tv)) * x - dsig(tv) * sc(tv) / sig(tv) * D

    x = latents.to(F64) * sig(t[0]) * sc(t[0])
    for n in range(num_steps):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(sig(t[n])) <= S_max else 0.0
        t_hat = inv(sig(t[n]) + gamma * sig(t[n])) if gamma > 0 else t[n]
        x_hat = sc(t_hat) / sc(t[n]) * x + (sig(t_hat) ** 2 - sig(t[n]) ** 2).clip(min=0).sqrt() * sc(t_hat) \
            * S_noise * noise[n]
        h = t[n + 1] - t_hat
        d = slope(x_hat, t_hat)
        if solver == "euler" or n == num_steps - 1:
            x = x_hat + h * d
        else:
            d2 = slope(x_hat + alpha * h * d, t_hat + alpha * h)
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * d2)
    return x


def draws(num_steps, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(3)
    return torch.randn(shape, generator=g, dtype=F64), [torch.randn(shape, generator=g, dtype=F64)
                                                         for _ in range(num_steps)]


COMBOS = list(itertools.product(("heun", "euler"), ("edm", "vp", "ve", "iddpm"), ("linear", "vp", "ve"),
                                ("none", "vp")))


@pytest.mark.parametrize("solver, discretization, schedule, scaling", COMBOS)
@pytest.mark.parametrize("churn", [dict(), dict(S_churn=3.0, S_min=0.05, S_max=20.0, S_noise=1.003)])
def test_matches_edm_table_1(solver, discretization, schedule, scaling, churn):
    num_steps = 5
    latents, noise = draws(num_steps)
    labels = torch.eye(5, dtype=F64)[[1, 4]]
    opts = dict(solver=solver, discretization=discretization, schedule=schedule, scaling=scaling, **churn)
    got = edm_sampler(toy_net, latents, labels, num_steps=num_steps, step_noise=noise, **opts)
    want = ref_ablation(toy_net, latents, labels, noise, num_steps, **opts)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_steps", [1, 2])
@pytest.mark.parametrize("opts", [dict(solver="heun", discretization="vp", schedule="vp", scaling="vp"),
                                  dict(solver="heun", discretization="iddpm", schedule="linear", scaling="none",
                                       sigma_min=0.01, sigma_max=40.0),
                                  dict(solver="heun", discretization="ve", schedule="ve", scaling="none", alpha=0.6),
                                  dict(solver="euler", discretization="edm", schedule="linear", scaling="vp",
                                       sigma_min=0.05, sigma_max=10.0, rho=3.0),
                                  # a vp schedule whose sigma(t) peaks inside [epsilon_s, 1] (beta_d < 0): EDM
                                  # samples on its rising branch, up to sigma_max
                                  dict(solver="heun", discretization="edm", schedule="vp", scaling="vp",
                                       sigma_min=0.2, sigma_max=20.0),
                                  dict(solver="heun", discretization="iddpm", schedule="vp", scaling="none",
                                       sigma_min=5.0, sigma_max=10.0)])
def test_short_grids_and_options(num_steps, opts):
    latents, noise = draws(num_steps)
    labels = torch.eye(5, dtype=F64)[[0, 2]]
    got = edm_sampler(toy_net, latents, labels, num_steps=num_steps, step_noise=noise, **opts)
    want = ref_ablation(toy_net, latents, labels, noise, num_steps, **opts)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_default_is_algorithm_2():
    """EDM's defaults (Heun, Karras grid, sigma(t) = t, s(t) = 1) are Algorithm 2 step for step."""
    latents, noise = draws(6)
    labels = torch.eye(5, dtype=F64)[[3, 1]]
    a = edm_sampler(toy_net, latents, labels, num_steps=6, step_noise=noise, S_churn=2.0)
    b = heun_sampler(toy_net, latents, labels, num_steps=6, step_noise=noise, S_churn=2.0)
    c = ref_ablation(toy_net, latents, labels, noise, 6, "heun", "edm", "linear", "none", S_churn=2.0)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("discretization, schedule, scaling", [
    ("edm", "linear", "none"), ("vp", "vp", "vp"), ("ve", "ve", "none"), ("iddpm", "linear", "none"),
    ("edm", "vp", "vp"), ("edm", "ve", "vp"), ("vp", "linear", "vp")])
def test_gaussian_data_converges_to_the_exact_flow(solver, discretization, schedule, scaling):
    """Data ~ N(0, sd^2): D(x; sigma) = x sd^2 / (sd^2 + sigma^2), and the probability-flow ODE carries
    x(sigma) / sqrt(sd^2 + sigma^2) unchanged, so x(0) = z sigma_max sd / sqrt(sd^2 + sigma_max^2). Heun
    converges at 2nd order (to within the last step's Euler jump from sigma_min, sigma_min^2 / 2 sd^2 <
    3e-4 relative), Euler at 1st."""
    sd = 0.5
    net = lambda x, sigma, labels: x * sd ** 2 / (sd ** 2 + sigma.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    z = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    opts = dict(discretization=discretization, schedule=schedule, scaling=scaling)
    t_steps, sched = edm_grid(8, **opts)
    sigma_max = sched.sigma(t_steps[0])
    exact = z * sigma_max * sd / math.sqrt(sd ** 2 + sigma_max ** 2)
    err = {n: ((edm_sampler(net, z, None, num_steps=n, solver=solver, **opts) - exact).abs().max()
               / exact.abs().max()).item() for n in (128, 512)}
    if solver == "heun":
        assert err[512] < 1e-3 and err[512] < err[128]
    else:
        assert err[512] < err[128] / 3 and err[512] < 0.05


#################################################################################
#                                Grids and errors                               #
#################################################################################

def test_grids_span_their_ranges():
    for disc, lo, hi in (("edm", 0.002, 80.0), ("ve", 0.02, 100.0), ("vp", vp_sigma(19.1, 0.1)(1e-3),
                                                                      vp_sigma(19.1, 0.1)(1.0))):
        levels = noise_levels(10, disc, lo, hi)
        assert math.isclose(levels[0], hi, rel_tol=1e-9) and math.isclose(levels[-1], lo, rel_tol=1e-9)
        assert all(a > b for a, b in zip(levels, levels[1:]))
    u = iddpm_sigmas()
    assert u[-1] == 0 and all(a > b for a, b in zip(u, u[1:]))
    levels = noise_levels(10, "iddpm", 0.002, 81.0)
    inside = [s for s in u if 0.002 <= s <= 81.0]
    assert levels[0] == inside[0] and levels[-1] == inside[-1]
    assert noise_levels(1, "ve", 0.02, 100.0) == [100.0]


@pytest.mark.parametrize("num_steps, sigma_min, sigma_max", [(59, 0.002, 81.0), (29, 0.002, 80.0),
                                                             (21, 0.05, 10.0), (40, 0.002, 81.0), (1, 0.01, 40.0)])
def test_iddpm_levels_are_edms(num_steps, sigma_min, sigma_max):
    """The iddpm grid is EDM's to the bit: its float32 alpha_bar (up to 5e-4 from a float64 one) and its
    index order ((len - 1) / (N - 1)) * i, which picks another level than (len - 1) * (i / (N - 1)) for
    e.g. step 29 of 59 on the default range (495.49999999999994 vs 495.5)."""
    got = torch.tensor(noise_levels(num_steps, "iddpm", sigma_min, sigma_max), dtype=F64)
    assert torch.equal(got, ref_iddpm_levels(num_steps, sigma_min, sigma_max))
    if num_steps == 59:
        inside = [s for s in iddpm_sigmas() if sigma_min <= s <= sigma_max]
        assert got[29] == inside[495] != inside[496]
    u64 = [0.0] * 1001  # the same recursion in float64 throughout: visibly other levels
    abar = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2  # noqa: E731
    for j in range(1000, 0, -1):
        u64[j - 1] = math.sqrt((u64[j] ** 2 + 1) / max(abar(j - 1) / abar(j), 0.001) - 1)
    assert max(abs(a / b - 1) for a, b in zip(iddpm_sigmas()[:-1], u64[:-1])) > 1e-4


def test_settings_that_cannot_work_raise_one_line():
    with pytest.raises(ValueError, match="vp discretization cannot span sigma_min=5.0 .. sigma_max=10.0"):
        edm_grid(8, discretization="vp", schedule="vp", sigma_min=5.0, sigma_max=10.0)
    with pytest.raises(ValueError, match="noise level 1000 is above the vp schedule's peak"):
        time_schedule("vp", sigma_min=0.2, sigma_max=20.0).sigma_inv(1e3)  # the peak: 326; levels stop at 20
    with pytest.raises(ValueError, match="iddpm discretization has no noise level"):
        edm_grid(8, discretization="iddpm", sigma_min=1e6, sigma_max=2e6)
    with pytest.raises(ValueError, match="discretization 'karras' is not valid"):
        edm_grid(8, discretization="karras")
    with pytest.raises(ValueError, match="solver 'rk4' is not valid"):
        edm_sampler(toy_net, torch.zeros(1, 1, 2, 2), torch.eye(2)[:1], solver="rk4")
    with pytest.raises(ValueError, match="scaling 've' is not valid"):
        edm_grid(8, scaling="ve")
