"""SiT stochastic interpolants: paths, prediction conversions and training losses.

Convention (willisma/SiT): **t = 0 is noise, t = 1 is data**,

    x_t = alpha_t * x1 + sigma_t * x0,      x1 = data, x0 ~ N(0, I),
    u_t = d_alpha_t * x1 + d_sigma_t * x0   (the velocity target).

Paths: Linear (alpha = t, sigma = 1 - t), GVP (alpha = sin(pi t / 2), sigma = cos(pi t / 2)) and VP
(sigma_min 0.1, sigma_max 20). The model may predict the velocity, the score or the noise x0; the
probability-flow velocity is always  v = mean_drift(x, t) + score_coeff(t) * score(x, t).

Every model is called as ``model_fn(x, t, **model_kwargs)`` with ``t`` of shape [B].
Samplers live in ``ode.py`` / ``sde.py``; REPA's reversed-time convention in ``repa.py``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from masked_dit import rng
from masked_dit.nn.embed import can_check_values

ModelFn = Callable[..., torch.Tensor]

PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
# SiT's compute_diffusion table spells "increasing-decreasing" "inccreasing-decreasing", the only spelling
# its code runs (so code ported from it passes that one): the same form here.
_SIT_SPELLINGS = {"inccreasing-decreasing": "increasing-decreasing"}


def diffusion_form_name(form: str) -> str:
    """The form of ``DIFFUSION_FORMS`` that ``form`` names (SiT's spelling included); one-line ValueError else."""
    name = _SIT_SPELLINGS.get(form, form)
    if name not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion_form {form!r}; expected one of {DIFFUSION_FORMS}")
    return name


# Where the SBDM SDE of a Linear/GVP velocity model starts: SiT's sample_eps for the models that are
# singular at t = 0 (its own start, sample_eps = 0, makes D(0) = score_coeff(0) infinite).
SBDM_VELOCITY_T0 = 1e-3


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] times -> [B, 1, ..., 1] so they broadcast against x [B, ...]."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.dim())))


#################################################################################
#                                      Paths                                    #
#################################################################################
# All methods take already-broadcastable t ([B, 1, ..., 1]) unless they also take x, in which case
# t is [B] and is expanded here (as SiT does).

