"""ADM diffusion over the option matrix, against an independent float64 implementation written here from
the official formulas (openai/guided-diffusion, DiT, MDT): schedules x mean types x variance types x loss
types x respacings x step counts, DDPM (clip on/off), DDIM (eta 0 and > 0) and MDT's Min-SNR weighting.

The reference computes every schedule table in numpy float64 and rounds it to float32 before use (the
official ``_extract_into_tensor`` calls ``.float()``); with ``coefficient_dtype=float64`` we compare
against the unrounded tables.
"""
import math

import numpy as np
import pytest
import torch

from masked_dit.diffusion import create_diffusion
from masked_dit.diffusion.respace import SpacedDiffusion

F64 = torch.float64


#################################################################################
#                     Reference (official formulas, float64)                    #
#################################################################################

def ref_betas(schedule, T):
    if schedule == "linear":
        scale = 1000 / T
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float64)


def ref_space(T, counts):
    """ADM's space_timesteps, sorted (the independent reference test_unseen_configs writes out)."""
    from tests.reliability.test_unseen_configs import _adm_space_reference

    spec = counts if isinstance(counts, str) else ",".join(str(c) for c in counts)
    return sorted(_adm_space_reference(T, spec))


class Ref:
    """GaussianDiffusion (respaced to `keep`) from the official formulas; tables as float64 numpy arrays."""

    def __init__(self, betas, keep, mean, var, loss, round32=True):
        ac_full = np.cumprod(1.0 - betas)
        new, last = [], 1.0
        for i in keep:
            new.append(1 - ac_full[i] / last)
            last = ac_full[i]
        b = np.array(new)
        self.T, self.keep, self.mean, self.var, self.loss = len(b), np.array(keep), mean, var, loss
        self.round32 = round32
        ac = np.cumprod(1.0 - b)
        acp = np.append(1.0, ac[:-1])
        pv = b * (1 - acp) / (1 - ac)
        tabs = {
            "ac": ac, "acp": acp, "sqrt_ac": np.sqrt(ac), "sqrt_1mac": np.sqrt(1 - ac),
            "sqrt_recip": np.sqrt(1 / ac), "sqrt_recipm1": np.sqrt(1 / ac - 1),
            "pv": pv, "plv": np.log(np.append(pv[1], pv[1:])), "log_b": np.log(b),
            "large": np.append(pv[1], b[1:]), "large_log": np.log(np.append(pv[1], b[1:])),
            "c1": b * np.sqrt(acp) / (1 - ac), "c2": (1 - acp) * np.sqrt(1 - b) / (1 - ac),
        }
        if round32:
            tabs = {k: v.astype(np.float32).astype(np.float64) for k, v in tabs.items()}
        self.tabs = {k: torch.from_numpy(v) for k, v in tabs.items()}

    def e(self, name, t):
        return self.tabs[name][t].view(-1, 1, 1, 1)

    def ddim_coef(self, t, eta):
        """DDIM's (sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2), sigma). The official code computes them
        from its float32 tensors in float32 arithmetic (float64 x only enters the products); where that
        rounds 1 - abar_prev - sigma^2 below 0 (eta 1, cosine, T 1000 in 9 steps) it is NaN, clamped to 0
        here (our deliberate deviation)."""
        ab, abp = self.e("ac", t), self.e("acp", t)
        if self.round32:
            ab, abp = ab.float(), abp.float()
        sig = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
        return abp.sqrt().double(), torch.sqrt((1 - abp - sig ** 2).clamp(min=0)).double(), sig.double()

    def posterior(self, x0, xt, t):
        return self.e("c1", t) * x0 + self.e("c2", t) * xt, self.e("plv", t)

    def p_mean_var(self, out, x, t, clip):
        C = x.shape[1]
        if self.var in ("learned", "learned_range"):
            out, v = out[:, :C], out[:, C:]
            if self.var == "learned":
                logv = v
            else:
                frac = (v + 1) / 2
                logv = frac * self.e("log_b", t) + (1 - frac) * self.e("plv", t)
        else:
            logv = self.e("large_log" if self.var == "fixed_large" else "plv", t).expand_as(x)
        if self.mean == "x0":
            x0 = out
        elif self.mean == "eps":
            x0 = self.e("sqrt_recip", t) * x - self.e("sqrt_recipm1", t) * out
        else:  # v
            x0 = self.e("sqrt_ac", t) * x - self.e("sqrt_1mac", t) * out
        if clip:
            x0 = x0.clamp(-1, 1)
        return self.posterior(x0, x, t)[0], logv, x0, out

    def vb(self, out, x0, xt, t):
        tm, tlv = self.posterior(x0, xt, t)
        m, lv, _, _ = self.p_mean_var(out, xt, t, False)
        kl = 0.5 * (-1 + lv - tlv + torch.exp(tlv - lv) + (tm - m) ** 2 * torch.exp(-lv))
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2)
        cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
        inv = torch.exp(-0.5 * lv)
        cp, cm = cdf(inv * (x0 - m + 1 / 255)), cdf(inv * (x0 - m - 1 / 255))
        ll = torch.where(x0 < -0.999, cp.clamp(min=1e-12).log(),
                         torch.where(x0 > 0.999, (1 - cm).clamp(min=1e-12).log(), (cp - cm).clamp(min=1e-12).log()))
        nll = -ll.mean(dim=(1, 2, 3)) / math.log(2)
        return torch.where(t == 0, nll, kl)

    def losses(self, model, x0, t, noise, min_snr=None):
        xt = self.e("sqrt_ac", t) * x0 + self.e("sqrt_1mac", t) * noise
        tm = torch.from_numpy(self.keep)[t]
        if self.loss in ("kl", "rescaled_kl"):
            loss = self.vb(model(xt, tm), x0, xt, t)
            return {"loss": loss * (self.T if self.loss == "rescaled_kl" else 1)}
        out = model(xt, tm)
        C = x0.shape[1]
        terms = {}
        if self.var in ("learned", "learned_range"):
            terms["vb"] = self.vb(out, x0, xt, t) * (self.T / 1000 if self.loss == "rescaled_mse" else 1)
            out = out[:, :C]
        alpha, sigma = self.tabs["sqrt_ac"][t], self.tabs["sqrt_1mac"][t]
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        # MDT's form of the velocity target, (alpha x_t - x_0) / sigma, equals alpha eps - sigma x_0 only
        # when alpha^2 + sigma^2 = 1, i.e. with unrounded tables.
        v = a * noise - s * x0 if self.round32 else (a * xt - x0) / s
        target = {"eps": noise, "x0": x0, "v": v}[self.mean]
        mse = ((target - out) ** 2).mean(dim=(1, 2, 3))
        if min_snr is not None:  # MDT: min(snr, k) / snr on the MSE term only
            snr = (alpha / sigma) ** 2
            mse = torch.minimum(snr, torch.full_like(snr, min_snr)) / snr * mse
        terms["mse"] = mse
        terms["loss"] = mse + terms.get("vb", 0)
        return terms


