"""Training configuration: one dataclass per section, named presets, ``--section.key=value`` overrides.

    cfg = get_preset("digits-mdtv2")
    cfg = apply_overrides(cfg, ["--optim.lr=2e-4", "--train.steps=100"])
    cfg.save("runs/x/config.json"); Config.load("runs/x/config.json")

Every field has a default; a preset changes only what its paper's recipe changes. Bad keys or
values raise ``ConfigError`` (a ValueError) with one line naming the key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming it and the valid choices."""


#################################################################################
#                                   Sections                                    #
#################################################################################

@dataclass
class RunConfig:
    name: str = "digits-mdtv2"           # run folder: <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0                        # global seed; rank r uses seed + r for its own draws
    resume: Optional[str] = None         # None | "latest" | path of a checkpoint folder
    init_from: Optional[str] = None      # weights only (fine-tuning): run / checkpoint / export folder or file


@dataclass
class ModelConfig:
    name: str = "MDTv2-S/2"              # masked_dit.models registry name (size and patch)
    input_size: int = 32                 # spatial side of what the model sees (latent side for VAE latents)
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1      # label dropout for classifier-free guidance
    learn_sigma: Optional[bool] = None   # None: the family's own default
    depth: Optional[int] = None          # None: from the registry name
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    extra: dict = field(default_factory=dict)  # further constructor kwargs (decode_layer, encoder_depth, ...)


@dataclass
class DataConfig:
    source: str = "digits"               # digits | folder | latents
    path: Optional[str] = None           # image folder root or extracted-latents folder
    image_size: int = 16                 # pixels (digits: 16 or 32; folder: center-crop side)
    random_flip: bool = True
    on_bad_image: str = "stop"           # stop | skip  (unreadable or undersized images)
    min_image_size: Optional[int] = None # folder: smallest short side taken (none: image_size; 0: any, upscaled as ADM)
    num_workers: int = 0
    latent_scale: float = 0.18215        # posterior sample x this factor (SD VAE)
    features: Optional[str] = None       # latents: cached REPA features <path>/features/<name> ('zs'; comma: several)


@dataclass
class ObjectiveConfig:
    kind: str = "mdtv2"                  # adm | mdtv2 | transport | edm_maskdit | repa
    # ADM (DiT, MDTv2)
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    min_snr_gamma: float = 5.0           # MDTv2: MSE weight min(snr, gamma)/snr
    mask_ratio: float = 0.3              # MDTv2: ratio = mask_ratio + mask_ratio_jitter * U(0,1); MaskDiT: fixed ratio
    mask_ratio_jitter: float = 0.2
    # EDM (MaskDiT)
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    mae_loss_coef: float = 0.1
    mask_ratio_fn: str = "constant"      # MaskDiT's ratio over the run: constant | cosine2..6 | exp | linear
    mask_ratio_min: float = 0.0          #   (its cosine4 unmasking fine-tune: mask_ratio 0.5 -> mask_ratio_min 0)
    # transport (SiT, REPA)
    path_type: str = "Linear"            # Linear | GVP | VP (REPA: Linear = its 'linear', GVP = its 'cosine')
    prediction: str = "velocity"         # velocity | noise | score
    loss_weight: Optional[str] = None    # None | velocity | likelihood
    train_eps: Optional[float] = None    # SiT: t in [eps, 1 - eps]; None: SiT's (VP 1e-5, noise/score 1e-3;
    sample_eps: Optional[float] = None   #   Linear/GVP velocity: 0, where SiT ignores a given eps: refused here)
    # REPA
    proj_coeff: float = 0.5
    weighting: str = "uniform"           # REPA's time sampling: uniform | lognormal
    encoder: str = "none"                # none (features come with the batch as 'zs') | patches (clean patches; tests/digits)
    #                                      | DINOv2 (pixel data): dinov2-vit-b, dinov2reg-vit-l, hub id, folder, a list


@dataclass
class OptimConfig:
    name: str = "adamw"                  # adamw | adan
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)          # adan: three betas
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0               # max grad norm; 0 disables clipping (Adan: with its eps, as sail-sg/Adan)
    warmup_steps: int = 0
    ema_decay: float = 0.9999


