"""Training objectives: the glue between a model family, its diffusion process and a batch.

Each objective is called as ``objective(model, batch)`` with ``batch = {'x': [B,C,H,W], 'y': [B]}``
(plus ``'zs'`` for REPA when features come with the data) and returns a dict of scalar loss terms
with the total under ``'loss'``. ``objective.sample(model, noise, y)`` draws samples with the same
process (used for the training grid and ``masked-dit sample``).

    objective       family      process and loss
    adm             DiT         ADM eps-MSE + VLB (learned sigma)
    mdtv2           MDTv2       ADM, two passes per step (full + masked, same t, own noise), MSE x min(snr,5)/snr
    transport       SiT         interpolant (Linear/GVP/VP), velocity/noise/score MSE
    edm_maskdit     MaskDiT     EDM loss on kept patches + mae_loss_coef x MAE loss on removed patches
    repa            REPA-SiT    REPA-time velocity MSE + proj_coeff x (-cos(projector, encoder feature))

``loss_passes(objective, model, batch)`` gives the same terms pass by pass (MDTv2: full, then masked),
so that a trainer can backpropagate one pass before the next runs and hold one graph at a time.

Random draws (t, noise, masks, label dropout) use the global RNG, so per-rank seeding and the
checkpointed RNG state make runs reproducible and resumable bit-exactly.
"""
from __future__ import annotations

import functools
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

from masked_dit.diffusion.edm import edm_loss, patchify
from masked_dit.diffusion.edm_sampling import edm_sampler
from masked_dit.diffusion.gaussian import min_snr_weight
from masked_dit.diffusion.guidance import (ClassifierFreeGuidance, forward_with_cfg, guided_channel_count,
                                            power_cosine_scale)
from masked_dit.diffusion.respace import create_diffusion
from masked_dit.diffusion.sample_settings import adm_respacing, check_adm_options_apply, check_adm_sampling
from masked_dit.nn.masking import keep_count, random_masking, sample_mdt_mask_ratio, scheduled_mask_ratio

# Which model families each objective trains.
FAMILIES = {
    "adm": ("dit",),
    "mdtv2": ("mdtv2", "mdtv1"),
    "transport": ("sit",),
    "edm_maskdit": ("maskdit",),
    "repa": ("repa_sit",),
}
# The objective a family trains with when none is named.
DEFAULT_OBJECTIVE = {"dit": "adm", "mdtv2": "mdtv2", "mdtv1": "mdtv2", "sit": "transport", "maskdit": "edm_maskdit",
                     "repa_sit": "repa"}


def _wrappers(model: torch.nn.Module):
    """``model``, then each module it wraps (DDP's ``.module``, torch.compile's ``._orig_mod``), innermost last."""
    while True:
        yield model
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user module under DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    for model in _wrappers(model):
        pass
    return model


