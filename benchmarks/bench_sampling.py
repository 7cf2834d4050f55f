"""Sampling throughput: each family's published sampler, eager vs compiled vs CUDA graphs.

    python benchmarks/bench_sampling.py                          # XL/2 models, batches 64 and 256, GPU
    python benchmarks/bench_sampling.py --samplers dit_ddpm250_cfg --batches 64
    python benchmarks/bench_sampling.py --size toy --device cpu --out-dir /tmp/r   # seconds, for tests

Samplers (random weights: speed does not depend on them), all with classifier-free guidance, so
the network sees 2 x batch images per call:

    dit_ddpm250_cfg      DiT, 250 respaced DDPM steps, cfg 1.5 (channels 0-2, as the official code)
    mdtv2_ddpm250_cfg    MDTv2, 250 DDPM steps, cfg 3.8 with the power-cosine schedule
    maskdit_heun40_cfg   MaskDiT, EDM Heun 40 steps (79 network calls), cfg 1.5
    sit_ode50_cfg        SiT, 50-point Euler ODE, cfg 1.5
    sit_sde50_cfg        SiT, 50-step Euler-Maruyama SDE, cfg 1.5

Variants: ``eager``; ``compiled`` (torch.compile of the whole network); ``cudagraphs``
(torch.compile mode="reduce-overhead": CUDA graphs replayed per network call; GPU only, skipped
with the reason on CPU). The samplers' Python loops stay eager in every variant. Each timed run
follows an untimed short run (compilation, graph capture). The number of network calls (NFE) is
counted in the eager run. Results: ``<out-dir>/sampling-<device>-<date>[-<tag>].json`` (rows of
earlier runs of the day are kept unless measured again), rewritten after every sampler and batch so
that a run stopped by a time limit keeps what it measured.

``--steps N`` (fewer than the published steps, to save device time) is recorded as such: every row
has ``steps`` (what ran) and ``published_steps``; when they differ it also has
``img_per_s_at_published_steps`` = img/s x NFE(steps) / NFE(published_steps), an *estimate* (network
calls counted on the toy model: EDM Heun makes 2 steps - 1, SiT's ODE steps - 1; each call costs the
same; the fixed per-run cost, rescaled with the calls, makes it err low), and
``published_steps_estimate: true``.
The file key includes ``steps``, so a shortened run never replaces (or reads as) a full one.
CUDA-graph rows record ``cudagraph_skips`` (Inductor's count of graphs it did not capture: > 0 means
that row ran at least partly without CUDA graphs).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `masked_dit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn as nn

from benchmarks import common, profiling
from benchmarks.bench_train_step import PREFIX, TOY_KWARGS, attention_choice

# name -> (family, objective class name, sample() keyword arguments)
SAMPLERS = {
    "dit_ddpm250_cfg": ("dit", "ADMObjective", dict(sampler="ddpm", steps=250, cfg_scale=1.5)),
    "mdtv2_ddpm250_cfg": ("mdtv2", "MDTv2Objective", dict(sampler="ddpm", steps=250, cfg_scale=3.8)),
    "maskdit_heun40_cfg": ("maskdit", "EDMMaskDiTObjective", dict(sampler="heun", steps=40, cfg_scale=1.5)),
    "sit_ode50_cfg": ("sit", "TransportObjective", dict(sampler="euler", steps=50, cfg_scale=1.5)),
    "sit_sde50_cfg": ("sit", "TransportObjective", dict(sampler="sde", steps=50, cfg_scale=1.5)),
}
VARIANTS = ("eager", "compiled", "cudagraphs")
# A row's identity in the day's file: a shortened (--steps) run is a different row from a full one.
KEY_FIELDS = ("sampler", "model", "batch", "variant", "steps")
TOY_STEPS = 3       # sampler steps at toy size
WARMUP_STEPS = 3    # steps of the untimed run before each timed run
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


#################################################################################
#                                  Helpers                                      #
#################################################################################

class GraphedModel(nn.Module):
    """Calls a ``mode="reduce-overhead"`` compiled network, marking each call as a new step and
    cloning the outputs (the next replay overwrites the graph's output buffers, and the samplers
    keep results across calls). ``.module`` lets ``objectives.unwrap`` reach the user model."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.module = compiled

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = self.module(*args, **kwargs)
        if isinstance(out, (tuple, list)):
            return type(out)(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
        return out.clone()


def build_sampling_model(family: str, size: str, device: torch.device) -> tuple[str, nn.Module]:
    from masked_dit.models import build, build_model

    if size == "toy":
        kwargs = {k: v for k, v in TOY_KWARGS[family].items() if k != "mask_ratio"}  # inference model
        return f"{PREFIX[family]}-toy", build(family, **kwargs).to(device).eval()
    name = f"{PREFIX[family]}-{size}/2"
    with torch.device(device):  # built where it runs: an XL model built on the host took seconds to move
        return name, build_model(name).eval()


def wrap_variant(model: nn.Module, variant: str, device: torch.device, args) -> nn.Module:
    if variant == "eager":
        return model
    if variant == "compiled":
        return torch.compile(model, backend=args.compile_backend)
    if device.type != "cuda":
        raise _Skip("CUDA graphs need a CUDA device")
    return GraphedModel(torch.compile(model, mode="reduce-overhead"))


class _Skip(Exception):
    pass


class CallCounter:
    """Counts a model's network calls (NFE) from creation until ``remove()`` (or the ``with`` block's end)."""

    def __init__(self, model: nn.Module):
        self.count = 0
        self._hook = model.register_forward_pre_hook(self._add)

    def _add(self, *_):
        self.count += 1

    def remove(self):
        self._hook.remove()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.remove()


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_sampler(objective, model, batch: int, sample_kwargs: dict, kwargs_steps: int, device, precision, seed,
                num_classes: int):
    g = torch.Generator(device=device).manual_seed(seed)
    size, channels = model_input_shape(model)
    noise = torch.randn(batch, channels, size, size, device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)
    with torch.no_grad(), autocast(device, precision):
        return objective.sample(model, noise, y, **{**sample_kwargs, "steps": kwargs_steps})


def sampler_nfe(name: str, steps: int, seed: int = 0) -> int:
    """Network calls of sampler ``name`` run for ``steps`` steps, counted on the family's toy model on the
    CPU (the count is the sampler's, not the model's: DDPM ``steps``, EDM Heun ``2 steps - 1``, SiT's ODE
    ``steps - 1``)."""
    from masked_dit.diffusion import objectives

    family, objective_name, sample_kwargs = SAMPLERS[name]
    _, toy = build_sampling_model(family, "toy", torch.device("cpu"))
    with CallCounter(toy) as calls:
        run_sampler(getattr(objectives, objective_name)(), toy, 1, sample_kwargs, steps, torch.device("cpu"),
                    "fp32", seed, model_num_classes(toy))
    return calls.count


def model_cfg(model: nn.Module) -> dict:
    """hidden_size / num_heads of the encoder blocks (for the attention kernel choice)."""
    from masked_dit.nn.block import FusedDiTBlock

    block = next(m for m in model.modules() if isinstance(m, FusedDiTBlock))
    return {"hidden_size": block.hidden_size, "num_heads": block.attn.num_heads}


def model_num_classes(model: nn.Module) -> int:
    """Class labels the sampler may draw (MaskDiT keeps the net in .model)."""
    return getattr(getattr(model, "model", model), "num_classes", 1000)


def model_input_shape(model: nn.Module) -> tuple[int, int]:
    from masked_dit.diffusion.objectives import unwrap

    m = unwrap(model)
    m = getattr(m, "model", m) if not hasattr(m, "x_embedder") else m  # MaskDiT keeps the net in .model
    return m.x_embedder.img_size, m.x_embedder.in_chans


#################################################################################
#                                  Measuring                                    #
#################################################################################

def run_one(name: str, size: str, batch: int, device: torch.device, args, variants) -> list[dict]:
    from masked_dit.diffusion import objectives

    family, objective_name, sample_kwargs = SAMPLERS[name]
    torch.manual_seed(args.seed)
    model_name, model = build_sampling_model(family, size, device)
    num_classes = model_num_classes(model)
    objective = getattr(objectives, objective_name)()
    steps = TOY_STEPS if size == "toy" else (args.steps or sample_kwargs["steps"])
    published = sample_kwargs["steps"]
    # a shortened run's rate at the published steps scales with the network calls, not the steps
    nfe_ratio = 1.0 if steps == published else (sampler_nfe(name, steps, args.seed)
                                                / sampler_nfe(name, published, args.seed))
    rows = []
    for variant in variants:
        row = {"sampler": name, "model": model_name, "family": family, "size": size, "variant": variant,
               "batch": batch, "network_batch": 2 * batch, "steps": steps, "precision": args.precision,
               "ops_backend": "auto", "attention": attention_choice(device, model_cfg(model), "auto",
                                                                    _DTYPES[args.precision]),
               "method": sample_kwargs["sampler"], "cfg_scale": sample_kwargs["cfg_scale"]}
        row["published_steps"] = published
        counter = None
        try:
            torch._dynamo.reset()
            skips_before = _cudagraph_skips()
            wrapped = wrap_variant(model, variant, device, args)
            if variant == "eager":  # count network calls (NFE)
                counter = CallCounter(model)
            warm = min(WARMUP_STEPS, steps)
            run_sampler(objective, wrapped, batch, sample_kwargs, warm, device, args.precision, args.seed,
                        num_classes)
            if counter is not None:
                counter.count = 0
            timer = common.Timer(device)
            common.reset_peak_memory(device)
            times = []
            for _ in range(args.repeats):  # one timed run each (device-synchronised at start and stop)
                timer.start()
                out = run_sampler(objective, wrapped, batch, sample_kwargs, steps, device, args.precision,
                                  args.seed, num_classes)
                times.append(timer.stop() / 1e3)
            seconds = statistics.median(times)
            if counter is not None:
                row["nfe"] = counter.count // args.repeats
            if not torch.isfinite(out).all():
                raise FloatingPointError("the sampler produced non-finite values")
            row.update(status="ok", seconds_per_batch=seconds, img_per_s=batch / seconds,
                       peak_mem_gib=common.peak_memory_gib(device))
            if args.repeats > 1:
                row["seconds_per_batch_runs"] = times
            if steps != published:
                row.update(published_steps_estimate=True,
                           img_per_s_at_published_steps=batch / seconds * nfe_ratio)
            if variant == "cudagraphs":
                row["cudagraph_skips"] = _cudagraph_skips() - skips_before
            if args.profile:  # one run of N sampler steps by kernel category (profiling.py)
                profiling.profile_into(row, f"{name}-{variant}-b{batch}",
                                       lambda: run_sampler(objective, wrapped, batch, sample_kwargs, args.profile,
                                                           device, args.precision, args.seed, num_classes),
                                       1, device, args.out_dir, args.trace,
                                       per=f"one run of {args.profile} sampler steps")
        except _Skip as why:
            row.update(status="skipped", reason=str(why))
        except Exception as err:  # noqa: BLE001  (one failing variant must not lose the others)
            row.update(status="error", reason=common.error_line(err))
            if args.verbose:
                traceback.print_exc()
        finally:
            if counter is not None:
                counter.remove()
        rows.append(row)
        _print_row(row)
    eager = next((r for r in rows if r["variant"] == "eager" and r["status"] == "ok"), None)
    for r in rows:
        if eager and r["status"] == "ok":
            r["nfe"] = eager.get("nfe")
            r["speedup_vs_eager"] = r["img_per_s"] / eager["img_per_s"]
    del model
    common.free_memory(device)
    return rows


def _cudagraph_skips() -> int:
    """Inductor's running count of graphs it declined to capture as CUDA graphs."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def _print_row(r: dict) -> None:
    head = f"{r['sampler']:>20} {r['model']:>14} batch {r['batch']:4d} {r['variant']:>11}"
    if r["status"] != "ok":
        print(f"{head}  {r['status']}: {r.get('reason', '')}", flush=True)
        return
    scaled = ""
    if r.get("published_steps_estimate"):
        scaled = (f"  ({r['steps']} of {r['published_steps']} steps; est. "
                  f"{r['img_per_s_at_published_steps']:.2f} img/s at {r['published_steps']})")
    print(f"{head}  {r['img_per_s']:9.2f} img/s  {r['seconds_per_batch']:8.2f} s/batch{scaled}", flush=True)


#################################################################################
#                                     CLI                                       #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--size", choices=("full", "toy"), default="full",
                   help=f"full: the --model-size models; toy: tiny models, {TOY_STEPS} sampler steps")
    p.add_argument("--model-size", choices=("S", "B", "L", "XL"), default="XL")
    p.add_argument("--samplers", type=common.csv_choices(tuple(SAMPLERS)), default=list(SAMPLERS))
    p.add_argument("--variants", type=common.csv_choices(VARIANTS), default=list(VARIANTS))
    p.add_argument("--batches", default=None, help="comma-separated images per batch (default 64,256 GPU; 2 CPU)")
    p.add_argument("--steps", type=int, default=0, help="override the sampler steps (0: the published number)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="network precision (default bf16 autocast on GPU, fp32 on CPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled' (tests: aot_eager)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one run of N sampler steps per row: time by kernel category")
    p.add_argument("--trace", action="store_true", help="with --profile: also write a gzipped Chrome trace per row")
    common.add_output_args(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.steps < 0:
        p.error("--steps must be >= 0")
    if args.profile < 0:
        p.error("--profile must be >= 0")
    if args.trace and not args.profile:
        p.error("--trace needs --profile N (N > 0)")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.set_device(device)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    try:
        batches = [int(b) for b in (args.batches or ("64,256" if gpu else "2")).split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches must be positive integers, got {args.batches!r}")
    env = common.environment(device)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}", flush=True)
    size = "toy" if args.size == "toy" else args.model_size
    rows, path = [], None
    for name in args.samplers:
        for batch in batches:
            rows.extend(run_one(name, size, batch, device, args, args.variants))
            # Written after every (sampler, batch): a run cut off by a time limit keeps its rows.
            payload = {"kind": "sampling", **env,
                       "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "tag")},
                       "results": rows}
            path = common.write_results(payload, args.out_dir, "sampling", key_fields=KEY_FIELDS, tag=args.tag)
    print(f"# wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
