"""Command line: ``masked-dit {train,sample,likelihood,extract-latents,extract-features,eval,info}`` (or ``python -m masked_dit``).

    masked-dit train                                  # the embedded default: MDTv2 on digits, CPU, minutes
    masked-dit train --preset digits-dit --optim.lr=5e-4 --train.steps=2000
    masked-dit train --preset imagenet256-mdtv2-xl2 --data.path=latents/ --run.resume=latest
    masked-dit sample runs/digits-mdtv2 --out grid.png
    masked-dit sample DiT-XL-2-256x256.pt --model DiT-XL/2 --num-samples 50000 --out samples.npz --vae stabilityai/sd-vae-ft-ema
    masked-dit likelihood runs/digits-sit --out nll.json      # bits/dim of the held-out digits (SiT, REPA-SiT)
    masked-dit extract-latents /data/imagenet/train latents/ --flip
    masked-dit extract-features /data/imagenet/train latents/ --encoder dinov2-vit-b  # --data.features=dinov2-vit-b
    masked-dit eval VIRTUAL_imagenet256_labeled.npz samples.npz --out metrics.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


#################################################################################
#                                    train                                      #
#################################################################################

def _train(args, overrides: list[str]) -> int:
    from masked_dit.configs import PRESETS, Config, apply_overrides, get_preset
    from masked_dit.configs.presets import DEFAULT_PRESET

    if args.list_presets:
        print("\n".join(PRESETS))
        return 0
    if args.config and args.preset:  # one would be silently ignored
        raise ValueError(f"--config {args.config} and --preset {args.preset} exclude each other; a config file "
                         "holds a whole config (override fields with --section.key=value)")
    cfg = Config.load(args.config) if args.config else get_preset(args.preset or DEFAULT_PRESET)
    if args.config:
        cfg.preset = cfg.preset or Path(args.config).stem
    if args.resume:
        overrides = overrides + [f"--run.resume={args.resume}"]
    cfg = apply_overrides(cfg, overrides)
    _say_pinned_sizes(cfg, overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from masked_dit.train import train

    result = train(cfg)
    if result.get("run_dir"):
        print(f"run folder: {result['run_dir']}")
    return 0


def _say_pinned_sizes(cfg, overrides: list[str]) -> None:
    """``--model.name`` picks the family; sizes the preset (or config file) pins stay unless given too:
    say so where they are not the name's (``--model.name=DiT-B/8`` on a digits preset trains width 96)."""
    from masked_dit.models.registry import MODEL_CONFIGS
    from masked_dit.train.dist import is_other_rank

    given = {o[2:].split("=", 1)[0] for o in overrides if o.startswith("--")}
    named = MODEL_CONFIGS.get(cfg.model.name, (None, {}))[1]
    if "model.name" not in given or is_other_rank():
        return
    kept = [f"{k}={getattr(cfg.model, k)} (the name's {named[k]})" for k in ("depth", "hidden_size", "num_heads",
                                                                            "patch_size")
            if f"model.{k}" not in given and k in named and getattr(cfg.model, k) not in (None, named[k])]
    if kept:
        print(f"masked-dit train: warning: --model.name={cfg.model.name} keeps {cfg.preset or 'the config'}'s model "
              f"{', '.join(kept)}: pass --model.<key>=none for the name's", file=sys.stderr)


#################################################################################
#                                    sample                                     #
#################################################################################

def _load_for_sampling(args):
    """(model, Config) from a run folder / export folder, or an official checkpoint with --model."""
    from masked_dit.configs import Config, get_preset
    from masked_dit.models import load_official
    from masked_dit.models.official import load_official_with_args
    from masked_dit.train import checkpoint as ckpt

    src = Path(args.source)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    official_only = [f for f, v in (("--model", args.model), ("--model-kwargs", args.model_kwargs),
                                    ("--path-type", args.path_type), ("--prediction", args.prediction)) if v]
    if src.is_dir() and official_only:  # were silently ignored
        raise ValueError(f"{' / '.join(official_only)} describe{'s' if len(official_only) == 1 else ''} an official "
                         f"checkpoint file; the folder {src} brings its own model config: leave "
                         f"{'it' if len(official_only) == 1 else 'them'} out")
    if src.is_dir():
        export = src / "export" if (src / "export" / "config.json").exists() else src
        info = {}
        if (export / "config.json").exists():
            try:
                info = json.loads((export / "config.json").read_text())
            except ValueError as exc:
                raise ValueError(f"{export / 'config.json'} is not valid JSON ({exc})") from None
        if "model_kwargs" not in info:  # not an export: a checkpoint folder or an unfinished run
            return _load_checkpoint_ema(src)
        if export != src and (newer := _checkpoint_past_export(src, info)) is not None:
            # a finished run extended (--train.steps) and stopped: its export is the old end's weights
            print(f"masked-dit {args.command}: {src}: checkpoint step {ckpt.checkpoint_step(newer)} is past the "
                  f"export's step {_export_step(info)}: sampling the checkpoint's EMA", file=sys.stderr)
            return _load_checkpoint_ema(newer)
        model = load_official(export / "ema.safetensors", info["model"], **info["model_kwargs"])
        cfg = Config.from_dict(info["run_config"]) if "run_config" in info else get_preset()
        return model, cfg
    if not args.model:
        raise ValueError("sampling an official checkpoint needs --model NAME (e.g. DiT-XL/2, MDTv2-XL/2)")
    try:
        overrides = json.loads(args.model_kwargs or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-kwargs {args.model_kwargs!r} is not valid JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--model-kwargs must be a JSON object of constructor arguments, e.g. "
                         f"'{{\"num_classes\": 10}}' (got {type(overrides).__name__})")
    _check_transport_flags(args)  # before reading the file (an XL training dict: gigabytes)
    try:
        model, saved_args = load_official_with_args(src, args.model, **overrides)
    except TypeError as exc:  # an argument the constructor does not take
        raise ValueError(f"--model-kwargs: cannot build {args.model} ({exc})") from None
    family = getattr(model, "family", "")
    preset = {"dit": "imagenet256-dit-xl2", "sit": "imagenet256-sit-xl2", "repa_sit": "imagenet256-repa-sit-xl2",
              "mdtv2": "imagenet256-mdtv2-xl2", "mdtv1": "imagenet256-mdtv2-xl2",
              "maskdit": "imagenet256-maskdit-xl2"}.get(family, "imagenet256-dit-xl2")
    cfg = get_preset(preset)
    cfg.model.num_classes = getattr(model, "num_classes", cfg.model.num_classes)
    cfg.model.in_channels = getattr(model, "in_channels", getattr(model, "img_channels", 4))
    cfg.model.input_size = getattr(model, "input_size", getattr(model, "img_resolution", cfg.model.input_size))
    cfg.data.source = "latents" if cfg.model.in_channels == 4 else "digits"  # pixel models clip to [-1, 1]
    _set_transport(cfg, args, saved_args, family, src)
    return model, cfg