def _under_ddp(model: torch.nn.Module) -> bool:
    """Whether a DistributedDataParallel wrapper is among ``model``'s wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    return any(isinstance(m, DistributedDataParallel) for m in _wrappers(model))


def _guided_channels(m) -> int:
    # The official DiT/SiT/MDT guidance acts on channels 0-2 only (a quirk kept for reproducing
    # published FIDs); with fewer data channels, every data channel (never the sigma half).
    return guided_channel_count(None, m.in_channels)


def _mean_terms(terms: dict, keys) -> dict:
    return {k: terms[k].mean() for k in keys if k in terms}


#################################################################################
#                           ADM: DiT and MDTv2                                  #
#################################################################################

class ADMObjective:
    """DiT's objective: ADM diffusion (linear betas, eps + learned-range sigma), MSE + VLB."""

    kind = "adm"
    samplers = ("ddpm", "ddim")  # what ``sample`` accepts besides "auto"

    def __init__(self, diffusion_steps: int = 1000, noise_schedule: str = "linear", learn_sigma: bool = True,
                 clip_denoised: bool = False):
        self.diffusion_steps, self.noise_schedule = diffusion_steps, noise_schedule
        self.learn_sigma, self.clip_denoised = learn_sigma, clip_denoised
        self.diffusion = create_diffusion("", noise_schedule, learn_sigma=learn_sigma, diffusion_steps=diffusion_steps)

    def _draw(self, x, t=None, noise=None):
        if t is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return t, torch.randn_like(x) if noise is None else noise

    def __call__(self, model, batch: dict, *, t=None, noise=None) -> dict:
        """``t`` / ``noise`` replace the random draws (tests replay a reference's draws)."""
        check_family(self.kind, model)
        x, y = batch["x"], batch["y"]
        t, noise = self._draw(x, t, noise)
        terms = self.diffusion.training_losses(model, x, t, noise=noise, model_kwargs={"y": y})
        return _mean_terms(terms, ("loss", "mse", "vb"))

    # ---- sampling ----
    def _guided(self, model, cfg_scale: float, scale_pow=None):
        m = unwrap(model)
        if cfg_scale == 1.0:
            return model
        return ClassifierFreeGuidance(model, cfg_scale, null_label=m.num_classes, guided_channels=_guided_channels(m))

    @torch.no_grad()
    def sample(self, model, noise: torch.Tensor, y: torch.Tensor, *, sampler: str = "ddpm", steps: int = 250,
               cfg_scale: float = 1.0, scale_pow: float | None = None, eta: float = 0.0, progress: bool = False,
               generator: torch.Generator | None = None, **unread) -> torch.Tensor:
        """``eta``: DDIM's stochasticity (sampler "ddim" only; 0 deterministic, 1 DDPM's variance)."""
        _check_sampler(self, model, sampler, "ADM diffusion", unread)
        check_adm_options_apply(["eta"] if eta != 0 else [], sampler, lambda key: key)
        check_adm_sampling({"eta": eta}, lambda key: f"{key}={eta}")
        respaced = create_diffusion(adm_respacing(sampler, steps, self.diffusion_steps, self.kind), self.noise_schedule,
                                    learn_sigma=self.learn_sigma, diffusion_steps=self.diffusion_steps)
        fn = self._guided(model, cfg_scale, scale_pow)
        kw = dict(noise=noise, clip_denoised=self.clip_denoised, model_kwargs={"y": y}, progress=progress,
                  generator=generator)
        if sampler == "ddim":
            return respaced.ddim_sample_loop(fn, tuple(noise.shape), eta=eta, **kw)
        return respaced.p_sample_loop(fn, tuple(noise.shape), **kw)


def _pass_terms(terms: dict, name: str) -> dict:
    """One MDTv2 pass's batch means: its ``loss`` (also under ``name``), ``mse`` and ``vb``."""
    out = {"loss": terms["loss"].mean()}
    out[name] = out["loss"]
    out["mse"] = terms["mse"].mean()
    if "vb" in terms:
        out["vb"] = terms["vb"].mean()
    return out


def loss_passes(objective, model, batch: dict):
    """``objective``'s loss terms pass by pass (MDTv2: full, then masked; the others: one pass, their
    ``__call__``). Backpropagate each pass's ``loss`` before the next to free its activations; the
    terms summed over the passes are the objective's."""
    passes = getattr(objective, "passes", None)
    if passes is None:
        yield objective(model, batch)
    else:
        yield from passes(model, batch)


def backward_by_pass(objective, model, batch: dict, context: Callable[[bool], ContextManager],
                     divide_by: int = 1) -> dict:
    """Runs each pass of ``objective`` and backpropagates its ``loss / divide_by`` inside
    ``context(last_pass)`` (sync and autocast: under DDP only the last pass may reduce) before the
    next pass runs; the passes' terms, detached and summed."""
    n = getattr(objective, "num_passes", 1)
    passes = loss_passes(objective, model, batch)
    out: dict = {}
    for j in range(n):
        with context(j == n - 1):
            terms = next(passes)
            (terms["loss"] / divide_by).backward()
        for k, v in terms.items():
            out[k] = out[k] + v.detach() if k in out else v.detach()
    passes.close()
    return out