@dataclass
class TrainConfig:
    steps: int = 400_000
    global_batch: int = 256
    micro_batch: Optional[int] = None    # per-rank batch per forward; None: global_batch / world
    log_every: int = 100
    sample_every: int = 10_000
    ckpt_every: int = 10_000
    keep_last: int = 2
    peak_tflops: Optional[float] = None  # MFU denominator; None: from the GPU name table
    device: str = "auto"                 # auto | cpu | cuda
    progress: bool = True                # tqdm bar on rank 0
    max_nonfinite_steps: int = 5         # non-finite loss/grad steps are skipped; this many in a row stop the run


@dataclass
class ParallelConfig:
    mode: str = "ddp"                    # ddp | fsdp
    compile: bool = False                # torch.compile each transformer block
    compile_mode: str = "default"        # default | max-autotune-no-cudagraphs (Inductor autotunes GEMMs,
                                         # Triton GEMM templates can take elementwise epilogues; longer compile)
    activation_checkpointing: bool = False
    precision: str = "fp32"              # fp32 | bf16 (autocast; FSDP: bf16 params, fp32 grad reduce)
    tf32: bool = True


@dataclass
class SampleConfig:
    sampler: str = "auto"                # auto | ddpm | ddim | heun | euler | ode | sde
    steps: int = 250
    cfg_scale: float = 1.0
    scale_pow: float = 4.0               # MDTv2 power-cosine guidance schedule (0: constant scale)
    num_per_class: int = 8               # grid: rows of classes
    grid_classes: Optional[list] = None  # None: 0..9 (or the first 10 classes)
    guidance_low: float = 0.0            # REPA guidance interval [low, high] of t
    guidance_high: float = 1.0
    seed: int = 0                        # fixed noise and labels of the grid
    eval_num: int = 200                  # digits: samples scored by the offline metric (0: off)
    # DiT / MDT (objective.kind=adm | mdtv2): ADM's DDIM stochasticity (sampler ddim; 0 deterministic, 1 DDPM's variance)
    eta: float = 0.0
    # SiT (objective.kind=transport), as SiT's sample.py ODE / SDE options (checked by sample_settings.check_sit_sampling)
    ode_method: str = "dopri5"           # sampler ode: dopri5 | euler | midpoint | heun | a torchdiffeq method
    atol: float = 1e-6                   # dopri5 / adaptive torchdiffeq tolerances
    rtol: float = 1e-3
    sde_method: str = "Euler"            # sampler sde: Euler | Heun
    diffusion_form: str = "sigma"        # constant | SBDM | sigma | linear | decreasing | increasing-decreasing
    diffusion_norm: float = 1.0
    last_step: Optional[str] = "Mean"    # Mean | Tweedie | Euler | None
    last_step_size: float = 0.04
    # MaskDiT (objective.kind=edm_maskdit), as MaskDiT's / EDM's sample.py (checked by sample_settings.check_edm_sampling);
    # sampler heun | euler is EDM's solver; a discretization / schedule / scaling other than EDM's is its ablation sampler
    S_churn: float = 0.0                 # stochasticity: noise levels in [S_min, S_max] raised by min(S_churn/steps, sqrt2-1)
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    sigma_min: Optional[float] = None    # None: the discretization's (edm, iddpm 0.002; ve 0.02; vp sigma(1e-3))
    sigma_max: Optional[float] = None    # None: the discretization's (edm 80, iddpm 81, ve 100, vp sigma(1))
    rho: float = 7.0                     # Karras grid exponent (discretization edm)
    discretization: str = "edm"          # noise levels of the grid: edm | vp | ve | iddpm
    schedule: str = "linear"             # sigma(t): linear | vp | ve
    scaling: str = "none"                # s(t): none | vp


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    preset: str = ""

    # ---- serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        # write-then-rename: a run killed mid-write never leaves a truncated config.json
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object of sections (got {type(d).__name__})")
        for section, values in d.items():
            if section == "preset":
                cfg.preset = values
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"section {section!r} must be an object of key: value (got {type(values).__name__})")
            for key, value in values.items():
                _set(cfg, section, key, value)
        validate(cfg)
        return cfg

    @classmethod
    def load(cls, path) -> "Config":
        """Reads a config.json; errors name the file."""
        path = Path(path)
        if path.is_dir():  # was "does not exist"
            raise ConfigError(f"config file {path} is a folder; name the JSON file (e.g. {path / 'config.json'})")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of sections (got {type(d).__name__})")
        try:
            return cls.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None


