"""roofline_inductor.py on the CPU: ops tagged in/out of compiled regions (forward and backward), Inductor's
kernels and their byte counts recorded per graph and call, and a compiled toy step put together from both."""
import pytest
import torch
from torch import nn

from benchmarks import roofline_step as R
from benchmarks.bench_train_step import FLOPS_MASK_RATIO, model_kwargs
from benchmarks.roofline_inductor import InductorGraphs, RegionTagger
from masked_dit.models import build
from masked_dit.models.flops import flops_per_image

D = 32


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 2 * D)

    def forward(self, x, c):
        return torch.nn.functional.gelu(self.fc(x)).sum(-1, keepdim=True) * c


def test_region_tagger_tags_forward_and_backward_of_the_block_only():
    pre, block, post = nn.Linear(D, D), _Inner(), nn.Linear(1, 3)
    x, c = torch.randn(4, D), torch.randn(4, 1, requires_grad=True)
    tagger = RegionTagger([block])
    mode = R.RooflineMode(tagger=tagger)
    with mode:
        post(block(torch.tanh(pre(x)), c.exp())).square().sum().backward()
    tagger.remove()
    inside = {r[0] for r in mode.records if r[6]}
    outside = {r[0] for r in mode.records if not r[6]}
    assert {"gelu", "gelu_backward", "sum"} <= inside  # forward and backward of the block
    assert {"tanh", "tanh_backward", "exp"} <= outside  # before the block, both directions
    assert "gelu" not in outside and "tanh" not in inside and "exp" not in inside
    # the block's Linear: its forward addmm and its two backward mm are inside; pre's and post's are not
    gemms_in = [r[0] for r in mode.records if r[6] and r[1] == "gemm"]
    gemms_out = [r[0] for r in mode.records if not r[6] and r[1] == "gemm"]
    assert sorted(gemms_in) == ["addmm", "mm", "mm"] and len(gemms_out) == 5  # pre: addmm+mm (x needs no grad)
    assert not tagger.handles


def test_inductor_graphs_records_kernel_bytes_and_calls():
    def f(x, w):
        return torch.relu(x * 2 + 1) @ w

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    x, w = torch.randn(64, 32), torch.randn(32, 16)
    torch._dynamo.reset()
    with InductorGraphs() as graphs:
        compiled(x, w)
        graphs.restart_calls()
        compiled(x, w)
        compiled(x, w)
        records = graphs.records()
    assert len(graphs.graphs) == 1 and graphs.calls[0] == 2
    kinds = [(r[0], r[1]) for r in graphs.graphs[0]]
    assert ("mm", "gemm") in kinds
    (pointwise,) = [r for r in graphs.graphs[0] if r[1] == "inductor"]
    assert pointwise[0] == "inductor:add+mul+relu"
    assert pointwise[3] == 2 * x.numel() * 4  # x read once, the fused result written once
    assert sorted(records) == sorted(graphs.graphs[0] * 2) and all(r[6] for r in records)
    assert pointwise[7] and all(r[7] for r in records)  # the FX nodes each kernel computes


def test_compiled_toy_step_counts_inductor_kernels_for_the_blocks():
    args = R.parse_args(["--size", "toy"])
    name, kwargs = model_kwargs("dit", "toy")
    torch.manual_seed(0)
    base = build("dit", **kwargs)
    analytic = flops_per_image(base, mask_ratio=FLOPS_MASK_RATIO.get("dit", 0.0), training=True)
    rows = {}
    for variant in ("eager_fused", "compiled_fused", "compiled", "compiled_fused_mlp"):
        c = R.count_variant(variant, "dit", kwargs, base.state_dict(), [2, 3], args)
        rows[variant] = R.make_row(name, "dit", "toy", variant, c, analytic, 256, "h100")
    for variant in ("compiled_fused", "compiled", "compiled_fused_mlp"):
        row = rows[variant]
        m = row["in_block_matmuls"]
        assert m["eager"] == m["inductor"] > 0, m  # both counts describe the same step
        assert row["counted_over_analytic"] == pytest.approx(1.0, abs=0.03)
        assert row["bytes_per_image"]["inductor"] > 0
        assert row["unmatched_ops"] == 0 and row["clamped_gb_per_step"] < 1e-3 * sum(row["bytes_per_step"].values()) / 1e9
        # outside the blocks nothing changes: the same optimizer and EMA traffic as the eager step
        assert row["bytes_const_per_step"]["optimizer_ema"] == \
            pytest.approx(rows["eager_fused"]["bytes_const_per_step"]["optimizer_ema"])
    # the fused variant keeps our ops opaque in the blocks (as on a GPU); the torch backend is traced inline
    assert rows["compiled_fused"]["bytes_per_image"]["fused_ops"] == \
        pytest.approx(rows["eager_fused"]["bytes_per_image"]["fused_ops"], rel=0.05)
    assert rows["compiled"]["bytes_per_image"]["fused_ops"] == 0
    # the opt-in MLP op: its GEMMs counted whole (the same matmul FLOPs: its FLOPs are counted, the CPU body's
    # matmuls are not), the GELU passes gone from the compiled blocks
    nonmatmul = lambda r: sum(v for c, v in r["bytes_per_image"].items() if c not in R.MATMUL)  # noqa: E731
    mlp, fused = rows["compiled_fused_mlp"], rows["compiled_fused"]
    assert mlp["counted_matmul_flops_per_image"] == pytest.approx(fused["counted_matmul_flops_per_image"], rel=1e-6)
    assert nonmatmul(mlp) < nonmatmul(fused)