#################################################################################
#                                  Toy models                                   #
#################################################################################

def toy_model(var, seen=None):
    """Smooth in x and the original timestep; variance channels in [-1, 1] (learned_range) or a log variance."""
    def f(x, t, **kwargs):
        if seen is not None:
            seen.append(t.clone())
        tt = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        out = 1.3 * torch.tanh(0.7 * x + 0.3 * torch.roll(x, 1, dims=1) + tt - 0.2)
        if var == "learned_range":
            return torch.cat([out, torch.tanh(0.5 * x - tt + 0.2)], dim=1)
        if var == "learned":
            return torch.cat([out, -4.0 + 2 * torch.tanh(0.5 * x + tt)], dim=1)
        return out
    return f


def data(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(B, 2, 4, 4, generator=g, dtype=F64) * 2.4 - 1.2).clamp(-1, 1)  # some exactly +-1
    return x0, torch.randn(B, 2, 4, 4, generator=g, dtype=F64), g


def ours(schedule, T, respacing, mean, var, loss, dtype):
    betas = torch.from_numpy(ref_betas(schedule, T))
    from masked_dit.diffusion import space_timesteps
    keep = space_timesteps(T, respacing)
    return SpacedDiffusion(keep, betas, model_mean_type=mean, model_var_type=var, loss_type=loss,
                           coefficient_dtype=dtype)


RESPACINGS = ["", "ddim7", "9", "3,0,4", [2, 5, 1]]
MEANS = ["eps", "x0", "v"]
VARS = ["learned_range", "fixed_small", "fixed_large", "learned"]
LOSSES = ["mse", "rescaled_mse", "kl", "rescaled_kl"]


def setup(schedule, T, respacing, mean, var, loss, round32):
    keep = ref_space(T, respacing if respacing != "" else [T])
    d = ours(schedule, T, respacing if respacing != "" else [T], mean, var, loss,
             torch.float32 if round32 else F64)
    assert d.timestep_map.tolist() == keep
    return d, Ref(ref_betas(schedule, T), keep, mean, var, loss, round32)


def close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