def _set_transport(cfg, args, saved_args, family: str, src: Path) -> None:
    """The interpolant an official SiT / REPA file was trained with: its saved args (SiT's and REPA's
    train.py save them), then --path-type / --prediction as SiT's sample.py takes them (bare state dicts)."""
    from masked_dit.configs import ConfigError, _validate_transport_eps
    from masked_dit.models.official import saved_transport

    given = _transport_flags(args)
    saved = saved_transport(saved_args, family, src)
    changed = {k: (saved[k], v) for k, v in given.items() if k in saved and saved[k] != v}
    if changed:
        print(f"masked-dit {args.command}: {src} was trained with "
              f"{', '.join(f'{k}={old}' for k, (old, _) in changed.items())}; sampling with "
              f"{', '.join(f'{k}={new}' for k, (_, new) in changed.items())} as given", file=sys.stderr)
    for key, value in {**saved, **given}.items():
        setattr(cfg.objective, key, value)
    if "path_type" in given or "prediction" in given:  # cut-offs saved for another interpolant do not apply
        if cfg.objective.path_type != "VP" and cfg.objective.prediction == "velocity":
            cfg.objective.train_eps = cfg.objective.sample_eps = None
    try:  # the cut-offs only: the rest of the preset's config is not this file's
        _validate_transport_eps(cfg.objective)
    except ConfigError as exc:
        raise ValueError(f"{src}: {exc}") from None


def _transport_flags(args) -> dict:
    """--path-type / --prediction as given (None: left out)."""
    return {k: getattr(args, k) for k in ("path_type", "prediction") if getattr(args, k) is not None}


def _check_transport_flags(args) -> None:
    """--path-type / --prediction name a SiT or REPA interpolant: refused for other models."""
    from masked_dit.models.registry import MODEL_CONFIGS

    family = MODEL_CONFIGS.get(args.model, ("",))[0]
    given = _transport_flags(args)
    if given and family not in ("sit", "repa_sit"):
        raise ValueError(f"--{next(iter(given)).replace('_', '-')} is a SiT / REPA interpolant option: {args.model} "
                         f"is not one")
    if given.get("prediction", "velocity") != "velocity" and family == "repa_sit":
        raise ValueError(f"--prediction {given['prediction']}: REPA models predict the velocity only")
    if given.get("path_type", "Linear") == "VP" and family == "repa_sit":
        raise ValueError("--path-type VP: REPA's paths are Linear (its 'linear') and GVP (its 'cosine')")


def _transport_settings(cfg, args) -> dict | None:
    """A parts folder's record of an official SiT / REPA file's interpolant when not SiT's default (Linear
    velocity): samples of another interpolant must not be mixed in; folders of before (no entry) read as the
    default. A run folder's interpolant is its config's, fixed with its weights: not recorded."""
    oc = cfg.objective
    if not args.model or oc.kind not in ("transport", "repa"):
        return None
    keys = {"path_type": "Linear", "prediction": "velocity", "train_eps": None, "sample_eps": None}
    changed = {k: getattr(oc, k) for k, default in keys.items() if getattr(oc, k) != default}
    return changed or None


def _export_step(info: dict) -> int | None:
    """The step an export was written at (exports before it was recorded: the end of their run)."""
    step = info.get("step", (info.get("run_config") or {}).get("train", {}).get("steps"))
    return step if type(step) is int else None


def _checkpoint_past_export(run_dir: Path, info: dict) -> Path | None:
    """The run's newest checkpoint folder when its step is past its export's, else None."""
    from masked_dit.train import checkpoint as ckpt

    found, exported = ckpt.list_checkpoints(run_dir / "checkpoints"), _export_step(info)
    return found[-1] if found and exported is not None and ckpt.checkpoint_step(found[-1]) > exported else None


