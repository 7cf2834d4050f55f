"""ADM Gaussian diffusion: official fixtures (DiT create_diffusion) and unit identities."""
import math

import pytest
import torch
from safetensors.torch import load_file

from masked_dit.diffusion import GaussianDiffusion, create_diffusion, get_named_beta_schedule, space_timesteps
from masked_dit.diffusion.gaussian import cosine_beta_schedule, linear_beta_schedule

F64 = torch.float64


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def analytic_model(x, t, **kwargs):
    """The fixtures' model: eps = 0.3x + 0.1 sin(3x) + 0.001 t, var_values = 0.9 tanh(x) (t original, as float)."""
    eps = 0.3 * x + 0.1 * torch.sin(3 * x) + 0.001 * t.to(x.dtype).view(-1, 1, 1, 1)
    return torch.cat([eps, 0.9 * torch.tanh(x)], dim=1)


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return lambda name: load_file(str(fixtures_dir / "diffusion" / f"{name}.safetensors"))


#################################################################################
#                                   Fixtures                                    #
#################################################################################

def test_training_losses_fixture(fx):
    f = fx("adm_training_losses")
    diffusion = create_diffusion("")
    assert rel_err(diffusion.q_sample(f["x_start"], f["t"], f["noise"]), f["x_t"]) <= 1e-6
    out = diffusion.training_losses(analytic_model, f["x_start"], f["t"], noise=f["noise"])
    for key in ("loss", "mse", "vb"):
        assert out[key].dtype == F64
        assert rel_err(out[key], f[key]) <= 1e-6, key


def test_training_losses_float64_coefficients_close_to_fixture(fx):
    # Full-precision coefficients differ from the official float32-rounded ones only at that rounding level.
    f = fx("adm_training_losses")
    out = create_diffusion("", coefficient_dtype=F64).training_losses(analytic_model, f["x_start"], f["t"], noise=f["noise"])
    for key in ("loss", "mse", "vb"):
        assert rel_err(out[key], f[key]) <= 1e-5, key


def test_ddim10_fixture(fx):
    f = fx("adm_ddim10")
    diffusion = create_diffusion("10")
    assert diffusion.timestep_map.tolist() == list(range(0, 1000, 111))
    sample = diffusion.ddim_sample_loop(analytic_model, f["noise"].shape, noise=f["noise"], clip_denoised=False, eta=0.0)
    assert rel_err(sample, f["sample"]) <= 1e-6


def test_ddpm5_fixture(fx):
    f = fx("adm_ddpm5")
    diffusion = create_diffusion("5")
    assert diffusion.timestep_map.tolist() == [0, 250, 500, 749, 999]
    step_noise = [f[f"step_noise.{i}"] for i in range(5)]
    sample = diffusion.p_sample_loop(analytic_model, f["noise"].shape, noise=f["noise"], step_noise=step_noise,
                                     clip_denoised=False)
    assert rel_err(sample, f["sample"]) <= 1e-6
    # The last step (t == 0) adds no noise: its draw must not matter.
    step_noise[-1] = torch.full_like(step_noise[-1], 1e3)
    sample2 = diffusion.p_sample_loop(analytic_model, f["noise"].shape, noise=f["noise"], step_noise=step_noise,
                                      clip_denoised=False)
    assert torch.equal(sample, sample2)


def test_model_sees_original_timesteps():
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)

    create_diffusion("4").p_sample_loop(model, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert [s.tolist() for s in seen] == [[999, 999], [666, 666], [333, 333], [0, 0]]


#################################################################################
#                                  Respacing                                    #
#################################################################################

@pytest.mark.parametrize("T, counts, expected", [
    (1000, "10", list(range(0, 1000, 111))),
    (1000, "5", [0, 250, 500, 749, 999]),       # 249.75 -> 250, 499.5 -> 500 (ties to even), 749.25 -> 749
    (1000, "ddim10", list(range(0, 1000, 100))),
    (1000, "ddim4", list(range(0, 1000, 250))),
    (10, "2,3", [0, 4, 5, 7, 9]),                # sections [0, 5) and [5, 10)
    (11, "2,2", [0, 5, 6, 10]),                  # 11 % 2 = 1: the first section is one longer
    (10, [1, 1], [0, 5]),
    (6, 6, [0, 1, 2, 3, 4, 5]),
])
def test_space_timesteps_hand_cases(T, counts, expected):
    assert space_timesteps(T, counts) == expected


def test_space_timesteps_errors():
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim600")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "6,1")
    with pytest.raises(ValueError, match="timestep_respacing"):
        space_timesteps(10, "abc")
    for bad in (2.5, [2.5, 1], None):
        with pytest.raises(ValueError, match="timestep_respacing must be"):
            space_timesteps(10, bad)
    assert space_timesteps(10, (2,)) == space_timesteps(10, "2") == space_timesteps(10, 2)


def test_respaced_alphas_cumprod_match_original():
    base = create_diffusion("")
    spaced = create_diffusion("250")
    keep = spaced.timestep_map
    assert spaced.num_timesteps == 250 and keep[0] == 0 and keep[-1] == 999
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12, atol=0)


