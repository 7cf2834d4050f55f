"""benchmarks/bench_ops.py end to end at toy size on the CPU: the JSON it writes."""
import json

import pytest

from benchmarks import bench_ops
from masked_dit.ops import dispatch

TOY = ["--size", "toy", "--device", "cpu", "--iters", "1", "--warmup", "0"]
ENV_FIELDS = ("kind", "device", "device_tag", "torch", "triton", "commit", "date", "copy_bandwidth_gbps", "results")
ROW_FIELDS = ("op", "size", "impl", "mode", "dtype", "shape", "status", "reason", "ms", "gbps", "pct_copy_bw")


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ops")
    path = bench_ops.main(TOY + ["--out-dir", str(out)])
    return path, json.loads(path.read_text())


def test_json_file_and_environment(toy_results):
    path, data = toy_results
    assert path.name == f"ops-cpu-{data['date']}.json"
    for name in ENV_FIELDS:
        assert name in data, name
    assert data["kind"] == "ops" and data["device_tag"] == "cpu" and data["copy_bandwidth_gbps"] > 0


def test_every_op_and_mode_measured(toy_results):
    rows = toy_results[1]["results"]
    for r in rows:
        for name in ROW_FIELDS:
            assert name in r, (r["op"], r["impl"], name)
        assert r["status"] in ("ok", "skipped"), (r["op"], r["mode"], r["impl"], r["reason"])
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy_bw"] > 0
            assert r["speedup_vs_reference"] > 0
        else:
            assert r["reason"], (r["op"], r["impl"])
    ok = {(r["op"], r["mode"], r["impl"]) for r in rows if r["status"] == "ok"}
    # linear_gelu has no derivative: forward measured (its one implementation and the reference), the
    # backward rows skipped with that reason
    assert all(r["status"] == "skipped" and "no derivative" in r["reason"]
               for r in rows if r["op"] == "linear_gelu" and r["mode"] == "fwd+bwd")
    assert {("linear_gelu", "fwd", "op (the reference)"), ("linear_gelu", "fwd", "reference:eager")} <= ok
    for op in bench_ops.OPS:
        if op == "linear_gelu":
            continue
        for mode in bench_ops.MODES:
            assert (op, mode, "reference:eager") in ok, (op, mode)
            # the public op ran through at least one backend
            assert any(o == op and m == mode and i.startswith("backend:") for o, m, i in ok), (op, mode)
            if not op.startswith("attention"):
                assert (op, mode, "backend:torch") in ok, (op, mode)


def test_unavailable_backends_reported_as_skipped(toy_results):
    rows = toy_results[1]["results"]
    cuda_rows = [r for r in rows if r["impl"] == "backend:cuda"]
    assert cuda_rows and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in cuda_rows)
    triton_ok, _ = dispatch.availability("triton", "cpu")  # TRITON_INTERPRET=1 from tests/conftest.py
    triton_rows = [r for r in rows if r["impl"] == "backend:triton" and r["op"] != "mlp_gelu"]
    assert triton_rows and all((r["status"] == "ok") == triton_ok for r in triton_rows)
    # an op without a Triton backend (the MLP: Inductor's GEMM templates are that) says so
    (mlp,) = [r for r in rows if r["impl"] == "backend:triton" and r["op"] == "mlp_gelu" and r["mode"] == "fwd"]
    assert mlp["status"] == "skipped" and mlp["reason"] == "op 'mlp_gelu' has no triton backend"
    compiled = [r for r in rows if r["impl"] == "reference:compile"]
    assert compiled and all(r["status"] == "skipped" for r in compiled)  # off on CPU by default


def test_compiled_reference_and_merge(tmp_path):
    """--compile on adds the torch.compile rows; a second run of the day merges into the same file."""
    args = TOY + ["--out-dir", str(tmp_path), "--ops", "gather_tokens", "--compile", "on", "--compile-backend", "aot_eager"]
    path = bench_ops.main(args)
    path2 = bench_ops.main(TOY + ["--out-dir", str(tmp_path), "--ops", "adaln_modulate"])
    assert path == path2
    rows = json.loads(path.read_text())["results"]
    assert {r["op"] for r in rows} == {"gather_tokens", "adaln_modulate"}
    compiled = [r for r in rows if r["op"] == "gather_tokens" and r["impl"] == "reference:compile"]
    assert len(compiled) == 2 and all(r["status"] == "ok" for r in compiled)


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench_ops.parse_args(["--ops", "nope"])
    with pytest.raises(ValueError, match="--iters"):
        bench_ops.main(TOY + ["--iters", "0"])
