"""Does masked training learn faster? DiT vs MDTv2 vs MaskDiT of equal width and depth on digits.

    python benchmarks/convergence_digits.py                          # defaults below, CPU or GPU
    python benchmarks/convergence_digits.py --steps 1000 --eval-every 100 --seeds 0,1 --width 128 --depth 6
    python benchmarks/convergence_digits.py --toy --out-dir /tmp/c   # seconds: the test's end-to-end run

Each model trains with the package's trainer (``masked_dit.train.Trainer``, one ``train_step`` at a
time) from its ``digits-*`` preset: its own objective (ADM for DiT, ADM two-pass + Min-SNR for
MDTv2, EDM + MAE for MaskDiT), its own optimizer (Adan for MDTv2, AdamW otherwise; ``--optimizer
adamw`` puts all on AdamW), the same data, batch, learning rate, warmup, EMA decay and steps.

Equal width and depth: every model has ``--depth`` transformer blocks of width ``--width`` on
the full token set at inference. MDTv2's last ``--decoder-depth`` blocks are its decoder (plus one
side-interpolater block used only in training, as the paper); MaskDiT's last ``--decoder-depth``
blocks are its decoder (width ``--width``, not the official 512), the first ones its encoder.

Every ``--eval-every`` steps the weights (``--weights ema``, the default, or ``raw``) draw
``--num-samples`` digits from fixed noise and balanced fixed labels, without guidance by default,
with the same number of network evaluations per sample for every family (DDPM with ``--sample-steps``
steps; EDM Heun with ``(sample_steps + 1) // 2`` steps, i.e. ``sample_steps`` or one fewer NFEs),
and ``masked_dit.eval.digits.score_digits`` scores them (conditional accuracy, feature FD).
Wall-clock time counts training steps only (synchronised), never evaluation; the process CPU time
of the same steps is kept too (on a busy shared CPU it is the steadier of the two; ``--threads 1``
avoids thread oversubscription there, often several times faster than torch's default).

What differs besides masking (so a gap is not masking alone): the diffusion process (ADM with learned
sigma vs EDM), loss weighting (MDTv2's Min-SNR), optimizer (Adan for MDTv2 unless ``--optimizer adamw``),
architecture details (MDTv2's relative position bias and long skips), and MaskDiT is scored without
its unmasking fine-tune. MDTv2 runs two passes per step (full + masked), MaskDiT's encoder sees 50%
of the tokens: per-step cost differs, hence the per-second view.

Outputs in ``--out-dir`` (default ``benchmarks/results/convergence_digits/``)::

    convergence_digits.json   settings, environment, per model: config, parameter count, the
                              mean-over-seeds series (steps, seconds, cond_acc, fd, loss) and each seed's
    convergence_digits.md     final / best metric per model, steps/s, seconds per step
    convergence_digits.png    cond. accuracy and FD vs step and vs training seconds

``--replot <json>`` rewrites the table and plot of an existing result without training.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `masked_dit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common

PRESETS = {"dit": "digits-dit", "mdtv2": "digits-mdtv2", "maskdit": "digits-maskdit"}
LABELS = {"dit": "DiT", "mdtv2": "MDTv2", "maskdit": "MaskDiT"}
DEFAULT_OUT = common.RESULTS_DIR / "convergence_digits"
STEM = "convergence_digits"

# --toy: end to end in seconds on a CPU (the test runs this).
TOY = dict(steps=4, eval_every=4, width=32, depth=3, num_heads=2, decoder_depth=1, batch=8, num_samples=20,
           sample_steps=4)


#################################################################################
#                                    Configs                                    #
#################################################################################

def build_config(model: str, args, seed: int, run_root: str):
    """The preset of ``model`` resized to ``args.width`` x ``args.depth`` with the shared schedule."""
    from masked_dit.configs import apply_overrides, get_preset

    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r} in --models; valid: {', '.join(PRESETS)}")
    heads = args.num_heads
    over = {
        "run.name": f"{model}-seed{seed}", "run.out_dir": run_root, "run.seed": seed,
        "model.hidden_size": args.width, "model.num_heads": heads, "model.depth": args.depth,
        "train.steps": args.steps, "train.global_batch": args.batch, "train.device": args.device,
        "train.progress": False, "train.log_every": args.steps, "train.ckpt_every": args.steps,
        "train.sample_every": args.steps,
        # identical sampling settings; the sampler itself is the family's (DDPM or EDM Heun)
        "sample.cfg_scale": args.cfg_scale,
    }
    if args.lr is not None:
        over["optim.lr"] = args.lr
    if args.ema_decay is not None:
        over["optim.ema_decay"] = args.ema_decay
    if args.optimizer == "adamw":
        over.update({"optim.name": "adamw", "optim.betas": (0.9, 0.999)})
    if model == "mdtv2":
        over["model.extra"] = {"decode_layer": args.decoder_depth}
    elif model == "maskdit":
        # encoder + decoder = depth blocks, all of width ``width``
        over["model.depth"] = args.depth - args.decoder_depth
        over["model.extra"] = {"decoder_hidden_size": args.width, "decoder_depth": args.decoder_depth,
                               "decoder_num_heads": heads}
    return apply_overrides(get_preset(PRESETS[model]), over)


def sampler_settings(model: str, sample_steps: int) -> tuple[str, int]:
    """(sampler, steps) with ~``sample_steps`` network evaluations per sample for every family."""
    if model == "maskdit":
        return "heun", max(1, (sample_steps + 1) // 2)  # Heun: 2 n - 1 NFEs
    return "ddpm", sample_steps


#################################################################################
#                                   Evaluation                                  #
#################################################################################

def eval_inputs(num_samples: int, in_channels: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise and balanced labels (0, 1, ..., 9, 0, 1, ...), the same for every model and seed."""
    from masked_dit.train.grid import fixed_noise

    labels = torch.arange(num_samples) % 10
    return fixed_noise((num_samples, in_channels, size, size), seed), labels


