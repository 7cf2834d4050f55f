"""bench_sampling.py end to end at toy size on the CPU."""
import pytest

from benchmarks import bench_sampling


def test_json_fields_and_every_sampler(sampling_results):
    path, data = sampling_results
    assert path.name == f"sampling-cpu-{data['date']}.json"
    for field in ("kind", "device", "torch", "triton", "commit", "date", "results"):
        assert field in data, field
    rows = data["results"]
    eager = {r["sampler"]: r for r in rows if r["variant"] == "eager"}
    assert set(eager) == set(bench_sampling.SAMPLERS)
    for r in eager.values():
        assert r["status"] == "ok", r.get("reason")
        assert r["img_per_s"] > 0 and r["seconds_per_batch"] > 0 and r["network_batch"] == 2 * r["batch"]
        assert r["steps"] == bench_sampling.TOY_STEPS and r["cfg_scale"] > 1
    # Network calls counted: one per DDPM step, Heun 2 per step but the last (EDM).
    assert eager["dit_ddpm250_cfg"]["nfe"] == 3 and eager["mdtv2_ddpm250_cfg"]["nfe"] == 3
    assert eager["maskdit_heun40_cfg"]["nfe"] == 2 * 3 - 1


def test_cudagraphs_skipped_with_reason_on_cpu(sampling_results):
    rows = [r for r in sampling_results[1]["results"] if r["variant"] == "cudagraphs"]
    assert len(rows) == len(bench_sampling.SAMPLERS)
    assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in rows)


def test_compiled_run_merged_into_the_same_file(sampling_results):
    rows = [r for r in sampling_results[1]["results"] if r["variant"] == "compiled"]
    assert [r["sampler"] for r in rows] == ["dit_ddpm250_cfg"]
    assert rows[0]["status"] == "ok", rows[0].get("reason")
    assert rows[0]["img_per_s"] > 0
    # the eager rows of the first call are still there
    assert any(r["sampler"] == "dit_ddpm250_cfg" and r["variant"] == "eager" for r in sampling_results[1]["results"])


def test_bad_options_fail_clearly():
    with pytest.raises(SystemExit):
        bench_sampling.parse_args(["--samplers", "ddim"])
    with pytest.raises(ValueError, match="--batches"):
        bench_sampling.main(["--size", "toy", "--device", "cpu", "--batches", "two"])


def test_graphed_model_wrapper_runs_a_sampler():
    """The CUDA-graph wrapper's mechanics (step marks, cloned outputs, unwrap) with a CPU compile backend."""
    import torch

    from masked_dit.diffusion.objectives import ADMObjective, unwrap

    _, model = bench_sampling.build_sampling_model("dit", "toy", torch.device("cpu"))
    wrapped = bench_sampling.GraphedModel(torch.compile(model, backend="aot_eager"))
    assert unwrap(wrapped) is model
    noise = torch.randn(2, 4, 8, 8)
    torch.manual_seed(1)  # DDPM draws its per-step noise from the global RNG
    out = ADMObjective().sample(wrapped, noise, torch.tensor([1, 2]), steps=2, cfg_scale=1.5)
    torch.manual_seed(1)
    ref = ADMObjective().sample(model, noise, torch.tensor([1, 2]), steps=2, cfg_scale=1.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_shortened_runs_say_so_and_estimate_the_published_count(sampling_results):
    """A run with fewer steps than the sampler's published count (gpu_session.sh: 50 of 250) keeps
    its measured img/s, names both counts, and gives the scaled figure as an estimate: scaled by the
    network calls, which are not the steps for EDM Heun (2 s - 1, no correction on the last step) and
    SiT's Euler ODE (s - 1 intervals between s times)."""
    rows = [r for r in sampling_results[1]["results"] if r["status"] == "ok"]
    published = {name: kw["steps"] for name, (_, _, kw) in bench_sampling.SAMPLERS.items()}
    calls = {"ddpm": lambda s: s, "heun": lambda s: 2 * s - 1, "euler": lambda s: s - 1, "sde": lambda s: s}
    for r in rows:
        assert r["steps"] == bench_sampling.TOY_STEPS and r["published_steps"] == published[r["sampler"]]
        assert r["published_steps_estimate"] is True
        nfe = calls[r["method"]]
        assert r["img_per_s_at_published_steps"] == pytest.approx(
            r["img_per_s"] * nfe(r["steps"]) / nfe(r["published_steps"]))
        if r["variant"] == "eager":
            assert r["nfe"] == nfe(r["steps"])
    assert "steps" in bench_sampling.KEY_FIELDS  # a shortened run never replaces a full one in the day's file


def test_results_are_written_after_every_sampler(tmp_path, monkeypatch):
    """A run stopped part-way (a stage's time limit) keeps the rows it finished."""
    real, calls = bench_sampling.run_one, []

    def run_one(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the SIGTERM of `timeout`
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_sampling, "run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        bench_sampling.main(["--size", "toy", "--device", "cpu", "--out-dir", str(tmp_path), "--variants", "eager",
                             "--samplers", "dit_ddpm250_cfg,sit_ode50_cfg"])
    import json

    (path,) = tmp_path.glob("sampling-*.json")
    rows = json.loads(path.read_text())["results"]
    assert [(r["sampler"], r["status"]) for r in rows] == [("dit_ddpm250_cfg", "ok")]


def test_repeats_report_the_median_run(tmp_path):
    import json

    path = bench_sampling.main(["--size", "toy", "--device", "cpu", "--out-dir", str(tmp_path), "--variants", "eager",
                                "--samplers", "dit_ddpm250_cfg", "--repeats", "3"])
    (row,) = json.loads(path.read_text())["results"]
    import statistics

    assert len(row["seconds_per_batch_runs"]) == 3
    assert row["seconds_per_batch"] == statistics.median(row["seconds_per_batch_runs"])


def test_profile_of_a_sampler_run(tmp_path):
    import gzip
    import json

    path = bench_sampling.main(["--size", "toy", "--device", "cpu", "--samplers", "dit_ddpm250_cfg", "--variants",
                                "eager", "--profile", "2", "--trace", "--out-dir", str(tmp_path)])
    (row,) = json.loads(path.read_text())["results"]
    assert row["status"] == "ok", row.get("reason")
    prof = row["profile"]
    assert prof["per"] == "one run of 2 sampler steps" and prof["categories_ms_per_step"]["gemm"] > 0
    trace = tmp_path / "trace-dit_ddpm250_cfg-eager-b2.json.gz"
    assert prof["trace"] == str(trace) and json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    with pytest.raises(SystemExit):
        bench_sampling.parse_args(["--trace"])
