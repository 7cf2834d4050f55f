"""Throughput, model FLOPs utilisation and the metrics log (one line + one JSONL record per K steps)."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# Dense bf16 datasheet peaks (TFLOP/s) by a substring of the device name (any case), first match wins: the
# PCIe / NVL boards (lower clocks and power) and GH200 come before the family name, which would match them
# too. MFU is reported against these unless --train.peak_tflops overrides them; benchmarks/ uses the same.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H800 PCIe": 756.0, "H200 NVL": 835.0, "GH200": 989.0,
                    "A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0}


def gpu_key(name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA H100 PCIe' -> 'H100 PCIe': the table key, None if unknown."""
    upper = name.upper()
    return next((key for key in PEAK_BF16_TFLOPS if key.upper() in upper), None)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of ``device``: the override, else the table entry for the GPU name, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    key = gpu_key(torch.cuda.get_device_name(device))
    return None if key is None else PEAK_BF16_TFLOPS[key] * 1e12


def training_flops_per_image(model, objective_cfg, mask_ratio: float | None = None) -> float | None:
    """Model FLOPs of one training image (forward + backward), from masked_dit.models.flops; MaskDiT at
    ``mask_ratio`` when given (its scheduled ratio of the step), else at the config's."""
    try:
        from masked_dit.models.flops import flops_per_image
    except ImportError:
        return None
    ratio = 0.0
    if objective_cfg.kind == "mdtv2":
        ratio = objective_cfg.mask_ratio + objective_cfg.mask_ratio_jitter / 2  # mean of the drawn ratio
    elif objective_cfg.kind == "edm_maskdit":
        ratio = objective_cfg.mask_ratio if mask_ratio is None else mask_ratio
    try:  # MDT: flops_per_image counts the objective's two passes
        return float(flops_per_image(model, mask_ratio=ratio, training=True))
    except (ValueError, AttributeError, TypeError):
        return None


class MetricsLog:
    """Accumulates per-step values between log points; rank 0 writes ``metrics.jsonl``. Values are
    averaged over the window, except ``LAST_VALUE_KEYS`` (the schedule's learning rate), which are
    the window's last step's: the lr a record shows is the one its step ran with."""

    LAST_VALUE_KEYS = ("lr",)

    def __init__(self, path: Path | None, flops_per_image: float | None, peak: float | None,
                 tensorboard_dir: Path | None = None):
        self.path, self.flops_per_image, self.peak = path, flops_per_image, peak
        self.tensorboard = _tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None else None
        self.sums: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.count = 0
        self.reset_clock()  # images, and this rank's model FLOPs, since the clock started

    def add(self, values: dict, images: int, flops_per_image: float | None = None) -> None:
        """``flops_per_image``: this step's, where it varies (MaskDiT's scheduled mask ratio)."""
        for k, v in values.items():
            if k in self.LAST_VALUE_KEYS:
                self.last[k] = float(v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        self.images += images
        self.flops += images * ((self.flops_per_image or 0.0) if flops_per_image is None else flops_per_image)

    def state_dict(self) -> dict:
        """The open log window (this rank's sums since the last record): saved in each checkpoint, so
        a record whose window spans a resume averages the same steps as in one run."""
        return {"sums": dict(self.sums), "last": dict(self.last), "count": self.count}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.sums, self.count = dict(state["sums"]), int(state["count"])
            # checkpoints from before "last" summed the lr with the other values
            self.last = dict(state.get("last", {}))
            for k in self.LAST_VALUE_KEYS:
                if k in self.sums:
                    total = self.sums.pop(k)
                    self.last.setdefault(k, total / max(self.count, 1))

    def reset_clock(self) -> None:
        self.t0 = time.perf_counter()
        self.paused_s = 0.0
        self.images, self.flops = 0, 0.0

    @contextmanager
    def paused(self):
        """Time that is not training (sample grids, evaluations, checkpoints) stays out of the window's
        img/s and MFU: the record after a grid showed a fraction of the real rate. The GPU's queued
        work of the last step is finished first, so it stays in."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def flush(self, step: int, world, extra: dict) -> dict | None:
        """Averages over the window and ranks; returns the record (rank 0 writes it)."""
        from masked_dit.train.dist import all_reduce_mean

        if self.count == 0:
            return None
        means = all_reduce_mean({k: v / self.count for k, v in self.sums.items()}, world)
        elapsed = max(time.perf_counter() - self.t0 - self.paused_s, 1e-9)
        img_s = self.images * world.size / elapsed
        record = {"step": step, **means, **self.last, **extra, "img_per_s": img_s}
        if self.flops_per_image:
            tflops = self.flops / elapsed / 1e12  # per device
            record["tflops_per_device"] = tflops
            if self.peak:
                record["mfu"] = tflops * 1e12 / self.peak
        if torch.cuda.is_available() and world.device.type == "cuda":
            # this window's peak (reset below), so a spike (a sample grid, a checkpoint) shows where it happened
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(world.device) / 2 ** 30
            torch.cuda.reset_peak_memory_stats(world.device)
        if world.is_main:
            self.write(record)
        self.sums, self.last, self.count = {}, {}, 0
        self.reset_clock()
        return record

    def truncate_after(self, step: int, evaluations_at_step: bool = True) -> None:
        """Drops records past ``step`` from ``metrics.jsonl`` (rank 0): after a resume those steps are
        re-done, so each step keeps one record. ``evaluations_at_step=False`` also drops the records
        without a loss at ``step`` (a finished run's final evaluation, which a re-run writes again).
        A torn line (a kill mid-write) goes too. Rewritten to a temporary file and renamed, so a kill
        mid-way leaves the old file."""
        if self.path is None or not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
                record_step = record["step"]
            except (ValueError, KeyError, TypeError):
                continue
            if record_step < step or (record_step == step and (evaluations_at_step or "loss" in record)):
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) == len(lines) and (not lines or lines[-1].endswith("\n")):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        """Appends a record to ``metrics.jsonl`` (and TensorBoard when installed); rank 0 only."""
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()


def _tensorboard_writer(log_dir: Path):
    """A TensorBoard ``SummaryWriter`` when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: metrics.jsonl is always written
        return None
    return SummaryWriter(str(log_dir))


def format_record(r: dict) -> str:
    parts = [f"step {r['step']}"]
    for k, v in r.items():
        if k == "step":
            continue
        if k == "mfu":
            parts.append(f"mfu {100 * v:.1f}%")
        elif k == "lr":
            parts.append(f"lr {v:.2e}")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
    return " | ".join(parts)
