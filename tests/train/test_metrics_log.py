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


def test_truncate_after_keeps_one_record_per_step(tmp_path):
    """On resume at step 2, records of steps 3+ (about to be re-done) are dropped; a torn last line too."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    log = metrics.MetricsLog(path, flops_per_image=None, peak=None)
    log.truncate_after(2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    log.write({"step": 3, "loss": 3.0})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    log.truncate_after(0)
    assert path.read_text() == ""


def test_peak_by_device_name_tells_pcie_and_nvl_boards_from_sxm(monkeypatch):
    """'NVIDIA H100 PCIe' used to match the 'H100' entry (989, the SXM part) and report an MFU 24% low
    against its 756 TFLOP/s datasheet peak."""
    cuda = torch.device("cuda", 0)
    expected = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
                "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA H800 PCIe": 756.0,
                "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA GeForce RTX 3090": None}
    for name, tflops in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        got = metrics.peak_flops(cuda)
        assert got == (None if tflops is None else tflops * 1e12), name
    assert metrics.peak_flops(cuda, override_tflops=500) == 500e12


def test_mdtv2_flops_count_both_passes_at_mask_ratio_zero():
    """MDTv2's objective always runs a full and a masked pass; at mask_ratio = jitter = 0 the masked pass
    keeps every token but still runs. Its FLOPs used to be dropped there (MFU halved): the count must
    stay continuous as the ratio goes to 0."""
    from masked_dit.configs import apply_overrides, get_preset
    from masked_dit.train.build import build_model_from_config

    def flops(ratio):
        cfg = apply_overrides(get_preset("imagenet256-mdtv2-xl2"),
                              {"objective.mask_ratio": ratio, "objective.mask_ratio_jitter": 0.0})
        with torch.device("meta"):
            model = build_model_from_config(cfg)
        return metrics.training_flops_per_image(model, cfg.objective)

    at_zero, near_zero = flops(0.0), flops(1 / 256)  # 1/256 of 256 tokens: 255 kept
    assert abs(at_zero - near_zero) / near_zero < 0.01, (at_zero, near_zero)


def test_peak_memory_is_per_log_window(tmp_path, monkeypatch):
    """Each record's peak_mem_gib is that window's peak (the counter is reset after each record)."""
    peaks = iter([3 * 2 ** 30, 1 * 2 ** 30])
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    world = World(rank=0, local_rank=0, size=1, device=torch.device("cuda", 0))
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", flops_per_image=None, peak=None)
    records = []
    for step in (1, 2):
        log.add({"loss": 1.0}, images=2)
        records.append(log.flush(step, world, {}))
    assert [r["peak_mem_gib"] for r in records] == [3.0, 1.0] and len(resets) == 2


def test_tflops_count_each_steps_own_flops(tmp_path, monkeypatch):
    """A step's FLOPs per image (MaskDiT's scheduled ratio) replace the run's for that step's images."""
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: 0.0)
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", flops_per_image=2e12, peak=10e12)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: 2.0)  # the window lasts 2 s
    log.add({"loss": 1.0}, images=4)                          # 4 x 2e12
    log.add({"loss": 1.0}, images=4, flops_per_image=1e12)    # 4 x 1e12
    record = log.flush(2, _world(), {})
    assert record["tflops_per_device"] == 12e12 / 2.0 / 1e12 and record["mfu"] == 0.6


def test_lr_is_the_last_steps_not_the_windows_mean(tmp_path):
    """During warm-up the window's mean lr was below every step's but the last: a record shows the lr
    its step ran with. The open window survives a checkpoint, also one written before "last" existed."""
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", flops_per_image=None, peak=None)
    log.add({"loss": 1.0, "lr": 1e-4}, images=2)
    log.add({"loss": 3.0, "lr": 2e-4}, images=2)
    resumed = metrics.MetricsLog(None, flops_per_image=None, peak=None)
    resumed.load_state_dict(log.state_dict())
    resumed.add({"loss": 5.0, "lr": 3e-4}, images=2)
    record = resumed.flush(3, _world(), {})
    assert record["lr"] == 3e-4 and record["loss"] == 3.0
    old = metrics.MetricsLog(None, flops_per_image=None, peak=None)
    old.load_state_dict({"sums": {"loss": 4.0, "lr": 3e-4}, "count": 2})  # an older checkpoint's window
    assert old.flush(2, _world(), {})["lr"] == 1.5e-4
    assert resumed.flush(4, _world(), {}) is None and resumed.last == {}


def test_paused_time_stays_out_of_the_rate(tmp_path, monkeypatch):
    """A grid or checkpoint between log points is not training: img/s and MFU leave it out (the record
    after a grid showed a fraction of the rate)."""
    clock = iter([0.0, 1.0, 11.0, 12.0, 13.0, 113.0, 114.0])  # reset, pause 1..11, flush at 12; then 13..113
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    log = metrics.MetricsLog(None, flops_per_image=1e12, peak=4e12)
    log.add({"loss": 1.0}, images=8)
    with log.paused():
        pass
    record = log.flush(1, _world(), {})
    assert record["img_per_s"] == 4.0 and record["mfu"] == 1.0  # 8 images in 2 s of training
    log.add({"loss": 1.0}, images=8)  # the next window starts with nothing paused
    assert log.flush(2, _world(), {})["img_per_s"] == 8 / 100
