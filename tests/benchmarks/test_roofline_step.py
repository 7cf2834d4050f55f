"""roofline_step.py on the CPU at toy size: the byte/FLOP counter on hand-checkable ops, fused custom ops
as one unit, the a + b * batch fit, fused vs unfused bytes, counted vs analytic FLOPs, the CLI."""
import json

import pytest
import torch

from benchmarks import roofline_step as R
from benchmarks.bench_train_step import FLOPS_MASK_RATIO, TOY_KWARGS, model_kwargs
from masked_dit import ops
from masked_dit.models import build
from masked_dit.models.flops import flops_per_image

B, T, D = 2, 16, 64


def _trace(fn, decompose_fused=False):
    mode = R.RooflineMode(decompose_fused=decompose_fused)
    with mode:
        fn()
    return mode.records


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


#################################################################################
#                               The op counter                                  #
#################################################################################

def test_add_reads_twice_writes_once_and_views_are_free():
    x, y = torch.randn(B, T, D), torch.randn(B, T, D)
    (add,) = _trace(lambda: x + y)
    assert add[:2] == ("add", "elementwise")
    assert (add[3], add[4]) == (2 * _nbytes(x), _nbytes(x))
    recs = _trace(lambda: (x.view(B * T, D), x.transpose(1, 2), x[:, :4], x.reshape(B, T * D)))
    assert all(r[3] == r[4] == 0 for r in recs), recs


def test_broadcast_and_inplace_bytes():
    x, row = torch.randn(B, T, D), torch.randn(D)
    (add,) = _trace(lambda: x.add_(row))  # reads x and the row once, writes x
    assert (add[3], add[4]) == (_nbytes(x, row), _nbytes(x))
    xs = [torch.randn(D, D) for _ in range(3)]
    (lerp,) = _trace(lambda: torch._foreach_lerp_(xs, xs, 0.5))  # returns nothing: the writes still count
    assert lerp[1] == "optimizer_ema" and lerp[4] == 3 * _nbytes(xs[0])
    (fill,) = _trace(lambda: x.zero_())  # writes only
    assert (fill[3], fill[4]) == (0, _nbytes(x))


def test_matmul_flops_and_bytes():
    M, K, N = 32, 48, 80
    a, b = torch.randn(M, K), torch.randn(K, N)
    (mm,) = _trace(lambda: a @ b)
    assert mm[:3] == ("mm", "gemm", 2.0 * M * K * N)
    assert (mm[3], mm[4]) == (_nbytes(a, b), 4 * M * N)
    q = torch.randn(B, 2, T, 32)
    recs = [r for r in _trace(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) if r[1] == "attention"]
    assert len(recs) == 1 and recs[0][2] == 4.0 * B * 2 * T * T * 32


def test_cpu_autocast_dtypes_match_cuda_for_matmuls():
    lin = torch.nn.Linear(D, D)
    x = torch.randn(B, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recs = _trace(lambda: lin(x))
    mm = [r for r in recs if r[1] == "gemm"]
    assert mm and all(r[5] == "bfloat16" for r in mm)
    casts = [r for r in recs if r[0] == "_to_copy"]  # weight, bias and input cast to bf16: real traffic on a GPU too
    assert len(casts) == 3


#################################################################################
#                           Our fused ops: one unit                             #
#################################################################################

def _adaln_inputs():
    x = torch.randn(B, T, D, requires_grad=True)
    return x, torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)


def test_fused_custom_op_is_one_unit():
    x, shift, scale = _adaln_inputs()
    outs = []
    recs = _trace(lambda: outs.append(torch.ops.masked_dit.adaln_modulate(x, shift, scale, 1e-6)))
    assert [r[0] for r in recs] == ["masked_dit.adaln_modulate"]  # no inner aten op recorded
    assert recs[0][1] == "fused_ops"
    assert recs[0][3] == _nbytes(x, shift, scale) and recs[0][4] == _nbytes(*outs[0])


def test_fused_op_backward_is_one_unit_and_torch_backend_decomposes():
    x, shift, scale = _adaln_inputs()
    fused = _trace(lambda: ops.adaln_modulate(x, shift, scale).sum().backward())
    names = [r[0] for r in fused]
    assert names.count("masked_dit.adaln_modulate") == 1 and names.count("masked_dit.adaln_modulate_backward") == 1
    assert "native_layer_norm" not in names and "var_mean" not in names
    unfused = _trace(lambda: ops.adaln_modulate(x, shift, scale).sum().backward(), decompose_fused=True)
    assert not any(r[0].startswith("masked_dit.") for r in unfused)
    nonmatmul = lambda recs: sum(r[3] + r[4] for r in recs)  # noqa: E731
    assert nonmatmul(unfused) > nonmatmul(fused)


