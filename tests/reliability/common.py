"""Shared pieces of the reliability tests: a tiny CPU run of the real CLI in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

FAULTY = str(Path(__file__).with_name("faulty_train.py"))
REPO = str(Path(__file__).resolve().parents[2])

# A ~20k-parameter DiT on 16x16 digits: one step plus a checkpoint is ~0.1 s on one core.
TINY = {"model.depth": 2, "model.hidden_size": 32, "model.num_heads": 2, "model.patch_size": 4,
        "train.global_batch": 8, "train.log_every": 1, "train.ckpt_every": 1, "train.keep_last": 2,
        "train.sample_every": 100000, "train.progress": "false", "train.device": "cpu",
        "optim.warmup_steps": 0, "sample.steps": 2, "sample.num_per_class": 1, "parallel.tf32": "false"}


def cli_args(out_dir, preset="digits-dit", **overrides) -> list[str]:
    o = {**TINY, "run.out_dir": str(out_dir), **overrides}
    return ["train", "--preset", preset, *[f"--{k}={v}" for k, v in o.items()]]


def child_env(**faults) -> dict:
    """One thread per child (the machine is small and shared); faults as MDIT_FAULT_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDIT_FAULT_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    env.update({f"MDIT_FAULT_{k.upper()}": str(v) for k, v in faults.items()})
    return env


def run_cli(args, timeout=120, **faults) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, FAULTY, *args], capture_output=True, text=True,
                          env=child_env(**faults), timeout=timeout, cwd=REPO)


def records(run_dir) -> list[dict]:
    """The training records of metrics.jsonl (evaluation records, which carry no loss, left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "loss" in r]


def tiny_config(out_dir, preset="digits-dit", **overrides):
    from masked_dit.configs import apply_overrides, get_preset

    return apply_overrides(get_preset(preset), {**TINY, "run.out_dir": str(out_dir), **overrides})


def load_latest(cfg):
    """Loads the newest complete checkpoint of ``cfg``'s run into fresh objects; its step (None if none)."""
    from masked_dit.train import checkpoint as ckpt
    from masked_dit.train.build import build_model_from_config
    from masked_dit.train.dist import World
    from masked_dit.train.ema import EMA
    from masked_dit.train.optim import build_optimizer

    path = ckpt.resolve_resume("latest", Path(cfg.run.out_dir) / cfg.run.name / "checkpoints")
    if path is None:
        return None
    with torch.random.fork_rng():
        model = build_model_from_config(cfg)
        optimizer = build_optimizer(model.parameters(), cfg.optim)
        ema = EMA(model, cfg.optim.ema_decay)
        extra = ckpt.load_checkpoint(path, model, optimizer, ema, World())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "data" in extra, f"{path}: no data position"
    return extra["step"]
