"""Roofline floor of one training step, counted on the CPU, predicted for a GPU ("two numbers first").

    python benchmarks/roofline_step.py --families dit,mdtv2,maskdit --sizes XL --batch 256 --device-peaks h100
    python benchmarks/roofline_step.py --size toy --families dit --out-dir /tmp/r      # seconds, for tests

Runs real training steps of bench_train_step's variants (reference, eager, eager_fused, compiled,
compiled_fused, compiled_fused_mlp; same models, objectives, step) on the CPU under a TorchDispatchMode that records every
op below autograd and autocast: its FLOPs (matmul class: torch.utils.flop_counter's formulas;
attention: our own, below) and its bytes (each input tensor's viewed elements read once, each
output written once; views and no-op aliases cost 0). The step is set up as the GPU runs it
(:func:`gpu_like`): fused AdamW (ours, MaskDiT's recipe) or foreach (the others), Adan's fused Triton
step (ours, and MDT's reference: the official Adan(fused=True) is a CUDA kernel), fp16 recipes as bf16 autocast + GradScaler (same byte widths). Adan is
counted without running it (:func:`adan_records`), so MDTv2-XL/2 fits on a 24 GB machine. Our custom
ops (torch.ops.masked_dit.*) are one unit at the dispatch level: counted once (inputs read once,
outputs written once) for eager_fused, as the GPU kernels run them; for eager (torch backend) their
Python body is traced op by op, as the GPU runs the torch reference. Attention custom ops and
``linear_gelu`` and ``mlp_gelu`` (GEMMs with cuBLASLt epilogues) stay one unit always (on the GPU:
flash/flex, cuBLASLt; ``mlp_gelu`` with its GEMMs' FLOPs, taken on the CPU where only its body can run). Compiled variants
(per-block torch.compile, Inductor on the CPU as a proxy for the GPU's fusion): the blocks' non-matmul
ops are replaced by the kernels Inductor generated for them (roofline_inductor.py).

Two batch sizes (--count-batches, default 2,3) separate per-image (activation) traffic from constant
(weights, gradients, optimizer state, EMA) traffic: every op's FLOPs and bytes are fitted as
a + b * batch (the two traces aligned op by op) and extrapolated to --batch.

Floor per step on --device-peaks (performance-facts.md), the three terms serialize on one stream:
    t_gemm = sum over matmul ops of max(FLOPs / GEMM ceiling, bytes / copy bandwidth)
    t_attn = sum over attention ops of max(FLOPs / (GEMM ceiling * ATTN_EFFICIENCY), bytes / bandwidth)
    t_mem  = non-matmul bytes / copy bandwidth
Results: ``<out-dir>/roofline-cpu-<date>.json`` (common.write_results; rows keyed by model, variant
and device_peaks) and a printed table.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import defaultdict
from contextlib import ExitStack
from unittest import mock
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `masked_dit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from benchmarks import common
from benchmarks.bench_train_step import (FAMILIES, FLOPS_MASK_RATIO, SIZES, add_reference_args, build_runner,
                                         make_batch, make_optimizer, model_kwargs)
from benchmarks.reference_style import RECIPES
from masked_dit.ops import mlp as mlp_ops

VARIANTS = ("reference", "eager", "eager_fused", "compiled", "compiled_fused", "compiled_fused_mlp")
COMPILED_VARIANTS = ("compiled", "compiled_fused", "compiled_fused_mlp")
TOP_OPS = 12  # ops listed per row by bytes moved


#################################################################################
#                                 Device peaks                                  #
#################################################################################

# performance-facts.md: measured 8192^3 bf16 GEMM and device copy (bytes read + written), datasheet dense bf16.
DEVICE_PEAKS = {
    "h100": dict(gemm_tflops=798.0, copy_tbs=3.0, datasheet_tflops=989.0),
    "h200": dict(gemm_tflops=788.0, copy_tbs=4.3, datasheet_tflops=989.0),
}
# Attention kernels reach less than a GEMM: FA2 runs head dim 72 (XL: 1152 / 16) on its 96 kernel, so 75% of
# its FLOPs are useful, and FA2/cuDNN reach ~ 50-60% of peak on H100 at 256 tokens: 0.75 x 0.55 ~ 0.4 of the
# GEMM ceiling. An assumption to check against a profile, not a measurement.
ATTN_EFFICIENCY = 0.4
# The flash backward recomputes QK^T: 5 matmuls where the model count (3 x forward) has 4.
ATTN_BWD_RECOMPUTE = 5 / 4
# fp32 matmuls of the fp32 reference recipes: TF32 tensor cores run at half the bf16 rate (H100 494.7 of 989
# dense), plain fp32 at 67 of 989 (non-tensor-core); scaled from the measured bf16 ceiling.
TF32_FRACTION = 494.7 / 989.0
FP32_FRACTION = 67.0 / 989.0


#################################################################################
#                                Counting ops                                   #
#################################################################################

ATTENTION_OPS = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "masked_dit.attention_math",
                 "flex_attention", "varlen_attn")
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "_convolution", "convolution_backward",
            "cudnn_convolution", "convolution_overrideable", "_slow_conv2d_forward",
            "masked_dit.linear_gelu",  # one cuBLASLt GEMM with its GELU epilogue on the GPU
            # the opt-in training MLP: its GEMMs with GELU, GELU' and fc1's bias gradient in cuBLASLt epilogues.
            # One unit: the FLOPs of its GEMMs, and the bytes of the op's inputs and outputs, where the GEMMs
            # also re-read act / dpre (compute-bound GEMMs: a floor term of FLOPs, not of bytes)
            "masked_dit.mlp_gelu", "masked_dit.mlp_gelu_backward"}
# Ops the CPU runs in bf16 under autocast where CUDA's autocast runs fp32 (its fp32 list): reported, since
# such an op moves half the bytes on the CPU. Our residual stream is fp32 anyway (checked in the tests).
CUDA_AUTOCAST_FP32 = {"native_layer_norm", "_softmax", "_log_softmax", "logsumexp", "group_norm"}
NORM_OPS = {"native_layer_norm", "native_layer_norm_backward", "_softmax", "_softmax_backward_data", "_log_softmax",
            "_log_softmax_backward_data", "native_group_norm", "native_group_norm_backward", "logsumexp"}
INDEX_OPS = ("gather", "scatter", "index", "embedding", "take", "masked_select", "nonzero")
MEMORY_OPS = {"copy_", "_to_copy", "clone", "fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full",
              "full_like", "new_zeros", "new_ones", "new_full", "cat", "stack", "repeat", "_copy_from",
              "constant_pad_nd", "lift_fresh_copy"}
FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
            "set_", "resize_", "_unsafe_view", "detach", "alias", "lift_fresh"}
# Arguments the schema marks mutable that the kernel only reads (fused Adam unscales grads in registers).
READ_ONLY_ARGS = {"_fused_adam_": {"grads"}, "_fused_adamw_": {"grads"}}
WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}
# inductor: the kernels Inductor generates in compiled blocks (roofline_inductor.py)
CATEGORIES = ("gemm", "attention", "fused_ops", "inductor", "norm", "elementwise", "index", "optimizer_ema", "memory")
MATMUL = ("gemm", "attention")


def base_name(func) -> str:
    """'aten.addmm.default' -> 'addmm'; 'masked_dit.adaln_modulate.default' -> 'masked_dit.adaln_modulate'."""
    packet = func._overloadpacket if hasattr(func, "_overloadpacket") else func
    ns = getattr(func, "namespace", "aten")
    name = getattr(packet, "__name__", str(packet)).split(".")[-1]
    return name if ns == "aten" else f"{ns}.{name}"


def viewed_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor view covers: broadcast (stride-0) dims count once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else 1
    return n * t.element_size()


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def op_bytes(func, args, kwargs, out) -> tuple[int, int]:
    """(bytes read, bytes written): every tensor argument read once (not out= or write-only ones), every
    mutated argument and every new output written once. A view, or an op whose outputs all alias its
    inputs' storage (reshape, _unsafe_view), costs 0."""
    name = base_name(func)
    if name in FREE_OPS or name.startswith("empty"):
        return 0, 0
    schema = func._schema
    read = written = 0
    bound = list(zip(schema.arguments, list(args) + [None] * len(schema.arguments)))
    for arg, value in bound:
        value = kwargs.get(arg.name, value) if arg.kwarg_only or value is None else value
        tensors = _tensors(value)
        if not tensors:
            continue
        mutated = arg.alias_info is not None and arg.alias_info.is_write \
            and arg.name not in READ_ONLY_ARGS.get(name, ())
        if mutated:
            written += sum(viewed_bytes(t) for t in tensors)
        if not (mutated and (arg.kwarg_only or name in WRITE_ONLY)):  # out= and fill/copy targets are not read
            read += sum(viewed_bytes(t) for t in tensors)
    outs = _tensors(out)
    aliased = [r.alias_info is not None for r in schema.returns]
    if outs and all(aliased) and not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return 0, 0  # a view op
    inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.untyped_storage().nbytes()}
    fresh = [t for i, t in enumerate(outs) if not (i < len(aliased) and aliased[i])]
    if fresh and not written and all(t.untyped_storage().data_ptr() in inputs for t in fresh):
        return 0, 0  # returns an alias of an input without saying so (e.g. a no-op _to_copy)
    written += sum(viewed_bytes(t) for t in fresh)
    return read, written