def _load_checkpoint_ema(src: Path):
    """(EMA model, Config) from a checkpoint folder or the newest checkpoint of an unfinished run."""
    from masked_dit.configs import Config
    from masked_dit.train import checkpoint as ckpt
    from masked_dit.train.build import build_model_from_config, model_kwargs
    from masked_dit.train.warm_start import initial_weights

    is_checkpoint = (src / "meta.json").exists()
    run_dir = src.parent.parent if is_checkpoint else src
    found = [src] if is_checkpoint else ckpt.list_checkpoints(src / "checkpoints")
    if not found or not (run_dir / "config.json").exists():
        raise ValueError(f"{src} is not a run folder (no export/config.json, no complete checkpoint with the run's "
                         f"config.json): train first")
    cfg = Config.load(run_dir / "config.json")
    model = build_model_from_config(cfg)
    _, ema = initial_weights(str(found[-1]), model, model_kwargs(cfg)[0], ema_only=True)  # not the raw weights
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in ema.items()})
    return model.eval(), cfg


def _sample(args, _overrides) -> int:
    import torch

    from masked_dit.configs import (ADM_SAMPLE_KEYS, FAMILY_ONLY_SAMPLE_KEYS, FAMILY_SAMPLE_KEYS, GUIDANCE_KEYS,
                                    check_guidance, foreign_sample_option)
    from masked_dit.diffusion.objectives import build_objective
    from masked_dit.diffusion.sample_settings import check_family_sampling, check_options_read, check_sample_steps
    from masked_dit.eval.generate import generate_npz, sample_batch, sample_labels, weights_fingerprint
    from masked_dit.rng import check_seed
    from masked_dit.train.dist import init_world, shutdown
    from masked_dit.train.grid import grid_labels, save_grid

    out = Path(args.out)
    if out.suffix not in (".npz", ".png"):
        raise ValueError(f"--out {out}: must end in .npz (samples for FID) or .png (a grid)")
    _check_positive(args, "batch_size", "steps", "per_class")
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num-samples must be >= 1 (got {args.num})")
    # each output reads one of the two counts: the other, given, would be silently ignored
    if out.suffix == ".png" and args.num is not None:
        raise ValueError(f"--num-samples is read for .npz output; the grid --out {out} has --per-class columns "
                         "per class: use --per-class")
    if out.suffix == ".npz" and args.per_class is not None:
        raise ValueError(f"--per-class sets the columns of a .png grid; the .npz --out {out} holds --num-samples "
                         "samples: use --num-samples")
    num, per_class = args.num or 50_000, args.per_class or 8
    check_seed(args.seed, "--seed")
    flag = lambda key: "--" + key.replace("_", "-")  # noqa: E731
    check_guidance({k: getattr(args, k) for k in GUIDANCE_KEYS}, flag)  # before the model loads
    if args.classes == []:
        raise ValueError("--classes needs at least one class label (or leave it out)")
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a file ending in .npz or .png")
    _check_out_outside(out, Path(args.source))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    model, cfg = _load_for_sampling(args)
    world = init_world(args.device)
    try:
        if out.suffix == ".png" and world.distributed:
            raise ValueError("a .png grid is sampled by one process; under torchrun write an .npz")
        # .npz parts only; on the host, before compile: the same digest on every rank
        weights = weights_fingerprint(model) if out.suffix == ".npz" else None
        model = model.to(world.device).eval()
        if args.compile:
            from masked_dit.train.parallel import apply_compile
            apply_compile(model)
        objective = build_objective(cfg.objective, model, pixel_space=cfg.data.source != "latents" and not args.vae)
        sc = cfg.sample
        kw = dict(sampler=args.sampler or sc.sampler, steps=sc.steps if args.steps is None else args.steps,
                  cfg_scale=sc.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                  scale_pow=sc.scale_pow if args.scale_pow is None else args.scale_pow,
                  guidance_low=sc.guidance_low if args.guidance_low is None else args.guidance_low,
                  guidance_high=sc.guidance_high if args.guidance_high is None else args.guidance_high)
        check_guidance({k: kw[k] for k in GUIDANCE_KEYS}, flag)  # one given, one from the run's config
        if kw["sampler"] != "auto" and kw["sampler"] not in objective.samplers:  # before any option it reads
            raise ValueError(f"--sampler {kw['sampler']} does not apply to objective {cfg.objective.kind}; choose "
                             f"one of: {', '.join(objective.samplers)}")
        check_sample_steps(cfg.objective.kind, kw["sampler"], kw["steps"], cfg.objective.diffusion_steps,
                           f"--steps {kw['steps']}")
        kind = cfg.objective.kind
        foreign = foreign_sample_option(kind, [k for k in FAMILY_ONLY_SAMPLE_KEYS if getattr(args, k) is not None])
        if foreign:  # one family's options would be ignored by the others
            key, family, _ = foreign
            raise ValueError(f"{flag(key)} is a {family} sampler option: it applies to {family} models "
                             f"(objective {kind})")
        keys = FAMILY_SAMPLE_KEYS.get(kind, ())
        given = [k for k in keys if getattr(args, k) is not None]
        kw.update({k: getattr(sc, k) if getattr(args, k) is None else getattr(args, k) for k in keys})
        if kw.get("last_step") == "None":  # given as None (no last step), not left out: argparse kept the word
            kw["last_step"] = None
        if keys is ADM_SAMPLE_KEYS and kw["sampler"] != "ddim":
            kw["eta"] = 0.0  # the run's DDIM eta, not given here: DDPM has none
        check_family_sampling(cfg.objective, kw["sampler"], kw["steps"], {k: kw[k] for k in keys}, given, flag,
                              lambda key: f"{flag(key)} {kw[key]}")
        check_options_read(kind, kw, given + [k for k in GUIDANCE_KEYS if getattr(args, k) is not None], flag)
        if cfg.model.num_classes == 0:  # unconditional: nothing to guide (the run's grid default is moot)
            if args.cfg_scale not in (None, 1):
                raise ValueError(f"--cfg-scale {args.cfg_scale}: the model is unconditional (num_classes=0), there is "
                                 f"nothing to guide: leave it out")
            kw["cfg_scale"] = 1.0
        if kw["cfg_scale"] != 1 and not _has_null_class(model):
            raise ValueError(f"--cfg-scale {kw['cfg_scale']} needs a null class, which this model lacks (trained "
                             f"with class_dropout_prob=0): sample with --cfg-scale 1")
        if world.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
        autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                    else torch.autocast(world.device.type, enabled=False))

        def draw(noise, y, generator):
            with autocast:
                return objective.sample(model, noise, y, generator=generator, **kw)

        vae = None
        if args.vae:
            from masked_dit.data.latents import load_vae
            vae = load_vae(args.vae, str(world.device))
            latent_channels = getattr(getattr(vae, "config", None), "latent_channels", cfg.model.in_channels)
            if latent_channels != cfg.model.in_channels:
                raise ValueError(f"--vae {args.vae} decodes {latent_channels}-channel latents but the model samples "
                                 f"{cfg.model.in_channels}-channel images; leave --vae out for a pixel-space model")

        def decode(x):
            with torch.no_grad():
                return vae.decode(x.float() / cfg.data.latent_scale).sample

        shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        if out.suffix == ".npz":
            labels = sample_labels(num, cfg.model.num_classes, args.seed, args.classes)
            settings = dict(source=str(Path(args.source).resolve()), model=args.model, weights=weights,
                            model_kwargs=_model_kwargs(args), transport=_transport_settings(cfg, args),
                            vae=args.vae, precision=args.precision, classes=args.classes, **kw)
            n = generate_npz(draw, labels, out, shape=shape, batch_size=args.batch_size, seed=args.seed,
                             settings=settings, world=world, decode=decode if vae else None)
            if n is not None:
                print(f"wrote {out} ({n} samples)")
                if cfg.data.source == "latents" and not args.vae:
                    print(f"masked-dit sample: warning: {out} holds latent channels 0-2 as images, not decoded "
                          "images: pass --vae (e.g. stabilityai/sd-vae-ft-ema) for FID", file=sys.stderr)
            return 0
        labels = grid_labels(cfg.model.num_classes, per_class, args.classes)
        images = [sample_batch(draw, labels[i:i + args.batch_size].to(world.device), shape, args.seed,
                               i // args.batch_size, decode if vae else None) for i in range(0, len(labels), args.batch_size)]
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(torch.cat(images), labels, out, per_row=per_class)
        print(f"wrote {out} ({len(labels)} samples)")
        return 0
    finally:
        shutdown(world)


#################################################################################
#                                  likelihood                                   #
#################################################################################

def _likelihood(args, _overrides) -> int:
    import torch

    from masked_dit.configs import SIT_SAMPLE_KEYS
    from masked_dit.data.shards import write_json_atomic
    from masked_dit.diffusion.objectives import build_objective
    from masked_dit.diffusion.sample_settings import check_options_read, check_sit_sampling
    from masked_dit.eval.generate import PartsFolder, weights_fingerprint
    from masked_dit.eval.nll import likelihood_data, score_batches, summarize
    from masked_dit.rng import check_seed
    from masked_dit.train.dist import init_world, shutdown

    out = Path(args.out)
    if out.suffix != ".json":
        raise ValueError(f"--out {out}: must end in .json")
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a file ending in .json")
    _check_positive(args, "batch_size")
    check_seed(args.seed, "--seed")
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num-samples must be >= 1 (got {args.num})")
    if args.steps < 2:
        raise ValueError(f"--steps {args.steps}: the ODE grid needs at least 2 time points (both ends included)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    _check_out_outside(out, Path(args.source))
    model, cfg = _load_for_sampling(args)
    if cfg.objective.kind not in ("transport", "repa"):
        raise ValueError(f"{args.source}: the probability-flow likelihood is SiT's (objective transport or repa); "
                         f"this model's objective is {cfg.objective.kind}")
    if not Path(args.source).is_dir():  # an official checkpoint: latents given here, or none
        cfg.data.source, cfg.data.path = "latents", ""
    if args.data_path:  # the run's kind of data (a folder run: images), else latents
        cfg.data.source = "latents" if cfg.data.source == "digits" else cfg.data.source
        cfg.data.path = args.data_path
    if cfg.data.source != "digits" and not cfg.data.path:
        raise ValueError(f"{args.source} names no data to score: pass --data-path (latents made by "
                         f"`masked-dit extract-latents`)")
    options = {k: getattr(cfg.sample, k) for k in SIT_SAMPLE_KEYS}
    options.update({k: getattr(args, k) for k in ("ode_method", "atol", "rtol") if getattr(args, k) is not None})
    check_sit_sampling(cfg.objective, "ode", options, lambda key: f"--{key.replace('_', '-')} {options[key]}")
    check_options_read("transport", options, [k for k in ("atol", "rtol") if getattr(args, k) is not None],
                       lambda key: "--" + key)
    dataset, what = likelihood_data(cfg.data, cfg.model, args.split)
    num = len(dataset) if args.num is None else min(args.num, len(dataset))
    if num == 0:
        raise ValueError(f"{what}: no items to score")
    settings = dict(source=str(Path(args.source).resolve()), model=args.model, weights=weights_fingerprint(model),
                    model_kwargs=_model_kwargs(args), transport=_transport_settings(cfg, args),
                    data=what, num=num, ode_method=options["ode_method"], steps=args.steps, atol=options["atol"],
                    rtol=options["rtol"], batch_size=args.batch_size, seed=args.seed, precision=args.precision)
    world = init_world(args.device)
    try:
        if world.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
        model = model.to(world.device).eval()
        objective = build_objective(cfg.objective, model)
        parts = PartsFolder(out, settings)  # finished batches survive a kill; a re-run skips them
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logp = score_batches(objective, model, dataset, num, batch_size=args.batch_size,
                                 latent_scale=cfg.data.latent_scale, method=options["ode_method"], steps=args.steps,
                                 atol=options["atol"], rtol=options["rtol"], seed=args.seed, parts=parts, world=world,
                                 progress=sys.stderr.isatty())
        if logp is None:  # not rank 0
            return 0
        first = dataset[0]
        result = {**summarize(logp, (first["x"] if "x" in first else first["mean"]).numel()), **settings}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
        parts.remove()
        stderr = result["bits_per_dim_stderr"]
        print(f"{result['bits_per_dim']:.4f}{'' if stderr is None else f' ± {stderr:.4f}'} bits/dim over "
              f"{num} {what} ({options['ode_method']}); wrote {out}")
        return 0
    finally:
        shutdown(world)


def _model_kwargs(args) -> dict | None:
    """--model-kwargs as parsed (checked by _load_for_sampling): part of a parts folder's settings, since
    some (MDTv1's decode_layer, num_classes without a null row) change the network, not its weights."""
    return json.loads(args.model_kwargs) if args.model_kwargs else None


def _run_folder_of(source: Path) -> Path | None:
    """The run folder ``source`` belongs to: the run itself, its ``export/``, one of its checkpoints, or a
    file in those (a run folder holds config.json and checkpoints/ or export/); else the source folder."""
    for folder in [source, *source.parents][:4]:  # run/checkpoints/step_N/file is three levels down
        if (folder / "config.json").is_file() and ((folder / "checkpoints").is_dir() or (folder / "export").is_dir()):
            return folder
    return source if source.is_dir() else None


def _check_out_outside(out: Path, source: Path) -> None:
    """An --out that names an existing file of the run the source belongs to (its config.json, export,
    grid), or the source itself, would destroy what it reads."""
    if not out.exists():
        return
    run = _run_folder_of(source)
    if out.resolve() == source.resolve() or (run is not None and out.resolve().is_relative_to(run.resolve())):
        raise ValueError(f"--out {out} is a file of {run or source}: writing it would replace part of the run; "
                         f"name a new file")


def _has_null_class(model) -> bool:
    """Whether the model's label embedding has the extra 'null' row classifier-free guidance needs
    (models without a LabelEmbedder, e.g. MaskDiT's one-hot labels, need none)."""
    from masked_dit.nn.embed import LabelEmbedder

    embedders = [m for m in model.modules() if isinstance(m, LabelEmbedder)]
    return all(m.embedding_table.num_embeddings > m.num_classes for m in embedders)


def _device(name: str) -> str:
    """--device of extract-latents / extract-features: 'auto', 'cpu', 'cuda', 'cuda:1', ... (one-line errors)."""
    from masked_dit.eval.cli import resolve_device

    return str(resolve_device(name))


def _extraction_world(name: str):
    """(World, device) under torchrun, where each rank takes its share of the shards on its own GPU
    (--device auto / cuda / cpu); (None, the device) in one process."""
    from masked_dit.train.dist import env_int, init_world

    if env_int("WORLD_SIZE", 1) <= 1:
        return None, _device(name)
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device {name}: under torchrun each rank takes the GPU of its LOCAL_RANK; pass "
                         "--device cuda (or auto, cpu)")
    world = init_world(name)
    return world, str(world.device)


def _check_out_dir(out: str) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"output folder {out} is a file")


def _check_positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")


#################################################################################
#                                extract-latents                                #
#################################################################################

def _check_min_image_size(args) -> None:
    if args.min_image_size is not None and args.min_image_size < 0:
        raise ValueError(f"--min-image-size must be >= 0 (0: take every image, upscaling small ones as ADM's "
                         f"crop does; got {args.min_image_size})")


def _extract(args, _overrides) -> int:
    from masked_dit.data import ImageFolderDataset, extract_latents
    from masked_dit.data.latents import load_vae

    _check_positive(args, "image_size", "batch_size", "shard_size")
    if args.shard_size % args.batch_size:  # checked before the VAE loads, in the options' names
        raise ValueError(f"--shard-size {args.shard_size} must be a multiple of --batch-size {args.batch_size}")
    _check_out_dir(args.out)
    _check_min_image_size(args)
    world, device = _extraction_world(args.device)
    try:
        dataset = ImageFolderDataset(args.images, args.image_size, args.on_bad_image, args.min_image_size)
        vae = load_vae(args.vae, device)
        manifest = extract_latents(dataset, args.out, vae, vae_name=args.vae, batch_size=args.batch_size,
                                   shard_size=args.shard_size, flip=args.flip, dtype=args.dtype, device=device,
                                   world=world)
    finally:
        _end_world(world)
    if world is None or world.is_main:
        print(f"{manifest['num_images']} images -> {args.out} ({len(manifest['shards'])} shards, latent "
              f"{manifest['latent_shape']})")
    return 0


def _end_world(world) -> None:
    if world is not None:
        from masked_dit.train.dist import shutdown
        shutdown(world)


def _extract_features(args, _overrides) -> int:
    from masked_dit.configs import is_folder_name
    from masked_dit.data import ImageFolderDataset, LatentDataset
    from masked_dit.data.encoders import extract_encoder_features, feature_dir_name, load_encoder_features

    # The latents must be complete and readable; their image size is how extract-latents saw the images.
    manifest = LatentDataset(args.latents).manifest
    image_size = manifest.get("image_size")
    if not isinstance(image_size, int):
        raise ValueError(f"latents {args.latents}: manifest.json has no image_size: re-run extract-latents")
    _check_positive(args, "batch_size", "encoder_image_size", "token_grid")
    _check_min_image_size(args)
    if args.name is not None and not is_folder_name(args.name):
        raise ValueError(f"--name {args.name!r} must be one folder name (the features go to <latents>/features/<name>)")
    min_size = manifest.get("min_image_size") if args.min_image_size is None else args.min_image_size
    if manifest.get("min_image_size", min_size) != min_size:  # the rows must be the latents' images
        raise ValueError(f"--min-image-size {min_size}: the latents in {args.latents} were extracted with "
                         f"--min-image-size {manifest['min_image_size']}; leave it out")
    world, device = _extraction_world(args.device)
    try:
        dataset = ImageFolderDataset(args.images, image_size, args.on_bad_image, min_size)
        features = load_encoder_features(args.encoder, token_grid=args.token_grid, device=device,
                                         image_size=args.encoder_image_size, resolution=image_size,
                                         autocast_dtype="bf16" if args.precision == "bf16" else None)
        name = args.name or feature_dir_name(args.encoder)
        manifest = extract_encoder_features(dataset, args.latents, features, name=name,
                                            batch_size=args.batch_size, dtype=args.dtype, world=world)
    finally:
        _end_world(world)
    if world is not None and not world.is_main:
        return 0
    print(f"{manifest['num_images']} images -> {Path(args.latents) / 'features' / name} (features "
          f"{manifest['feature_shape']}); train with --data.features={name}")
    return 0


#################################################################################
#                                    parser                                     #
#################################################################################

def _add_transport_flags(parser) -> None:
    parser.add_argument("--path-type", choices=["Linear", "GVP", "VP"],
                        help="interpolant of an official SiT / REPA file (default: the one its saved args name, "
                             "else Linear; REPA's 'cosine' is GVP)")
    parser.add_argument("--prediction", choices=["velocity", "noise", "score"],
                        help="what an official SiT file predicts (default: its saved args, else velocity)")


def build_parser() -> argparse.ArgumentParser:
    from masked_dit.configs.presets import DEFAULT_PRESET

    p = argparse.ArgumentParser(prog="masked-dit", description="Train and sample masked diffusion transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: MDTv2 on the embedded digits)",
                       description="Train from a preset or a config.json; override any field with "
                       "--section.key=value (or --section.key value).")
    t.add_argument("--preset", default=None, help=f"named recipe (default {DEFAULT_PRESET}; --list-presets)")
    t.add_argument("--config", help="a config.json (e.g. from a run folder) instead of a preset")
    t.add_argument("--resume", help="'latest' or a checkpoint folder (same as --run.resume=...)")
    t.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample a grid PNG or an .npz (ADM evaluator layout)")
    s.add_argument("source", help="run folder, export folder, or official checkpoint file (then --model)")
    s.add_argument("--model", help="registry name of an official checkpoint (DiT-XL/2, MDTv2-XL/2, ...)")
    s.add_argument("--model-kwargs", help="JSON constructor overrides for --model (e.g. '{\"num_classes\": 10}')")
    _add_transport_flags(s)
    s.add_argument("--out", default="samples.png", help="*.png grid or *.npz (uint8 NHWC 'arr_0', labels 'arr_1')")
    # --num-samples, not --num, under torchrun: its parser takes "--num" for an abbreviation of --numa-binding.
    s.add_argument("--num-samples", "--num", dest="num", type=int,
                   help="samples for .npz output (default 50000; batches land in <out>.parts/: a re-run resumes; "
                   "torchrun shards)")
    s.add_argument("--per-class", type=int, help="grid columns per class, for .png output (default 8)")
    s.add_argument("--classes", type=int, nargs="*", help="class labels (default: grid 0-9, npz uniform)")
    s.add_argument("--sampler", choices=["ddpm", "ddim", "heun", "euler", "ode", "sde"])
    s.add_argument("--steps", type=int)
    s.add_argument("--cfg-scale", type=float)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale-pow", type=float, help="MDT power-cosine guidance ramp (0: constant scale)")
    s.add_argument("--guidance-low", type=float, help="guidance interval: lower end of t (REPA)")
    s.add_argument("--guidance-high", type=float, help="guidance interval: upper end of t (REPA: 0.7)")
    sit = s.add_argument_group("SiT sampling (--sampler ode / sde; default: the run's --sample.* values, SiT's)")
    sit.add_argument("--ode-method", help="ODE solver: dopri5, euler, midpoint, heun or a torchdiffeq method (rk4, ...)")
    sit.add_argument("--atol", type=float, help="adaptive ODE absolute tolerance (SiT: 1e-6)")
    sit.add_argument("--rtol", type=float, help="adaptive ODE relative tolerance (SiT: 1e-3)")
    sit.add_argument("--sde-method", choices=["Euler", "Heun"])
    sit.add_argument("--diffusion-form", help="SDE diffusion: constant, SBDM, sigma, linear, decreasing, "
                                                "increasing-decreasing (SiT: sigma)")
    sit.add_argument("--diffusion-norm", type=float, help="scale of the SDE diffusion (SiT: 1)")
    sit.add_argument("--last-step", type=lambda v: "None" if v == "none" else v,  # "None": mapped once given
                     help="SDE last step: Mean, Tweedie, Euler or None (SiT: Mean)")
    sit.add_argument("--last-step-size", type=float, help="SiT: 0.04")
    adm = s.add_argument_group("DiT / MDT sampling (ADM diffusion; default: the run's --sample.* values)")
    adm.add_argument("--eta", type=float, help="DDIM stochasticity, with --sampler ddim: 0 deterministic (ADM's "
                                               "default), 1 DDPM's variance")
    edm = s.add_argument_group("MaskDiT sampling (EDM's sampler: --sampler heun / euler; default: the run's "
                               "--sample.* values, MaskDiT's)")
    edm.add_argument("--S-churn", type=float, help="stochasticity strength (MaskDiT: 0, deterministic)")
    edm.add_argument("--S-min", type=float, help="churn only for noise levels >= S_min (EDM: 0)")
    edm.add_argument("--S-max", type=float, help="churn only for noise levels <= S_max (EDM: inf)")
    edm.add_argument("--S-noise", type=float, help="scale of the churn noise (EDM: 1)")
    edm.add_argument("--sigma-min", type=float, help="lowest noise level (default: the discretization's, 0.002 for edm)")
    edm.add_argument("--sigma-max", type=float, help="highest noise level (default: the discretization's, 80 for edm)")
    edm.add_argument("--rho", type=float, help="Karras grid exponent (EDM: 7)")
    edm.add_argument("--discretization", choices=["edm", "vp", "ve", "iddpm"],
                     help="noise levels of the time grid (EDM's ablation sampler unless edm)")
    edm.add_argument("--schedule", choices=["linear", "vp", "ve"], help="noise schedule sigma(t) (EDM: linear)")
    edm.add_argument("--scaling", choices=["none", "vp"], help="signal scaling s(t) (EDM: none)")
    s.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32",
                   help="tf32: fp32 with TF32 matmuls on GPU, as DiT's sample scripts (default); fp32: strict; "
                        "bf16: autocast")
    s.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    s.add_argument("--vae", help="decode latents with this AutoencoderKL (hub id or folder)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.set_defaults(func=_sample)

    lk = sub.add_parser("likelihood", help="bits/dim of data under a SiT or REPA model (SiT's ODE --likelihood)")
    lk.add_argument("source", help="run folder, export folder, or official checkpoint file (then --model)")
    lk.add_argument("--model", help="registry name of an official checkpoint (SiT-XL/2, ...)")
    lk.add_argument("--model-kwargs", help="JSON constructor overrides for --model")
    _add_transport_flags(lk)
    lk.add_argument("--data-path", help="latents folder to score (an image-folder run: images; default: the "
                                        "run's data)")
    lk.add_argument("--split", choices=["heldout", "train", "all"], help="digits split (default: heldout)")
    lk.add_argument("--num-samples", "--num", dest="num", type=int, help="score the first N items (default: all)")
    lk.add_argument("--out", default="likelihood.json", help="*.json: the summary and per-sample bits/dim")
    lk.add_argument("--ode-method", help="ODE solver (default: the run's --sample.ode_method, SiT's dopri5; "
                                         "higher-order adaptive ones such as dopri8 crawl: Hutchinson's estimate "
                                         "draws anew at every evaluation, which their error control sees as noise)")
    lk.add_argument("--atol", type=float, help="adaptive ODE absolute tolerance (SiT: 1e-6)")
    lk.add_argument("--rtol", type=float, help="adaptive ODE relative tolerance (SiT: 1e-3)")
    lk.add_argument("--steps", type=int, default=50,
                    help="SiT's num_steps: time points of the grid (fixed solvers: steps + 1), dopri5: output points "
                         "(SiT: 50)")
    lk.add_argument("--batch-size", type=int, default=64)
    lk.add_argument("--seed", type=int, default=0, help="Hutchinson draws (and the latents' posterior draws)")
    lk.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                    help="fp32 (default: the divergence estimate is sensitive), tf32 or bf16 autocast")
    lk.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    lk.set_defaults(func=_likelihood)

    e = sub.add_parser("extract-latents", help="encode an image folder once into sharded VAE moments")
    e.add_argument("images", help="image folder (class subfolders or ADM ClassName_ImgID.jpg names)")
    e.add_argument("out", help="output folder (re-run to resume)")
    e.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL hub id or local folder")
    e.add_argument("--image-size", type=int, default=256)
    e.add_argument("--flip", action="store_true", help="also store the moments of the mirrored images")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--shard-size", type=int, default=4096)
    e.add_argument("--dtype", choices=["float16", "float32"], default="float32")
    e.add_argument("--on-bad-image", choices=["stop", "skip"], default="stop")
    e.add_argument("--min-image-size", type=int, help="smallest short side taken (default: --image-size; 0: every "
                   "image, small ones upscaled as DiT's/ADM's crop does, e.g. for ImageNet's train split)")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_extract)

    f = sub.add_parser("extract-features", help="cache REPA's encoder features beside extracted latents")
    f.add_argument("images", help="the image folder the latents were extracted from (same order and crop)")
    f.add_argument("latents", help="extract-latents' folder; writes <latents>/features/<name> (re-run to resume)")
    f.add_argument("--encoder", default="dinov2-vit-b",
                   help="REPA name (dinov2-vit-b, clip-vit-L, mocov3-vit-b:CKPT, ...), hub id or local folder")
    f.add_argument("--name", help="feature folder name (default: from --encoder); train with --data.features=NAME")
    f.add_argument("--encoder-image-size", type=int, help="encoder input side (default REPA's: 224 * (size // 256); "
                   "MoCo v3, MAE, DINOv1 256 * (size // 256))")
    f.add_argument("--token-grid", type=int, help="resample tokens to this grid, the model's input_size / patch "
                   "(default: the encoder's own grid, 16 at 224px)")
    f.add_argument("--batch-size", type=int, default=32, help="must divide the latents' shard size")
    f.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    f.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="encoder autocast")
    f.add_argument("--on-bad-image", choices=["stop", "skip"], default="stop", help="as given to extract-latents")
    f.add_argument("--min-image-size", type=int, help="default (and required): as extract-latents recorded it; "
                   "for latents whose manifest predates the record")
    f.add_argument("--device", default="auto")
    f.set_defaults(func=_extract_features)

    v = sub.add_parser("eval", help="FID, sFID, IS, precision, recall of samples vs an ADM reference batch",
                       add_help=False)
    v.add_argument("eval_args", nargs=argparse.REMAINDER, help="see `masked-dit eval --help`")
    v.set_defaults(func=_eval)

    i = sub.add_parser("info", help="versions, the compiled extension and op backends")
    i.set_defaults(func=_info)
    return p


