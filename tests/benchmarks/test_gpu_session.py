"""benchmarks/gpu_session.sh runs its stages at toy size without a GPU (so it has not rotted when a
GPU session finally uses it) and refuses unknown stages."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"


def _run(tmp_path, *args, **extra_env):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", **extra_env}
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
    assert proc.stderr.strip() == ("unknown stage 'bogus'; valid: build-test, ops, train FAMILY SIZE [VARIANTS [BATCH]], "
                                   "profile FAMILY SIZE [BATCH], sample")


@pytest.mark.slow
def test_train_stage_runs_every_variant_into_one_file(tmp_path):
    """References + eager in one process, each compiled variant in its own at eager's batch: all eight
    rows end in the day's file, and the report computes the compiled rows' ratios from the merged rows."""
    import json

    proc = _run(tmp_path, "train", "dit", "XL")
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list(tmp_path.glob("train_step-*.json"))
    assert len(files) == 1, proc.stdout[-2000:]
    rows = {r["variant"]: r for r in json.loads(files[0].read_text())["results"]}
    assert set(rows) == {"reference", "reference_bf16", "eager", "eager_fused", "compiled", "compiled_fused",
                         "compiled_fused_mlp", "compiled_fused_fsdp"}
    assert rows["compiled_fused"]["status"] == "ok", rows["compiled_fused"].get("reason")
    assert rows["compiled_fused"]["batch"] == rows["eager"]["batch"]
    assert "# compiled variants at batch" in (tmp_path / "train_dit_XL.log").read_text()


def test_stage_deadline_refuses_to_start_a_run_it_cannot_finish(tmp_path):
    """A python run that would have less than MIN_SECONDS of the stage left is not started (a timeout
    would kill it with its results unwritten); the log says so."""
    proc = _run(tmp_path, "train", "dit", "XL", "reference", STAGE_SECONDS="5", MIN_SECONDS="60")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not started (only" in proc.stdout
    assert not list(tmp_path.glob("train_step-*.json"))


@pytest.mark.parametrize("python", ["/nonexistent/python3.12", sys.executable if sys.version_info[:2] != (3, 12)
                                    else "/bin/false"], ids=["missing", "not-3.12"])
def test_prebuild_ext_without_python312_says_so_in_one_line(python):
    """benchmarks/prebuild_ext.sh (the extension built here for the GPU image) names what it lacks: a
    python that is missing or does not run as 3.12 (a pyenv shim of an unselected version) is refused."""
    script = SCRIPT.parent / "prebuild_ext.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON312": python})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "prebuild_ext: no python3.12 found; set PYTHON312=/path/to/python3.12"