def attention_flops(name: str, args) -> float:
    """Model FLOPs of an attention op: forward 2 matmuls (QK^T, PV), backward 4 (dV, dP, dQ, dK) as the
    analytic 3 x forward count; the flash recompute of QK^T is added in the time model (ATTN_BWD_RECOMPUTE)."""
    backward = name.endswith("backward")
    q, k = (args[1], args[2]) if backward else (args[0], args[1])
    if name.startswith("masked_dit."):  # [B, L, H, D]
        (b, lq, h, d), lk = q.shape, k.shape[1]
    else:  # SDPA layout [B, H, L, D]
        (b, h, lq, d), lk = q.shape, k.shape[2]
    fwd = 2.0 * 2 * b * h * lq * lk * d
    return 2.0 * fwd if backward else fwd


def classify(name: str, phase: str | None) -> str:
    if any(s in name for s in ATTENTION_OPS):
        return "attention"
    if name in GEMM_OPS:
        return "gemm"
    if name.startswith("masked_dit."):
        return "fused_ops"
    if phase == "optimizer_ema" or name.startswith("_foreach") or name.startswith("_fused_") \
            or name.startswith("_amp_foreach"):
        return "optimizer_ema"
    if name in MEMORY_OPS:
        return "memory"
    if name in NORM_OPS:
        return "norm"
    if any(s in name for s in INDEX_OPS):
        return "index"
    return "elementwise"