def test_attention_custom_op_stays_one_unit_when_decomposing():
    q = torch.randn(B, T, 2, 32)
    recs = _trace(lambda: torch.ops.masked_dit.attention_math(q, q, q, None, None, None, None, 32 ** -0.5),
                  decompose_fused=True)
    assert [r[0] for r in recs] == ["masked_dit.attention_math"]
    assert recs[0][1] == "attention" and recs[0][2] == 4.0 * B * 2 * T * T * 32


#################################################################################
#                                  Fitting                                      #
#################################################################################

def test_fit_line_recovers_a_and_b():
    assert R.fit_line([1, 2], [7.0, 10.0]) == pytest.approx((4.0, 3.0))
    assert R.fit_line([1, 2, 4], [5.5 + 2.5 * b for b in (1, 2, 4)]) == pytest.approx((5.5, 2.5))
    with pytest.raises(ValueError):
        R.fit_line([2, 2], [1.0, 1.0])


def test_fit_ops_aligns_traces_and_extrapolates():
    # op name, category, flops, read, written, dtype; 'clone' appears at batch 3 only (a per-image copy)
    t2 = [("mm", "gemm", 20.0, 100, 0, "bfloat16"), ("add", "elementwise", 0.0, 30, 10, "float32")]
    t3 = [("mm", "gemm", 30.0, 150, 0, "bfloat16"), ("clone", "memory", 0.0, 9, 9, "float32"),
          ("add", "elementwise", 0.0, 40, 10, "float32")]
    fitted, unmatched = R.fit_ops({2: t2, 3: t3})
    by = {o["name"]: o for o in fitted}
    assert unmatched == 1
    assert by["mm"]["flops"] == pytest.approx((0.0, 10.0)) and by["mm"]["bytes"] == pytest.approx((0.0, 50.0))
    assert by["add"]["bytes"] == pytest.approx((20.0, 10.0))
    assert by["clone"]["bytes"] == pytest.approx((0.0, 6.0))
    cats = R.predict(fitted, 256, R.DEVICE_PEAKS["h100"], tf32=True)
    assert cats["elementwise"]["bytes"] == pytest.approx(20 + 10 * 256)
    assert cats["gemm"]["flops"] == pytest.approx(2560.0)


def test_residual_keeps_category_totals_exact():
    # 'fused' (a kernel of the batch-2 trace only, split in two at batch 3) is lost or misfitted per op
    t2 = [("mm", "gemm", 20.0, 100, 0, ""), ("inductor:a+b", "inductor", 0.0, 30, 10, ""),
          ("inductor:c", "inductor", 0.0, 5, 5, "")]
    t3 = [("mm", "gemm", 30.0, 150, 0, ""), ("inductor:a", "inductor", 0.0, 25, 10, ""),
          ("inductor:b", "inductor", 0.0, 20, 10, ""), ("inductor:c", "inductor", 0.0, 5, 5, "")]
    fitted, _ = R.fit_ops({2: t2, 3: t3})
    residual = R.residual_ops({2: t2, 3: t3}, fitted)
    assert [(o["name"], o["category"], o["exact"]) for o in residual] == [("(fit residual)", "inductor", True)]
    for batch, raw in ((2, 50.0), (3, 75.0), (256, 50.0 + 25.0 * 254)):  # the line through both totals
        cats = R.predict(fitted + residual, batch, R.DEVICE_PEAKS["h100"], tf32=True)
        assert cats["inductor"]["bytes"] == pytest.approx(raw)
    assert R.residual_ops({2: t2, 3: t2}, R.fit_ops({2: t2, 3: t2})[0]) == []  # nothing missed, nothing added


#################################################################################
#                               Whole steps (toy)                               #
#################################################################################

@pytest.fixture(scope="module")
def counted():
    """DiT and MaskDiT, eager and eager_fused, counted at batches 2 and 3."""
    args = R.parse_args(["--size", "toy"])
    out = {}
    for family in ("dit", "maskdit"):
        name, kwargs = model_kwargs(family, "toy")
        torch.manual_seed(0)
        base = build(family, **kwargs)
        analytic = flops_per_image(base, mask_ratio=FLOPS_MASK_RATIO.get(family, 0.0), training=True)
        for variant in ("eager", "eager_fused"):
            c = R.count_variant(variant, family, kwargs, base.state_dict(), [2, 3], args)
            out[(family, variant)] = R.make_row(name, family, "toy", variant, c, analytic, 256, "h100")
    return out


def test_fused_moves_fewer_nonmatmul_bytes(counted):
    for family in ("dit", "maskdit"):
        eager, fused = counted[(family, "eager")], counted[(family, "eager_fused")]
        nonmatmul = lambda r: sum(v for c, v in r["bytes_per_image"].items() if c not in R.MATMUL)  # noqa: E731
        assert nonmatmul(fused) < nonmatmul(eager), family
        assert fused["bytes_per_image"]["fused_ops"] > 0 and eager["bytes_per_image"]["fused_ops"] == 0
        assert fused["pred_img_per_s"] > eager["pred_img_per_s"]


