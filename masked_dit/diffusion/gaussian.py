"""ADM Gaussian diffusion (DiT, MDTv2): beta schedules, q(x_t | x_0), posteriors, losses, DDPM and DDIM.

Behaviour follows facebookresearch/DiT's ``diffusion`` package (itself openai/guided-diffusion), which
official DiT and MDTv2 checkpoints were trained with:

* integer timesteps ``t`` in ``0 .. T-1`` (t = 0 is the least noisy step);
* the model is called as ``model_fn(x_t, t_model, **model_kwargs)`` where ``t_model`` is the timestep of the
  *original* 1000-step schedule (respaced diffusions map their indices first, see ``respace.py``);
* a learned-sigma model returns ``2C`` channels: the mean prediction, then ``v`` in [-1, 1] that
  interpolates the log variance between the posterior variance and beta (LEARNED_RANGE);
* the hybrid loss is the MSE on the mean prediction plus the VLB term computed with a *frozen* mean.

All schedule tensors are computed once in float64 on the CPU and cached per (device, dtype); the
per-step work is pure tensor code (no ``.item()``, no branching on tensor values), so GPU sampling
never waits on the host.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Iterator, Sequence

import torch

from masked_dit import rng
from masked_dit.nn.embed import can_check_values

ModelFn = Callable[..., torch.Tensor]


#################################################################################
#                                    Options                                    #
#################################################################################

class ModelMeanType(str, enum.Enum):
    """What the network predicts."""
    EPSILON = "eps"      # the noise
    START_X = "x0"       # the clean sample
    VELOCITY = "v"       # v = sqrt(abar) * eps - sqrt(1 - abar) * x0


class ModelVarType(str, enum.Enum):
    """How the reverse-step variance is chosen."""
    FIXED_SMALL = "fixed_small"      # posterior variance (beta tilde)
    FIXED_LARGE = "fixed_large"      # beta (first entry replaced by the posterior variance)
    LEARNED = "learned"              # the network outputs the log variance
    LEARNED_RANGE = "learned_range"  # the network outputs v in [-1, 1] between the two fixed choices


class LossType(str, enum.Enum):
    MSE = "mse"                    # MSE (+ raw VLB when the variance is learned)
    RESCALED_MSE = "rescaled_mse"  # MSE + VLB * num_timesteps / 1000
    KL = "kl"                      # the variational bound alone
    RESCALED_KL = "rescaled_kl"    # VLB * num_timesteps


def _option(enum_cls, value, what: str):
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; choose one of {[m.value for m in enum_cls]}") from None


#################################################################################
#                                Beta schedules                                 #
#################################################################################

def linear_beta_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Evenly spaced betas, float64; computed as numpy.linspace does (i * step + start, exact end)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if num_timesteps == 1:
        return torch.tensor([beta_start], dtype=torch.float64)
    step = (beta_end - beta_start) / (num_timesteps - 1)
    betas = torch.arange(num_timesteps, dtype=torch.float64) * step + beta_start
    betas[-1] = beta_end
    return betas


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> torch.Tensor:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1], clipped at max_beta."""
    betas = [min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (ADM's "squaredcos_cap_v2")."""
    return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2, max_beta)


def get_named_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """"linear" (1e-4 -> 0.02, scaled by 1000 / T so any T matches the 1000-step schedule) or "cosine"."""
    if name == "linear":
        scale = 1000.0 / num_timesteps
        # beta_end = 1 (diffusion_steps = 20) is rejected too: alpha_bar reaches 0 at the last step, where
        # x_0 from eps divides by sqrt(alpha_bar) and every loss and sample turns NaN. (One step uses
        # beta_start only.)
        if num_timesteps > 1 and scale * 0.02 >= 1.0:
            relation = ">" if scale * 0.02 > 1.0 else "="
            raise ValueError(f"noise_schedule 'linear' scales beta_end 0.02 by 1000 / diffusion_steps: "
                             f"diffusion_steps={num_timesteps} gives beta_end={scale * 0.02:g} {relation} 1; use "
                             f"diffusion_steps >= 21 or noise_schedule='cosine'")
        return linear_beta_schedule(num_timesteps, scale * 0.0001, scale * 0.02)
    if name in ("cosine", "squaredcos_cap_v2"):
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown noise_schedule {name!r}; choose 'linear' or 'cosine'")


#################################################################################
#                          Gaussian helpers (in nats)                           #
#################################################################################

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that ADM's likelihood uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins (edge bins open-ended), elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0, mean_type="eps") -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for the given prediction target.

    eps: min(snr, gamma) / snr (MDTv2's weighting); x0: min(snr, gamma); v: min(snr, gamma) / (snr + 1).
    """
    mean_type = _option(ModelMeanType, mean_type, "model_mean_type")
    clipped = torch.clamp(snr, max=gamma)
    if mean_type is ModelMeanType.EPSILON:
        return clipped / snr
    if mean_type is ModelMeanType.START_X:
        return clipped
    return clipped / (snr + 1.0)


def _randn(shape, like: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
           device=None, dtype=None) -> torch.Tensor:
    """Standard normal draw, from `generator` (on its own device, then moved) or the global RNG."""
    device = like.device if device is None else torch.device(device)
    return rng.randn(shape, device=device, dtype=like.dtype if dtype is None else dtype, generator=generator)


def _step_noise(step_noise, i: int, x: torch.Tensor) -> torch.Tensor | None:
    if step_noise is None:
        return None
    noise = step_noise[i]
    if noise.shape != x.shape:
        raise ValueError(f"step_noise[{i}] has shape {list(noise.shape)}, expected {list(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


#################################################################################
#                              Gaussian diffusion                               #
#################################################################################

class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with ADM's parameterisations, losses and samplers.

    betas: 1-D schedule (float64 is kept). timestep_map: for respaced diffusions, the original timestep
    each of our indices stands for (the model always sees original timesteps); identity by default.
    coefficient_dtype: the schedule coefficients are rounded to this dtype before use. float32 (default)
    is what the official code does (its ``_extract_into_tensor`` calls ``.float()``), so even float64
    inputs reproduce official numbers; pass torch.float64 for full precision with float64 inputs.
    """

    def __init__(self, betas, model_mean_type="eps", model_var_type="learned_range", loss_type="mse",
                 timestep_map: Sequence[int] | None = None, coefficient_dtype: torch.dtype = torch.float32):
        if coefficient_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"coefficient_dtype must be torch.float32 or torch.float64, got {coefficient_dtype}")
        self.coefficient_dtype = coefficient_dtype
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {list(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.model_mean_type = _option(ModelMeanType, model_mean_type, "model_mean_type")
        self.model_var_type = _option(ModelVarType, model_var_type, "model_var_type")
        self.loss_type = _option(LossType, loss_type, "loss_type")
        self.num_timesteps = T = betas.numel()
        timestep_map = torch.arange(T) if timestep_map is None else torch.as_tensor(list(timestep_map), dtype=torch.long)
        if timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have {T} entries, got {timestep_map.numel()}")
        self.timestep_map = timestep_map

        # Schedule tables, float64 on the CPU (ADM's formulas; names kept so readers can cross-check).
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        ac_next = torch.cat([ac[1:], ac.new_zeros(1)])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # log(0) at t = 0 is replaced by the t = 1 value (ADM's "clipped" log variance). A one-step
        # diffusion (e.g. respaced to 1 step) has no t = 1: both fixed choices fall back to beta_0
        # (only the decoder NLL reads it; sampling adds no noise at t = 0).
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]) if T > 1 else betas.clone())
        large_var = torch.cat([post_var[1:2], betas[1:]]) if T > 1 else betas.clone()
        self._schedule = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": ac_next,
            "sqrt_alphas_cumprod": torch.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / ac - 1.0),
            "signal_to_noise": ac / (1.0 - ac),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * torch.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
            "fixed_large_variance": large_var,
            "fixed_large_log_variance": torch.log(large_var),
        }
        for name, table in self._schedule.items():
            setattr(self, name, table)
        self._tables: dict = {}

    # ------------------------------------------------------------------ tables
    def _table(self, name: str, device, dtype) -> torch.Tensor:
        # float64 tables for float64 work, float32 otherwise (as ADM); one host->device copy per device.
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (name, torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._schedule[name].to(self.coefficient_dtype).to(dtype)
            table = self._tables[key] = table.to(device)
        return table

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """schedule[name][t] shaped [B, 1, ..., 1] to broadcast against x."""
        return self._table(name, x.device, x.dtype)[t].view(-1, *([1] * (x.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Our timestep indices -> the original-schedule timesteps the network was trained on."""
        key = ("timestep_map", t.device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self.timestep_map.to(t.device)
        return table[t]

    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, num_timesteps)."""
        return rng.randint(self.num_timesteps, (batch_size,), device=device, generator=generator)

    # ------------------------------------------------------- forward process
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        var = (1.0 - self._extract("alphas_cumprod", t, x_start)).expand_as(x_start)
        log_var = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, var, log_var

    def check_timesteps(self, t, batch: int) -> None:
        """``t``: [batch] integer indices in [0, num_timesteps), one line otherwise. The range is checked on
        CPU tensors only (a host read of a GPU tensor would sync every step): a table lookup with t = -1
        reads the last step's entry silently."""
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"t must be a [{batch}] tensor of timestep indices, got {type(t).__name__}")
        if t.shape != (batch,):
            raise ValueError(f"t has shape {list(t.shape)}, expected [{batch}]")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer timestep indices in [0, {self.num_timesteps}), got {t.dtype}")
        if can_check_values(t) and t.numel() and bool(
                ((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"timesteps t must be in [0, {self.num_timesteps - 1}] (got min {int(t.min())}, "
                             f"max {int(t.max())})")

    def q_sample(self, x_start, t, noise=None, generator: torch.Generator | None = None):
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar) x_0 + sqrt(1 - abar) noise."""
        self.check_timesteps(t, x_start.shape[0])
        if noise is None:
            noise = _randn(x_start.shape, x_start, generator=generator)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {list(noise.shape)}, expected {list(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {list(x_start.shape)} and x_t {list(x_t.shape)} differ in shape")
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        var = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    # ------------------------------------------------ parameterisation helpers
    def predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_xstart_from_v(self, x_t, t, v):
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def velocity(self, x_start, t, noise):
        """v-prediction target sqrt(abar) * eps - sqrt(1 - abar) * x0."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    def snr(self, t: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) at our timesteps t, shape [B]."""
        return self._table("signal_to_noise", t.device, dtype)[t]

    def min_snr_snr(self, t: torch.Tensor) -> torch.Tensor:
        """The snr of MDTv2's Min-SNR weight, [B], as its training_losses computes it: (alpha / sigma)^2 from
        the sqrt(abar) and sqrt(1 - abar) coefficients (float32 by default, as ADM's), in their dtype. The
        rounded ratio (``snr``) is 1-2 float32 ulps off at ~8% of the steps, and so was the weight."""
        alpha = self._table("sqrt_alphas_cumprod", t.device, self.coefficient_dtype)[t]
        sigma = self._table("sqrt_one_minus_alphas_cumprod", t.device, self.coefficient_dtype)[t]
        return (alpha / sigma) ** 2

    def _split_output(self, model_output, x):
        """Model output -> (mean prediction, variance values or None), checking the channel count."""
        if isinstance(model_output, (tuple, list)):
            model_output = model_output[0]
        elif isinstance(model_output, dict):
            model_output = model_output["x"]
        B, C = x.shape[:2]
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        want = (B, 2 * C, *x.shape[2:]) if learned else tuple(x.shape)
        if tuple(model_output.shape) != want:
            kind = "learned" if learned else "fixed"
            raise ValueError(f"model output has shape {list(model_output.shape)}, expected {list(want)} "
                             f"for {kind} variance (model_var_type={self.model_var_type.value!r})")
        # A bf16 output (autocast, FSDP2) is widened to x's dtype first: the learned-range log-variance
        # frac * max_log + (1 - frac) * min_log in bf16 cancels its own gradient at large t (the VB
        # gradient on the variance channels 10-200x off), which the official fp32 training never sees.
        model_output = model_output.to(torch.promote_types(model_output.dtype, x.dtype))
        if learned:
            return model_output[:, :C], model_output[:, C:]
        return model_output, None

    # --------------------------------------------------------- reverse process
    def p_mean_variance(self, model_fn: ModelFn | None, x, t, clip_denoised: bool = True,
                        denoised_fn: Callable | None = None, model_kwargs: dict | None = None,
                        model_output: torch.Tensor | None = None) -> dict:
        """p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart, model_output).

        Pass `model_output` to reuse an output already computed (model_fn is then not called).
        """
        if model_output is None:
            model_output = model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        out, var_values = self._split_output(model_output, x)

        if self.model_var_type is ModelVarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, x)
            max_log = self._extract("log_betas", t, x)
            frac = (var_values + 1) / 2          # [-1, 1] -> [min_var, max_var] in log space
            log_var = frac * max_log + (1 - frac) * min_log
        elif self.model_var_type is ModelVarType.LEARNED:
            log_var = var_values
        elif self.model_var_type is ModelVarType.FIXED_LARGE:
            log_var = self._extract("fixed_large_log_variance", t, x).expand_as(x)
            variance = self._extract("fixed_large_variance", t, x).expand_as(x)
        else:
            log_var = self._extract("posterior_log_variance_clipped", t, x).expand_as(x)
            # (the table itself, as ADM: 0 at t = 0, where only the log variance is clipped)
            variance = self._extract("posterior_variance", t, x).expand_as(x)

        if self.model_mean_type is ModelMeanType.START_X:
            pred_xstart = out
        elif self.model_mean_type is ModelMeanType.VELOCITY:
            pred_xstart = self.predict_xstart_from_v(x, t, out)
        else:
            pred_xstart = self.predict_xstart_from_eps(x, t, out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        if var_values is not None:
            variance = torch.exp(log_var)
        return {"mean": mean, "variance": variance, "log_variance": log_var,
                "pred_xstart": pred_xstart, "model_output": out}

    def p_sample(self, model_fn: ModelFn, x, t, clip_denoised: bool = True, denoised_fn=None,
                 model_kwargs: dict | None = None, noise=None, generator: torch.Generator | None = None) -> dict:
        """One ancestral step x_t -> x_{t-1}: dict(sample, pred_xstart). No noise is added where t == 0."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = _randn(x.shape, x, generator=generator)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn: ModelFn, x, t, clip_denoised: bool = True, denoised_fn=None,
                    model_kwargs: dict | None = None, eta: float = 0.0, noise=None,
                    generator: torch.Generator | None = None) -> dict:
        """One DDIM step (Song et al. eq. 12) with stochasticity eta: dict(sample, pred_xstart)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive eps from (possibly clipped) x0 so x0 and eps predictions are consistent.
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        # ADM does this arithmetic on its float32 tables in float32, also for float64 x; with float64
        # arithmetic on the rounded tables the cancelling 1 - ab_prev - sigma^2 (eta near 1, alpha_bar
        # near 0) would differ from it by up to 3e-4 (relative). Clamped at 0 where float32 rounding
        # would make it negative (ADM: NaN).
        table_dtype = self._table("alphas_cumprod", x.device, x.dtype).dtype
        dtype = torch.float64 if table_dtype == self.coefficient_dtype == torch.float64 else torch.float32
        ab = self._extract("alphas_cumprod", t, x).to(dtype)
        ab_prev = self._extract("alphas_cumprod_prev", t, x).to(dtype)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        c_xstart, c_eps = torch.sqrt(ab_prev), torch.sqrt((1 - ab_prev - sigma ** 2).clamp(min=0))
        sigma, c_xstart, c_eps = sigma.to(table_dtype), c_xstart.to(table_dtype), c_eps.to(table_dtype)
        sample = out["pred_xstart"] * c_xstart + c_eps * eps
        if eta != 0.0 or noise is not None:
            if noise is None:
                noise = _randn(x.shape, x, generator=generator)
            nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ---------------------------------------------------------------- loops
    def _loop(self, step, model_fn, shape, noise, step_noise, generator, device, dtype, progress, **step_kwargs):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {list(noise.shape)}, expected {list(shape)}")
            x = noise.to(device) if device is not None else noise
        else:
            if device is None:
                device = generator.device if generator is not None else torch.device("cpu")
            x = _randn(tuple(shape), generator=generator, device=device, dtype=dtype or torch.float32)
        if step_noise is not None and len(step_noise) < self.num_timesteps:
            raise ValueError(f"step_noise has {len(step_noise)} entries, the loop takes {self.num_timesteps} steps")
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices)
        for n, i in enumerate(indices):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = step(model_fn, x, t, noise=_step_noise(step_noise, n, x), generator=generator, **step_kwargs)
            yield out
            x = out["sample"]

    def p_sample_loop_progressive(self, model_fn: ModelFn, shape, noise=None, step_noise=None,
                                  generator: torch.Generator | None = None, clip_denoised: bool = True,
                                  denoised_fn=None, model_kwargs: dict | None = None, device=None,
                                  dtype=None, progress: bool = False) -> Iterator[dict]:
        """Yield each ancestral step's dict(sample, pred_xstart), noisiest first."""
        yield from self._loop(self.p_sample, model_fn, shape, noise, step_noise, generator, device, dtype, progress,
                              clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)

    def p_sample_loop(self, model_fn: ModelFn, shape, noise=None, step_noise=None,
                      generator: torch.Generator | None = None, clip_denoised: bool = True, denoised_fn=None,
                      model_kwargs: dict | None = None, device=None, dtype=None, progress: bool = False):
        """Ancestral (DDPM) sampling over all num_timesteps steps.

        noise: the starting x_T (else drawn). step_noise[i]: the Gaussian draw of the i-th step (from the
        noisiest); else drawn from `generator` (or the global RNG).
        """
        out = None
        for out in self.p_sample_loop_progressive(model_fn, shape, noise, step_noise, generator, clip_denoised,
                                                  denoised_fn, model_kwargs, device, dtype, progress):
            pass
        return out["sample"]

    def ddim_sample_loop_progressive(self, model_fn: ModelFn, shape, noise=None, step_noise=None,
                                     generator: torch.Generator | None = None, clip_denoised: bool = True,
                                     denoised_fn=None, model_kwargs: dict | None = None, device=None,
                                     dtype=None, progress: bool = False, eta: float = 0.0) -> Iterator[dict]:
        """Yield each DDIM step's dict(sample, pred_xstart), noisiest first."""
        if not (math.isfinite(eta) and eta >= 0):  # a variance weight: negative would flip the noise's sign
            raise ValueError(f"eta must be a finite number >= 0 (0 deterministic, 1 DDPM's variance), got {eta}")
        yield from self._loop(self.ddim_sample, model_fn, shape, noise, step_noise, generator, device, dtype, progress,
                              clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta)

    def ddim_sample_loop(self, model_fn: ModelFn, shape, noise=None, step_noise=None,
                         generator: torch.Generator | None = None, clip_denoised: bool = True, denoised_fn=None,
                         model_kwargs: dict | None = None, device=None, dtype=None, progress: bool = False,
                         eta: float = 0.0):
        """DDIM sampling (deterministic for eta = 0) over all num_timesteps steps; arguments as p_sample_loop."""
        out = None
        for out in self.ddim_sample_loop_progressive(model_fn, shape, noise, step_noise, generator, clip_denoised,
                                                     denoised_fn, model_kwargs, device, dtype, progress, eta):
            pass
        return out["sample"]

    # ---------------------------------------------------------------- losses
    def _vb_terms_bpd(self, model_fn, x_start, x_t, t, clip_denoised=False, model_kwargs=None, model_output=None):
        """VLB term in bits per dim: decoder NLL at t == 0, KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) otherwise."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_fn, x_t, t, clip_denoised, None, model_kwargs, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def _mse_weight(self, weighting, t, x_start):
        if isinstance(weighting, torch.Tensor):
            if weighting.shape != t.shape:
                raise ValueError(f"weighting tensor has shape {list(weighting.shape)}, expected {list(t.shape)}")
            return weighting.to(x_start.dtype)
        if weighting is None or weighting == "constant":
            return None
        if isinstance(weighting, str) and (weighting == "min_snr" or weighting.startswith("min_snr_")):
            try:
                gamma = 5.0 if weighting == "min_snr" else float(weighting[len("min_snr_"):])
            except ValueError:
                gamma = None
            if gamma is not None:
                return min_snr_weight(self.min_snr_snr(t), gamma, self.model_mean_type)
        raise ValueError(f"unknown weighting {weighting!r}; use None, 'min_snr', 'min_snr_<gamma>' or a [B] tensor")

    def training_losses(self, model_fn: ModelFn, x_start, t=None, noise=None, model_kwargs: dict | None = None,
                        weighting=None, generator: torch.Generator | None = None) -> dict:
        """Per-sample losses at timesteps t: dict(loss, mse[, vb]), each of shape [B].

        t: our timestep indices (drawn uniformly when None); noise: the eps of q_sample (drawn when None).
        weighting multiplies the MSE term per sample: None, "min_snr" (gamma 5, MDTv2), "min_snr_<gamma>",
        or a [B] tensor. The model may return a tensor, a tuple (first item used) or a dict with "x". With a learned variance, vb is the VLB with the mean prediction frozen (gradient
        reaches only the variance channels), rescaled by num_timesteps / 1000 for RESCALED_MSE.
        """
        if t is None:
            t = self.sample_timesteps(x_start.shape[0], x_start.device, generator)
        if noise is None:
            noise = _randn(x_start.shape, x_start, generator=generator)
        x_t = self.q_sample(x_start, t, noise)
        model_kwargs = model_kwargs or {}
        terms = {}

        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            terms["loss"] = self._vb_terms_bpd(model_fn, x_start, x_t, t, False, model_kwargs)["output"]
            if self.loss_type is LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model_fn(x_t, self.model_timesteps(t), **model_kwargs)
        out, var_values = self._split_output(model_output, x_t)
        if var_values is not None:
            # The VLB trains only the variance: the mean prediction enters it detached.
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(None, x_start, x_t, t, False, model_output=frozen)["output"]
            if self.loss_type is LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type is ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type is ModelMeanType.VELOCITY:
            target = self.velocity(x_start, t, noise)
        else:
            target = noise
        mse = mean_flat((target - out) ** 2)
        weight = self._mse_weight(weighting, t, x_start)
        terms["mse"] = mse if weight is None else weight * mse
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
