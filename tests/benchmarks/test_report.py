"""report.py: markdown tables and the MFU plot from result files."""
import json

import pytest

from benchmarks import report


def _gpu_run(tmp_path):
    rows = [
        {"model": "DiT-XL/2", "variant": "reference", "status": "ok", "batch": 32, "img_per_s": 30.0, "tflops": 21.4,
         "mfu_datasheet": 0.0216, "mfu_measured_gemm": 0.0268, "peak_mem_gib": 70.1, "speedup_vs_reference": 1.0},
        {"model": "DiT-XL/2", "variant": "compiled_fused", "status": "ok", "batch": 256, "img_per_s": 300.0,
         "tflops": 213.6, "mfu_datasheet": 0.216, "mfu_measured_gemm": 0.268, "peak_mem_gib": 60.0,
         "speedup_vs_reference": 10.0},
        {"model": "MDTv2-XL/2", "variant": "compiled_fused_fsdp", "status": "error", "reason": "NotImplementedError: x"},
    ]
    data = {"kind": "train_step", "device": "FAKE H100 (test data)", "device_tag": "h100", "torch": "2.11",
            "triton": "3.6", "commit": "0123456789abcdef", "date": "2026-01-01",
            "peaks": {"key": "H100", "datasheet_tflops": 989.0, "measured_gemm_tflops": 798.0}, "results": rows}
    (tmp_path / "train_step-h100-2026-01-01.json").write_text(json.dumps(data))
    (tmp_path / "unrelated.json").write_text(json.dumps({"something": "else"}))


def test_markdown_and_plot_from_gpu_like_results(tmp_path):
    _gpu_run(tmp_path)
    out, png = tmp_path / "table.md", tmp_path / "mfu.png"
    report.main(["--results", str(tmp_path), "--out", str(out), "--plot", str(png)])
    text = out.read_text()
    assert "| DiT-XL/2 | compiled_fused | 256 | 300.0 | 213.6 | 21.6% | 26.8% | 60.0 | 10.00 |" in text
    assert "datasheet 989 TFLOP/s, measured GEMM 798 TFLOP/s" in text
    assert "error: NotImplementedError" in text
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_report_of_the_toy_runs(train_results, sampling_results, tmp_path):
    for path, _ in (train_results, sampling_results):
        (tmp_path / path.name).write_text(path.read_text())
    text = report.main(["--results", str(tmp_path), "--plot", str(tmp_path / "p.png")])
    assert "## Training step" in text and "## Sampling" in text and "DiT-toy" in text
    assert (tmp_path / "p.png").exists()  # CPU runs: img/s panels


def test_empty_and_missing_folders(tmp_path):
    assert report.main(["--results", str(tmp_path), "--no-plot"]).startswith("No benchmark results")
    with pytest.raises(ValueError, match="not a folder"):
        report.main(["--results", str(tmp_path / "missing")])


def _sampling_run(tmp_path, rows, name="sampling-h100-2026-01-01.json"):
    data = {"kind": "sampling", "device": "FAKE H100 (test data)", "device_tag": "h100", "torch": "2.11",
            "triton": "3.6", "commit": "0123456789abcdef", "date": "2026-01-01",
            "peaks": {"key": "H100", "datasheet_tflops": 989.0, "measured_gemm_tflops": 798.0}, "results": rows}
    (tmp_path / name).write_text(json.dumps(data))


def test_sampling_table_never_shows_a_shortened_run_as_the_published_one(tmp_path):
    base = {"sampler": "dit_ddpm250_cfg", "model": "DiT-XL/2", "batch": 64, "status": "ok", "nfe": 50,
            "published_steps": 250}
    _sampling_run(tmp_path, [
        dict(base, variant="eager", steps=50, img_per_s=10.0, seconds_per_batch=6.4, published_steps_estimate=True,
             img_per_s_at_published_steps=2.0),
        dict(base, variant="eager", steps=250, nfe=250, img_per_s=2.1, seconds_per_batch=30.5)])
    text = report.main(["--results", str(tmp_path), "--no-plot"])
    assert "| dit_ddpm250_cfg | DiT-XL/2 | 64 | eager | 50 | 50 | 10.00 | 6.40 | ≈ 2.00 (est. from 50 of 250) |" in text
    assert "| dit_ddpm250_cfg | DiT-XL/2 | 64 | eager | 250 | 250 | 2.10 | 30.50 | 2.10 |" in text


