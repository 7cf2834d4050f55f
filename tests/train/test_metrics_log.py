"""metrics.jsonl records, and TensorBoard scalars when the package is installed."""
import importlib.util
import json

import torch

from masked_dit.train import metrics
from masked_dit.train.dist import World


class FakeWriter:
    def __init__(self):
        self.scalars, self.flushed = [], 0

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def flush(self):
        self.flushed += 1


def _world():
    return World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))


def test_records_go_to_jsonl_and_tensorboard(tmp_path, monkeypatch):
    writer = FakeWriter()
    monkeypatch.setattr(metrics, "_tensorboard_writer", lambda log_dir: writer)
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", flops_per_image=2e9, peak=1e12, tensorboard_dir=tmp_path)
    log.add({"loss": 1.0, "grad_norm": 2.0}, images=4)
    log.add({"loss": 3.0, "grad_norm": 4.0}, images=4)
    record = log.flush(7, _world(), {})
    log.write({"step": 7, "digits_cond_acc": 0.5, "note": "text is not a scalar"})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == record and record["loss"] == 2.0 and record["grad_norm"] == 3.0 and "mfu" in record
    assert lines[1]["digits_cond_acc"] == 0.5
    keys = {k for k, _, step in writer.scalars if step == 7}
    assert {"loss", "grad_norm", "img_per_s", "mfu", "digits_cond_acc"} <= keys and "note" not in keys
    assert writer.flushed == 2


def test_tensorboard_only_when_installed(tmp_path):
    installed = importlib.util.find_spec("tensorboard") is not None
    assert (metrics._tensorboard_writer(tmp_path / "tb") is not None) == installed