def _eval(args, _overrides) -> int:
    from masked_dit.eval.cli import main as eval_main

    return eval_main(args.eval_args) or 0


def _info(args, _overrides) -> int:
    from masked_dit.info import main as info_main

    return info_main([]) or 0


def _join_spaced_overrides(argv: list) -> list:
    """``--section.key value`` -> ``--section.key=value`` (argparse style), when a value follows."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        dotted = a.startswith("--") and "=" not in a and "." in a
        if dotted and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["eval"]:  # the evaluator owns its options (its own --help)
        try:
            return _eval(argparse.Namespace(eval_args=argv[1:]), [])
        except KeyboardInterrupt:
            print("masked-dit eval: interrupted", file=sys.stderr)
            return 130
    if argv[:1] == ["train"]:
        argv = _join_spaced_overrides(argv)
    args, rest = parser.parse_known_args(argv)
    # Only `train` takes --section.key=value overrides; anything else left over is an error.
    overrides = [a for a in rest if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    unknown = [a for a in rest if a not in overrides]
    valueless = [a for a in unknown if a.startswith("--") and "." in a and "=" not in a]
    if valueless and args.command == "train":
        parser.error(f"override {valueless[0]} needs a value: {valueless[0]}=VALUE")
    if unknown or (overrides and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    # OSError: a path that is a file where a folder is needed (or the reverse), no permission, ...;
    # Python's message names the path.
    from masked_dit.train.signals import Preempted

    try:
        return args.func(args, overrides)
    except Preempted as exc:  # SIGTERM / SIGINT / SIGUSR1 during training: checkpoint saved
        from masked_dit.train.dist import is_other_rank

        if not is_other_rank():  # the ranks stop at the same step, in the same checkpoint: said once
            print(f"masked-dit {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # Ctrl-C outside the step loop (or twice): what was written stays
        print(f"masked-dit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, FloatingPointError) as exc:
        from masked_dit.configs import ConfigError
        from masked_dit.train.dist import is_other_rank

        if isinstance(exc, ConfigError) and is_other_rank():
            return 2  # a config error is the same on every torchrun rank: rank 0 says it once
        print(f"masked-dit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