class RooflineMode(TorchDispatchMode):
    """Records (op, category, FLOPs, bytes read, bytes written, dtype, in_region) of every op below
    autograd/autocast.

    ``decompose_fused``: trace the Python body of our non-attention custom ops (the torch backend: the GPU
    runs them as separate aten kernels) instead of counting each as one fused unit. ``tagger``: says
    whether an op runs inside a compiled block (roofline_inductor.RegionTagger); without one, never."""

    def __init__(self, decompose_fused: bool = False, tagger=None):
        super().__init__()
        self.decompose_fused = decompose_fused
        self.tagger = tagger
        self.records: list[tuple] = []
        self.phase: str | None = None
        self.autocast_fp32_mismatch = 0  # ops CUDA autocast would run in fp32, seen in bf16 here

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = base_name(func)
        opdef = OPDEFS.get(f"{func.namespace}::{func._overloadpacket.__name__}") \
            if func.namespace == "masked_dit" else None
        if opdef is not None and self.decompose_fused and "attention" not in name and name not in GEMM_OPS:
            with self:  # re-enter: the body's aten ops are recorded, the custom op itself is not
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        cat = classify(name, self.phase)
        flops = 0.0
        if cat == "attention":
            flops = attention_flops(name, args)
        elif name == "masked_dit.linear_gelu":  # x [..., K] @ weight.T -> out [..., N]
            flops = 2.0 * out.numel() * args[0].shape[-1]
        elif name in ("masked_dit.mlp_gelu", "masked_dit.mlp_gelu_backward"):
            flops = mlp_gelu_flops(name, args)
        elif cat == "gemm" and func._overloadpacket in flop_registry:
            flops = float(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
        read, written = op_bytes(func, args, kwargs, out)
        dtype = next((t.dtype for t in _tensors(args) if t.is_floating_point()), None)
        if name in CUDA_AUTOCAST_FP32 and dtype in (torch.bfloat16, torch.float16) \
                and torch.is_autocast_enabled("cpu"):
            self.autocast_fp32_mismatch += 1
        inside = self.tagger is not None and self.tagger.inside()
        self.records.append((name, cat, flops, read, written, str(dtype).replace("torch.", ""), inside))
        return out


#################################################################################
#                              Fitting and predicting                           #
#################################################################################

def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x (exact through two points)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_line needs at least two distinct x values")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def fit_ops(traces: dict[int, list[tuple]]) -> tuple[list[dict], int]:
    """Per op: a + b * batch of FLOPs and bytes, from the traces at two batches aligned op by op (free
    ops dropped first). Ops of one trace only (e.g. a reshape that copies at batch 2 but is a view at 1)
    are taken as per-image cost (a = 0); returns (ops, number of unmatched ops)."""
    import difflib

    (b1, t1), (b2, t2) = sorted(traces.items())
    t1, t2 = ([r for r in t if r[2] or r[3] or r[4]] for t in (t1, t2))
    matcher = difflib.SequenceMatcher(None, [r[0] for r in t1], [r[0] for r in t2], autojunk=False)
    ops, matched1, matched2 = [], set(), set()

    def op(rec, flops, nbytes):
        return dict(name=rec[0], category=rec[1], dtype=rec[5], flops=flops, bytes=nbytes)

    for block in matcher.get_matching_blocks():
        for i, j in zip(range(block.a, block.a + block.size), range(block.b, block.b + block.size)):
            r1, r2 = t1[i], t2[j]
            ops.append(op(r2, fit_line([b1, b2], [r1[2], r2[2]]), fit_line([b1, b2], [r1[3] + r1[4], r2[3] + r2[4]])))
            matched1.add(i)
            matched2.add(j)
    for batch, trace, matched in ((b1, t1, matched1), (b2, t2, matched2)):
        for i, r in enumerate(trace):
            if i not in matched and batch == b2:
                ops.append(op(r, (0.0, r[2] / batch), (0.0, (r[3] + r[4]) / batch)))
    unmatched = len(t1) - len(matched1) + len(t2) - len(matched2)
    return ops, unmatched


def residual_ops(traces: dict[int, list[tuple]], ops: list[dict]) -> list[dict]:
    """Per non-matmul category, the line through what the per-op fit misses at the two traced batches
    (ops of one trace only, e.g. kernels Inductor fuses differently at the two sizes): category totals
    stay exact. Marked ``exact``: not clamped at 0 like the ops (it may correct one downwards)."""
    (b1, t1), (b2, t2) = sorted(traces.items())
    out = []
    for cat in CATEGORIES:
        if cat in MATMUL:
            continue
        raw = [sum(r[3] + r[4] for r in t if r[1] == cat) for t in (t1, t2)]
        fit = [sum(o["bytes"][0] + o["bytes"][1] * b for o in ops if o["category"] == cat) for b in (b1, b2)]
        miss = [r - f for r, f in zip(raw, fit)]
        if any(abs(m) > 0.5 for m in miss):
            out.append(dict(name="(fit residual)", category=cat, dtype="", flops=(0.0, 0.0),
                            bytes=fit_line([b1, b2], miss), exact=True))
    return out


def gemm_tflops(dtype: str, peaks: dict, tf32: bool) -> float:
    if dtype == "float32":
        return peaks["gemm_tflops"] * (TF32_FRACTION if tf32 else FP32_FRACTION)
    return peaks["gemm_tflops"]


def predict(ops: list[dict], batch: int, peaks: dict, tf32: bool) -> dict:
    """Per-category FLOPs, bytes and floor time (ms) per step at ``batch``, and their per-image slopes."""
    bw = peaks["copy_tbs"] * 1e12
    cats = {c: dict(flops=0.0, bytes=0.0, ms=0.0, bytes_const=0.0, bytes_per_img=0.0, flops_per_img=0.0)
            for c in CATEGORIES}
    for op in ops:
        floor = float("-inf") if op.get("exact") else 0.0
        flops = max(op["flops"][0] + op["flops"][1] * batch, floor)
        nbytes = max(op["bytes"][0] + op["bytes"][1] * batch, floor)
        c = cats[op["category"]]
        c["flops"] += flops
        c["bytes"] += nbytes
        c["bytes_const"] += op["bytes"][0]
        c["bytes_per_img"] += op["bytes"][1]
        c["flops_per_img"] += op["flops"][1]
        if op["category"] in MATMUL:
            rate = gemm_tflops(op["dtype"], peaks, tf32) * 1e12
            if op["category"] == "attention":
                rate *= ATTN_EFFICIENCY
                flops *= ATTN_BWD_RECOMPUTE if op["name"].endswith("backward") else 1.0
            c["ms"] += 1e3 * max(flops / rate, nbytes / bw)
        else:
            c["ms"] += 1e3 * nbytes / bw
    return cats


#################################################################################
#                                 Traced steps                                  #
#################################################################################

def gpu_like(runner, variant: str, family: str) -> str:
    """Sets the runner up as the GPU runs the variant; returns the precision note. build_runner on the CPU
    uses the for-loop AdamW and fp32 for fp16 recipes: the GPU uses fused AdamW (ours; MaskDiT's recipe) or
    foreach (the others), Adan's fused Triton step (ours and MDT's reference, as ``RECIPES`` says;
    counted by :func:`adan_records`), and fp16 autocast + GradScaler (here bf16, same widths)."""
    recipe = RECIPES[family]
    fused = variant != "reference" or recipe["fused_optimizer"]
    runner.optimizer = make_optimizer(recipe["optimizer"], runner.params, fused=fused and recipe["optimizer"] == "adamw")
    runner.gpu_fused_optimizer = fused
    if not fused:
        for group in runner.optimizer.param_groups:
            group["foreach"] = True
    if variant == "reference" and recipe["precision"] == "fp16":
        runner.autocast_dtype = torch.bfloat16
        runner.scaler = torch.amp.GradScaler("cpu")
        return "fp16 autocast + GradScaler on GPU (counted as bf16 autocast: same byte widths)"
    if variant == "reference":
        return "fp32" + (" (TF32 matmuls)" if recipe["tf32"] else " (no TF32)")
    return "bf16 autocast"


def init_optimizer_state(runner) -> None:
    """Creates the optimizer state (a first step's lazy zeros) with zero gradients, outside the traces:
    costs one optimizer pass instead of a whole warmup step; zero gradients leave AdamW/Adan's weights as
    they were (no weight decay). Adan: none (its step is counted, not run: :func:`adan_records`)."""
    if _is_adan(runner.optimizer):
        return
    for p in runner.params:
        p.grad = torch.zeros_like(p)
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    if runner.scaler is not None:
        runner.scaler.scale(torch.zeros(()))  # its scale tensor, created on first use


#################################################################################
#                       Adan: counted, not run                                  #
#################################################################################

ADAN_PROXY_NUMEL = 4096
ADAN_FUSED_ACCESSES = (6, 5)  # fp32 reads (p, g, pre_grad, 3 moments), writes (all but g): triton_kernels/adan.py


def _is_adan(optimizer) -> bool:
    from masked_dit.train.optim import Adan

    return isinstance(optimizer, Adan)


def adan_records(optimizer, fused: bool) -> list[tuple]:
    """Adan's step as records, without running it. Its four fp32 buffers per parameter (12 GB at
    MDTv2-XL/2) need not fit beside the model on the counting machine, and the GPU's fused step is a
    Triton kernel that dispatch cannot see. Fused: one record per parameter, 11 fp32 accesses per element.
    Foreach (a recipe without a fused step): ``_foreach_step`` traced once on a small proxy tensor, each op's bytes scaled
    to the parameters' element count (each of its ops is elementwise, so bytes scale exactly)."""
    from masked_dit.train.optim import _foreach_step

    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if fused:
        reads, writes = ADAN_FUSED_ACCESSES
        return [("masked_dit.adan_step_ (triton)", "optimizer_ema", 0.0, 4.0 * reads * p.numel(),
                 4.0 * writes * p.numel(), "float32", False) for p in params]
    group = optimizer.param_groups[0]
    (b1, b2, b3), lr, wd = group["betas"], group["lr"], group["weight_decay"]
    proxy = [[torch.zeros(ADAN_PROXY_NUMEL)] for _ in range(6)]  # p, g, pre_grad and the moments
    mode = RooflineMode()
    mode.phase = "optimizer_ema"
    with mode:
        _foreach_step(*proxy, b1=b1, b2=b2, b3=b3, lr=lr, wd=wd, eps=group["eps"], bc1=1 - b1, bc2=1 - b2,
                      bc3=1 - b3, no_prox=group["no_prox"])
    scale = sum(p.numel() for p in params) / ADAN_PROXY_NUMEL
    return [(r[0], r[1], r[2] * scale, r[3] * scale, r[4] * scale, r[5], False) for r in mode.records]


def _phased(mode: RooflineMode, fn):
    def wrapper(*args, **kwargs):
        mode.phase = "optimizer_ema"
        try:
            return fn(*args, **kwargs)
        finally:
            mode.phase = None
    return wrapper


def mlp_gelu_flops(name: str, args) -> float:
    """fc1 (x [M, K] @ w1.T, w1 [H, K]) and fc2 (w2 [N, H]): 2MH(K + N) forward; the backward's four GEMMs
    (fc2's input and weight gradients, fc1's) twice that."""
    if name == "masked_dit.mlp_gelu":
        x, w1, _b1, w2 = args[:4]
    else:
        _dout, x, w1, w2 = args[:4]
    fwd = 2.0 * x.shape[0] * w1.shape[0] * (w1.shape[1] + w2.shape[0])
    return fwd if name == "masked_dit.mlp_gelu" else 2.0 * fwd


def trace_step(runner, data: dict, tagger=None) -> tuple[list[tuple], int]:
    """One training step under the counting mode: (records, ops CUDA autocast would run in fp32)."""
    mode = RooflineMode(decompose_fused=runner.backend == "torch", tagger=tagger)
    step, update = runner.optimizer.step, runner.ema.update
    if _is_adan(runner.optimizer):
        records = adan_records(runner.optimizer, runner.gpu_fused_optimizer)
        step = lambda *args, **kwargs: mode.records.extend(records)  # noqa: E731
    runner.optimizer.step, runner.ema.update = _phased(mode, step), _phased(mode, update)
    try:
        with mode:
            runner.step(data)
    finally:
        del runner.optimizer.step, runner.ema.update  # back to the class methods
    return mode.records, mode.autocast_fp32_mismatch


def trace_compiled_step(runner, data: dict) -> tuple[list[tuple], int, dict]:
    """A compiled step's records (roofline_inductor.py): the eager trace with its non-matmul ops inside the
    compiled blocks replaced by the kernels Inductor generated for them, times their calls in one step.
    Also returns the in-block matmul counts of both (a check that the two describe the same step)."""
    from benchmarks.roofline_inductor import InductorGraphs, RegionTagger
    from masked_dit.diffusion.objectives import unwrap
    from masked_dit.ops import dispatch
    from masked_dit.train.parallel import transformer_blocks

    tagger = RegionTagger(transformer_blocks(unwrap(runner.model)))
    try:
        with torch.compiler.set_stance("force_eager"):
            eager, mismatch = trace_step(runner, data, tagger)
    finally:
        tagger.remove()
    with ExitStack() as stack:
        graphs = stack.enter_context(InductorGraphs())
        stack.enter_context(torch._dynamo.config.patch(automatic_dynamic_shapes=False))
        if runner.backend != "torch":  # the CPU's auto backend is torch, traced inline: keep the GPU's opaque ops
            stack.enter_context(mock.patch.object(dispatch, "_selects_torch", lambda op, device_type: False))
        if _is_adan(runner.optimizer):  # counted in the eager trace; running it would allocate its state
            stack.enter_context(mock.patch.object(runner.optimizer, "step", lambda *args, **kwargs: None))
        runner.step(data)  # compiles
        graphs.restart_calls()
        runner.step(data)
        kernels = graphs.records()
    if not kernels:
        raise RuntimeError("no Inductor kernels ran in the compiled step (compile backend not inductor?)")
    in_block_matmuls = dict(eager=sum(r[6] and r[1] in MATMUL for r in eager),
                            inductor=sum(r[1] in MATMUL for r in kernels), graphs=len(graphs.graphs))
    records = [r for r in eager if not (r[6] and r[1] not in MATMUL)] + [r for r in kernels if r[1] not in MATMUL]
    return records, mismatch, in_block_matmuls


def count_variant(variant: str, family: str, kwargs: dict, base_state: dict | None, batches, args) -> dict:
    """Traces one step per batch size; returns per-op fits and what was counted."""
    device = torch.device("cpu")
    compiled = variant in COMPILED_VARIANTS

    def setup():
        runner, info = build_runner(variant, family, kwargs, base_state, device, args)
        info["precision"] = gpu_like(runner, variant, family)
        objective = runner.objective
        if family in FLOPS_MASK_RATIO:  # a fixed ratio: MDTv2 draws one per step (mean 0.4), MaskDiT runs 0.5
            objective.mask_ratio = FLOPS_MASK_RATIO[family]
            if hasattr(objective, "mask_ratio_jitter"):
                objective.mask_ratio_jitter = 0.0
        init_optimizer_state(runner)
        return runner, info

    runner, info = setup()
    traces, mismatch, seconds, matmuls = {}, 0, 0.0, {}
    for b in batches:
        if compiled and b != batches[0]:  # compiled: a fresh runner per batch (static shapes, new graphs)
            runner = None  # freed before the next one is built
            runner, info = setup()
        torch.manual_seed(args.seed)
        data = make_batch(family, kwargs, b, device, runner.raw_images)
        t0 = time.perf_counter()
        with ExitStack() as stack:
            if "mlp_gelu" in getattr(runner, "opt_in", ()):  # the CPU has no cuBLASLt: the op runs its torch body, counted as
                stack.enter_context(mock.patch.object(mlp_ops, "_runs_fused", lambda device_type: True))  # a unit
            if compiled:
                traces[b], mism, matmuls[b] = trace_compiled_step(runner, data)
            else:
                traces[b], mism = trace_step(runner, data)
        seconds += time.perf_counter() - t0
        mismatch = max(mismatch, mism)
    if compiled:
        info["in_block_matmuls"] = matmuls[batches[-1]]
    ops, unmatched = fit_ops(traces)
    ops += residual_ops(traces, ops)
    info.update(count_batches=list(batches), ops_per_step=len(traces[batches[-1]]), unmatched_ops=unmatched,
                count_seconds=seconds,
                cpu_autocast_fp32_mismatch_ops=mismatch, tf32=bool(getattr(runner, "tf32", False))
                if variant != "reference" else RECIPES[family]["tf32"])
    return dict(info=info, ops=ops)


#################################################################################
#                                    Rows                                       #
#################################################################################

def top_ops(ops: list[dict], batch: int, n: int = TOP_OPS) -> list[dict]:
    """The ``n`` ops (by name and category, summed over the step) that move the most bytes at ``batch``:
    where fusion or a better kernel would pay first."""
    by_name: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for op in ops:
        if op.get("exact"):  # a fit residual, not an op (make_row reports it)
            continue
        agg = by_name[(op["name"], op["category"])]
        agg[0] += max(op["bytes"][0] + op["bytes"][1] * batch, 0.0)
        agg[1] += op["bytes"][1]
        agg[2] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:n]
    return [dict(name=name, category=cat, gb_per_step=v[0] / 1e9, gb_per_image=v[1] / 1e9, calls=v[2])
            for (name, cat), v in ranked]


