"""benchmarks/gpu_session.sh runs its stages at toy size without a GPU (so it has not rotted when a
GPU session finally uses it) and refuses unknown stages."""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"


def _run(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_build_test_stage_reports_the_backends(tmp_path):
    proc = _run(tmp_path, "build-test")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attention (dense)" in (tmp_path / "info.txt").read_text()


@pytest.mark.slow
def test_sample_stage_writes_its_json(tmp_path):
    proc = _run(tmp_path, "sample")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.glob("sampling-*.json")), proc.stdout[-2000:]


def test_profile_stage_writes_summaries_and_traces(tmp_path):
    import json

    proc = _run(tmp_path, "profile", "sit", "XL", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("train_step-*-profile.json")
    rows = json.loads(result.read_text())["results"]
    assert [(r["variant"], r["status"]) for r in rows] == [("reference", "ok"), ("compiled_fused", "ok")]
    assert all(r["batch"] == 2 and r["profile"]["steps"] == 3 for r in rows)
    assert len(list(tmp_path.glob("trace-SiT-toy-*.json.gz"))) == 2
    assert "## SiT-toy-compiled_fused-b2" in proc.stdout


def test_unknown_stage_is_refused(tmp_path):
    proc = _run(tmp_path, "bogus")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("unknown stage 'bogus'; valid: build-test, ops, train FAMILY SIZE, "
                                   "profile FAMILY SIZE [BATCH], sample")