def test_train_flags_mark_suspect_rows(tmp_path):
    _gpu_run(tmp_path)
    path = tmp_path / "train_step-h100-2026-01-01.json"
    data = json.loads(path.read_text())
    data["results"][1]["dynamo"] = {"unique_graphs": 4, "graph_breaks": 0, "recompile_limit_hits": 1,
                                    "compiled_while_timing": 2}
    data["results"][1]["backed_off"] = True
    path.write_text(json.dumps(data))
    text = report.main(["--results", str(tmp_path), "--no-plot"])
    assert ("2 graph(s) compiled while timing; 1 recompile-limit hit(s); batch backed off after OOM |" in text)


def test_session_folders_are_read_and_copies_once(tmp_path):
    """gpu_session.sh writes to results/session-<date>/: the report finds those files; a copy of the
    same file elsewhere is not counted twice."""
    (tmp_path / "session-2026-01-01").mkdir()
    _gpu_run(tmp_path / "session-2026-01-01")
    (tmp_path / "train_step-h100-2026-01-01.json").write_text(
        (tmp_path / "session-2026-01-01" / "train_step-h100-2026-01-01.json").read_text())
    runs = report.load_results(tmp_path)
    assert len(runs) == 1 and runs[0]["kind"] == "train_step"


def test_headline_table_checks_the_targets(tmp_path):
    """Best of our variants vs the reference and the MFU target; DiT-XL/2 sampling vs 4 img/s by its
    (marked) 250-step estimate."""
    _gpu_run(tmp_path)
    base = {"sampler": "dit_ddpm250_cfg", "model": "DiT-XL/2", "batch": 64, "status": "ok", "published_steps": 250}
    _sampling_run(tmp_path, [dict(base, variant="cudagraphs", steps=50, img_per_s=25.0, seconds_per_batch=2.56,
                                  published_steps_estimate=True, img_per_s_at_published_steps=5.0)])
    text = report.main(["--results", str(tmp_path), "--no-plot"])
    assert ("| FAKE H100 (test data) | DiT-XL/2 | compiled_fused | 300.0 | 21.6% (target 50%) | **no** | 30.0 | "
            "10.00 | yes |") in text
    assert "| cudagraphs | 5.00 (est. from 50 of 250 steps) | | yes (≥ 4 img/s) |" in text


def test_readme_section_is_rewritten_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.README_BEGIN}\nold text\n{report.README_END}\nafter\n")
    results = tmp_path / "results"
    results.mkdir()
    report.main(["--results", str(results), "--no-plot", "--readme", str(readme)])  # no GPU runs yet
    assert readme.read_text() == (f"# x\n\nbefore\n{report.README_BEGIN}\n{report.NO_GPU_RESULTS}\n"
                                  f"{report.README_END}\nafter\n")
    _gpu_run(results)
    report.main(["--results", str(results), "--out", str(results / "RESULTS.md"), "--plot",
                 str(results / "mfu.png"), "--readme", str(readme)])
    text = readme.read_text()
    section = text.split(report.README_BEGIN)[1].split(report.README_END)[0]
    assert "| DiT-XL/2 | compiled_fused |" in section and "old text" not in text
    assert "![MFU per model and variant](results/mfu.png)" in section
    assert "[results/RESULTS.md](results/RESULTS.md)" in section
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n")


def test_readme_without_markers_is_refused_in_one_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match=r"--readme .*README.md: needs one '<!-- benchmark-results:begin"):
        report.main(["--results", str(tmp_path), "--no-plot", "--readme", str(readme)])
    assert readme.read_text() == "# no markers\n"


def test_the_repository_readme_has_the_markers():
    from pathlib import Path

    text = (Path(report.__file__).resolve().parents[1] / "README.md").read_text()
    assert text.count(report.README_BEGIN) == 1 and text.count(report.README_END) == 1