def config_changes(old: dict, new: dict, ignore=("run.resume", "train.steps")) -> list[str]:
    """'section.key old -> new' for each setting that differs between two config dicts (a run's saved
    config.json and the one it is resumed with), ``ignore`` left out (resuming and extending)."""
    flat = lambda d: {f"{s}.{k}": v for s, vs in d.items() if isinstance(vs, dict) for k, v in vs.items()}  # noqa: E731
    a, b = flat(old), flat(new)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in ignore and a.get(k) != b.get(k)]


#################################################################################
#                             Choices and validation                            #
#################################################################################

CHOICES = {
    ("data", "source"): ("digits", "folder", "latents"),
    ("data", "on_bad_image"): ("stop", "skip"),
    ("objective", "kind"): ("adm", "mdtv2", "transport", "edm_maskdit", "repa"),
    ("objective", "noise_schedule"): ("linear", "squaredcos_cap_v2"),
    ("objective", "path_type"): ("Linear", "GVP", "VP"),
    ("objective", "prediction"): ("velocity", "noise", "score"),
    ("objective", "loss_weight"): (None, "velocity", "likelihood"),
    ("objective", "weighting"): ("uniform", "lognormal"),
    ("optim", "name"): ("adamw", "adan"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("parallel", "mode"): ("ddp", "fsdp"),
    ("parallel", "precision"): ("fp32", "bf16"),
    # no CUDA-graph modes: per-block graphs under FSDP/DDP hooks and AC recompute are not capturable
    ("parallel", "compile_mode"): ("default", "max-autotune-no-cudagraphs"),
    ("sample", "sampler"): ("auto", "ddpm", "ddim", "heun", "euler", "ode", "sde"),
    ("sample", "discretization"): ("edm", "vp", "ve", "iddpm"),
    ("sample", "schedule"): ("linear", "vp", "ve"),
    ("sample", "scaling"): ("none", "vp"),
}


def is_folder_name(name) -> bool:
    """Whether ``name`` names one folder inside another (not empty, '.', '..' or a path): a run's or a
    feature set's folder must stay where it is looked for."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name


def validate(cfg: Config) -> None:
    for (section, key), valid in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in valid:
            raise ConfigError(f"--{section}.{key}={value!r} is not valid; choose one of: "
                              + ", ".join(str(v) for v in valid))
    positive = [("train", "steps"), ("train", "global_batch"), ("train", "log_every"), ("train", "sample_every"),
                ("train", "max_nonfinite_steps"),
                ("train", "ckpt_every"), ("train", "keep_last"), ("model", "input_size"), ("model", "in_channels"),
                ("sample", "steps"), ("objective", "diffusion_steps")]
    for section, key in positive:
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"--{section}.{key} must be > 0 (got {getattr(getattr(cfg, section), key)})")
    if cfg.train.micro_batch is not None and cfg.train.micro_batch <= 0:
        raise ConfigError(f"--train.micro_batch must be > 0, or none for global_batch / world size "
                          f"(got {cfg.train.micro_batch})")
    if not is_folder_name(cfg.run.name):
        raise ConfigError(f"--run.name={cfg.run.name!r} must be one folder name (the run goes to <out_dir>/<name>)")
    _validate_model(cfg)
    if not (math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0):
        raise ConfigError(f"--optim.lr must be a finite number > 0 (got {cfg.optim.lr})")
    for key in ("weight_decay", "grad_clip"):
        value = getattr(cfg.optim, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--optim.{key} must be a finite number >= 0 (got {value})")
    if cfg.data.min_image_size is not None and cfg.data.min_image_size < 0:
        raise ConfigError(f"--data.min_image_size must be >= 0, or none for --data.image_size (got "
                          f"{cfg.data.min_image_size})")
    for section, key in (("data", "num_workers"), ("optim", "warmup_steps"), ("sample", "eval_num")):
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"--{section}.{key} must be >= 0 (got {getattr(getattr(cfg, section), key)})")
    if not (math.isfinite(cfg.data.latent_scale) and cfg.data.latent_scale > 0):
        raise ConfigError(f"--data.latent_scale must be a finite number > 0 (got {cfg.data.latent_scale})")
    _validate_sample(cfg)
    from masked_dit.rng import check_seed

    for section in ("run", "sample"):
        try:
            check_seed(getattr(cfg, section).seed, f"--{section}.seed")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"--optim.ema_decay must be in [0, 1) (got {cfg.optim.ema_decay})")
    n_betas = 3 if cfg.optim.name == "adan" else 2
    if len(cfg.optim.betas) != n_betas:
        raise ConfigError(f"--optim.betas needs {n_betas} values for {cfg.optim.name} (got {list(cfg.optim.betas)})")
    if not 0 <= cfg.objective.mask_ratio < 1:
        raise ConfigError(f"--objective.mask_ratio must be in [0, 1) (got {cfg.objective.mask_ratio})")
    if cfg.train.peak_tflops is not None and not (math.isfinite(cfg.train.peak_tflops) and cfg.train.peak_tflops > 0):
        raise ConfigError(f"--train.peak_tflops must be a finite number > 0 (the GPU's peak, for MFU), or none for "
                          f"the GPU name table (got {cfg.train.peak_tflops})")
    _validate_loss_terms(cfg.objective)

    _validate_encoder(cfg.objective.encoder)
    _validate_transport_eps(cfg.objective)
    _validate_mask_ratio_schedule(cfg.objective)
    if cfg.objective.kind == "repa":  # REPA has no VP path
        from masked_dit.diffusion.repa import repa_path_name

        try:
            repa_path_name(cfg.objective.path_type)
        except ValueError:
            raise ConfigError(f"--objective.path_type={cfg.objective.path_type} is not one of REPA's paths: choose "
                              f"Linear (REPA's linear) or GVP (REPA's cosine)") from None
    if cfg.data.features and cfg.data.source != "latents":
        raise ConfigError(f"--data.features={cfg.data.features!r} reads features cached beside extracted latents; "
                          f"it needs --data.source=latents (got {cfg.data.source!r})")
    if cfg.data.features and (cfg.objective.kind != "repa" or cfg.objective.encoder != "none"):
        raise ConfigError(f"--data.features={cfg.data.features!r} gives REPA its features: it needs "
                          f"--objective.kind=repa --objective.encoder=none (got {cfg.objective.kind}, "
                          f"{cfg.objective.encoder})")


def _validate_model(cfg: Config) -> None:
    """Sizes and labels the model constructors would otherwise reject with a ZeroDivisionError or an
    out-of-range label deep inside a step."""
    mc = cfg.model
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        value = getattr(mc, key)
        if value is not None and value <= 0:
            raise ConfigError(f"--model.{key} must be > 0, or none for the registry's value (got {value})")
    # MaskDiT alone has an unconditional (num_classes=0) form; the others embed at least one class.
    least = 0 if cfg.objective.kind == "edm_maskdit" else 1
    if mc.num_classes < least:
        raise ConfigError(f"--model.num_classes must be >= {least} for --objective.kind={cfg.objective.kind} "
                          f"(got {mc.num_classes})")
    if not 0 <= mc.class_dropout_prob <= 1:
        raise ConfigError(f"--model.class_dropout_prob must be in [0, 1] (got {mc.class_dropout_prob})")


GUIDANCE_KEYS = ("cfg_scale", "scale_pow", "guidance_low", "guidance_high")
SIT_SAMPLE_KEYS = ("ode_method", "atol", "rtol", "sde_method", "diffusion_form", "diffusion_norm", "last_step",
                   "last_step_size")
EDM_SAMPLE_KEYS = ("S_churn", "S_min", "S_max", "S_noise", "sigma_min", "sigma_max", "rho", "discretization",
                   "schedule", "scaling")
ADM_SAMPLE_KEYS = ("eta",)
# The sampler options each objective kind reads beside the shared ones; any other kind refuses them.
FAMILY_SAMPLE_KEYS = {"adm": ADM_SAMPLE_KEYS, "mdtv2": ADM_SAMPLE_KEYS, "transport": SIT_SAMPLE_KEYS,
                      "edm_maskdit": EDM_SAMPLE_KEYS}
SAMPLE_FAMILY = {"adm": "DiT/MDT", "mdtv2": "DiT/MDT", "transport": "SiT", "edm_maskdit": "MaskDiT"}
FAMILY_ONLY_SAMPLE_KEYS = tuple(dict.fromkeys(k for keys in FAMILY_SAMPLE_KEYS.values() for k in keys))


def foreign_sample_option(kind: str, given) -> Optional[tuple]:
    """The first option in ``given`` that objective ``kind``'s sampler does not read but another
    family's does, as (key, family, kinds), or None: set there, it would be silently ignored."""
    own = FAMILY_SAMPLE_KEYS.get(kind, ())
    for key in given:
        owners = [k for k, keys in FAMILY_SAMPLE_KEYS.items() if key in keys]
        if owners and key not in own:
            return key, SAMPLE_FAMILY[owners[0]], " or ".join(owners)
    return None


def _validate_loss_terms(oc: ObjectiveConfig) -> None:
    """Numbers every step's loss is made of: a zero, negative or non-finite one makes every step
    non-finite (skipped) or trains on a sign-flipped term, silently."""
    ranges = {"sigma_data": (0.0, False), "P_std": (0.0, True), "min_snr_gamma": (0.0, False),
              "mae_loss_coef": (0.0, True), "proj_coeff": (0.0, True)}
    for key, (low, closed) in ranges.items():
        value = getattr(oc, key)
        if not (math.isfinite(value) and (value >= low if closed else value > low)):
            raise ConfigError(f"--objective.{key} must be a finite number {'>=' if closed else '>'} {low:g} "
                              f"(got {value})")
    if not math.isfinite(oc.P_mean):
        raise ConfigError(f"--objective.P_mean must be a finite number (got {oc.P_mean})")


def check_guidance(values: dict, flag) -> None:
    """Raises ConfigError unless the guidance settings in ``values`` (``GUIDANCE_KEYS``; None: not
    given) make sense; ``flag(key)`` spells the option as the caller's command line does. Shared by
    the training config and ``masked-dit sample``'s overrides."""
    for key, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{flag(key)} must be a finite number (got {value})")
    if values.get("cfg_scale") is not None and values["cfg_scale"] < 0:
        raise ConfigError(f"{flag('cfg_scale')} must be >= 0 (1: no guidance, above 1: toward the class; got "
                          f"{values['cfg_scale']})")
    if values.get("scale_pow") is not None and values["scale_pow"] < 0:
        raise ConfigError(f"{flag('scale_pow')} must be >= 0 (0: constant guidance scale; got {values['scale_pow']})")
    low, high = values.get("guidance_low"), values.get("guidance_high")
    for key, value in (("guidance_low", low), ("guidance_high", high)):
        if value is not None and not 0.0 <= value <= 1.0:  # outside, the interval silently drops or keeps all
            raise ConfigError(f"{flag(key)} must be in [0, 1]: REPA's guidance interval is over the time t in "
                              f"[0, 1] (got {value})")
    if low is not None and high is not None and not low <= high:
        raise ConfigError(f"{flag('guidance_low')}={low} must be <= {flag('guidance_high')}={high} (guidance "
                          f"applies for t in [low, high])")


def _validate_transport_eps(oc: ObjectiveConfig) -> None:
    """SiT's ``--train-eps`` / ``--sample-eps``: the transport kind only, in [0, 0.5), and where SiT reads
    them (a VP path, or noise / score prediction; Linear and GVP velocity models use [0, 1] as they are)."""
    for key in ("train_eps", "sample_eps"):
        value = getattr(oc, key)
        if value is None:
            continue
        if oc.kind != "transport":
            raise ConfigError(f"--objective.{key}={value} is SiT's time cut-off: it applies to --objective.kind="
                              f"transport only (got {oc.kind})")
        if not (math.isfinite(value) and 0 <= value < 0.5):
            raise ConfigError(f"--objective.{key} must be a finite number in [0, 0.5) (got {value})")
        if oc.path_type != "VP" and oc.prediction == "velocity":
            raise ConfigError(f"--objective.{key}={value} is not read for a {oc.path_type} velocity model (SiT trains "
                              f"and samples it on [0, 1] and ignores the cut-off): leave it unset")


def _validate_mask_ratio_schedule(oc: ObjectiveConfig) -> None:
    """MaskDiT's ``mask_ratio_fn`` / ``mask_ratio_min``: a known name, MaskDiT only, min in [0, mask_ratio]."""
    if (oc.mask_ratio_fn, oc.mask_ratio_min) == ("constant", 0.0):
        return
    from masked_dit.nn.masking import MASK_RATIO_FNS  # (imports torch: only for a schedule)

    if oc.mask_ratio_fn not in MASK_RATIO_FNS:
        raise ConfigError(f"--objective.mask_ratio_fn={oc.mask_ratio_fn!r} is not valid; choose one of: "
                          f"{', '.join(MASK_RATIO_FNS)}")
    if oc.kind != "edm_maskdit":
        raise ConfigError(f"--objective.mask_ratio_fn={oc.mask_ratio_fn} / mask_ratio_min is MaskDiT's schedule: "
                          f"it applies to --objective.kind=edm_maskdit only (got {oc.kind})")
    if not (math.isfinite(oc.mask_ratio_min) and 0 <= oc.mask_ratio_min <= oc.mask_ratio):
        raise ConfigError(f"--objective.mask_ratio_min must be in [0, --objective.mask_ratio={oc.mask_ratio}] "
                          f"(got {oc.mask_ratio_min})")


def _validate_sample(cfg: Config) -> None:
    sc = cfg.sample
    if sc.num_per_class <= 0:
        raise ConfigError(f"--sample.num_per_class must be > 0 (got {sc.num_per_class})")
    if sc.grid_classes is not None:
        labels = sc.grid_classes
        if not labels or not all(isinstance(c, int) and not isinstance(c, bool) for c in labels):
            raise ConfigError(f"--sample.grid_classes={labels!r} must be a non-empty list of class labels, "
                              f"e.g. [0,3,7], or none")
        bad = [c for c in labels if not 0 <= c < max(cfg.model.num_classes, 1)]
        if bad:
            raise ConfigError(f"--sample.grid_classes {bad} are outside [0, {cfg.model.num_classes - 1}] "
                              f"(--model.num_classes={cfg.model.num_classes})")
    check_guidance({k: getattr(sc, k) for k in GUIDANCE_KEYS}, lambda key: f"--sample.{key}")
    foreign = foreign_sample_option(cfg.objective.kind, [k for k in FAMILY_ONLY_SAMPLE_KEYS
                                                         if getattr(sc, k) != getattr(SampleConfig, k)])
    if foreign:
        key, family, kinds = foreign
        raise ConfigError(f"--sample.{key}={getattr(sc, key)!r} is a {family} sampler option: it applies to "
                          f"--objective.kind={kinds} only (got {cfg.objective.kind})")
    if sc.cfg_scale != 1 and cfg.objective.kind == "edm_maskdit" and cfg.model.num_classes == 0:
        raise ConfigError(f"--sample.cfg_scale={sc.cfg_scale} guides with class labels, which an unconditional "
                          f"MaskDiT (--model.num_classes=0) lacks: set --sample.cfg_scale=1")
    # Without label dropout the model has no null-class row for the unconditional half of CFG
    # (MaskDiT's null label is the zero one-hot vector, which needs no row).
    if (sc.cfg_scale != 1 and cfg.model.class_dropout_prob == 0 and cfg.objective.kind != "edm_maskdit"
            and cfg.model.num_classes > 0):
        raise ConfigError(f"--sample.cfg_scale={sc.cfg_scale} needs the null class that label dropout trains, but "
                          f"--model.class_dropout_prob=0 leaves it out: set --sample.cfg_scale=1 or "
                          f"--model.class_dropout_prob > 0")


ENCODER_CHOICES = ("none, patches, dinov2-vit-{s,b,l,g}, dinov2reg-vit-{s,b,l,g}, dinov1-vit-b, clip-vit-L, "
                   "mocov3-vit-{s,b,l}, mae-vit-l, jepa-vit-h (NAME:PATH: a local folder, or MoCo v3 checkpoint), "
                   "a hub id (facebook/dinov2-base), a local save_pretrained folder, a timm name "
                   "(vit_base_patch14_dinov2.lvd142m); comma-separated for several encoders")


def _validate_encoder(value: str) -> None:
    """``objective.encoder`` is none, patches, or DINOv2 specs; checked by form only (a missing
    folder is reported when the trainer loads it, so a finished run's config still loads)."""
    if value in ("none", "patches"):
        return
    specs = [s.strip() for s in str(value).split(",")]
    if not all(specs) or any(s in ("none", "patches") for s in specs):
        raise ConfigError(f"--objective.encoder={value!r} is not valid; choose one of: {ENCODER_CHOICES}")
    from masked_dit.data.encoders import resolve_encoder

    for spec in specs:
        try:
            resolve_encoder(spec)
        except FileNotFoundError:
            pass
        except ValueError as exc:
            raise ConfigError(f"--objective.encoder={value!r} is not valid ({exc}); choose one of: "
                              f"{ENCODER_CHOICES}") from None


#################################################################################
#                                   Overrides                                   #
#################################################################################

def _fields(obj) -> dict:
    return {f.name: f for f in dataclasses.fields(obj)}


def _coerce(section: str, key: str, hint, value):
    """Converts ``value`` (a string from the command line, or a JSON value) to the field's type."""
    where = f"--{section}.{key}"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin is typing.Union and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                value = value.replace("_", "")
                try:
                    return int(value)  # exact: through float, 9999999999999999999999 became 1e22
                except ValueError:
                    f = float(value)  # "1e6"
                if f != int(f):
                    raise ValueError
                return int(f)
            if isinstance(value, float) and value != int(value):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):  # JSON null: was 'None'
                raise ValueError
            return str(value)
        if hint in (tuple, list) or origin in (tuple, list):
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            seq = [float(v) if hint is tuple else (int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v) for v in value]
            return tuple(seq) if hint is tuple else list(seq)
        if hint is dict or origin is dict:
            return dict(json.loads(value) if isinstance(value, str) else value)
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):  # OverflowError: int(inf)
        pass
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where}={value!r} is not a valid {name}")


