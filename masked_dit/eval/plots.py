"""Pictures for every run folder: loss curves per term and metric curves (matplotlib).

Sample grids are drawn by :func:`masked_dit.train.grid.save_grid`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | Path) -> list[dict]:
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # a run killed mid-write leaves at most one partial last line
                raise ValueError(f"{path}:{lineno}: not a JSON record") from None
    return records


def plot_curves(records: list[dict], keys: Sequence[str], path: str | Path, title: str, log_y: bool = False,
                step_key: str = "step") -> Path | None:
    """One line per key over ``step_key``; returns None when no record has any of the keys."""
    series = {k: [(r[step_key], r[k]) for r in records if k in r and step_key in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=k, lw=1.2, marker="o" if len(xs) < 20 else None, ms=3)
    ax.set_xlabel(step_key)
    ax.set_title(title)
    if log_y and all(y > 0 for pts in series.values() for _, y in pts):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# metrics.jsonl keys that are not loss terms: a step's bookkeeping (the trainer's train_step, MetricsLog)
# and the evaluation metrics; every other key is a term of the objective's loss (loss, mse, vb, mae,
# loss_full, loss_masked, denoising_loss, proj_loss, ...).
BOOKKEEPING_KEYS = ("step", "grad_norm", "lr", "mask_ratio", "img_per_s", "tflops_per_device", "mfu", "peak_mem_gib",
                    "nonfinite_steps")
METRIC_PREFIXES = ("digits_", "fid", "is_", "precision", "recall")


def loss_terms(keys) -> list[str]:
    return sorted(k for k in keys if k not in BOOKKEEPING_KEYS and not k.startswith(METRIC_PREFIXES))


def plot_run(run_dir: str | Path) -> list[Path]:
    """Loss curves per term (``loss_curves.png``) and metric curves (``metric_curves.png``)
    from a run folder's ``metrics.jsonl``: the loss terms (:func:`loss_terms`) and the evaluation keys
    (``digits_*``, ``fid``...)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics file in the run folder")
    records = read_jsonl(metrics)
    keys = sorted({k for r in records for k in r})
    loss_keys = loss_terms(keys)
    metric_keys = [k for k in keys if k.startswith(METRIC_PREFIXES)]
    out = [plot_curves(records, loss_keys, run_dir / "loss_curves.png", "training loss per term", log_y=True),
           plot_curves(records, metric_keys, run_dir / "metric_curves.png", "evaluation metrics vs step")]
    return [p for p in out if p is not None]
