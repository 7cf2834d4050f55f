"""bench_train_step.py end to end at toy size on the CPU: every family, every field of the JSON."""
import pytest
import torch

from benchmarks import bench_train_step
from masked_dit.models import build
from masked_dit.models.flops import flops_per_image, forward_flops

ENV_FIELDS = ("kind", "device", "device_tag", "torch", "triton", "commit", "date", "peaks", "settings", "results")
ROW_FIELDS = ("model", "family", "variant", "status", "batch", "step_ms", "img_per_s", "flops_per_image", "tflops",
              "mfu_datasheet", "mfu_measured_gemm", "peak_mem_gib", "precision", "optimizer", "ops_backend")


def _ok_rows(data):
    bad = [(r["model"], r["variant"], r.get("reason")) for r in data["results"] if r["status"] != "ok"]
    assert not bad, bad
    return data["results"]


def test_json_file_and_environment(train_results):
    path, data = train_results
    assert path.name == f"train_step-cpu-{data['date']}.json"
    for field in ENV_FIELDS:
        assert field in data, field
    assert data["kind"] == "train_step" and data["device_tag"] == "cpu"
    assert data["peaks"]["datasheet_tflops"] is None  # CPU: no peak, so no MFU


def test_every_family_and_variant_ran(train_results):
    rows = _ok_rows(train_results[1])
    got = {(r["family"], r["variant"]) for r in rows}
    assert got == {(f, v) for f in bench_train_step.FAMILIES for v in ("reference", "eager")}
    for r in rows:
        for field in ROW_FIELDS:
            assert field in r, (r["model"], r["variant"], field)
        assert r["batch"] == 2 and r["step_ms"] > 0
        assert r["img_per_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        assert r["mfu_datasheet"] is None and r["tflops"] == pytest.approx(r["img_per_s"] * r["flops_per_image"] / 1e12)
        assert "speedup_vs_reference" in r


def test_flops_are_the_analytic_training_count(train_results):
    rows = {(r["family"], r["variant"]): r for r in _ok_rows(train_results[1])}
    for family, ratio in (("dit", 0.0), ("mdtv2", 0.4), ("maskdit", 0.5), ("repa_sit", 0.0)):
        model = build(family, **bench_train_step.TOY_KWARGS[family])
        expected = flops_per_image(model, mask_ratio=ratio, training=True)
        assert rows[(family, "eager")]["flops_per_image"] == pytest.approx(expected)
        assert rows[(family, "reference")]["flops_per_image"] == pytest.approx(expected)  # same network
    # MDTv2 counts both passes: more than one masked forward x 3.
    mdt = build("mdtv2", **bench_train_step.TOY_KWARGS["mdtv2"])
    one_pass = 3 * forward_flops(mdt, 0.4).flops
    assert rows[("mdtv2", "eager")]["flops_per_image"] == pytest.approx(one_pass + 3 * forward_flops(mdt).flops)


def test_reference_records_the_official_recipe(train_results):
    rows = {(r["family"], r["variant"]): r for r in _ok_rows(train_results[1])}
    assert rows[("dit", "reference")]["precision"].startswith("fp32")
    assert rows[("mdtv2", "reference")]["attention"] == "softmax" and rows[("mdtv2", "reference")]["optimizer"] == "adan"
    assert "fp16" in rows[("maskdit", "reference")]["precision"]  # and why the CPU toy run is fp32
    assert rows[("maskdit", "reference")]["cudnn_benchmark"] and not rows[("dit", "reference")]["cudnn_benchmark"]
    assert rows[("mdtv2", "reference")]["fused_optimizer"] is False  # fused needs CUDA: the toy CPU run is foreach
    assert rows[("dit", "eager")]["precision"] == "bf16 autocast"
    assert rows[("dit", "eager")]["ops_backend"] == "torch"
    # REPA's official step runs DINOv2 on the raw images every step; ours train on precomputed features
    ref, eager = rows[("repa_sit", "reference")], rows[("repa_sit", "eager")]
    assert ref["encoder_forward"].startswith("online dinov2-toy") and ref["encoder_flops_per_image"] > 0
    assert eager["encoder_forward"] == "precomputed" and "encoder_flops_per_image" not in eager
    assert "encoder_forward" not in rows[("dit", "reference")]


def _toy_runner(variant, family, argv=()):
    args = bench_train_step.parse_args(["--size", "toy", "--device", "cpu", *argv])
    state = build(family, **bench_train_step.TOY_KWARGS[family]).state_dict()
    return bench_train_step.build_runner(variant, family, bench_train_step.TOY_KWARGS[family], state,
                                         torch.device("cpu"), args)


@pytest.mark.parametrize("variant", ["reference", "reference_bf16"])
def test_repa_reference_step_runs_the_encoder_on_raw_images(variant):
    """Drawn once like the latents: uint8 images at 8x the latent side; each step encodes them once."""
    runner, info = _toy_runner(variant, "repa_sit")
    assert runner.raw_images and info["encoder_forward"] == "online dinov2-toy (sdpa, 56 px)"
    batch = bench_train_step.make_batch("repa_sit", bench_train_step.TOY_KWARGS["repa_sit"], 2, torch.device("cpu"),
                                        runner.raw_images)
    assert "zs" not in batch and batch["raw_image"].dtype == torch.uint8 and batch["raw_image"].shape == (2, 3, 64, 64)
    encode, calls = runner.objective.encoder, []
    runner.objective.encoder = lambda b: calls.append(b) or encode(b)
    runner.step(batch)
    runner.step(batch)
    assert len(calls) == 2


def test_ref_no_encoder_gives_the_reference_precomputed_features(tmp_path):
    import json

    runner, info = _toy_runner("reference", "repa_sit", ["--ref-no-encoder"])
    assert not runner.raw_images and runner.objective.encoder is None
    assert info["encoder_forward"] == "precomputed (--ref-no-encoder)"
    path = bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--families",
                                  "repa_sit", "--variants", "reference", "--ref-no-encoder", "--out-dir", str(tmp_path)])
    (row,) = json.loads(path.read_text())["results"]
    assert row["status"] == "ok" and row["encoder_forward"] == "precomputed (--ref-no-encoder)"
    assert "encoder_flops_per_image" not in row