class MDTv2Objective(ADMObjective):
    """MDTv2: per step a full pass and a masked pass with the same t, each with its own noise (MDT's
    train_util calls training_losses twice without noise, so each draws one); both ADM losses
    (MSE weighted by min(snr, gamma)/snr, plus the VLB) are summed.

    The masked pass keeps ``int(N (1 - r))`` tokens per sample with one ratio per step,
    ``r = mask_ratio + jitter * U(0, 1)`` (0.3 + 0.2 U as MDTv2).
    """

    kind = "mdtv2"

    def __init__(self, diffusion_steps: int = 1000, noise_schedule: str = "linear", learn_sigma: bool = True,
                 clip_denoised: bool = False, mask_ratio: float = 0.3, mask_ratio_jitter: float = 0.2,
                 min_snr_gamma: float = 5.0, scale_pow: float = 4.0):
        super().__init__(diffusion_steps, noise_schedule, learn_sigma, clip_denoised)
        if not (mask_ratio >= 0.0 and mask_ratio_jitter >= 0.0 and mask_ratio + mask_ratio_jitter < 1.0):
            # (checked here, not at the first unlucky draw many steps into training)
            raise ValueError(f"MDTv2 draws mask ratios in [mask_ratio, mask_ratio + mask_ratio_jitter) = "
                             f"[{mask_ratio}, {mask_ratio + mask_ratio_jitter}): both must be >= 0 and the sum < 1")
        self.mask_ratio, self.mask_ratio_jitter = mask_ratio, mask_ratio_jitter
        self.min_snr_gamma, self.scale_pow = min_snr_gamma, scale_pow

    num_passes = 2

    def __call__(self, model, batch: dict, *, t=None, noise=None, ids_keep=None) -> dict:
        """Both passes' terms summed (``loss`` = full + masked); see :meth:`passes`."""
        out: dict = {}
        for terms in self.passes(model, batch, t=t, noise=noise, ids_keep=ids_keep):
            for k, v in terms.items():
                out[k] = out[k] + v if k in out else v
        return out

    def passes(self, model, batch: dict, *, t=None, noise=None, ids_keep=None):
        """The full pass's terms, then the masked pass's (each with its own ``loss``). A trainer that
        backpropagates each pass before asking for the next holds one pass's activations at a time
        (both graphs at once took 1.9x the activation memory); the draws are the same either way."""
        check_family(self.kind, model)
        x, y = batch["x"], batch["y"]
        m = unwrap(model)
        top = self.mask_ratio + self.mask_ratio_jitter
        if ids_keep is None and m.num_patches * (1.0 - top) < 1.0:
            raise ValueError(f"mask ratios up to {top} may keep no token of the model's {m.num_patches} patches; "
                             f"lower mask_ratio + mask_ratio_jitter to <= 1 - 1/{m.num_patches}")
        given_noise = noise  # a given noise (a reference replay) is used by both passes
        t, noise = self._draw(x, t, noise)
        weight = min_snr_weight(self.diffusion.min_snr_snr(t), self.min_snr_gamma, "eps")
        full = self.diffusion.training_losses(model, x, t, noise=noise, model_kwargs={"y": y}, weighting=weight)
        yield _pass_terms(full, "loss_full")
        del full  # its graph goes with the caller's backward
        ids_restore = None
        if ids_keep is None:
            ratio = sample_mdt_mask_ratio(self.mask_ratio, spread=self.mask_ratio_jitter, device=x.device) \
                if self.mask_ratio_jitter else self.mask_ratio
            ids_keep, ids_restore, _ = random_masking(x.shape[0], m.num_patches, ratio, device=x.device)
        noise_masked = torch.randn_like(x) if given_noise is None else given_noise
        masked = self.diffusion.training_losses(model, x, t, noise=noise_masked, weighting=weight,
                                                model_kwargs={"y": y, "ids_keep": ids_keep, "ids_restore": ids_restore})
        yield _pass_terms(masked, "loss_masked")

    def _guided(self, model, cfg_scale: float, scale_pow=None):
        """MDT's power-cosine guidance (pow 4: guidance mostly at low noise); ``scale_pow=0`` is a
        constant scale."""
        m = unwrap(model)
        if cfg_scale == 1.0:
            return model
        scale_pow = self.scale_pow if scale_pow is None else scale_pow
        schedule = functools.partial(power_cosine_scale, scale_pow=scale_pow, num_timesteps=self.diffusion_steps)
        return ClassifierFreeGuidance(model, cfg_scale, null_label=m.num_classes, guided_channels=_guided_channels(m),
                                      schedule=schedule)


#################################################################################
#                           SiT: stochastic interpolants                        #
#################################################################################

