"""Timing, batch search, MFU fields and result files of benchmarks/common.py."""
import json

import pytest
import torch

from benchmarks import common


def _oom_above(limit, seen):
    def try_batch(b):
        seen.append(b)
        if b > limit:
            raise common.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return try_batch


def test_batch_search_doubles_until_oom():
    seen = []
    best, log = common.largest_fitting_batch(_oom_above(40, seen), 8, 1024, torch.device("cpu"))
    assert best == 32 and seen == [8, 16, 32, 64]
    assert [e["ok"] for e in log] == [True, True, True, False]


def test_batch_search_stops_at_cap_and_reraises_other_errors():
    seen = []
    assert common.largest_fitting_batch(_oom_above(10 ** 6, seen), 3, 24, torch.device("cpu"))[0] == 24
    assert seen == [3, 6, 12, 24]

    def broken(b):
        raise KeyError("not an OOM")
    with pytest.raises(KeyError):
        common.largest_fitting_batch(broken, 8, 64, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="batch 8 does not fit"):
        common.largest_fitting_batch(_oom_above(4, []), 8, 64, torch.device("cpu"))
    with pytest.raises(ValueError, match="start"):
        common.largest_fitting_batch(_oom_above(4, []), 0, 64, torch.device("cpu"))


def test_mfu_fields_use_both_peaks():
    peaks = {"key": "H100", "datasheet_tflops": 989.0, "measured_gemm_tflops": 798.0}
    f = common.mfu_fields(100.0, 712e9, peaks)  # DiT-XL/2 training FLOPs per image at 100 img/s
    assert f["tflops"] == pytest.approx(71.2)
    assert f["mfu_datasheet"] == pytest.approx(71.2 / 989.0)
    assert f["mfu_measured_gemm"] == pytest.approx(71.2 / 798.0)
    assert common.mfu_fields(100.0, 712e9, common.peaks_for(torch.device("cpu")))["mfu_datasheet"] is None


def test_device_key_and_tags():
    assert common.device_key("NVIDIA H100 80GB HBM3") == "H100"
    assert common.device_key("NVIDIA H200") == "H200"
    assert common.device_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert common.device_key("Tesla T4") is None
    # the PCIe / NVL boards have lower datasheet peaks than the SXM part (and no measured ceiling here)
    assert common.device_key("NVIDIA H100 PCIe") == "H100 PCIe"
    assert common.DATASHEET_BF16_TFLOPS[common.device_key("NVIDIA H100 NVL")] == 835.0
    assert common.DATASHEET_BF16_TFLOPS[common.device_key("NVIDIA H100 80GB HBM3")] == 989.0
    # the H200 NVL / H800 PCIe boards: their own peaks (they took the SXM 989 here, the trainer's 835 / 756)
    assert common.DATASHEET_BF16_TFLOPS[common.device_key("NVIDIA H200 NVL")] == 835.0
    assert common.DATASHEET_BF16_TFLOPS[common.device_key("NVIDIA H800 PCIe")] == 756.0
    # a measured GEMM ceiling only for the boards it was measured on (not GH200's, nor the PCIe / NVL boards)
    for other in ("NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA GH200 480GB"):
        assert common.MEASURED_GEMM_TFLOPS.get(common.device_key(other)) is None, other
    assert common.device_tag(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="--device"):
        common.resolve_device("tpu")


def test_timer_and_time_loop_on_cpu():
    calls = []
    ms = common.time_loop(lambda: calls.append(1), 3, torch.device("cpu"), warmup=2)
    assert len(calls) == 5 and ms >= 0.0


def test_write_results_merges_rows_of_the_day(tmp_path):
    base = {"kind": "train_step", "device": "cpu", "device_tag": "cpu", "date": "2026-01-02", "commit": "abc"}
    rows1 = [{"model": "A", "variant": "eager", "v": 1}, {"model": "B", "variant": "eager", "v": 1}]
    path = common.write_results(dict(base, results=rows1), tmp_path, "train_step", key_fields=("model", "variant"))
    assert path.name == "train_step-cpu-2026-01-02.json"
    common.write_results(dict(base, commit="def", results=[{"model": "B", "variant": "eager", "v": 2}]), tmp_path,
                         "train_step", key_fields=("model", "variant"))
    rows = json.loads(path.read_text())["results"]
    assert [(r["model"], r["v"], r["commit"]) for r in rows] == [("A", 1, "abc"), ("B", 2, "def")]
    tagged = common.write_results(dict(base, results=[]), tmp_path, "train_step", tag="run2")
    assert tagged.name == "train_step-cpu-2026-01-02-run2.json"
    with pytest.raises(ValueError, match="--tag"):
        common.write_results(dict(base, results=[]), tmp_path, "train_step", tag="a/b")


def test_environment_names_allocator_and_cudnn_settings(monkeypatch):
    import torch

    from benchmarks import common as c

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env = c.environment(torch.device("cpu"))
    assert env["pytorch_cuda_alloc_conf"] == "expandable_segments:True"
    assert env["cudnn_benchmark"] is bool(torch.backends.cudnn.benchmark)


def test_commit_comes_from_the_environment_without_git(monkeypatch):
    """The device tool copies the working tree without .git: the run command names the commit."""
    import subprocess

    from benchmarks import common

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "not a repo"))
    monkeypatch.setenv("MASKED_DIT_COMMIT", "d0c6916")
    assert common.git_commit() == "d0c6916"
    monkeypatch.delenv("MASKED_DIT_COMMIT")
    assert common.git_commit() is None