#################################################################################
#                                    Tests                                      #
#################################################################################

@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [1000, 40])
@pytest.mark.parametrize("respacing", RESPACINGS)
@pytest.mark.parametrize("mean", MEANS)
@pytest.mark.parametrize("var", VARS)
def test_training_losses_matrix(schedule, T, respacing, mean, var):
    x0, noise, g = data()
    for loss in LOSSES:
        for round32 in (True, False):
            d, ref = setup(schedule, T, respacing, mean, var, loss, round32)
            t = torch.tensor([0, d.num_timesteps - 1, d.num_timesteps // 2, 1 % d.num_timesteps])
            seen = []
            got = d.training_losses(toy_model(var, seen), x0, t, noise=noise)
            want = ref.losses(toy_model(var), x0, t, noise)
            assert all(torch.equal(s, torch.from_numpy(ref.keep)[t]) for s in seen)
            assert set(got) == set(want), (loss, set(got))
            for k in want:
                assert torch.isfinite(got[k]).all(), (loss, k)
                close(got[k], want[k], 1e-6 if round32 else 1e-9)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [1000, 40])
@pytest.mark.parametrize("respacing", ["", "ddim7", "3,0,4"])
@pytest.mark.parametrize("var", VARS)
def test_min_snr_weights_mse_only(schedule, T, respacing, var):
    x0, noise, _ = data(seed=1)
    d, ref = setup(schedule, T, respacing, "eps", var, "mse", True)
    t = torch.tensor([0, d.num_timesteps - 1, d.num_timesteps // 2, 1 % d.num_timesteps])
    got = d.training_losses(toy_model(var), x0, t, noise=noise, weighting="min_snr")
    want = ref.losses(toy_model(var), x0, t, noise, min_snr=5.0)
    for k in want:
        close(got[k], want[k], 2e-6)
    # x0 prediction: MDT weights by min(snr, k) alone.
    d, ref = setup(schedule, T, respacing, "x0", var, "mse", True)
    got = d.training_losses(toy_model(var), x0, t, noise=noise, weighting="min_snr_3")
    want = ref.losses(toy_model(var), x0, t, noise)
    snr = (ref.tabs["sqrt_ac"][t] / ref.tabs["sqrt_1mac"][t]) ** 2
    close(got["mse"], want["mse"] * snr.clamp(max=3.0), 2e-6)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
# (the unrespaced loop runs with T = 40 only: 1000 steps are slow)
@pytest.mark.parametrize("T, respacing", [(T, r) for T in (1000, 40) for r in RESPACINGS if (T, r) != (1000, "")])
@pytest.mark.parametrize("mean", MEANS)
@pytest.mark.parametrize("var", VARS)
def test_ddpm_and_ddim_loops_matrix(schedule, T, respacing, mean, var):
    d, ref = setup(schedule, T, respacing, mean, var, "mse", True)
    g = torch.Generator().manual_seed(2)
    xT = torch.randn(2, 2, 4, 4, generator=g, dtype=F64)
    steps = [torch.randn(2, 2, 4, 4, generator=g, dtype=F64) for _ in range(d.num_timesteps)]
    model = toy_model(var)
    for clip in (True, False):
        # DDPM: mean + exp(0.5 log var) noise, no noise at t = 0.
        got = d.p_sample_loop(model, xT.shape, noise=xT, step_noise=steps, clip_denoised=clip)
        x = xT
        for n, i in enumerate(range(d.num_timesteps - 1, -1, -1)):
            t = torch.full((2,), i)
            m, lv, _, _ = ref.p_mean_var(model(x, torch.from_numpy(ref.keep)[t]), x, t, clip)
            x = m + (i != 0) * torch.exp(0.5 * lv) * steps[n]
        assert torch.isfinite(got).all()
        close(got, x, 1e-9)
        # DDIM, eta 0 and > 0 (eta 1 is DDPM with the posterior variance).
        for eta in (0.0, 0.5, 1.0):
            got = d.ddim_sample_loop(model, xT.shape, noise=xT, step_noise=steps, clip_denoised=clip, eta=eta)
            x = xT
            for n, i in enumerate(range(d.num_timesteps - 1, -1, -1)):
                t = torch.full((2,), i)
                _, _, x0, _ = ref.p_mean_var(model(x, torch.from_numpy(ref.keep)[t]), x, t, clip)
                eps = (ref.e("sqrt_recip", t) * x - x0) / ref.e("sqrt_recipm1", t)
                c_x0, c_eps, sig = ref.ddim_coef(t, eta)
                x = x0 * c_x0 + c_eps * eps + (i != 0) * sig * steps[n]
            assert torch.isfinite(got).all(), eta
            close(got, x, 1e-9)


def test_linear_schedule_with_twenty_steps_is_refused_not_nan():
    # 1000 / 20 * 0.02 = 1: beta_end = 1 makes alpha_bar 0 at the last step, so eps -> x_0 is 0 * inf (NaN).
    with pytest.raises(ValueError, match="diffusion_steps=20 gives beta_end=1 = 1; use diffusion_steps >= 21"):
        create_diffusion("", diffusion_steps=20)
    x0, noise, _ = data()
    d = create_diffusion("", diffusion_steps=21)
    t = torch.tensor([0, 20, 10, 20])
    assert all(torch.isfinite(v).all() for v in d.training_losses(toy_model("learned_range"), x0, t, noise=noise).values())
    assert torch.isfinite(d.p_sample_loop(toy_model("learned_range"), x0.shape, noise=noise)).all()


#################################################################################
#                 Guided sampling through the objectives (DiT, MDTv2)           #
#################################################################################

class GuidedToy(torch.nn.Module):
    """learn_sigma model with 4 data channels whose every output channel depends on the label."""
    learn_sigma, in_channels, num_classes, num_patches, family = True, 4, 10, 4, "mdtv2"

    def forward(self, x, t, y, **kwargs):
        tt = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        shift = (y.to(x.dtype) - 4.5).view(-1, 1, 1, 1) * 0.1
        return torch.cat([torch.tanh(0.6 * x + shift + tt), torch.tanh(0.5 * x - shift - tt)], dim=1)


def official_mdt_guided(model, cfg, pow_, T):
    """MDT's forward_with_cfg on [x; x] with labels [y; null], first half kept: channels 0-2 guided with
    (cfg - 1) (1 - cos((1 - t/T)^pow pi)) / 2 + 1 at the original timestep t the wrapped model receives."""
    def fn(x, t, y):
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]))
        cond, uncond = out.chunk(2)
        s = (1 - torch.cos(((1 - t / T) ** pow_) * math.pi)) / 2
        scale = ((cfg - 1) * s + 1).view(-1, 1, 1, 1)
        return torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
    return fn