@torch.no_grad()
def evaluate(trainer, noise, labels, args, model: str) -> dict:
    """Draws the eval samples with the EMA (or raw) weights and scores them."""
    from masked_dit.eval.digits import score_digits

    device = trainer.world.device
    net = trainer.ema_model() if args.weights == "ema" else trainer.module.eval()
    sampler, steps = sampler_settings(model, args.sample_steps)
    chunks = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # sampling must not move the training RNG
        torch.manual_seed(args.eval_seed)
        for start in range(0, len(labels), args.eval_batch):
            sl = slice(start, start + args.eval_batch)
            chunks.append(trainer.objective.sample(net, noise[sl].to(device), labels[sl].to(device), sampler=sampler,
                                                   steps=steps, cfg_scale=args.cfg_scale).float().cpu())
    score = score_digits(torch.cat(chunks), labels)
    return {"cond_acc": score.conditional_accuracy, "fd": score.feature_fd}


#################################################################################
#                                    Training                                   #
#################################################################################

def run_one(model: str, seed: int, args, device: torch.device, run_root: str) -> dict:
    """Trains one model for ``args.steps`` steps; evaluates every ``args.eval_every`` steps."""
    from masked_dit.train.trainer import Trainer

    cfg = build_config(model, args, seed, run_root)
    trainer = Trainer(cfg)
    noise, labels = eval_inputs(args.num_samples, cfg.model.in_channels, cfg.model.input_size, args.eval_seed)
    series = {"steps": [], "seconds": [], "cpu_seconds": [], "cond_acc": [], "fd": [], "loss": []}
    train_seconds = cpu_seconds = eval_seconds = 0.0
    losses = []
    while trainer.step < args.steps:
        common.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        values = trainer.train_step()  # reads the loss back: the step has finished when it returns
        common.synchronize(device)
        train_seconds += time.perf_counter() - t0
        cpu_seconds += time.process_time() - c0  # this process's CPU time: robust to a busy shared machine
        losses.append(values["loss"])
        if trainer.step % args.eval_every == 0 or trainer.step == args.steps:
            t1 = time.perf_counter()
            scores = evaluate(trainer, noise, labels, args, model)
            eval_seconds += time.perf_counter() - t1
            series["steps"].append(trainer.step)
            series["seconds"].append(train_seconds)
            series["cpu_seconds"].append(cpu_seconds)
            series["cond_acc"].append(scores["cond_acc"])
            series["fd"].append(scores["fd"])
            series["loss"].append(sum(losses) / len(losses))  # mean training loss since the last eval
            losses = []
            print(f"  {LABELS[model]:8s} seed {seed} step {trainer.step:6d}  {train_seconds:8.1f}s  "
                  f"loss {series['loss'][-1]:.4f}  cond_acc {scores['cond_acc']:.3f}  fd {scores['fd']:.2f}",
                  flush=True)
    return {"seed": seed, **series, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "seconds_per_step": train_seconds / args.steps, "cpu_seconds_per_step": cpu_seconds / args.steps,
            "config": cfg.to_dict(),
            "params": sum(p.numel() for p in trainer.module.parameters()),
            "trainable_params": sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)}


def mean_over_seeds(runs: list[dict]) -> dict:
    """Per-step means of the seeds' series (all seeds share the eval steps)."""
    out = {"steps": runs[0]["steps"]}
    for key in ("seconds", "cpu_seconds", "cond_acc", "fd", "loss"):
        out[key] = [sum(r[key][i] for r in runs) / len(runs) for i in range(len(runs[0]["steps"]))]
    return out