def make_row(name, family, size, variant, counted: dict, analytic: float, batch: int, peaks_name: str) -> dict:
    peaks = DEVICE_PEAKS[peaks_name]
    cats = predict(counted["ops"], batch, peaks, counted["info"]["tf32"])
    matmul_per_img = sum(cats[c]["flops_per_img"] for c in MATMUL)
    nonmatmul = [c for c in CATEGORIES if c not in MATMUL]
    t = {"gemm": cats["gemm"]["ms"], "attention": cats["attention"]["ms"],
         "memory_bound": sum(cats[c]["ms"] for c in nonmatmul)}
    step_ms = sum(t.values())
    img_per_s = batch * 1e3 / step_ms
    row = dict(model=name, family=family, size=size, variant=variant, device_peaks=peaks_name, batch=batch,
               flops_mask_ratio=FLOPS_MASK_RATIO.get(family, 0.0), flops_per_image=analytic,
               counted_matmul_flops_per_image=matmul_per_img, counted_over_analytic=matmul_per_img / analytic,
               counted_attention_flops_per_image=cats["attention"]["flops_per_img"],
               bytes_per_image={c: cats[c]["bytes_per_img"] for c in CATEGORIES},
               bytes_const_per_step={c: cats[c]["bytes_const"] for c in CATEGORIES},
               bytes_per_step={c: cats[c]["bytes"] for c in CATEGORIES},
               ms_by_category={c: cats[c]["ms"] for c in CATEGORIES},
               floor_terms_ms=t, floor_share={k: v / step_ms for k, v in t.items()},
               pred_step_ms=step_ms, pred_img_per_s=img_per_s,
               peaks=dict(peaks, attn_efficiency=ATTN_EFFICIENCY, attn_bwd_recompute=ATTN_BWD_RECOMPUTE),
               **counted["info"])
    row["top_ops"] = top_ops(counted["ops"], batch)
    row["fit_residual_gb_per_step"] = {o["category"]: (o["bytes"][0] + o["bytes"][1] * batch) / 1e9
                                       for o in counted["ops"] if o.get("exact")}
    # what clamping ops at 0 added (a large value: traces misaligned, op fits crossing zero)
    row["clamped_gb_per_step"] = sum(max(-(o["bytes"][0] + o["bytes"][1] * batch), 0.0)
                                     for o in counted["ops"] if not o.get("exact")) / 1e9
    row.update(common.mfu_fields(img_per_s, analytic, {"datasheet_tflops": peaks["datasheet_tflops"],
                                                       "measured_gemm_tflops": peaks["gemm_tflops"]}))
    row["status"] = "ok"
    return row