class LinearPath:
    """alpha_t = t, sigma_t = 1 - t (SiT's ICPlan)."""

    name = "Linear"

    def alpha(self, t):
        """(alpha_t, d alpha_t / dt), the data coefficient."""
        return t, 1.0

    def sigma(self, t):
        """(sigma_t, d sigma_t / dt), the noise coefficient."""
        return 1 - t, -1.0

    def d_log_alpha(self, t):
        """d alpha_t / alpha_t, in a numerically stable form per path."""
        return 1 / t

    # --- probability-flow drift: v = mean_drift + score_coeff * score ---------------
    def drift(self, x: torch.Tensor, t: torch.Tensor):
        """(mean_drift, score_coeff) with v(x, t) = mean_drift + score_coeff * score(x, t)."""
        t = expand_t_like_x(t, x)
        ratio = self.d_log_alpha(t)
        sigma_t, d_sigma_t = self.sigma(t)
        return ratio * x, ratio * sigma_t ** 2 - sigma_t * d_sigma_t

    def diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str = "sigma", norm: float = 1.0):
        """SDE diffusion coefficient D(t) (the SDE noise is sqrt(2 D) dW, its drift v + D * score);
        ``form`` as ``diffusion_form_name`` reads it."""
        form = diffusion_form_name(form)
        t = expand_t_like_x(t, x)
        if form == "constant":
            return torch.full_like(t, float(norm))
        if form == "SBDM":
            return norm * self.drift(x, t.reshape(-1))[1]
        if form == "sigma":
            return norm * self.sigma(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        return norm * torch.sin(math.pi * t) ** 2  # increasing-decreasing

    # --- interpolation ------------------------------------------------------------
    def plan(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor):
        """(x_t, u_t) for noise x0, data x1 and times t [B]."""
        t = expand_t_like_x(t, x1)
        alpha_t, d_alpha_t = self.alpha(t)
        sigma_t, d_sigma_t = self.sigma(t)
        return alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0

    # --- conversions between predictions (x is x_t, t is [B]) -------------------------
    def score_from_velocity(self, velocity, x, t):
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.alpha(t)
        sigma_t, d_sigma_t = self.sigma(t)
        reverse_ratio = alpha_t / d_alpha_t
        var = sigma_t ** 2 - reverse_ratio * d_sigma_t * sigma_t
        return (reverse_ratio * velocity - x) / var

    def noise_from_velocity(self, velocity, x, t):
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.alpha(t)
        sigma_t, d_sigma_t = self.sigma(t)
        reverse_ratio = alpha_t / d_alpha_t
        return (reverse_ratio * velocity - x) / (reverse_ratio * d_sigma_t - sigma_t)

    def velocity_from_score(self, score, x, t):
        mean_drift, score_coeff = self.drift(x, t)
        return mean_drift + score_coeff * score

    def score_from_noise(self, noise, x, t):
        # x_t = alpha x1 + sigma x0  =>  grad log p_t(x_t | x1) = -x0 / sigma
        return noise / -self.sigma(expand_t_like_x(t, x))[0]

    def noise_from_score(self, score, x, t):
        return -self.sigma(expand_t_like_x(t, x))[0] * score

    def velocity_from_noise(self, noise, x, t):
        return self.velocity_from_score(self.score_from_noise(noise, x, t), x, t)


class GVPPath(LinearPath):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (SiT's GVPCPlan)."""

    name = "GVP"

    def alpha(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def d_log_alpha(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(LinearPath):
    """Variance-preserving path of score SDEs with a linear beta schedule (SiT's VPCPlan).

    log alpha_t = -1/4 (1 - t)^2 (s_max - s_min) - 1/2 (1 - t) s_min,  sigma_t = sqrt(1 - alpha_t^2).
    """

    name = "VP"

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def _log_mean_coeff(self, t):
        return -0.25 * ((1 - t) ** 2) * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def _d_log_mean_coeff(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t):
        alpha_t = torch.exp(self._log_mean_coeff(t))
        return alpha_t, alpha_t * self._d_log_mean_coeff(t)

    def sigma(self, t):
        p_sigma_t = 2 * self._log_mean_coeff(t)
        sigma_t = torch.sqrt(1 - torch.exp(p_sigma_t))
        d_sigma_t = torch.exp(p_sigma_t) * (2 * self._d_log_mean_coeff(t)) / (-2 * sigma_t)
        return sigma_t, d_sigma_t

    def d_log_alpha(self, t):
        return self._d_log_mean_coeff(t)

    def drift(self, x, t):
        # Closed form of the generic expression: d_log_alpha = beta/2 and score_coeff = beta/2.
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return 0.5 * beta_t * x, beta_t / 2


def make_path(path: str):
    """Path object from its SiT name ("Linear", "GVP", "VP")."""
    if path == "Linear":
        return LinearPath()
    if path == "GVP":
        return GVPPath()
    if path == "VP":
        return VPPath()
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


#################################################################################
#                                    Transport                                  #
#################################################################################

class Transport:
    """A path plus what the model predicts, how the loss is weighted, and the time cut-offs.

    ``train_eps`` / ``sample_eps`` default as SiT's ``create_transport`` sets them: VP 1e-5 / 1e-3;
    Linear and GVP with score or noise prediction 1e-3 / 1e-3; velocity on Linear/GVP 0 / 0 (stable
    everywhere, and then any given eps is ignored, as in SiT). Unlike SiT, a given ``train_eps`` with
    no ``sample_eps`` keeps the default sample_eps (SiT sets it to None and sampling then fails), and a
    given ``sample_eps`` with no ``train_eps`` is used (SiT's test reads train_eps and silently
    replaces it with 1e-3): each eps defaults on its own.
    """

    def __init__(self, path: str = "Linear", prediction: str = "velocity", loss_weight: Optional[str] = None,
                 train_eps: Optional[float] = None, sample_eps: Optional[float] = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if loss_weight in ("None", "none"):
            loss_weight = None
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss_weight {loss_weight!r}; expected one of {LOSS_WEIGHTS}")
        self.path = make_path(path)
        self.prediction, self.loss_weight = prediction, loss_weight
        if path == "VP":
            train_eps = 1e-5 if train_eps is None else train_eps
            sample_eps = 1e-3 if sample_eps is None else sample_eps
        elif prediction != "velocity":
            train_eps = 1e-3 if train_eps is None else train_eps
            sample_eps = 1e-3 if sample_eps is None else sample_eps
        else:
            train_eps, sample_eps = 0.0, 0.0
        self.train_eps, self.sample_eps = float(train_eps), float(sample_eps)

    def __repr__(self):
        return (f"Transport(path={self.path.name!r}, prediction={self.prediction!r}, loss_weight={self.loss_weight!r}, "
                f"train_eps={self.train_eps}, sample_eps={self.sample_eps})")

    # --- time interval ----------------------------------------------------------------
    def interval(self, *, sde: bool = False, eval: bool = False, diffusion_form: str = "SBDM",
                 last_step_size: float = 0.0, reverse: bool = False):
        """(t0, t1) to train or integrate on; SiT's ``check_interval``.

        VP stops at 1 - eps (or before the SDE's last step). Linear/GVP with score/noise models, or
        any SDE, stop before t = 1 too, and start at eps when the model is not a velocity model or
        the SDE uses the SBDM diffusion (both blow up at t = 0). For a velocity model that eps is 0
        (see the class docstring), so SiT's SBDM SDE starts where D(0) is infinite and every sample
        is NaN; here it starts at ``SBDM_VELOCITY_T0`` instead (a deliberate deviation).
        """
        t0, t1 = 0.0, 1.0
        eps = self.sample_eps if eval else self.train_eps
        end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if isinstance(self.path, VPPath):
            t1 = end
        elif self.prediction != "velocity":
            t0, t1 = eps, end
        elif sde:
            t0 = max(eps, SBDM_VELOCITY_T0) if diffusion_form == "SBDM" else 0.0
            t1 = end
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    # --- model output -> velocity / score -------------------------------------------------
    def velocity(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Probability-flow velocity from a raw model output at (x, t)."""
        if self.prediction == "velocity":
            return output
        if self.prediction == "score":
            return self.path.velocity_from_score(output, x, t)
        return self.path.velocity_from_noise(output, x, t)

    def score(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score grad log p_t(x) from a raw model output at (x, t)."""
        if self.prediction == "score":
            return output
        if self.prediction == "noise":
            return self.path.score_from_noise(output, x, t)
        return self.path.score_from_velocity(output, x, t)

    # --- training -----------------------------------------------------------------------
    def sample_time_and_noise(self, x1: torch.Tensor, generator: Optional[torch.Generator] = None):
        """(t [B] uniform on the training interval, x0 ~ N(0, I) like x1); noise drawn first, as SiT."""
        x0 = rng.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        t0, t1 = self.interval()
        t_dtype = torch.promote_types(x1.dtype, torch.float32)  # never draw times in bf16/fp16
        t = rng.rand((x1.shape[0],), generator=generator, device=x1.device, dtype=t_dtype) * (t1 - t0) + t0
        return t, x0

    def training_losses(self, model_fn: ModelFn, x1: torch.Tensor, t: Optional[torch.Tensor] = None,
                        x0: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                        model_kwargs: Optional[dict] = None) -> dict:
        """Per-sample loss of ``model_fn(x_t, t, **model_kwargs)`` on data x1.

        t [B] and x0 (noise, shaped like x1) may be given; whatever is missing is drawn (with
        ``generator`` if given). Returns {"loss" [B], "pred", "t", "xt", "ut"}.
        Velocity models: MSE to u_t. Score / noise models: weighted MSE with weight 1 (None),
        (score_coeff / sigma)^2 ("velocity") or score_coeff / sigma^2 ("likelihood"); the score
        error is measured as sigma * s + x0 (SiT's form), the noise error as eps_hat - x0.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if t is None or x0 is None:
            t_draw, x0_draw = self.sample_time_and_noise(x1, generator)
            t = t_draw if t is None else t
            x0 = x0_draw if x0 is None else x0
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != x1.shape[0]:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape [{x1.shape[0]}], got {got}")
        # the path's time runs over [0, 1]: outside, alpha and sigma leave it silently (checked on the host only)
        if can_check_values(t) and t.numel() and bool(
                ((t < 0) | (t > 1)).any()):
            raise ValueError(f"times t must be in [0, 1] (got min {float(t.min())}, max {float(t.max())})")
        if x0.shape != x1.shape:
            raise ValueError(f"noise x0 must have the data's shape {list(x1.shape)}, got {list(x0.shape)}")
        t = t.to(torch.promote_types(x1.dtype, torch.float32))
        xt, ut = self.path.plan(t, x0, x1)
        pred = model_fn(xt, t, **model_kwargs)
        if pred.shape != xt.shape:
            raise ValueError(f"model output shape {list(pred.shape)} does not match x_t shape {list(xt.shape)}")

        if self.prediction == "velocity":
            loss = mean_flat((pred - ut) ** 2)
        else:
            _, score_coeff = self.path.drift(xt, t)
            sigma_t = self.path.sigma(expand_t_like_x(t, xt))[0]
            if self.loss_weight == "velocity":
                weight = (score_coeff / sigma_t) ** 2
            elif self.loss_weight == "likelihood":
                weight = score_coeff / sigma_t ** 2
            else:
                weight = 1.0
            err = pred - x0 if self.prediction == "noise" else pred * sigma_t + x0
            loss = mean_flat(weight * err ** 2)
        return {"loss": loss, "pred": pred, "t": t, "xt": xt, "ut": ut}


def create_transport(path_type: str = "Linear", prediction: str = "velocity", loss_weight: Optional[str] = None,
                     train_eps: Optional[float] = None, sample_eps: Optional[float] = None) -> Transport:
    """SiT's factory name and argument order, for code ported from SiT."""
    return Transport(path_type, prediction, loss_weight, train_eps, sample_eps)