class TransportObjective:
    """SiT's interpolant loss (t = 0 noise, t = 1 data)."""

    kind = "transport"
    samplers = ("ode", "euler", "heun", "sde")

    def __init__(self, path_type: str = "Linear", prediction: str = "velocity", loss_weight: Optional[str] = None,
                 train_eps: Optional[float] = None, sample_eps: Optional[float] = None):
        from masked_dit.diffusion.transport import Transport

        self.transport = Transport(path_type, prediction, loss_weight, train_eps, sample_eps)

    def __call__(self, model, batch: dict) -> dict:
        check_family(self.kind, model)
        terms = self.transport.training_losses(model, batch["x"], model_kwargs={"y": batch["y"]})
        return {"loss": terms["loss"].mean()}

    @torch.no_grad()
    def sample(self, model, noise, y, *, sampler: str = "ode", steps: int = 50, cfg_scale: float = 1.0,
               progress: bool = False, generator: torch.Generator | None = None, ode_method: str = "dopri5",
               atol: float = 1e-6, rtol: float = 1e-3, sde_method: str = "Euler", diffusion_form: str = "sigma",
               diffusion_norm: float = 1.0, last_step: Optional[str] = "Mean", last_step_size: float = 0.04,
               **unread) -> torch.Tensor:
        """SiT's sample.py: ``ode`` integrates with ``ode_method`` (``euler`` / ``heun``: those fixed-step
        ODE methods), ``sde`` runs ``sde_method`` with the diffusion form and last step; defaults as SiT's."""
        from masked_dit.diffusion.ode import sample_ode
        from masked_dit.diffusion.sde import sample_sde

        _check_sampler(self, model, sampler, "SiT", unread)
        m = unwrap(model)
        fn = model if cfg_scale == 1.0 else ClassifierFreeGuidance(model, cfg_scale, null_label=m.num_classes,
                                                                     guided_channels=_guided_channels(m))
        kw = {"model_kwargs": {"y": y}, "progress": progress}
        if sampler in ("auto", "ode", "euler", "heun"):
            method = ode_method if sampler in ("auto", "ode") else sampler
            if cfg_scale == 1.0:
                return sample_ode(self.transport, fn, noise, method=method, num_steps=steps, atol=atol, rtol=rtol, **kw)
            # SiT integrates the doubled state [z; z] with labels [y; null] through forward_with_cfg; the
            # second half keeps the unconditional channel 3, and an adaptive solver's (dopri5's) error
            # norm covers both halves, so the conditional half alone takes other steps (results ~1e-4
            # apart at rtol 1e-3). Fixed-step methods give the same either way.
            doubled = functools.partial(forward_with_cfg, model, cfg_scale=cfg_scale,
                                        guided_channels=_guided_channels(m))
            kw["model_kwargs"] = {"y": torch.cat([y, torch.full_like(y, m.num_classes)])}
            out = sample_ode(self.transport, doubled, torch.cat([noise, noise]), method=method, num_steps=steps,
                             atol=atol, rtol=rtol, **kw)
            return out[: noise.shape[0]]
        return sample_sde(self.transport, fn, noise, method=sde_method, diffusion_form=diffusion_form,
                          diffusion_norm=diffusion_norm, last_step=last_step, last_step_size=last_step_size,
                          num_steps=steps, generator=generator, **kw)


#################################################################################
#                              MaskDiT: EDM + MAE                               #
#################################################################################

def _one_hot_labels(m, y: torch.Tensor, dtype: torch.dtype):
    """MaskDiT's one-hot labels, or None for an unconditional model (num_classes=0)."""
    return F.one_hot(y.long(), m.num_classes).to(dtype) if m.num_classes else None