def run_family(family: str, size: str, args) -> list[dict]:
    from masked_dit.models import build
    from masked_dit.models.flops import flops_per_image

    name, kwargs = model_kwargs(family, size)
    torch.manual_seed(args.seed)
    with torch.device("meta"):  # shapes only; each variant initialises its own weights (XL on a small machine)
        base = build(family, **kwargs)
    analytic = float(flops_per_image(base, mask_ratio=FLOPS_MASK_RATIO.get(family, 0.0), training=True))
    rows = []
    for variant in args.variants:
        try:
            counted = count_variant(variant, family, kwargs, None, args.count_batches, args)
            for peaks_name in args.device_peaks:
                rows.append(make_row(name, family, size, variant, counted, analytic, args.batch, peaks_name))
                _print_row(rows[-1])
        except Exception as err:  # noqa: BLE001  (one failing variant must not lose the others)
            rows.append(dict(model=name, family=family, size=size, variant=variant, device_peaks=",".join(
                args.device_peaks), status="error", reason=f"{type(err).__name__}: {err}"))
            print(f"{name:>14} {variant:>12}  error: {rows[-1]['reason']}", flush=True)
            if args.verbose:
                traceback.print_exc()
    return rows


HEADER = (f"{'model':>14} {'variant':>12} {'peaks':>5} {'batch':>5} {'GFLOP/img':>9} {'analytic':>8} {'ratio':>6}"
          f"  GB/img: {'gemm':>5} {'attn':>5} {'fused':>5} {'other':>5} {'opt+ema':>7} {'mem':>5}"
          f"  {'ms/step':>8} {'gemm%':>5} {'attn%':>5} {'mem%':>5} {'img/s':>7} {'MFU ds':>6} {'MFU gm':>6}")