@pytest.mark.parametrize("T, sampler, steps", [(1000, "ddpm", 7), (400, "ddpm", 9), (400, "ddim", 8), (50, "ddpm", 50)])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_mdtv2_power_cosine_guided_sampling(T, sampler, steps, schedule):
    from masked_dit.diffusion.objectives import MDTv2Objective
    model = GuidedToy().double()
    obj = MDTv2Objective(diffusion_steps=T, noise_schedule=schedule)
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    y = torch.tensor([0, 5, 9])
    got = obj.sample(model, noise, y, sampler=sampler, steps=steps, cfg_scale=3.8, scale_pow=4.0,
                     generator=torch.Generator().manual_seed(4))
    d = create_diffusion(str(steps), schedule, diffusion_steps=T)  # MDT's image_sample.py, with or without --use_ddim
    loop = d.ddim_sample_loop if sampler == "ddim" else d.p_sample_loop
    want = loop(official_mdt_guided(model, 3.8, 4.0, T), noise.shape, noise=noise, clip_denoised=False,
                model_kwargs={"y": y}, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T, schedule", [(1000, "squaredcos_cap_v2"), (400, "linear"), (64, "squaredcos_cap_v2")])
def test_mdtv2_objective_min_snr_other_step_counts(T, schedule):
    from masked_dit.diffusion.objectives import MDTv2Objective
    model = GuidedToy().double()
    x0, noise, g = data()
    x0, noise = torch.cat([x0, -x0], 1), torch.cat([noise, noise.flip(1)], 1)   # 4 channels
    t = torch.tensor([0, T - 1, T // 3, 1])
    y = torch.tensor([1, 2, 3, 4])
    out = MDTv2Objective(diffusion_steps=T, noise_schedule=schedule)(
        model, {"x": x0, "y": y}, t=t, noise=noise, ids_keep=torch.tensor([[0, 1]] * 4))
    ref = Ref(ref_betas(schedule, T), list(range(T)), "eps", "learned_range", "mse")
    want = ref.losses(lambda x, tt: model(x, tt, y), x0, t, noise, min_snr=5.0)
    # the toy ignores the mask: both passes give MDT's per-sample loss
    torch.testing.assert_close(out["loss_full"], want["loss"].mean(), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(out["vb"], 2 * want["vb"].mean(), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(out["mse"], 2 * want["mse"].mean(), rtol=2e-6, atol=1e-9)