#################################################################################
#                                    Outputs                                    #
#################################################################################

def command_line(settings: dict) -> str:
    """The command that reproduces a run with these settings."""
    flags = ["--models", ",".join(settings["models"]), "--seeds", ",".join(str(x) for x in settings["seeds"])]
    for key in ("steps", "eval_every", "width", "depth", "num_heads", "decoder_depth", "batch", "lr", "optimizer",
                "num_samples", "sample_steps", "cfg_scale", "weights", "ema_decay", "eval_seed", "device", "threads"):
        if settings.get(key) is not None:
            flags += [f"--{key.replace('_', '-')}", str(settings[key])]
    return "python benchmarks/convergence_digits.py " + " ".join(flags)


def markdown_table(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        f"# Convergence on digits ({s['width']} wide, {s['depth']} deep, {s['steps']} steps, batch {s['batch']}, "
        f"seeds {s['seeds']})",
        "",
        f"`{command_line(s)}`",
        "",
        f"Device: {payload['device']}; torch {payload['torch']}; commit {payload['commit']}; {payload['date']}.",
        f"Metric: {s['num_samples']} samples, {s['weights']} weights, cfg {s['cfg_scale']}, "
        f"~{s['sample_steps']} network evaluations per sample; mean over seeds. Seconds: training steps only "
        f"({s['torch_threads']} torch thread(s)).",
        "",
        "| model | params (M) | wall s/step | steps/s | CPU s/step | final cond. acc | best cond. acc (step) | "
        "final FD | best FD (step) | train wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in payload["models"].items():
        steps, acc, fd = m["steps"], m["cond_acc"], m["fd"]
        ia = max(range(len(acc)), key=acc.__getitem__)
        ifd = min(range(len(fd)), key=fd.__getitem__)
        sps = m["seconds_per_step"]
        lines.append(f"| {LABELS[name]} | {m['params'] / 1e6:.2f} | {sps:.3f} | {1 / sps:.2f} | "
                     f"{m['cpu_seconds_per_step']:.3f} | {acc[-1]:.3f} | "
                     f"{acc[ia]:.3f} ({steps[ia]}) | {fd[-1]:.2f} | {fd[ifd]:.2f} ({steps[ifd]}) | "
                     f"{m['seconds'][-1]:.0f} |")
    # every evaluation: cond. acc / FD per model
    names = list(payload["models"])
    lines += ["", "Cond. acc / feature FD at each evaluation:", "",
              "| step | " + " | ".join(LABELS[n] for n in names) + " |", "|---:|" + "---:|" * len(names)]
    for i, step in enumerate(payload["models"][names[0]]["steps"]):
        cells = [f"{payload['models'][n]['cond_acc'][i]:.3f} / {payload['models'][n]['fd'][i]:.1f}" for n in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> Path:
    """Cond. accuracy and FD (log scale past a decade) against step and training wall-clock seconds (on a CPU also
    against process CPU seconds, which a busy shared machine distorts less)."""
    from matplotlib.ticker import ScalarFormatter

    from masked_dit.eval.plots import _pyplot

    plt = _pyplot()
    xaxes = [("steps", "training step"), ("seconds", "training wall-clock seconds")]
    if payload.get("device_tag") == "cpu":
        xaxes.append(("cpu_seconds", "training CPU seconds (this process)"))
    fig, axes = plt.subplots(2, len(xaxes), figsize=(5 * len(xaxes), 7), squeeze=False)
    for name, m in payload["models"].items():
        many = len(m["runs"]) > 1
        for col, (xkey, xlabel) in enumerate(xaxes):
            for row, (ykey, ylabel) in enumerate((("cond_acc", "conditional accuracy"), ("fd", "feature FD"))):
                ax = axes[row][col]
                line, = ax.plot(m[xkey], m[ykey], marker="o", ms=3, lw=1.5,
                                label=f"{LABELS[name]}" + (" (mean)" if many else ""))
                if many:  # thin lines: the individual seeds
                    for r in m["runs"]:
                        ax.plot(r[xkey], r[ykey], lw=0.6, alpha=0.4, color=line.get_color())
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
    fds = [v for m in payload["models"].values() for v in m["fd"]]
    if min(fds) > 0 and max(fds) / min(fds) > 10:  # log only when FD spans more than a decade
        for ax in axes[1]:
            ax.set_yscale("log")
            for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                fmt = ScalarFormatter()
                fmt.set_scientific(False)
                axis_formatter(fmt)
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=9)
    s = payload["settings"]
    fig.suptitle(f"digits 16x16: width {s['width']}, depth {s['depth']}, batch {s['batch']}, {s['steps']} steps; "
                 f"metric on {s['num_samples']} samples ({s['weights']} weights, ~{s['sample_steps']} NFE, "
                 f"cfg {s['cfg_scale']}); {payload['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#################################################################################
#                                      CLI                                      #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dit,mdtv2,maskdit", help="comma-separated: " + ", ".join(PRESETS))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--width", type=int, default=128, help="hidden size of every block")
    p.add_argument("--depth", type=int, default=6, help="transformer blocks at inference (encoder + decoder)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--decoder-depth", type=int, default=2, help="MDTv2 decode_layer and MaskDiT decoder blocks")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of every model (equal schedules)")
    p.add_argument("--optimizer", choices=("preset", "adamw"), default="preset",
                   help="preset: Adan for MDTv2 as its paper, AdamW for the others; adamw: AdamW for all")
    p.add_argument("--num-samples", type=int, default=300, help="generated digits per evaluation")
    p.add_argument("--sample-steps", type=int, default=50, help="network evaluations per sample")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="1: no guidance (measures the model alone)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="which weights draw the eval samples (EMA lags ~1 / (1 - decay) steps behind)")
    p.add_argument("--ema-decay", type=float, default=None, help="default: the presets' (0.995)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the fixed noise, labels and sampler draws")
    p.add_argument("--eval-batch", type=int, default=500, help="samples per sampling call")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the run (default: torch's); 1 is far faster on a busy shared CPU")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT))
    p.add_argument("--toy", action="store_true", help="tiny everything: end to end in seconds (tests)")
    p.add_argument("--replot", metavar="JSON", help="only rewrite the table and plot of an existing result JSON")
    args = p.parse_args(argv)
    if args.toy:
        for key, value in TOY.items():
            setattr(args, key, value)
    return check_args(args)


def check_args(args):
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.model_list if m not in PRESETS]
    if bad or not args.model_list:
        raise ValueError(f"--models {args.models!r}: unknown {bad}; valid: {', '.join(PRESETS)}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not args.seed_list:
        raise ValueError("--seeds is empty")
    for key in ("steps", "eval_every", "width", "depth", "num_heads", "batch", "sample_steps", "eval_batch"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be > 0 (got {getattr(args, key)})")
    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 for the feature FD (got {args.num_samples})")
    if args.width % args.num_heads:
        raise ValueError(f"--width {args.width} must be a multiple of --num-heads {args.num_heads}")
    if not 1 <= args.decoder_depth < args.depth or (args.depth - args.decoder_depth) % 2:
        raise ValueError(f"--decoder-depth {args.decoder_depth} must be in [1, depth) with depth - decoder_depth "
                         f"even (MDTv2's encoder is two halves); got --depth {args.depth}")
    return args


def replot(json_path: str) -> dict:
    """Rewrites the table and the plot next to an existing result JSON (no training)."""
    path = Path(json_path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--replot {json_path}: cannot read a result JSON ({err})") from None
    if payload.get("kind") != STEM:
        raise ValueError(f"--replot {json_path}: not a {STEM} result (kind={payload.get('kind')!r})")
    return write_outputs(payload, path.parent, write_json=False)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot)
    device = common.resolve_device(args.device)
    args.device = device.type
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep theirs


def _run(args, device: torch.device) -> dict:
    env = common.environment(device)
    print(f"# {env['device']}  torch {env['torch']}  commit {env['commit']}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "model_list", "seed_list", "models")}
    settings.update(models=args.model_list, seeds=args.seed_list, torch_threads=torch.get_num_threads(),
                    samplers={m: dict(zip(("sampler", "steps"), sampler_settings(m, args.sample_steps)))
                              for m in args.model_list})
    models = {}
    with tempfile.TemporaryDirectory(prefix="convergence_digits_") as run_root:  # the trainer's run folders
        for model in args.model_list:
            runs = [run_one(model, seed, args, device, run_root) for seed in args.seed_list]
            mean = mean_over_seeds(runs)
            models[model] = {**mean, "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / len(runs),
                             "cpu_seconds_per_step": sum(r["cpu_seconds_per_step"] for r in runs) / len(runs),
                             "params": runs[0]["params"], "trainable_params": runs[0]["trainable_params"],
                             "config": runs[0]["config"],
                             "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]}
    payload = {"kind": STEM, **env, "settings": settings, "models": models}
    return write_outputs(payload, Path(args.out_dir))


def write_outputs(payload: dict, out: Path, write_json: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{STEM}.json", "md": out / f"{STEM}.md", "png": out / f"{STEM}.png"}
    if write_json:
        paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown_table(payload))
    plot(payload, paths["png"])
    print(markdown_table(payload))
    for kind, p in paths.items():
        if write_json or kind != "json":
            print(f"# wrote {p}", flush=True)
    return {k: str(v) for k, v in paths.items()}


if __name__ == "__main__":
    main()
