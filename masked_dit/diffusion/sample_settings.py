"""Sampler settings, checked before a run reaches its samples (a grid at step N, or the first batch
of ``masked-dit sample``): each error is one line naming the option as the caller spells it
(``flag(key)``: ``--sample.eta=2.0`` in a config, ``--eta 2.0`` on ``masked-dit sample``).

    ADM (DiT, MDT)   respaced step counts, DDIM's eta
    SiT              ODE / SDE options of its sample.py, and which sampler reads them
    MaskDiT          EDM's (ablation) sampler options, with the grid they build
"""
from __future__ import annotations

import math

from masked_dit.diffusion.respace import space_timesteps


def adm_respacing(sampler: str, steps: int, diffusion_steps: int, kind: str = "adm") -> str:
    """The ``timestep_respacing`` ADM sampling of objective ``kind`` uses: DDPM takes N evenly spaced
    steps (DiT's and MDT's sample scripts), and so does MDT's DDIM (its image_sample.py --use_ddim keeps
    that respacing: from t = 999); DiT, which has no DDIM script, keeps every k-th step ("ddimN", ADM's
    DDIM convention: from t = T - k). ValueError (one line) when ``steps`` cannot be made that way, so
    callers can check a setting before a run reaches its samples."""
    respacing = f"ddim{steps}" if sampler == "ddim" and kind == "adm" else str(steps)
    try:
        space_timesteps(diffusion_steps, respacing)
    except ValueError as exc:
        raise ValueError(f"{steps} {'DDIM' if sampler == 'ddim' else 'DDPM'} steps cannot be taken from "
                         f"{diffusion_steps} diffusion steps ({exc})") from None
    return respacing


def check_sample_steps(kind: str, sampler: str, steps: int, diffusion_steps: int, option: str) -> None:
    """Before a run reaches its samples: the ADM kinds' respacing must make ``steps``, SiT's grid needs
    two points; the one-line error starts with ``option``, the setting as the caller's command line spells it."""
    if kind in ("adm", "mdtv2"):  # ADM's respaced samplers
        try:
            adm_respacing(sampler, steps, diffusion_steps, kind)
        except ValueError as exc:
            raise ValueError(f"{option}: {exc}") from None
    elif kind == "transport" and steps < 2:  # SiT's num_steps counts time points, both ends included
        raise ValueError(f"{option}: SiT's samplers need at least 2 time points (num_steps, both ends included)")


def check_adm_options_apply(keys, sampler: str, flag) -> None:
    """``keys`` (of ``configs.ADM_SAMPLE_KEYS``) are options set on purpose: DDPM ('ddpm', 'auto') reads
    none of them, so there they would be silently ignored."""
    if keys and sampler != "ddim":
        raise ValueError(f"{flag(keys[0])} is read by the ddim sampler only (this run samples with {sampler})")


def check_adm_sampling(options: dict, flag) -> None:
    """Before a run reaches its samples: ADM's DDIM ``options`` (``configs.ADM_SAMPLE_KEYS``). Past
    eta = 1 the step's noise can exceed the variance left for it, and sqrt(1 - abar_prev - sigma^2)
    is NaN, so eta stays in [0, 1]."""
    eta = options["eta"]
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0 <= eta <= 1):
        raise ValueError(f"{flag('eta')} must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance)")


def check_sit_options_apply(keys, sampler: str, flag) -> None:
    """``keys`` (of ``configs.SIT_SAMPLE_KEYS``) are options set on purpose: one the ``sampler`` does not
    read would be silently ignored. The ODE ('ode', 'auto') reads the first three, the SDE the others."""
    for key in keys:
        wanted = "ode" if key in ("ode_method", "atol", "rtol") else "sde"
        if sampler != wanted and not (wanted == "ode" and sampler == "auto"):
            raise ValueError(f"{flag(key)} is read by the {wanted} sampler only (this run samples with {sampler})")


def check_sit_sampling(objective_cfg, sampler: str, options: dict, flag) -> None:
    """Before a run reaches its samples: SiT's ODE / SDE ``options`` (``configs.SIT_SAMPLE_KEYS``) for
    ``sampler``; ``flag(key)`` spells an option as the caller's command line does."""
    from masked_dit.diffusion.ode import check_ode_method
    from masked_dit.diffusion.sde import LAST_STEPS, SDE_METHODS, sde_interval
    from masked_dit.diffusion.transport import DIFFUSION_FORMS, Transport

    for key, ok, rule in (("atol", lambda v: v > 0, "> 0"), ("rtol", lambda v: v > 0, "> 0"),
                          ("diffusion_norm", lambda v: v >= 0, ">= 0"),
                          ("last_step_size", lambda v: 0 <= v < 1, "in [0, 1)")):
        value = options[key]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise ValueError(f"{flag(key)} must be a finite number {rule} (got {value})")
    for key, valid in (("sde_method", SDE_METHODS), ("diffusion_form", DIFFUSION_FORMS), ("last_step", LAST_STEPS)):
        if options[key] not in valid:
            raise ValueError(f"{flag(key)} is not valid; choose one of: {', '.join(str(v) for v in valid)}")
    key = "ode_method" if sampler in ("auto", "ode") else "sde_method"
    try:
        if sampler in ("auto", "ode"):
            check_ode_method(options["ode_method"])
        elif sampler == "sde":  # Heun ending where the score is singular
            oc = objective_cfg
            sde_interval(Transport(oc.path_type, oc.prediction, oc.loss_weight, oc.train_eps, oc.sample_eps),
                         options["sde_method"], options["diffusion_form"], options["last_step"],
                         options["last_step_size"])
    except ValueError as exc:
        raise ValueError(f"{flag(key)}: {exc}") from None