def test_compiled_and_fsdp_variants(train_results_compiled):
    from masked_dit.train.parallel import fsdp_supported

    results = train_results_compiled[1]["results"]
    fsdp_ok, why = fsdp_supported("cpu")
    if not fsdp_ok:  # torch 2.6: FSDP2 has no CPU path; recorded as skipped with the reason, not an error
        skipped = [r for r in results if r["variant"] == "compiled_fused_fsdp"]
        assert [(r["status"], r["reason"]) for r in skipped] == [("skipped", why)]
        results = [r for r in results if r not in skipped]
    rows = {r["variant"]: r for r in _ok_rows({"results": results})}
    assert set(rows) == {"reference_bf16", "compiled", "compiled_fused_mlp"} | ({"compiled_fused_fsdp"} if fsdp_ok else set())
    assert rows["compiled"]["compile"] == "block (aot_eager)"
    # DiT's blocks are alike: a few graphs, no break, no eager fallback; with --warmup 0 every graph
    # was compiled inside the timed loop, and the row says so
    dyn = rows["compiled"]["dynamo"]
    assert dyn["unique_graphs"] >= 1 and dyn["graph_breaks"] == 0 and dyn["recompile_limit_hits"] == 0
    assert dyn["compiled_while_timing"] == dyn["unique_graphs"]
    assert "speedup_vs_reference_bf16" in rows["compiled"]
    assert rows["compiled"]["ops_backend"] == "torch"
    # the opt-in MLP op is asked for; on the CPU the op has only its reference, so the step is compiled_fused's
    assert rows["compiled_fused_mlp"]["ops_backend"] == "auto + mlp_gelu (opt-in)"
    assert rows["compiled_fused_mlp"]["mlp_gelu_backend"].startswith("torch (auto: ")
    assert rows["compiled_fused_mlp"]["dynamo"]["graph_breaks"] == 0
    if fsdp_ok:
        assert rows["compiled_fused_fsdp"]["precision"].startswith("FSDP2")
        assert rows["compiled_fused_fsdp"]["ops_backend"] == "auto"


def test_fsdp_variant_of_a_clipping_family(tmp_path):
    """MDTv2 and REPA clip gradients: under FSDP2 clip_grad_norm_ returns a DTensor, which the step's
    one host read (.tolist()) refused, after the compile (minutes at XL)."""
    import json

    from masked_dit.train.parallel import fsdp_supported

    if not fsdp_supported("cpu")[0]:
        pytest.skip(f"FSDP2 on CPU: {fsdp_supported('cpu')[1]}")
    path = bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--families",
                                  "mdtv2", "--variants", "eager,compiled_fused_fsdp", "--compile-backend", "aot_eager",
                                  "--out-dir", str(tmp_path)])
    rows = {r["variant"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["compiled_fused_fsdp"]["status"] == "ok", rows["compiled_fused_fsdp"]
    # the reference rows differ only in precision: the same (the recipe's) optimizer and cudnn flags
    ref = bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--families",
                                 "maskdit", "--variants", "reference,reference_bf16", "--out-dir", str(tmp_path / "r")])
    rows = {r["variant"]: r for r in json.loads(ref.read_text())["results"]}
    for key in ("fused_optimizer", "cudnn_benchmark", "optimizer"):
        assert rows["reference"][key] == rows["reference_bf16"][key], key