def _print_row(r: dict) -> None:
    b = r["batch"]
    gb = {c: r["bytes_per_step"][c] / b / 1e9 for c in CATEGORIES}
    other = gb["norm"] + gb["elementwise"] + gb["index"] + gb["inductor"]
    s = r["floor_share"]
    print(f"{r['model']:>14} {r['variant']:>12} {r['device_peaks']:>5} {b:5d} "
          f"{r['counted_matmul_flops_per_image'] / 1e9:9.1f} {r['flops_per_image'] / 1e9:8.1f} "
          f"{r['counted_over_analytic']:6.3f}          {gb['gemm']:5.2f} {gb['attention']:5.2f} {gb['fused_ops']:5.2f} "
          f"{other:5.2f} {gb['optimizer_ema']:7.3f} {gb['memory']:5.2f}  {r['pred_step_ms']:8.1f} "
          f"{100 * s['gemm']:5.1f} {100 * s['attention']:5.1f} {100 * s['memory_bound']:5.1f} "
          f"{r['pred_img_per_s']:7.1f} {100 * r['mfu_datasheet']:5.1f}% {100 * r['mfu_measured_gemm']:5.1f}%",
          flush=True)


#################################################################################
#                                     CLI                                       #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("full", "toy"), default="full", help="toy: tiny models on 8x8 latents")
    p.add_argument("--sizes", type=common.csv_choices(SIZES), default=["XL"], help="model sizes at patch 2 (full)")
    p.add_argument("--families", type=common.csv_choices(FAMILIES), default=["dit", "mdtv2", "maskdit"])
    p.add_argument("--variants", type=common.csv_choices(VARIANTS), default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=256, help="batch the prediction is for (per GPU)")
    add_count_args(p)
    add_reference_args(p)
    # bench_train_step's compile settings, which build_runner reads. Only the default mode: GEMM templates
    # with fused epilogues (max-autotune) would blur the line between matmul and the rest.
    p.set_defaults(compile="block", compile_backend="inductor", compile_mode="default")
    common.add_output_args(p)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    check_count_args(p, args)
    return args


