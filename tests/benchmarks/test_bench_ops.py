"""bench_ops.py end to end at toy size on the CPU (it had no test: the ops stage of gpu_session.sh)."""
import json

import pytest

from benchmarks import bench_ops


def test_toy_run_writes_every_case_with_reference_speedups(tmp_path):
    path = bench_ops.main(["--size", "toy", "--device", "cpu", "--out-dir", str(tmp_path),
                           "--ops", "gather_tokens,adaln_modulate,adaln_modulate_to_bf16,attention"])
    data = json.loads(path.read_text())
    assert data["kind"] == "ops" and data["copy_bandwidth_gbps"] > 0
    rows = data["results"]
    assert {r["op"] for r in rows} == {"gather_tokens", "adaln_modulate", "adaln_modulate_to_bf16", "attention"}
    for op in ("gather_tokens", "adaln_modulate", "adaln_modulate_to_bf16", "attention"):
        for mode in bench_ops.MODES:
            ref = [r for r in rows if r["op"] == op and r["mode"] == mode and r["impl"] == "reference:eager"]
            assert ref and ref[0]["status"] == "ok", ref
            assert ref[0]["speedup_vs_reference"] == pytest.approx(1.0)
            assert any(r["impl"].startswith("backend:") and r["status"] == "ok" for r in rows
                       if r["op"] == op and r["mode"] == mode)
    # the blocks' autocast case: an fp32 residual in, bf16 h out (what the model runs)
    assert all(r["shape"]["x"] == "float32" and r["shape"]["h"] == "bfloat16"
               for r in rows if r["op"] == "adaln_modulate_to_bf16")
    att = [r for r in rows if r["op"] == "attention" and r["status"] == "ok"]
    assert all(r["tflops"] > 0 for r in att)


def test_results_are_written_after_every_op(tmp_path, monkeypatch):
    """A run stopped part-way (the ops stage's time limit) keeps the ops it finished."""
    real, calls = bench_ops.measure, []

    def measure(case, *args, **kwargs):
        calls.append(case.op)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the SIGTERM of `timeout`
        return real(case, *args, **kwargs)

    monkeypatch.setattr(bench_ops, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        bench_ops.main(["--size", "toy", "--device", "cpu", "--out-dir", str(tmp_path),
                        "--ops", "gather_tokens,adaln_modulate"])
    (path,) = tmp_path.glob("ops-*.json")
    assert {r["op"] for r in json.loads(path.read_text())["results"]} == {"gather_tokens"}


def test_mlp_gelu_case_counts_gemm_flops_and_names_its_backends(tmp_path):
    path = bench_ops.main(["--size", "toy", "--device", "cpu", "--out-dir", str(tmp_path), "--ops", "mlp_gelu"])
    rows = json.loads(path.read_text())["results"]
    by = {(r["impl"], r["mode"]): r for r in rows}
    for mode in bench_ops.MODES:
        assert by[("backend:torch", mode)]["status"] == "ok"
        assert "has no triton backend" in by[("backend:triton", mode)]["reason"]
        assert by[("backend:cuda", mode)]["status"] == "skipped"
        ref = by[("reference:eager", mode)]
        # two GEMMs of 2*M*D*4D each forward; the backward's four GEMMs twice that
        s = ref["shape"]
        flops = 2 * 2.0 * s["B"] * s["L"] * s["D"] * s["hidden"] * (3.0 if mode == "fwd+bwd" else 1.0)
        assert ref["tflops"] == pytest.approx(flops / (ref["ms"] * 1e-3) / 1e12)