def test_bad_options_fail_clearly():
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--families", "dit,nope"])
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--variants", "turbo"])
    with pytest.raises(ValueError, match="--steps"):
        bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "0"])


def _first_measure_runs_out_of_memory(monkeypatch) -> list[int]:
    """Patches measure(): the first call raises a (simulated) CUDA OOM; returns the batches it was called with."""
    real_measure, calls = bench_train_step.measure, []

    def measure(runner, family, kwargs, batch, device, args):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB (simulated)")
        return real_measure(runner, family, kwargs, batch, device, args)

    monkeypatch.setattr(bench_train_step, "measure", measure)
    return calls


def test_batch_search_and_back_off(tmp_path, monkeypatch):
    """The GPU path on the CPU: search doubles 2 -> 4 (the cap); a later OOM at 4 backs off to 2."""
    calls = _first_measure_runs_out_of_memory(monkeypatch)
    path = bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0",
                                  "--families", "sit", "--variants", "eager", "--search-batch", "--batch-start",
                                  "2", "--batch-cap", "4", "--out-dir", str(tmp_path)])
    import json
    row = json.loads(path.read_text())["results"][0]
    assert row["status"] == "ok", row.get("reason")
    assert [e["batch"] for e in row["batch_search"]] == [2, 4] and all(e["ok"] for e in row["batch_search"])
    assert calls == [4, 2] and row["batch"] == 2 and row["backed_off"]


def test_results_are_written_after_every_variant(tmp_path, monkeypatch):
    """A run killed by a deadline keeps the rows it measured: the file exists after the first variant."""
    import json

    seen = []
    real = bench_train_step.build_runner

    def build_runner(variant, *args, **kwargs):
        files = list(tmp_path.glob("train_step-*.json"))
        seen.append((variant, [r["variant"] for f in files for r in json.loads(f.read_text())["results"]]))
        return real(variant, *args, **kwargs)

    monkeypatch.setattr(bench_train_step, "build_runner", build_runner)
    bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--families", "dit",
                           "--variants", "reference,eager", "--out-dir", str(tmp_path)])
    assert seen == [("reference", []), ("eager", ["reference"])]


def test_compiled_variant_searches_its_batch_with_the_eager_twin(tmp_path, monkeypatch):
    """Probing batches with a compiled model would compile at every size: the eager twin probes; a
    back-off of one variant is where the next starts."""
    import json

    built = []
    real_build = bench_train_step.build_runner

    def build_runner(variant, *args, **kwargs):
        built.append(variant)
        return real_build(variant, *args, **kwargs)

    monkeypatch.setattr(bench_train_step, "build_runner", build_runner)
    measured = _first_measure_runs_out_of_memory(monkeypatch)
    path = bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0",
                                  "--families", "dit", "--variants", "compiled_fused,compiled",
                                  "--compile-backend", "aot_eager", "--search-batch", "--batch-start", "2",
                                  "--batch-cap", "4", "--out-dir", str(tmp_path)])
    rows = {r["variant"]: r for r in json.loads(path.read_text())["results"]}
    assert built == ["eager_fused", "compiled_fused", "compiled"]
    assert rows["compiled_fused"]["batch_search_variant"] == "eager_fused"
    assert [e["batch"] for e in rows["compiled_fused"]["batch_search"]] == [2, 4]
    assert measured == [4, 2, 2] and rows["compiled_fused"]["backed_off"] and rows["compiled"]["batch"] == 2
    assert "backed_off" not in rows["compiled"]


def test_mdtv2_probe_runs_at_the_lowest_mask_ratio():
    """The probe must see the most kept tokens (ratio 0.3, not a random draw up to 0.5), then restore."""
    from masked_dit.diffusion.objectives import MDTv2Objective

    objective = MDTv2Objective()
    jitters = []

    class Runner:
        tf32, raw_images = False, False

        def __init__(self):
            self.objective = objective

        def step(self, data):
            jitters.append(objective.mask_ratio_jitter)

    try_batch = bench_train_step.probe(Runner(), "mdtv2", bench_train_step.TOY_KWARGS["mdtv2"], torch.device("cpu"))
    try_batch(2)
    assert jitters == [0.0, 0.0] and objective.mask_ratio_jitter == 0.2