def add_count_args(p) -> None:
    """--count-batches and --device-peaks (this script and roofline_sampling.py)."""
    # Not 1: at batch 1 some reshapes are views that copy at every larger batch.
    p.add_argument("--count-batches", type=lambda s: sorted({int(x) for x in s.split(",")}), default=[2, 3],
                   help="the two batches traced on the CPU for the a + b * batch fit")
    p.add_argument("--device-peaks", type=common.csv_choices(tuple(DEVICE_PEAKS)), default=["h100"])


def check_count_args(p, args) -> None:
    if len(args.count_batches) != 2 or args.count_batches[0] < 1:
        p.error("--count-batches needs two distinct batches >= 1")


def start_count(what: str, header: str) -> dict:
    """The environment of a counting run (this script and roofline_sampling.py), announced with its table header."""
    env = common.environment(torch.device("cpu"))
    print(f"# counted on {env['device']}  torch {env['torch']}  commit {env['commit']}; {what}, attention at "
          f"{ATTN_EFFICIENCY:.0%} of the GEMM ceiling", flush=True)
    print(header, flush=True)
    return env


def write_count(kind: str, env: dict, args, model: str, rows: list, key_fields: tuple) -> Path:
    """The JSON of a counting run: settings, the peaks used, how the floor is modelled, the rows."""
    payload = {"kind": kind, **env, "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "tag")},
               "device_peaks": {k: DEVICE_PEAKS[k] for k in args.device_peaks}, "model": model, "results": rows}
    path = common.write_results(payload, args.out_dir, kind, key_fields=key_fields, tag=args.tag)
    print(f"# wrote {path}", flush=True)
    return path


def main(argv=None) -> Path:
    args = parse_args(argv)
    env = start_count(f"predicted at batch {args.batch}", HEADER)
    rows = []
    sizes = ["toy"] if args.size == "toy" else args.sizes
    for size in sizes:
        for family in args.families:
            rows.extend(run_family(family, size, args))
    return write_count("roofline", env, args,
                       "floor = sum of max(FLOPs / ceiling, bytes / copy bandwidth) over matmul ops + non-matmul "
                       "bytes / copy bandwidth; bytes fitted a + b * batch from CPU traces",
                       rows, ("model", "variant", "device_peaks"))


if __name__ == "__main__":
    main()
