"""Shared helpers of the benchmark scripts: timing, device facts, peaks, result files.

    from benchmarks.common import Timer, environment, peaks_for, write_results

Timing uses CUDA events on GPU (device time between two points of the stream, after a sync)
and ``time.perf_counter`` on CPU. Peaks: datasheet dense bf16 and the bf16 GEMM ceiling measured
on the lent machines (see ``/work/shared/notes/performance-facts.md``); MFU is reported against
both, and every record names which peak it used.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from masked_dit.train.metrics import PEAK_BF16_TFLOPS, gpu_key

RESULTS_DIR = Path(__file__).resolve().parent / "results"


#################################################################################
#                                    Peaks                                      #
#################################################################################

# Dense bf16 TFLOP/s from the datasheets: the trainer's table (one for both), keyed by board, so that the
# PCIe / NVL boards do not take their SXM part's peak.
DATASHEET_BF16_TFLOPS = PEAK_BF16_TFLOPS
device_key = gpu_key  # 'NVIDIA H100 80GB HBM3' -> 'H100', None when unknown
# 8192^3 bf16 GEMM measured on the lent machines (performance-facts.md): H100 SXM ('H100 80GB HBM3') and
# H200 SXM ('H200'); their keys match no other board. None: not measured.
MEASURED_GEMM_TFLOPS = {"H200": 788.0, "H100": 798.0}


def peaks_for(device: torch.device) -> dict:
    """{'key', 'datasheet_tflops', 'measured_gemm_tflops'} of ``device`` (values None when unknown/CPU)."""
    if device.type != "cuda":
        return {"key": None, "datasheet_tflops": None, "measured_gemm_tflops": None}
    key = device_key(torch.cuda.get_device_name(device))
    return {"key": key, "datasheet_tflops": DATASHEET_BF16_TFLOPS.get(key),
            "measured_gemm_tflops": MEASURED_GEMM_TFLOPS.get(key)}


def mfu_fields(img_per_s: float, flops_per_image: float | None, peaks: dict) -> dict:
    """TFLOP/s achieved and MFU against both peaks (None where a number is unknown)."""
    if not flops_per_image or not img_per_s:
        return {"tflops": None, "mfu_datasheet": None, "mfu_measured_gemm": None}
    tflops = img_per_s * flops_per_image / 1e12
    ds, gemm = peaks.get("datasheet_tflops"), peaks.get("measured_gemm_tflops")
    return {"tflops": tflops, "mfu_datasheet": tflops / ds if ds else None,
            "mfu_measured_gemm": tflops / gemm if gemm else None}


#################################################################################
#                                  Environment                                  #
#################################################################################

def _version(dist: str) -> str | None:
    # Metadata only: importing triton here would fix TRITON_INTERPRET for the whole process.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark runs from ('+dirty' when the tree has changes); else
    MASKED_DIT_COMMIT (the device tool copies the working tree without .git: its run command sets it),
    else None."""
    root = Path(__file__).resolve().parent.parent
    given = os.environ.get("MASKED_DIT_COMMIT") or None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return given
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return given


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_tag(device: torch.device) -> str:
    """Short file-name tag: 'h100', 'h200', 'a100', another GPU's slug, or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    key = device_key(torch.cuda.get_device_name(device))
    if key:
        return re.sub(r"[^a-z0-9]+", "-", key.lower())
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    """What a result file records about where and with what it ran."""
    now = _dt.datetime.now(_dt.timezone.utc)
    env = {
        "device": device_name(device),
        "device_tag": device_tag(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%H:%M:%S"),
        "python": platform.python_version(),
        "peaks": peaks_for(device),
        # Allocator settings change which batch fits (fragmentation after an OOM probe) and cuDNN's
        # autotuner the conv kernel: a result names them.
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = props.total_memory / 2 ** 30
    return env


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def write_results(payload: dict, out_dir: str | os.PathLike | None, prefix: str, key_fields=(),
                  tag: str | None = None) -> Path:
    """Writes ``<out_dir>/<prefix>-<device_tag>-<date>[-<tag>].json`` and returns its path.

    When the file exists (an earlier run of the same day, e.g. another family), its rows are kept
    unless this run measured the same ``key_fields`` again; every row carries its run's commit and
    time, the top-level fields are this run's.
    """
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    if tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise ValueError(f"--tag must be letters, digits, '_', '.' or '-', got {tag!r}")
    path = out / f"{prefix}-{payload['device_tag']}-{payload['date']}{'-' + tag if tag else ''}.json"
    rows = [dict(r, commit=payload.get("commit"), time_utc=payload.get("time_utc")) for r in payload["results"]]
    if key_fields and path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("kind") == payload.get("kind") and old.get("device") == payload.get("device"):
            new_keys = {tuple(r.get(k) for k in key_fields) for r in rows}
            rows = [r for r in old.get("results", []) if tuple(r.get(k) for k in key_fields) not in new_keys] + rows
    path.write_text(json.dumps(dict(payload, results=rows), indent=2, default=str) + "\n")
    return path


#################################################################################
#                                    Timing                                     #
#################################################################################

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Elapsed milliseconds between ``start()`` and ``stop()``: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        synchronize(self.device)
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t1 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._t1.record()
            self._t1.synchronize()
            return float(self._t0.elapsed_time(self._t1))
        return (time.perf_counter() - self._t0) * 1e3


def time_loop(fn, iters: int, device: torch.device, warmup: int = 0) -> float:
    """Milliseconds per call of ``fn()`` over ``iters`` back-to-back calls (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    timer = Timer(device)
    timer.start()
    for _ in range(iters):
        fn()
    return timer.stop() / max(iters, 1)


#################################################################################
#                                    Memory                                     #
#################################################################################

OutOfMemoryError = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    """Returns cached GPU blocks after a variant or an OOM probe (nothing to do on CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset (None on CPU: no allocator statistics)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def run_or_oom(fn, *args) -> bool:
    """True when ``fn(*args)`` ran, False when it ran out of memory (other errors propagate)."""
    try:
        fn(*args)
        return True
    except Exception as err:  # noqa: BLE001  (only OOM is expected; anything else is re-raised)
        if not is_oom(err):
            raise
        return False


def largest_fitting_batch(try_batch, start: int, cap: int, device: torch.device) -> tuple[int, list[dict]]:
    """Doubles the batch from ``start`` while ``try_batch(b)`` succeeds (up to ``cap``); returns the
    largest batch that ran and the probe log. An OOM ends the search; other errors propagate."""
    if start < 1 or cap < start:
        raise ValueError(f"batch search needs 1 <= start <= cap, got start={start}, cap={cap}")
    best, log, b = None, [], start
    while b <= cap:
        ok = run_or_oom(try_batch, b)
        log.append({"batch": b, "ok": ok} if ok else {"batch": b, "ok": False, "error": "out of memory"})
        free_memory(device)  # outside the except block: the traceback no longer pins the activations
        if not ok:
            break
        best = b
        b *= 2
    if best is None:
        raise RuntimeError(f"batch {start} does not fit in memory (out of memory at the first probe)")
    return best, log


def error_line(err: BaseException) -> str:
    """'Type: first line of the message', what a failed row records as its reason."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def add_output_args(p, seed: bool = True) -> None:
    """The arguments every benchmark script ends with: --seed, --out-dir, --tag, --verbose."""
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--tag", default=None, help="suffix of the result file name (default: the day's file)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")


def csv_choices(choices):
    """argparse ``type=``: a comma-separated list whose items must all be in ``choices``."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"invalid choice(s) {bad or text!r}; valid: {', '.join(choices)}")
        return items
    return parse