class EDMMaskDiTObjective:
    """MaskDiT: EDM denoising loss on the kept patches + ``mae_loss_coef`` x MAE loss (noisy input,
    normalised per patch) on the removed ones; ``mask_ratio = 0`` is the plain EDM loss (the
    unmasking fine-tune). Labels are one-hot, zeroed with the model's ``class_dropout_prob``.

    ``mask_ratio_fn`` (MaskDiT's ``get_mask_ratio_fn``) moves the ratio over the run, from the
    fraction of it done that the trainer sets in ``progress`` before each step; a ratio that removes no
    patch (the end of a cosine schedule) is the plain loss.
    """

    kind = "edm_maskdit"
    samplers = ("heun", "euler")

    def __init__(self, mask_ratio: float = 0.5, mae_loss_coef: float = 0.1, P_mean: float = -1.2, P_std: float = 1.2,
                 sigma_data: float = 0.5, mask_ratio_fn: str = "constant", mask_ratio_min: float = 0.0):
        self.mask_ratio, self.mae_loss_coef = mask_ratio, mae_loss_coef
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.mask_ratio_fn, self.mask_ratio_min = mask_ratio_fn, mask_ratio_min
        scheduled_mask_ratio(0.0, mask_ratio_fn, mask_ratio, mask_ratio_min)  # an unknown name fails here
        self.progress = 0.0  # fraction of the run done (the trainer sets it before each step)

    def current_mask_ratio(self) -> float:
        return scheduled_mask_ratio(self.progress, self.mask_ratio_fn, self.mask_ratio, self.mask_ratio_min)

    def __call__(self, model, batch: dict, *, rnd_normal=None, noise=None, ids_keep=None) -> dict:
        """``rnd_normal`` [B] / ``noise`` (unit) / ``ids_keep`` [B, K] replace the random draws."""
        check_family(self.kind, model)
        x, y = batch["x"], batch["y"]
        m = unwrap(model)
        labels = _one_hot_labels(m, y, x.dtype)
        if labels is not None and m.class_dropout_prob > 0:
            keep = torch.rand(x.shape[0], 1, device=x.device) >= m.class_dropout_prob
            labels = labels * keep.to(labels.dtype)
        net_kwargs, mask = {}, None
        num_patches = m.model.num_patches
        if ids_keep is not None:
            mask = torch.ones(x.shape[0], num_patches, device=x.device).scatter_(1, ids_keep, 0.0)
            net_kwargs = {"ids_keep": ids_keep}
        elif (ratio := self.current_mask_ratio()) > 0 and keep_count(num_patches, ratio) < num_patches:
            ids_keep, ids_restore, mask = random_masking(x.shape[0], num_patches, ratio, device=x.device)
            net_kwargs = {"ids_keep": ids_keep, "ids_restore": ids_restore}
        terms = edm_loss(model, x, labels, P_mean=self.P_mean, P_std=self.P_std, sigma_data=self.sigma_data,
                         patch_size=m.model.patch_size, mae_loss_coef=self.mae_loss_coef if mask is not None else 0.0,
                         mask=mask, net_kwargs=net_kwargs, rnd_normal=rnd_normal, noise=noise)
        out = {"loss": terms["loss"].mean()}
        mask_token = getattr(m.model, "mask_token", None)
        if mask is None and mask_token is not None and _under_ddp(model):
            # a step that removes no patch leaves the mask token out of the graph, and DDP (which expects
            # every parameter's gradient) fails the next step: a zero gradient keeps it in
            out["loss"] = out["loss"] + 0.0 * mask_token.sum()
        if "mae" in terms:
            out["mae"] = terms["mae"].mean()
        if self.mask_ratio_fn != "constant":  # logged beside the loss
            out["mask_ratio"] = torch.full((), self.current_mask_ratio(), device=x.device)
        return out

    @torch.no_grad()
    def sample(self, model, noise, y, *, sampler: str = "heun", steps: int = 40, cfg_scale: float = 1.0,
               progress: bool = False, generator: torch.Generator | None = None, S_churn: float = 0.0,
               S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
               sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, rho: float = 7.0,
               discretization: str = "edm", schedule: str = "linear", scaling: str = "none", **unread) -> torch.Tensor:
        """MaskDiT's sample.py: EDM's Heun (or ``euler``) sampler; a discretization / schedule / scaling
        other than EDM's is its ablation sampler. Defaults as MaskDiT's (sigma range: the discretization's)."""
        _check_sampler(self, model, sampler, "EDM", unread)
        m = unwrap(model)
        labels = _one_hot_labels(m, y, noise.dtype)
        if labels is None and cfg_scale != 1.0:
            raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional model; this MaskDiT has num_classes=0")
        out = edm_sampler(model, noise, labels, num_steps=steps, solver="euler" if sampler == "euler" else "heun",
                          sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, discretization=discretization,
                          schedule=schedule, scaling=scaling, S_churn=S_churn, S_min=S_min, S_max=S_max,
                          S_noise=S_noise, cfg_scale=cfg_scale, progress=progress, generator=generator)
        return out.to(noise.dtype)


