"""benchmarks/profiling.py: kernel names land in the right category, busy time is an interval union,
and ``bench_train_step.py --profile`` writes a summary (and a trace) per variant without losing the row."""
import gzip
import json

import pytest

from benchmarks import bench_train_step, profiling

# Kernel names of the forms CUDA profiles of torch 2.x on Hopper show (cuBLAS/cuDNN/FA2/Triton/ours), written
# from public traces, not captured on a lent GPU yet: the first GPU profile should confirm the categories.
KERNELS = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off": "gemm",
    "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align8>(Params)": "gemm",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4, false, false, cutlass::bfloat16_t>>": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k96_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80>)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
    "triton_tem_fused_flex_attention_0": "attention",
    "void masked_dit::adaln::(anonymous namespace)::adaln_fwd_kernel<__nv_bfloat16, __nv_bfloat16, 3>(...)": "fused_ops",
    "_gated_bwd_kernel": "fused_ops",
    "_gather_rows_kernel": "fused_ops",
    "triton_poi_fused_add_mul_native_layer_norm_0": "inductor",
    "triton_red_fused_native_layer_norm_backward_1": "inductor",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer_ema",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(...)>": "elementwise",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(...)": "norm_softmax",
    "void at::native::index_elementwise_kernel<128, 4, ...>": "index",
    "Memcpy DtoD (Device -> Device)": "memory",
    "Memset (Device)": "memory",
    "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "aten::addmm": "gemm",
    "aten::native_layer_norm": "norm_softmax",
    "masked_dit::adaln_modulate": "fused_ops",
}


@pytest.mark.parametrize("name,cat", sorted(KERNELS.items()))
def test_category_of_real_kernel_names(name, cat):
    assert profiling.category(name) == cat


def test_busy_time_is_the_union_of_intervals():
    assert profiling._union_us([]) == 0
    assert profiling._union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25  # overlap counted once
    assert profiling._union_us([(20, 30), (0, 10)]) == 20


def test_device_user_annotations_are_not_counted():
    """Optimizer.step#..., Inductor's "## Call CompiledFxGraph ##" and "Torch-Compiled Region" spans sit on
    the GPU timeline over kernels counted on their own (torch's tables leave them out too)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, start, end, annotation=False):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA, time_range=span, is_user_annotation=annotation)

    events = [event("sm90_xmma_gemm_bf16", 0, 100), event("triton_poi_fused_add_0", 150, 200),
              event("## Call CompiledFxGraph fabc ##", 0, 200, annotation=True),
              event("Optimizer.step#AdamW.step", 150, 200, annotation=True)]
    out = profiling.summarize(events, steps=1, wall_ms=0.3, on_device=True)
    assert out["busy_ms_per_step"] == pytest.approx(0.15)  # the 50 us gap stays idle
    assert {row["name"] for row in out["top"]} == {"sm90_xmma_gemm_bf16", "triton_poi_fused_add_0"}


def test_bench_train_step_profile_and_trace(tmp_path):
    path = bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "1",
                                  "--families", "maskdit", "--variants", "eager", "--profile", "1", "--trace",
                                  "--out-dir", str(tmp_path)])
    row = json.loads(path.read_text())["results"][0]
    assert row["status"] == "ok", row.get("reason")
    prof = row["profile"]
    assert prof["steps"] == 1 and prof["busy_ms_per_step"] is None and prof["wall_ms_per_step"] > 0
    cats = prof["categories_ms_per_step"]
    assert cats["gemm"] > 0 and set(cats) <= {c for c, _ in profiling.CATEGORIES} | {"other"}
    assert sum(prof["category_share"].values()) == pytest.approx(1.0)
    assert len(prof["top"]) == profiling.TOP
    assert [t["ms_per_step"] for t in prof["top"]] == sorted((t["ms_per_step"] for t in prof["top"]), reverse=True)
    trace = tmp_path / "trace-MaskDiT-toy-eager-b2.json.gz"
    assert prof["trace"] == str(trace)
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("name") == "aten::addmm" for e in events)


def test_profile_failure_keeps_the_measured_row(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("profiler ran out of memory (simulated)")

    monkeypatch.setattr(profiling, "profile_steps", broken)
    path = bench_train_step.main(["--size", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0",
                                  "--families", "dit", "--variants", "eager", "--profile", "1",
                                  "--out-dir", str(tmp_path)])
    row = json.loads(path.read_text())["results"][0]
    assert row["status"] == "ok" and row["img_per_s"] > 0 and "profile" not in row
    assert row["profile_error"] == "RuntimeError: profiler ran out of memory (simulated)"


def test_trace_needs_profile():
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--trace"])
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--profile", "-1"])