def test_counted_matmul_flops_match_analytic(counted):
    for (family, variant), row in counted.items():
        assert row["counted_over_analytic"] == pytest.approx(1.0, abs=0.03), (family, variant)
        assert row["cpu_autocast_fp32_mismatch_ops"] == 0  # our residual stream and norms are fp32 on the CPU too


def test_constant_traffic_is_optimizer_and_ema(counted):
    row = counted[("dit", "eager_fused")]
    params = sum(p.numel() for p in build("dit", **TOY_KWARGS["dit"]).parameters())
    # fused AdamW reads param, grad, exp_avg, exp_avg_sq and writes three (28 B/param); EMA lerp 12 B/param;
    # the trainer's gradient norm for its non-finite check (DiT does not clip: one more read of grad, 4 B/param)
    assert row["bytes_const_per_step"]["optimizer_ema"] == pytest.approx(44 * params, rel=0.02)
    assert row["bytes_per_image"]["optimizer_ema"] == pytest.approx(0.0, abs=1.0)


def test_adan_counted_without_its_state():
    """Adan is counted, not run (its four fp32 buffers would not fit beside MDTv2-XL/2 on the counting
    machine): the foreach reference as its real step traced, scaled from a proxy; the fused (Triton) step
    as 11 fp32 accesses per element."""
    from masked_dit.train.optim import Adan

    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 7, 1000)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adan(params, lr=1e-3, weight_decay=0.02, fused=False)
    opt.step()  # the state; the traced step below is a second one (bias corrections differ, bytes do not)
    real = _trace(opt.step)
    real = real[[r[0] for r in real].index("stack") + 1:]  # before: the scalar step counters (a foreach add_)
    real = [r for r in real if r[0] != "_local_scalar_dense"]  # the counters read on the host
    counted = R.adan_records(opt, fused=False)
    assert [r[0] for r in counted] == [r[0] for r in real if r[0].startswith("_foreach")]
    assert sum(r[3] for r in counted) == pytest.approx(sum(r[3] for r in real))
    assert sum(r[4] for r in counted) == pytest.approx(sum(r[4] for r in real))
    assert {r[1] for r in counted} == {"optimizer_ema"}
    fused = R.adan_records(opt, fused=True)
    assert len(fused) == 3 and sum(r[3] + r[4] for r in fused) == 44 * 1307


def test_mdtv2_step_counts_the_fused_adan():
    name, kwargs = model_kwargs("mdtv2", "toy")
    torch.manual_seed(0)
    base = build("mdtv2", **kwargs)
    params = sum(p.numel() for p in base.parameters())
    c = R.count_variant("eager_fused", "mdtv2", kwargs, base.state_dict(), [2, 3], R.parse_args(["--size", "toy"]))
    row = R.make_row(name, "mdtv2", "toy", "eager_fused", c, 1.0, 256, "h100")
    # fused Adan 44 B/param, EMA lerp 12, grad-norm clip (read, then scale in place) 12
    assert row["bytes_const_per_step"]["optimizer_ema"] == pytest.approx(68 * params, rel=1e-3)
    assert any(o["name"] == "masked_dit.adan_step_ (triton)" for o in row["top_ops"] + c["ops"])


def test_cli_end_to_end_writes_json(tmp_path):
    path = R.main(["--size", "toy", "--families", "dit", "--variants", "reference,eager_fused",
                   "--device-peaks", "h100,h200", "--batch", "64", "--out-dir", str(tmp_path)])
    data = json.loads(path.read_text())
    assert path.name == f"roofline-cpu-{data['date']}.json"
    for field in ("kind", "device", "torch", "commit", "date", "device_peaks", "settings", "results"):
        assert field in data, field
    rows = data["results"]
    assert {(r["variant"], r["device_peaks"]) for r in rows} == \
        {(v, p) for v in ("reference", "eager_fused") for p in ("h100", "h200")}
    for r in rows:
        assert r["status"] == "ok" and r["batch"] == 64
        assert r["pred_step_ms"] == pytest.approx(sum(r["floor_terms_ms"].values()))
        assert r["pred_img_per_s"] == pytest.approx(64e3 / r["pred_step_ms"])
        assert 0 < r["mfu_datasheet"] < r["mfu_measured_gemm"] < 1
        top = [t["gb_per_step"] for t in r["top_ops"]]
        assert 0 < len(top) <= R.TOP_OPS and top == sorted(top, reverse=True)
        assert sum(top) <= sum(r["bytes_per_step"].values()) / 1e9 * (1 + 1e-9)
    h100, h200 = (next(r for r in rows if r["variant"] == "eager_fused" and r["device_peaks"] == p)
                  for p in ("h100", "h200"))
    assert h200["floor_terms_ms"]["memory_bound"] < h100["floor_terms_ms"]["memory_bound"]  # 4.3 vs 3.0 TB/s