#################################################################################
#                          REPA: SiT + representation alignment                 #
#################################################################################

def patch_features(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A stand-in encoder: the clean input's patches [B, N, p*p*C] (aligned with the model's tokens)."""
    return patchify(x, patch_size)


class REPAObjective:
    """REPA: velocity MSE in REPA time (t = 0 data, t = 1 noise) + ``proj_coeff`` x the negative
    cosine similarity between projector outputs and encoder features.

    Features: ``batch['zs']`` (a tensor or a list, one [B, T, D_k] per encoder), else
    ``encoder(batch)`` when an encoder callable is given.
    """

    kind = "repa"
    samplers = ("euler", "ode", "heun", "sde")

    def __init__(self, proj_coeff: float = 0.5, path_type: str = "linear", weighting: str = "uniform",
                 encoder: Optional[Callable] = None):
        self.proj_coeff, self.path_type, self.weighting, self.encoder = proj_coeff, path_type, weighting, encoder

    def features(self, batch: dict) -> list:
        if "zs" in batch:
            zs = batch["zs"]
        elif self.encoder is not None:
            with torch.no_grad():
                zs = self.encoder(batch)
        else:
            raise ValueError("REPA needs encoder features: put them in the batch as 'zs' (latents: --data.features="
                             "<name> from `masked-dit extract-features`) or pass an encoder (pixel data: "
                             "--objective.encoder=dinov2-vit-b)")
        return [zs] if isinstance(zs, torch.Tensor) else list(zs)

    def __call__(self, model, batch: dict, *, t=None, noise=None) -> dict:
        from masked_dit.diffusion.repa import repa_training_losses

        check_family(self.kind, model)
        x, y = batch["x"], batch["y"]
        zs = self.features(batch)
        terms = repa_training_losses(model, x, zs, t=t, noise=noise, model_kwargs={"y": y}, path_type=self.path_type,
                                     weighting=self.weighting, proj_coeff=self.proj_coeff)
        return {"loss": terms["loss"], "denoising_loss": terms["denoising_loss"].mean(), "proj_loss": terms["proj_loss"]}

    @torch.no_grad()
    def sample(self, model, noise, y, *, sampler: str = "euler", steps: int = 50, cfg_scale: float = 1.0,
               guidance_low: float = 0.0, guidance_high: float = 1.0, progress: bool = False,
               generator: torch.Generator | None = None, **unread) -> torch.Tensor:
        from masked_dit.diffusion.repa import repa_euler_maruyama_sampler, repa_euler_sampler

        _check_sampler(self, model, sampler, "REPA", unread)
        m = unwrap(model)
        kw = dict(num_steps=steps, cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
                  null_label=m.num_classes, progress=progress)
        if sampler == "sde":
            out = repa_euler_maruyama_sampler(model, noise, y, path_type=self.path_type, generator=generator, **kw)
        else:
            out = repa_euler_sampler(model, noise, y, heun=sampler == "heun", **kw)
        return out.to(noise.dtype)


#################################################################################
#                                   Factory                                     #
#################################################################################

def pixel_encoder(specs: str, model, image_size: int, precision: str = "fp32") -> Callable:
    """REPA's frozen DINOv2 encoder(s) on a pixel batch: ``batch -> zs`` on ``model``'s token grid.

    ``batch['x']`` holds the (flipped) training images in [-1, 1] at ``image_size`` px; the encoder
    sees them at REPA's ``repa_encoder_image_size(image_size, spec)`` (224 for small images; 256 for
    MoCo v3, MAE, DINOv1), under the training autocast. Grayscale images (digits) are repeated to RGB.
    """
    from masked_dit.data.encoders import load_encoder_features

    device = next(model.parameters()).device
    features = load_encoder_features(specs, model=model, device=device, resolution=image_size,
                                     autocast_dtype="bf16" if precision == "bf16" else None)

    def encode(batch: dict):
        x = batch["x"]
        return features(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)

    encode.features = features  # the loaded EncoderFeatures (z_dims, encoders)
    return encode


def check_family(kind: str, model: torch.nn.Module) -> None:
    """One line if ``model`` is of a registered family that objective ``kind`` does not train: the loss
    or the sampler would fail deep inside (an AttributeError, a shape mismatch) or train the wrong thing."""
    family = getattr(unwrap(model), "family", None)
    if family is not None and family not in FAMILIES[kind]:
        raise ValueError(f"objective {kind!r} trains {', '.join(FAMILIES[kind])} models, not {family!r} "
                         f"(use --objective.kind={DEFAULT_OBJECTIVE.get(family, '?')})")


def _check_sampler(objective, model, sampler: str, what: str, unread: dict) -> None:
    """``sampler`` applies, and ``sample`` read every option it was given but the shared guidance keys,
    which generic callers (the trainer's grids, ``masked-dit sample``) pass to every objective: a
    misspelt name or another family's option (``S_churn`` to SiT) is an error, not silently dropped."""
    from masked_dit.configs import GUIDANCE_KEYS

    foreign = sorted(k for k in unread if k not in GUIDANCE_KEYS)
    if foreign:
        raise TypeError(f"{type(objective).__name__}.sample() got options it does not read: {', '.join(foreign)}")
    if sampler != "auto" and sampler not in objective.samplers:
        raise ValueError(f"sampler {sampler!r} does not apply to {what}; valid: {', '.join(objective.samplers)}")
    check_family(objective.kind, model)


# Samplers each objective's ``sample`` accepts besides "auto", by objective kind.
SAMPLERS = {c.kind: c.samplers for c in (ADMObjective, MDTv2Objective, TransportObjective, EDMMaskDiTObjective,
                                         REPAObjective)}


def build_objective(cfg, model=None, pixel_space: bool = False, *, image_size: Optional[int] = None,
                    precision: str = "fp32"):
    """The objective an ``ObjectiveConfig`` names; ``model`` (if given) is checked against it.

    REPA with a DINOv2 ``cfg.encoder`` loads the encoder only when ``image_size`` (the pixel
    training images' side) is given: training needs it, sampling does not.
    """
    kind = cfg.kind
    if kind not in FAMILIES:
        raise ValueError(f"unknown objective {kind!r}; valid: {', '.join(FAMILIES)}")
    m = unwrap(model) if model is not None else None
    if m is not None:
        check_family(kind, m)
    if kind in ("adm", "mdtv2"):
        learn_sigma = bool(getattr(m, "learn_sigma", True))
        common = dict(diffusion_steps=cfg.diffusion_steps, noise_schedule=cfg.noise_schedule, learn_sigma=learn_sigma,
                      clip_denoised=pixel_space)
        if kind == "adm":
            return ADMObjective(**common)
        return MDTv2Objective(**common, mask_ratio=cfg.mask_ratio, mask_ratio_jitter=cfg.mask_ratio_jitter,
                              min_snr_gamma=cfg.min_snr_gamma)
    if kind == "transport":
        return TransportObjective(cfg.path_type, cfg.prediction, cfg.loss_weight, cfg.train_eps, cfg.sample_eps)
    if kind == "edm_maskdit":
        return EDMMaskDiTObjective(cfg.mask_ratio, cfg.mae_loss_coef, cfg.P_mean, cfg.P_std, cfg.sigma_data,
                                   cfg.mask_ratio_fn, cfg.mask_ratio_min)
    encoder = None
    if cfg.encoder == "patches":
        patch = m.patch_size if m is not None else 2
        encoder = lambda batch: patch_features(batch["x"], patch)  # noqa: E731
    elif cfg.encoder != "none" and image_size is not None:
        if m is None or not pixel_space:
            raise ValueError(f"--objective.encoder={cfg.encoder} needs the model and pixel data (for latents cache "
                             "features with `masked-dit extract-features` and use --data.features)")
        encoder = pixel_encoder(cfg.encoder, m, image_size, precision)
    from masked_dit.diffusion.repa import repa_path_name

    return REPAObjective(cfg.proj_coeff, repa_path_name(cfg.path_type), cfg.weighting, encoder=encoder)