#################################################################################
#                              Schedules, identities                            #
#################################################################################

def test_beta_schedules():
    lin = get_named_beta_schedule("linear", 1000)
    assert lin.dtype == F64 and lin[0] == 1e-4 and lin[-1] == 0.02
    torch.testing.assert_close(lin, torch.linspace(1e-4, 0.02, 1000, dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(get_named_beta_schedule("linear", 500), linear_beta_schedule(500, 2e-4, 0.04))
    cos = cosine_beta_schedule(1000)
    abar = torch.cumprod(1 - cos, 0)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(abar[499], torch.tensor(f(0.5) / f(0.0), dtype=F64), rtol=1e-10, atol=0)
    assert cos.max() <= 0.999
    with pytest.raises(ValueError, match="noise_schedule"):
        get_named_beta_schedule("quadratic", 10)


def _diffusion(mean_type="eps", var_type="fixed_small"):
    return GaussianDiffusion(get_named_beta_schedule("linear", 1000), mean_type, var_type, coefficient_dtype=F64)


def test_q_sample_and_posterior_identities():
    g = torch.Generator().manual_seed(0)
    d = _diffusion()
    x0 = torch.randn(4, 3, 2, 2, generator=g, dtype=F64)
    eps = torch.randn(4, 3, 2, 2, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 500, 999])
    xt = d.q_sample(x0, t, eps)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    torch.testing.assert_close(d.predict_xstart_from_eps(xt, t, eps), x0)
    torch.testing.assert_close(d.predict_eps_from_xstart(xt, t, x0), eps)
    torch.testing.assert_close(d.predict_xstart_from_v(xt, t, d.velocity(x0, t, eps)), x0)
    # Posterior by Bayes: mean = (sqrt(ab_prev) beta x0 + sqrt(alpha) (1 - ab_prev) x_t) / (1 - ab).
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    b = d.betas[t].view(-1, 1, 1, 1)
    ab_prev = d.alphas_cumprod_prev[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, (ab_prev.sqrt() * b * x0 + (1 - b).sqrt() * (1 - ab_prev) * xt) / (1 - ab))
    torch.testing.assert_close(var, (b * (1 - ab_prev) / (1 - ab)).expand_as(xt))
    torch.testing.assert_close(mean[0], x0[0])                                # t = 0: the posterior is x0
    assert log_var[0, 0, 0, 0] == math.log(d.posterior_variance[1])           # clipped log variance at t = 0


def test_fixed_variances():
    d_small, d_large = _diffusion(var_type="fixed_small"), _diffusion(var_type="fixed_large")
    x = torch.zeros(2, 1, 1, 1, dtype=F64)
    t = torch.tensor([0, 10])
    zero = lambda x, t: torch.zeros_like(x)
    small = d_small.p_mean_variance(zero, x, t)["variance"].flatten()
    large = d_large.p_mean_variance(zero, x, t)["variance"].flatten()
    torch.testing.assert_close(small[1], d_small.posterior_variance[10])
    torch.testing.assert_close(large, torch.stack([d_small.posterior_variance[1], d_small.betas[10]]))


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_ddim_with_oracle_recovers_data(mean_type):
    """Data is a single point x0: the exact prediction makes deterministic DDIM land on x0."""
    d = create_diffusion("ddim20", coefficient_dtype=F64, learn_sigma=False,
                         predict_xstart=mean_type == "x0", predict_v=mean_type == "v")
    x0 = torch.tensor([0.3, -0.7], dtype=F64).view(1, 2, 1, 1).expand(3, 2, 1, 1)
    full = GaussianDiffusion(get_named_beta_schedule("linear", 1000), coefficient_dtype=F64)

    def oracle(x, t):
        ab = full.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[mean_type]

    noise = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    sample = d.ddim_sample_loop(oracle, noise.shape, noise=noise, clip_denoised=False)
    torch.testing.assert_close(sample, x0, rtol=1e-9, atol=1e-9)


def test_clip_denoised_and_denoised_fn():
    d = create_diffusion("5")
    x = torch.full((1, 1, 1, 1), 3.0, dtype=F64)
    t = torch.tensor([4])
    big = lambda x, t: torch.cat([torch.full_like(x, -50.0), torch.zeros_like(x)], 1)
    assert d.p_mean_variance(big, x, t, clip_denoised=True)["pred_xstart"].item() == 1.0
    assert d.p_mean_variance(big, x, t, clip_denoised=False)["pred_xstart"].item() > 1.0
    out = d.p_mean_variance(big, x, t, clip_denoised=True, denoised_fn=lambda z: z * 0 - 0.5)
    assert out["pred_xstart"].item() == -0.5


def test_generator_reproducible_and_injected_equivalent():
    d = create_diffusion("")
    x0 = torch.randn(4, 4, 2, 2, dtype=F64)
    a = d.training_losses(analytic_model, x0, generator=torch.Generator().manual_seed(3))
    b = d.training_losses(analytic_model, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["loss"], b["loss"])
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    c = d.training_losses(analytic_model, x0, t, noise=noise)
    assert torch.equal(a["loss"], c["loss"])

    d5 = create_diffusion("5")
    s1 = d5.p_sample_loop(analytic_model, (2, 4, 2, 2), generator=torch.Generator().manual_seed(7), dtype=F64)
    s2 = d5.p_sample_loop(analytic_model, (2, 4, 2, 2), generator=torch.Generator().manual_seed(7), dtype=F64)
    assert torch.equal(s1, s2) and s1.dtype == F64
    s3 = d5.ddim_sample_loop(analytic_model, (2, 4, 2, 2), generator=torch.Generator().manual_seed(7), eta=1.0)
    assert s3.shape == (2, 4, 2, 2) and torch.isfinite(s3).all()


def test_rescaled_and_kl_losses():
    x0 = torch.randn(3, 4, 2, 2, dtype=F64)
    t = torch.tensor([0, 5, 999])
    noise = torch.randn_like(x0)
    plain = create_diffusion("").training_losses(analytic_model, x0, t, noise=noise)
    rescaled = create_diffusion("", rescale_learned_sigmas=True, diffusion_steps=1000)
    torch.testing.assert_close(rescaled.training_losses(analytic_model, x0, t, noise=noise)["vb"], plain["vb"])
    kl = create_diffusion("", use_kl=True).training_losses(analytic_model, x0, t, noise=noise)
    assert set(kl) == {"loss"}
    torch.testing.assert_close(kl["loss"], plain["vb"] * 1000)


def test_bad_inputs_raise():
    d = create_diffusion("")
    x0 = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="model output has shape"):
        d.training_losses(lambda x, t: x, x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t has shape"):
        d.training_losses(analytic_model, x0, torch.tensor([1]))
    with pytest.raises(ValueError, match="model_mean_type"):
        GaussianDiffusion(get_named_beta_schedule("linear", 100), model_mean_type="score")
    with pytest.raises(ValueError, match="step_noise"):
        create_diffusion("5").p_sample_loop(analytic_model, (2, 4, 2, 2), step_noise=[torch.zeros(2, 4, 2, 2)])
    for bad in ("min_snr_x", "min_snrX", "minsnr"):
        with pytest.raises(ValueError, match="unknown weighting"):
            d.training_losses(analytic_model, x0, torch.tensor([1, 2]), weighting=bad)


def _sampling_calls(d, dev, g, x0):
    """The loops the no-sync test times. Run once first to warm the per-device table caches: the first
    use of each schedule table on a device is a blocking host->device copy (a sync)."""
    d.p_sample_loop(analytic_model, (2, 4, 4, 4), generator=g, device=dev)
    d.ddim_sample_loop(analytic_model, (2, 4, 4, 4), generator=g, device=dev, eta=0.5)
    d.training_losses(analytic_model, x0, generator=g, weighting="min_snr")


def test_one_warm_up_run_caches_every_table():
    """After one warm-up run of the loops, a second run copies no further table to the device (on a
    GPU each new table would be a host->device copy, failing the sync check below): DDIM reads
    alphas_cumprod(_prev), which DDPM sampling and the losses never touch."""
    d = create_diffusion("5")
    dev = torch.device("cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, device=dev)
    _sampling_calls(d, dev, g, x0)
    warm = set(d._tables)
    _sampling_calls(d, dev, g, x0)
    assert set(d._tables) == warm


@pytest.mark.gpu
def test_sampling_does_not_sync_on_gpu():
    d = create_diffusion("5")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, device=dev)
    _sampling_calls(d, dev, g, x0)  # warm the table caches (ddim included: it reads tables DDPM does not)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _sampling_calls(d, dev, g, x0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_space_timesteps_zero_count_skips_a_section():
    """ADM accepts a section count of 0 (no step from that section); sections of 1000 split in 3 are
    334, 333, 333 long. Expected steps written out: 10 over [0, 333], none, 5 over [667, 999]."""
    first = [round(i * 333 / 9) for i in range(10)]
    last = [667 + round(i * 332 / 4) for i in range(5)]
    assert space_timesteps(1000, "10,0,5") == first + last
    d = create_diffusion("10,0,5")
    assert d.timestep_map.tolist() == first + last
    with pytest.raises(ValueError, match="keep no timestep"):
        space_timesteps(1000, "0,0")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(1000, "10,-1")


def test_fixed_variance_is_the_table_not_exp_of_the_clipped_log():
    """ADM's p_mean_variance returns the fixed variance table itself: beta-tilde is 0 at t = 0, where only
    the log variance is clipped (to the t = 1 value); fixed_large's first entry is beta-tilde_1."""
    d_small, d_large = _diffusion(var_type="fixed_small"), _diffusion(var_type="fixed_large")
    x = torch.zeros(3, 1, 1, 1, dtype=F64)
    t = torch.tensor([0, 1, 10])
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    small = d_small.p_mean_variance(zero, x, t)
    assert small["variance"][0].item() == 0.0
    assert small["log_variance"][0].item() == math.log(d_small.posterior_variance[1].item())
    for d, table in ((d_small, d_small.posterior_variance), (d_large, torch.cat([d_small.posterior_variance[1:2],
                                                                                  d_small.betas[1:]]))):
        got = d.p_mean_variance(zero, x, t)["variance"].flatten()
        assert torch.equal(got, table[t])


@pytest.mark.parametrize("respacing, eta", [("7", 1.0), ("9", 1.0), ("ddim10", 0.5), ("7", 0.0)])
def test_ddim_coefficients_are_float32_arithmetic_as_adm(respacing, eta):
    """ADM computes DDIM's sigma, sqrt(abar_prev) and sqrt(1 - abar_prev - sigma^2) from its float32 tables
    in float32 arithmetic, also for float64 x. With eta 1 and alpha_bar near 0 (cosine) the last one
    cancels: float64 arithmetic on the same rounded tables differs by up to 3e-4 (relative, 7 steps),
    and where float32 rounds it below 0 (9 steps) ADM returns NaN; we clamp it to 0."""
    d = create_diffusion(respacing, "squaredcos_cap_v2", learn_sigma=False)
    keep = space_timesteps(1000, respacing)
    ac_full = torch.cumprod(1 - cosine_beta_schedule(1000), 0)
    betas = 1 - ac_full[keep] / torch.cat([torch.ones(1, dtype=F64), ac_full[keep][:-1]])  # ADM's respaced betas
    ac64 = torch.cumprod(1 - betas, 0)
    ac32 = ac64.float()                                 # its alpha_bar table, as _extract_into_tensor returns it
    acp32 = torch.cat([torch.ones(1), ac32[:-1]])
    g = torch.Generator().manual_seed(0)
    xT = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)
    noise = [torch.randn(2, 3, 4, 4, generator=g, dtype=F64) for _ in range(len(keep))]
    model = lambda x, t: torch.tanh(0.7 * x + t.to(x.dtype).view(-1, 1, 1, 1) / 1000)  # noqa: E731
    got = d.ddim_sample_loop(model, xT.shape, noise=xT, step_noise=noise, clip_denoised=True, eta=eta)
    x, x64 = xT, xT
    for n, i in enumerate(range(len(keep) - 1, -1, -1)):
        ab, abp = ac32[i], acp32[i]
        r, rm1 = torch.sqrt(1 / ac64[i]).float().double(), torch.sqrt(1 / ac64[i] - 1).float().double()
        outs = []
        for y, arith in ((x, torch.float32), (x64, F64)):
            eps_model = model(y, torch.full((2,), keep[i]))
            x0 = (r * y - rm1 * eps_model).clamp(-1, 1)
            eps = (r * y - x0) / rm1
            a, b = ab.to(arith), abp.to(arith)
            sig = eta * torch.sqrt((1 - b) / (1 - a)) * torch.sqrt(1 - a / b)
            c_eps = torch.sqrt((1 - b - sig ** 2).clamp(min=0))
            outs.append(x0 * b.sqrt().double() + c_eps.double() * eps + (i != 0) * sig.double() * noise[n])
        x, x64 = outs
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)
    if respacing == "7" and eta == 1.0:  # the float64-arithmetic result is measurably another one
        assert rel_err(x64, x) > 1e-5