def check_edm_sampling(options: dict, steps: int, flag) -> None:
    """Before a run reaches its samples: MaskDiT's EDM ``options`` (``configs.EDM_SAMPLE_KEYS``) for a
    ``steps``-step grid; ``flag(key)`` spells an option as the caller's command line does. The grid is
    built (host floats only), so a VP schedule or iDDPM grid that cannot span the range is caught too."""
    from masked_dit.diffusion.edm_sampling import DISCRETIZATIONS, SCALINGS, SCHEDULES, SamplerSettingError, edm_grid

    for key, valid in (("discretization", DISCRETIZATIONS), ("schedule", SCHEDULES), ("scaling", SCALINGS)):
        if options[key] not in valid:
            raise ValueError(f"{flag(key)} is not valid; choose one of: {', '.join(valid)}")
    for key, ok, rule in (("S_churn", lambda v: v >= 0, ">= 0"), ("S_min", lambda v: v >= 0, ">= 0"),
                          ("S_max", lambda v: v >= 0, ">= 0 (inf: no upper bound)"),
                          ("S_noise", lambda v: v >= 0, ">= 0"), ("rho", lambda v: v > 0, "> 0"),
                          ("sigma_min", lambda v: v > 0, "> 0 (none: the discretization's)"),
                          ("sigma_max", lambda v: v > 0, "> 0 (none: the discretization's)")):
        value = options[key]
        if value is None and key in ("sigma_min", "sigma_max"):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        if not (number and (math.isfinite(value) or key == "S_max") and ok(value)):
            raise ValueError(f"{flag(key)} must be a {'' if key == 'S_max' else 'finite '}number {rule} (got {value})")
    if options["S_min"] > options["S_max"]:
        raise ValueError(f"{flag('S_min')} must be <= {flag('S_max')} (churn applies for sigma in [S_min, S_max])")
    lo, hi = options["sigma_min"], options["sigma_max"]
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{flag('sigma_min')} must be <= {flag('sigma_max')}")
    try:
        edm_grid(steps, sigma_min=lo, sigma_max=hi, rho=options["rho"], discretization=options["discretization"],
                 schedule=options["schedule"], scaling=options["scaling"])
    except SamplerSettingError as exc:
        raise ValueError(f"{flag(exc.option)}: {exc}") from None


def check_family_sampling(objective_cfg, sampler: str, steps: int, options: dict, given, flag, spelled=None) -> None:
    """The options only the objective kind's own sampler reads (``configs.FAMILY_SAMPLE_KEYS``): those set
    on purpose (``given``) must be read by ``sampler``, and the values in ``options`` must work.
    ``flag(key)`` names an option, ``spelled(key)`` names it with its value (default: ``flag``)."""
    spelled = spelled or flag
    kind = objective_cfg.kind
    if kind == "transport":
        check_sit_options_apply(given, sampler, flag)
        check_sit_sampling(objective_cfg, sampler, options, spelled)
    elif kind in ("adm", "mdtv2"):
        check_adm_options_apply(given, sampler, flag)
        check_adm_sampling(options, spelled)
    elif kind == "edm_maskdit":
        check_edm_sampling(options, steps, spelled)


# Where each of these is read (beside the family check above, which names the sampler): given on the
# command line where nothing reads it, it would be silently ignored.
GUIDANCE_READERS = {"scale_pow": ("mdtv2", "MDT's power-cosine schedule"),
                    "guidance_low": ("repa", "REPA's guidance interval"),
                    "guidance_high": ("repa", "REPA's guidance interval")}


def check_options_read(kind: str, options: dict, given, flag) -> None:
    """Options set on purpose (``given``) that the resolved settings (``options``: the sampler's options,
    and ``cfg_scale`` where guidance or REPA is checked) never read: guidance schedules of another family or without guidance,
    REPA's scales below 1 (its sampler guides only above 1), tolerances of a fixed-step ODE method,
    the Karras exponent of another grid, churn bounds without churn."""
    from masked_dit.diffusion.ode import ADAPTIVE_TORCHDIFFEQ

    given = set(given)
    for key, (reader, what) in GUIDANCE_READERS.items():
        if key in given and kind != reader:
            raise ValueError(f"{flag(key)} sets {what}: it applies to that family only (objective {kind})")
        if key in given and options["cfg_scale"] == 1:
            raise ValueError(f"{flag(key)} sets {what}, which --cfg-scale 1 (no guidance) never reads")
    if kind == "repa" and options["cfg_scale"] < 1:
        raise ValueError(f"--cfg-scale {options['cfg_scale']}: REPA's sampler guides only for a scale > 1 "
                         f"(below 1 it samples as 1); use 1 for no guidance")
    if kind == "transport" and given & {"atol", "rtol"} and options["ode_method"] not in ADAPTIVE_TORCHDIFFEQ:
        key = "atol" if "atol" in given else "rtol"
        raise ValueError(f"{flag(key)} is a step-size tolerance: --ode-method {options['ode_method']} takes "
                         f"fixed steps (adaptive: {', '.join(ADAPTIVE_TORCHDIFFEQ)})")
    if kind == "edm_maskdit":
        if "rho" in given and options["discretization"] != "edm":
            raise ValueError(f"{flag('rho')} is the Karras grid's exponent: --discretization "
                             f"{options['discretization']} does not read it")
        unread = [k for k in ("S_min", "S_max", "S_noise") if k in given]
        if unread and options["S_churn"] == 0:
            raise ValueError(f"{flag(unread[0])} bounds or scales churn, which --S-churn 0 turns off")
