"""Roofline floor of each family's sampler, counted on the CPU, predicted for a GPU ("two numbers first").

    python benchmarks/roofline_sampling.py --batches 64,256 --device-peaks h100,h200    # XL/2 samplers
    python benchmarks/roofline_sampling.py --size toy --out-dir /tmp/r                  # seconds, for tests

bench_sampling.py's samplers as its eager variant runs them on the GPU: bf16 autocast, classifier-free
guidance (the network sees [cond; uncond], 2 x batch), our fused ops one unit each, attention one unit
(roofline_step.RooflineMode). Each sampler is traced at two batches and two lengths (2 and 3 steps);
the ops of each length are fitted a + b * batch (roofline_step.fit_ops) and predicted at --batches.
A run of the published N steps then costs

    t(N) = t(2) + (NFE(N) - NFE(2)) * (t(3) - t(2)) / (NFE(3) - NFE(2))

the run's fixed work once (noise, the weight casts autocast caches over a run) and every further network
call at the cost of the third step's (Heun: its two calls with the update). NFE(N) is counted on the
toy model of the same family (the sampler's calls do not depend on the network's size).
Results: ``<out-dir>/roofline_sampling-cpu-<date>.json`` and a printed table. A floor, not a
measurement: launch gaps (what CUDA graphs remove) and kernel efficiency below the ceilings are not in it.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `masked_dit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from benchmarks.bench_sampling import (SAMPLERS, CallCounter, build_sampling_model, model_num_classes, run_sampler,
                                      sampler_nfe)
from benchmarks.roofline_step import (ATTN_EFFICIENCY, CATEGORIES, DEVICE_PEAKS, MATMUL, TOP_OPS, RooflineMode,
                                      add_count_args, check_count_args, fit_ops, predict, start_count, top_ops,
                                      write_count)

LENGTHS = (2, 3)  # sampler steps traced (ODE/SDE grids need 2 points): the fixed work and one more step


def trace_sampler(objective, model, batch: int, steps: int, sample_kwargs: dict, num_classes: int, seed: int):
    """Records of one sampler run (bf16 autocast, CPU) and its network calls."""
    mode = RooflineMode()
    with mode, CallCounter(model) as calls:
        run_sampler(objective, model, batch, sample_kwargs, steps, torch.device("cpu"), "bf16", seed, num_classes)
    return mode.records, calls.count


def count_sampler(name: str, size: str, args) -> dict:
    """Per-op fits for each traced length, the calls of each, and the published NFE."""
    from masked_dit.diffusion import objectives
    from masked_dit.models.flops import flops_per_image

    family, objective_name, sample_kwargs = SAMPLERS[name]
    torch.manual_seed(args.seed)
    model_name, model = build_sampling_model(family, size, torch.device("cpu"))
    num_classes = model_num_classes(model)
    objective = getattr(objectives, objective_name)()
    fits, nfe = {}, {}
    for steps in LENGTHS:
        traces = {}
        for b in args.count_batches:
            torch.manual_seed(args.seed)
            traces[b], nfe[steps] = trace_sampler(objective, model, b, steps, sample_kwargs, num_classes, args.seed)
        fits[steps] = fit_ops(traces)[0]
    if nfe[LENGTHS[1]] <= nfe[LENGTHS[0]]:
        raise RuntimeError(f"{name}: {LENGTHS[1]} steps made no more network calls than {LENGTHS[0]}")
    forward = float(flops_per_image(model, training=False))
    return dict(model=model_name, family=family, fits=fits, nfe=nfe, published_steps=sample_kwargs["steps"],
                published_nfe=sampler_nfe(name, SAMPLERS[name][2]["steps"], args.seed), forward_flops=forward,
                method=sample_kwargs["sampler"], cfg_scale=sample_kwargs["cfg_scale"])


def call_top_ops(counted: dict, batch: int, n: int = TOP_OPS) -> list[dict]:
    """The ``n`` ops (by name and category) that move the most bytes in one further network call."""
    (s1, s2), calls = LENGTHS, counted["nfe"][LENGTHS[1]] - counted["nfe"][LENGTHS[0]]
    tops = {s: {(o["name"], o["category"]): o["gb_per_step"] for o in top_ops(counted["fits"][s], batch, n=10 ** 6)}
            for s in LENGTHS}
    per_call = {k: (tops[s2].get(k, 0.0) - tops[s1].get(k, 0.0)) / calls for k in tops[s2]}
    ranked = sorted(per_call.items(), key=lambda kv: -kv[1])[:n]
    return [dict(name=name, category=cat, gb_per_call=gb) for (name, cat), gb in ranked]


def make_row(name: str, size: str, counted: dict, batch: int, peaks_name: str) -> dict:
    peaks = DEVICE_PEAKS[peaks_name]
    (s1, s2), nfe = LENGTHS, counted["nfe"]
    cats = {s: predict(counted["fits"][s], batch, peaks, tf32=False) for s in LENGTHS}
    calls = nfe[s2] - nfe[s1]  # the calls the second trace made beyond the first
    extra = counted["published_nfe"] - nfe[s1]

    def run_ms(cat_names):
        t1 = sum(cats[s1][c]["ms"] for c in cat_names)
        t2 = sum(cats[s2][c]["ms"] for c in cat_names)
        return t1 + extra * (t2 - t1) / calls

    nonmatmul = [c for c in CATEGORIES if c not in MATMUL]
    terms = {"gemm": run_ms(["gemm"]), "attention": run_ms(["attention"]), "memory_bound": run_ms(nonmatmul)}
    seconds = sum(terms.values()) / 1e3
    img_per_s = batch / seconds
    call_gb = {c: (cats[s2][c]["bytes"] - cats[s1][c]["bytes"]) / calls / (2 * batch) / 1e9 for c in CATEGORIES}
    call_matmul_flops = sum(cats[s2][c]["flops"] - cats[s1][c]["flops"] for c in MATMUL) / calls / (2 * batch)
    flops_per_image = 2 * counted["published_nfe"] * counted["forward_flops"]  # [cond; uncond] per call
    row = dict(sampler=name, model=counted["model"], family=counted["family"], size=size, variant="eager_fused",
               device_peaks=peaks_name, batch=batch, network_batch=2 * batch, precision="bf16 autocast",
               method=counted["method"], cfg_scale=counted["cfg_scale"], steps=counted["published_steps"],
               nfe=counted["published_nfe"], traced_nfe={str(k): v for k, v in nfe.items()},
               forward_flops_per_image=counted["forward_flops"],
               counted_matmul_flops_per_network_image=call_matmul_flops,
               counted_over_analytic=call_matmul_flops / counted["forward_flops"],
               gb_per_network_image=call_gb, floor_terms_ms=terms,
               floor_share={k: v / (seconds * 1e3) for k, v in terms.items()},
               pred_seconds_per_batch=seconds, pred_img_per_s=img_per_s,
               peaks=dict(peaks, attn_efficiency=ATTN_EFFICIENCY), top_ops=call_top_ops(counted, batch),
               status="ok")
    row.update(common.mfu_fields(img_per_s, flops_per_image, {"datasheet_tflops": peaks["datasheet_tflops"],
                                                              "measured_gemm_tflops": peaks["gemm_tflops"]}))
    return row


#################################################################################
#                                      CLI                                      #
#################################################################################

HEADER = (f"{'sampler':>20} {'model':>14} {'peaks':>5} {'batch':>5} {'NFE':>4} {'ratio':>6}  GB/net-img: "
          f"{'gemm':>5} {'attn':>5} {'other':>5}  {'s/batch':>8} {'gemm%':>5} {'mem%':>5} {'img/s':>7} {'MFU ds':>6}")


def _print_row(r: dict) -> None:
    if r["status"] != "ok":
        print(f"{r['sampler']:>20} {r.get('model', ''):>14}  {r['status']}: {r.get('reason', '')}", flush=True)
        return
    gb, s = r["gb_per_network_image"], r["floor_share"]
    other = sum(v for c, v in gb.items() if c not in MATMUL)
    print(f"{r['sampler']:>20} {r['model']:>14} {r['device_peaks']:>5} {r['batch']:5d} {r['nfe']:4d} "
          f"{r['counted_over_analytic']:6.3f}              {gb['gemm']:5.2f} {gb['attention']:5.2f} {other:5.2f}  "
          f"{r['pred_seconds_per_batch']:8.2f} {100 * s['gemm']:5.1f} {100 * s['memory_bound']:5.1f} "
          f"{r['pred_img_per_s']:7.2f} {100 * r['mfu_datasheet']:5.1f}%", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("full", "toy"), default="full", help="toy: tiny models, for tests")
    p.add_argument("--model-size", choices=("S", "B", "L", "XL"), default="XL")
    p.add_argument("--samplers", type=common.csv_choices(tuple(SAMPLERS)), default=list(SAMPLERS))
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256],
                   help="images per batch the prediction is for (the network sees twice as many)")
    add_count_args(p)
    common.add_output_args(p)
    args = p.parse_args(argv)
    if not args.batches or min(args.batches) < 1:
        p.error("--batches must be positive integers")
    check_count_args(p, args)
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    env = start_count("floor of a whole run at the published steps", HEADER)
    size = "toy" if args.size == "toy" else args.model_size
    rows = []
    for name in args.samplers:
        try:
            counted = count_sampler(name, size, args)
            for batch in args.batches:
                for peaks_name in args.device_peaks:
                    rows.append(make_row(name, size, counted, batch, peaks_name))
                    _print_row(rows[-1])
        except Exception as err:  # noqa: BLE001  (one failing sampler must not lose the others)
            rows.append(dict(sampler=name, size=size, status="error", reason=common.error_line(err)))
            _print_row(rows[-1])
            if args.verbose:
                traceback.print_exc()
    return write_count("roofline_sampling", env, args,
                       "floor of a run = t(2 steps) + (NFE - NFE(2)) x (t(3) - t(2)) / (NFE(3) - NFE(2)); t = sum of "
                       "max(FLOPs / ceiling, bytes / copy bandwidth) over matmul ops + non-matmul bytes / bandwidth",
                       rows, ("sampler", "model", "batch", "device_peaks"))


if __name__ == "__main__":
    main()
