"""Where a step's time goes: a torch.profiler summary by kernel category, to fix the largest gap first.

    summary = profile_steps(lambda: runner.step(batch), steps=3, device=device, trace="trace.json.gz")

On a GPU the basis is device time: every kernel, copy and memset the steps launched, grouped into
categories (GEMM, attention, our fused ops, Inductor's fused kernels, unfused aten elementwise/norm/
index kernels, optimizer + EMA, communication, memory). The union of their intervals against the
wall time of the steps gives the *idle* share: time the GPU waited on the host (launch overhead,
syncs, Python). On the CPU the basis is each op's self time (there are no kernels); that is only
good for testing this code at toy size.
"""
from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
import shutil
import tempfile
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins: names are lower-cased kernel (GPU) or op (CPU) names. Order matters: our kernels
# and attention before GEMM (cutlass/sm90 appear in attention names too), Inductor before aten.
CATEGORIES = (
    ("fused_ops", ("masked_dit", "_adaln_", "_gated_", "_gather_rows", "_scatter_rows", "_scatter_backward")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "flex")),
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::baddbmm", "matmul", "_scaled_mm", "conv")),
    ("optimizer_ema", ("adam", "adan", "multi_tensor", "foreach", "lerp")),
    ("inductor", ("triton_",)),
    ("communication", ("nccl", "c10d", "all_reduce", "all_gather", "reduce_scatter")),
    ("memory", ("memcpy", "memset", "aten::copy_", "aten::fill_", "aten::zero_", "aten::empty", "aten::clone")),
    ("norm_softmax", ("layer_norm", "layernorm", "softmax", "group_norm")),
    ("index", ("index", "gather", "scatter")),
    ("elementwise", ("elementwise", "reduce_kernel", "aten::")),
)
TOP = 15


def category(name: str) -> str:
    low = name.lower()
    for cat, needles in CATEGORIES:
        if any(n in low for n in needles):
            return cat
    return "other"


def short_name(name: str, width: int = 110) -> str:
    """'void at::native::vectorized_elementwise_kernel<4, ...>(...)' -> 'at::native::vectorized_elementwise_kernel<4, ...'"""
    name = re.sub(r"^void ", "", name.strip())
    return name if len(name) <= width else name[: width - 3] + "..."


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(events, steps: int, wall_ms: float, on_device: bool) -> dict:
    """Per-step milliseconds by category and the top kernels/ops from a profiler's flat event list."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [us, calls]
    intervals = []
    for e in events:
        if on_device:
            # user-annotation spans on the GPU timeline (Optimizer.step#..., Inductor's "## Call
            # CompiledFxGraph ##", "Torch-Compiled Region") cover kernels counted on their own: as torch's
            # own tables do, leave them out (they double the time and hide the launch gaps)
            if e.device_type == DeviceType.CPU or getattr(e, "is_user_annotation", False):
                continue
            us = e.time_range.elapsed_us()
            intervals.append((e.time_range.start, e.time_range.end))
        else:
            if e.device_type != DeviceType.CPU or not (e.name.startswith("aten::") or "::" in e.name):
                continue
            us = e.self_cpu_time_total
        per_name[e.name][0] += us
        per_name[e.name][1] += 1
    categories: dict[str, float] = defaultdict(float)
    for name, (us, _) in per_name.items():
        categories[category(name)] += us / 1e3 / steps
    total_ms = sum(categories.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {
        "steps": steps,
        "basis": "device time of kernels, copies and memsets" if on_device else "CPU self time of ops (toy use only)",
        "wall_ms_per_step": wall_ms / steps,
        "busy_ms_per_step": _union_us(intervals) / 1e3 / steps if on_device else None,
        "categories_ms_per_step": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "category_share": {k: v / total_ms for k, v in sorted(categories.items(), key=lambda kv: -kv[1])} if total_ms else {},
        "top": [{"name": short_name(n), "category": category(n), "ms_per_step": us / 1e3 / steps,
                 "calls_per_step": calls / steps} for n, (us, calls) in top],
    }


def profile_steps(step, steps: int, device: torch.device, trace: str | os.PathLike | None = None) -> dict:
    """Runs ``step()`` ``steps`` times under the profiler (after the caller's warmup) and summarizes.
    ``trace``: also write a gzipped Chrome trace there (open in Perfetto / chrome://tracing)."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        if on_device:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if on_device:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    summary = summarize(prof.events(), steps, wall_ms, on_device)
    if trace is not None:
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
        summary["trace"] = str(trace)
    return summary


def profile_into(row: dict, label: str, step, steps: int, device: torch.device, out_dir, trace: bool,
                 per: str | None = None) -> None:
    """``--profile``: ``steps`` calls of ``step()`` under the profiler, after the row was timed (its
    overhead stays out of the numbers), into ``row["profile"]`` and printed; a failure (e.g. the
    profiler's memory) only sets ``row["profile_error"]``: the measured row stays. ``trace``: a gzipped
    Chrome trace named after ``label`` in ``out_dir``; ``per``: what one step is, if not a step."""
    from benchmarks import common

    path = None
    if trace:
        path = Path(out_dir or common.RESULTS_DIR) / f"trace-{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}.json.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = profile_steps(step, steps, device, trace=path)
    except Exception as err:  # noqa: BLE001
        row["profile_error"] = common.error_line(err)
        print(f"# profile of {label} failed: {row['profile_error']}", flush=True)
        return
    if per is not None:
        summary["per"] = per
    row["profile"] = summary
    text = format_summary(label if per is None else f"{label}, {per}", summary)
    print(text if per is None else text.replace("ms/step", "ms/run"), flush=True)


def format_summary(label: str, summary: dict) -> str:
    """A short text table: categories with ms/step and share, then the top kernels."""
    busy = summary["busy_ms_per_step"]
    head = f"## {label}: {summary['wall_ms_per_step']:.2f} ms/step under the profiler"
    if busy is not None:
        idle = max(summary["wall_ms_per_step"] - busy, 0.0)
        head += f", GPU busy {busy:.2f} ms, idle {idle:.2f} ms ({100 * idle / summary['wall_ms_per_step']:.0f}%)"
    lines = [head, f"   basis: {summary['basis']}"]
    for cat, ms in summary["categories_ms_per_step"].items():
        lines.append(f"   {cat:>14} {ms:9.3f} ms  {100 * summary['category_share'][cat]:5.1f}%")
    lines.append("   top:")
    for t in summary["top"]:
        lines.append(f"   {t['ms_per_step']:9.3f} ms  x{t['calls_per_step']:<6g} {t['category']:>13}  {t['name']}")
    return "\n".join(lines)
