"""roofline_sampling.py on the CPU at toy size: the run extrapolation on hand-made fits, and every
sampler end to end (counted network FLOPs equal the analytic forward, published NFE)."""
import json

import pytest

from benchmarks import bench_sampling
from benchmarks import roofline_sampling as RS
from benchmarks.roofline_step import DEVICE_PEAKS


def test_run_is_fixed_work_once_and_each_further_call_at_its_cost():
    # one elementwise op per traced length: 2 steps move 100 + 10 b bytes, 3 steps 100 + 16 b (+1 call)
    def op(a, b):
        return dict(name="add", category="elementwise", dtype="float32", flops=(0.0, 0.0), bytes=(a, b))

    counted = dict(model="m", family="dit", fits={2: [op(100.0, 10.0)], 3: [op(100.0, 16.0)]}, nfe={2: 2, 3: 3},
                   published_steps=10, published_nfe=10, forward_flops=1e9, method="ddpm", cfg_scale=1.5)
    row = RS.make_row("dit_ddpm250_cfg", "toy", counted, 4, "h100")
    bw = DEVICE_PEAKS["h100"]["copy_tbs"] * 1e12
    t2, t3 = (100 + 10 * 4) / bw, (100 + 16 * 4) / bw
    assert row["pred_seconds_per_batch"] == pytest.approx(t2 + 8 * (t3 - t2))
    assert row["gb_per_network_image"]["elementwise"] == pytest.approx(6 * 4 / 8 / 1e9)
    assert row["floor_share"]["memory_bound"] == pytest.approx(1.0)


def test_cli_end_to_end_every_sampler(tmp_path):
    path = RS.main(["--size", "toy", "--batches", "8,16", "--device-peaks", "h100,h200", "--out-dir", str(tmp_path)])
    data = json.loads(path.read_text())
    assert path.name == f"roofline_sampling-cpu-{data['date']}.json" and data["kind"] == "roofline_sampling"
    rows = data["results"]
    assert all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    assert {r["sampler"] for r in rows} == set(bench_sampling.SAMPLERS) and len(rows) == 5 * 2 * 2
    for r in rows:
        assert r["counted_over_analytic"] == pytest.approx(1.0, abs=0.03), r["sampler"]
        assert r["pred_img_per_s"] > 0 and 0 < r["mfu_datasheet"] < 1 and r["network_batch"] == 2 * r["batch"]
    nfe = {r["sampler"]: r["nfe"] for r in rows}
    assert nfe["dit_ddpm250_cfg"] == nfe["mdtv2_ddpm250_cfg"] == 250
    assert nfe["maskdit_heun40_cfg"] == 2 * 40 - 1  # EDM Heun: the last step is Euler
    by = {(r["sampler"], r["batch"], r["device_peaks"]): r for r in rows}
    # a larger batch amortises the fixed work: more img/s; the H200's bandwidth: faster
    assert by[("dit_ddpm250_cfg", 16, "h100")]["pred_img_per_s"] > by[("dit_ddpm250_cfg", 8, "h100")]["pred_img_per_s"]
    assert by[("dit_ddpm250_cfg", 8, "h200")]["pred_img_per_s"] > by[("dit_ddpm250_cfg", 8, "h100")]["pred_img_per_s"]