def _set(cfg: Config, section: str, key: str, value) -> None:
    sections = {n: f for n, f in _fields(cfg).items() if n != "preset"}
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(sections)}")
    sub = getattr(cfg, section)
    fields = _fields(sub)
    if key not in fields:
        raise ConfigError(f"unknown key --{section}.{key}; valid keys of {section}: {', '.join(fields)}")
    hints = typing.get_type_hints(type(sub))
    setattr(sub, key, _coerce(section, key, hints[key], value))


def apply_overrides(cfg: Config, overrides) -> Config:
    """Applies ``--section.key=value`` strings (or ``{'section.key': value}``) to a copy of ``cfg``."""
    cfg = dataclasses.replace(cfg, **{n: dataclasses.replace(getattr(cfg, n)) for n in _fields(cfg) if n != "preset"})
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for dotted, value in items:
        if "." not in dotted:
            raise ConfigError(f"override {dotted!r} must look like --section.key=value; sections: "
                              + ", ".join(n for n in _fields(cfg) if n != "preset"))
        section, key = dotted.split(".", 1)
        _set(cfg, section, key, value)
    validate(cfg)
    return cfg


def _split(arg: str):
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"cannot parse {arg!r}: overrides look like --section.key=value")
    dotted, value = arg[2:].split("=", 1)
    return dotted, value


from masked_dit.configs.presets import PRESETS, get_preset  # noqa: E402  (presets build on the classes above)

__all__ = ["Config", "ConfigError", "RunConfig", "ModelConfig", "DataConfig", "ObjectiveConfig", "OptimConfig",
           "TrainConfig", "ParallelConfig", "SampleConfig", "PRESETS", "get_preset", "apply_overrides", "validate"]