def test_timing_windows_and_warmup_until_compiles_stop(train_results_compiled):
    assert bench_train_step._windows(1) == [1] and bench_train_step._windows(2) == [2]
    assert bench_train_step._windows(20) == [7, 7, 6] and bench_train_step._windows(3) == [1, 1, 1]
    from masked_dit.train.parallel import fsdp_supported

    rows = {r["variant"]: r for r in train_results_compiled[1]["results"]}
    fsdp_ok, why = fsdp_supported("cpu")  # torch < 2.7: FSDP2 cannot run on CPU, the row says so
    if not fsdp_ok:
        skipped = rows.pop("compiled_fused_fsdp")
        assert skipped["status"] == "skipped" and why in skipped["reason"]
    assert set(rows) >= {"reference_bf16", "compiled"}
    for row in rows.values():
        assert len(row["step_ms_windows"]) == 1 and row["step_ms"] == row["step_ms_windows"][0]
    assert rows["reference_bf16"]["warmup_steps"] == 0  # --warmup 0, nothing compiled: no extra step


def test_compiled_warmup_goes_on_until_two_steps_compile_nothing(tmp_path):
    import json

    path = bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "3", "--warmup", "1",
                                  "--families", "dit", "--variants", "compiled", "--compile-backend", "aot_eager",
                                  "--out-dir", str(tmp_path)])
    (row,) = json.loads(path.read_text())["results"]
    assert row["warmup_steps"] == 3 and row["dynamo"]["compiled_while_timing"] == 0
    assert len(row["step_ms_windows"]) == 3 and row["step_ms"] == sorted(row["step_ms_windows"])[1]


def test_tf32_flags_keep_cudnn_tf32_and_restore():
    """TF32 off means matmuls only (cuDNN keeps torch's default, as MDT and MaskDiT run); all restored."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with bench_train_step.tf32(False, cudnn_benchmark=True):
        assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    assert after == before


def _host_reads_of_a_step(runner, batch, monkeypatch) -> int:
    """Tensor .item() / .tolist() calls during one ``runner.step``."""
    calls = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _real=real: calls.append(1) or _real(self))
    runner.step(batch)
    monkeypatch.undo()
    return len(calls)


@pytest.mark.parametrize("family", bench_train_step.FAMILIES)
def test_reference_step_reads_what_the_official_loop_reads(family, monkeypatch):
    """The reference step syncs the host as often as the official loop (DiT/SiT/MaskDiT: loss.item(); REPA: its
    three logged values; MDT: 18 loss reads + two norms per parameter); ours once, as our trainer."""
    from benchmarks.reference_style import OfficialHostReads

    kwargs = bench_train_step.TOY_KWARGS[family]
    runner, info = _toy_runner("reference", family)
    assert isinstance(runner.host_reads, OfficialHostReads)
    batch = bench_train_step.make_batch(family, kwargs, 2, torch.device("cpu"), runner.raw_images)
    runner.step(batch)  # optimizer state first: the counts below are a steady step's
    with_reads = _host_reads_of_a_step(runner, batch, monkeypatch)
    reads, runner.host_reads = runner.host_reads, None
    without = _host_reads_of_a_step(runner, batch, monkeypatch)
    n_params = sum(1 for p in runner.model.parameters() if p.requires_grad)
    expected = {"mdtv2": 18 + 2 * n_params, "repa_sit": 3}.get(family, 1)
    assert with_reads - without == reads.per_step() == info["host_reads_per_step"] == expected

    ours, info = _toy_runner("eager", family)
    batch = bench_train_step.make_batch(family, kwargs, 2, torch.device("cpu"))  # features, not raw images
    ours.step(batch)
    with_reads = _host_reads_of_a_step(ours, batch, monkeypatch)
    ours.host_reads = None
    assert with_reads - _host_reads_of_a_step(ours, batch, monkeypatch) == info["host_reads_per_step"] == 1


def test_ref_no_host_reads_turns_them_off():
    runner, info = _toy_runner("reference", "mdtv2", ["--ref-no-host-reads"])
    assert runner.host_reads is None and info["host_reads_per_step"] == "0 (--ref-no-host-reads)"
