"""Every op of masked_dit.ops, each backend against eager PyTorch and torch.compile of it.

    python benchmarks/bench_ops.py                                 # DiT-XL/2 and S/2 shapes, GPU, bf16
    python benchmarks/bench_ops.py --sizes xl2 --ops gather_tokens,scatter_tokens
    python benchmarks/bench_ops.py --size toy --device cpu --out-dir /tmp/r    # seconds, for tests

Shapes (batch 256, 256 tokens, 128 kept, as in masked DiT training at mask ratio 0.5):

    xl2   D=1152, 16 heads of 72        s2   D=384, 6 heads of 64        toy  tiny, CPU tests

Ops: gather_tokens / scatter_tokens (mask token [D]) and their packed varlen forms (kept counts
vary around 128 per sample), adaln_modulate and gated_residual_adaln over all 256 tokens,
attention over 256 tokens, attention over the 128 kept tokens with MDT's relative-position
bias (``positions=ids_keep``), linear_gelu (the MLP's fc1 + GELU as sampling runs it: forward only,
cuBLASLt's epilogue on CUDA; TFLOP/s reported) and mlp_gelu (the whole MLP as training runs it: its
``backend:cuda`` row is the opt-in cuBLASLt epilogue op, ``reference:compile`` Inductor's fused GELU).

Implementations per op, forward and forward+backward:

    backend:<name>     the public op under ``use_backend(name)`` (torch, triton, cuda); attention
                       under ``use_attention_backend(name)`` (flash, xformers, varlen, flex, sdpa, math)
    reference:eager    the op written the way the official repos do it (benchmarks/reference_style.py:
                       ``torch.gather`` with a repeated B*K*D index, MAE's cat + ids_restore gather,
                       LayerNorm + modulate, explicit softmax with the gathered MDT bias)
    reference:compile  ``torch.compile`` of that reference (off on CPU unless ``--compile on``)

Unavailable implementations are reported as ``skipped`` with the reason. Bandwidth: bytes an
ideal kernel moves (each input read once, each output written once; index tensors included,
saved LayerNorm statistics not) over the time, and that as a fraction of the device's copy
bandwidth measured here with a large tensor copy. Attention also reports TFLOP/s (forward
4*B*H*L^2*Dh; backward 2.5x that). Timing: CUDA events on GPU (``benchmarks.common.Timer``).
Results: ``<out-dir>/ops-<device>-<date>[-<tag>].json``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `masked_dit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.reference_style import RelPosBias, gather_tokens as official_gather, modulate
from masked_dit import ops
from masked_dit.ops import dispatch
from masked_dit.ops.mlp import reference as mlp_reference

# the module (masked_dit.ops exports the function under the same name)
attention_mod = importlib.import_module("masked_dit.ops.attention")

SIZES = {
    "toy": dict(B=2, N=16, K=8, D=32, H=2, grid=4),
    "s2": dict(B=256, N=256, K=128, D=384, H=6, grid=16),
    "xl2": dict(B=256, N=256, K=128, D=1152, H=16, grid=16),
}
OPS = ("gather_tokens", "scatter_tokens", "gather_tokens_varlen", "scatter_tokens_varlen", "adaln_modulate",
       "adaln_modulate_to_bf16", "gated_residual_adaln", "attention", "attention_mdt_bias", "linear_gelu", "mlp_gelu")
MODES = ("fwd", "fwd+bwd")
EPS = 1e-6

#################################################################################
#                                 Benchmark cases                               #
#################################################################################


@dataclass
class Case:
    """One op at one size: inputs, the public call, the reference, and ideal traffic."""

    op: str
    inputs: dict                                # name -> tensor (float ones get gradients in fwd+bwd)
    call: Callable                              # call(**inputs) -> tensor or tuple, via masked_dit.ops
    reference: Callable                         # same maths, official style
    bytes_fwd: int
    bytes_bwd: int
    backends: tuple                             # ("dispatch", op names) or ("attention", biased)
    shape: dict = field(default_factory=dict)
    flops_fwd: float | None = None              # attention and the MLP GEMMs
    flops_bwd_ratio: float = 2.5                # backward FLOPs / forward (attention 2.5, GEMMs 2)

    def grad_inputs(self) -> list:
        return [t for t in self.inputs.values() if t.is_floating_point()]


def _mask(B, N, K, gen, device):
    """MAE masking: ids_keep [B, K] and ids_restore [B, N] (argsort of the shuffle)."""
    ids_shuffle = torch.rand(B, N, generator=gen).argsort(1)
    return ids_shuffle[:, :K].to(device), ids_shuffle.argsort(1).to(device)


def _varlen(B, N, K, gen, device):
    """Per-sample kept counts spread over [K/2, 3K/2) (clipped to N), positions, cu_seqlens."""
    lengths = torch.randint(K // 2, min(N, K + K // 2) + 1, (B,), generator=gen)
    ids = torch.cat([torch.randperm(N, generator=gen)[:int(n)] for n in lengths])
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return ids.to(device), cu.to(device), int(lengths.sum())


def build_cases(size: str, dtype: torch.dtype, device: torch.device, wanted) -> list[Case]:
    s = SIZES[size]
    B, N, K, D, H, grid = s["B"], s["N"], s["K"], s["D"], s["H"], s["grid"]
    Dh = D // H
    e = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    ids_keep, ids_restore = _mask(B, N, K, gen, device)
    ids_v, cu, T = _varlen(B, N, K, gen, device)
    base = dict(B=B, N=N, K=K, D=D)
    cases = []

    if "gather_tokens" in wanted:
        cases.append(Case(
            "gather_tokens", dict(x=rnd(B, N, D), ids_keep=ids_keep),
            lambda x, ids_keep: ops.gather_tokens(x, ids_keep),
            lambda x, ids_keep: official_gather(x, ids_keep),
            bytes_fwd=2 * B * K * D * e + B * K * 8, bytes_bwd=(B * K + B * N) * D * e + B * K * 8,
            backends=("dispatch", "gather_tokens"), shape=base))

    if "scatter_tokens" in wanted:
        def mae_unshuffle(x_keep, mask_token, ids_restore):
            # MAE decoder: append mask tokens, unshuffle with ids_restore (an int64 B*N*D index)
            tokens = torch.cat([x_keep, mask_token.repeat(x_keep.shape[0], N - x_keep.shape[1], 1)], dim=1)
            return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).repeat(1, 1, tokens.shape[-1]))

        cases.append(Case(
            "scatter_tokens", dict(x_keep=rnd(B, K, D), mask_token=rnd(1, 1, D), ids_keep=ids_keep, ids_restore=ids_restore),
            lambda x_keep, mask_token, ids_keep, ids_restore: ops.scatter_tokens(x_keep, ids_keep, mask_token.view(-1), N),
            lambda x_keep, mask_token, ids_keep, ids_restore: mae_unshuffle(x_keep, mask_token, ids_restore),
            bytes_fwd=(B * K + B * N) * D * e + B * K * 8, bytes_bwd=(B * N + B * K + 1) * D * e + B * K * 8,
            backends=("dispatch", "scatter_tokens"), shape=dict(base, fill="[D]")))

    if "gather_tokens_varlen" in wanted or "scatter_tokens_varlen" in wanted:
        batch = torch.repeat_interleave(torch.arange(B, device=device), (cu[1:] - cu[:-1]).long())

    if "gather_tokens_varlen" in wanted:
        cases.append(Case(
            "gather_tokens_varlen", dict(x=rnd(B, N, D), ids_keep=ids_v, cu_seqlens=cu),
            lambda x, ids_keep, cu_seqlens: ops.gather_tokens_varlen(x, ids_keep, cu_seqlens),
            lambda x, ids_keep, cu_seqlens: x[batch, ids_keep],
            bytes_fwd=2 * T * D * e + T * 8 + (B + 1) * 4, bytes_bwd=(T + B * N) * D * e + T * 8,
            backends=("dispatch", "gather_tokens_varlen"), shape=dict(base, T=T)))

    if "scatter_tokens_varlen" in wanted:
        def scatter_ref(x_keep, mask_token, ids_keep, cu_seqlens):
            out = mask_token.expand(B, N, D).clone()
            out[batch, ids_keep] = x_keep
            return out

        cases.append(Case(
            "scatter_tokens_varlen", dict(x_keep=rnd(T, D), mask_token=rnd(D), ids_keep=ids_v, cu_seqlens=cu),
            lambda x_keep, mask_token, ids_keep, cu_seqlens: ops.scatter_tokens_varlen(x_keep, ids_keep, cu_seqlens, mask_token, N),
            scatter_ref,
            bytes_fwd=(T + B * N) * D * e + T * 8, bytes_bwd=(B * N + T + 1) * D * e + T * 8,
            backends=("dispatch", "scatter_tokens_varlen"), shape=dict(base, T=T, fill="[D]")))

    if "adaln_modulate" in wanted:
        cases.append(Case(
            "adaln_modulate", dict(x=rnd(B, N, D), shift=rnd(B, D), scale=rnd(B, D)),
            lambda x, shift, scale: ops.adaln_modulate(x, shift, scale, EPS),
            lambda x, shift, scale: modulate(F.layer_norm(x, (D,), eps=EPS), shift, scale),
            bytes_fwd=2 * B * N * D * e + 2 * B * D * e, bytes_bwd=3 * B * N * D * e + 3 * B * D * e,
            backends=("dispatch", "adaln_modulate"), shape=dict(B=B, L=N, D=D)))

    if "adaln_modulate_to_bf16" in wanted:  # as the blocks run it under bf16 autocast: fp32 residual in, bf16 h out
        bf16 = torch.bfloat16
        cases.append(Case(
            "adaln_modulate_to_bf16", dict(x=rnd(B, N, D).float(), shift=rnd(B, D), scale=rnd(B, D)),
            lambda x, shift, scale: ops.adaln_modulate(x, shift, scale, EPS, out_dtype=bf16),
            lambda x, shift, scale: modulate(F.layer_norm(x, (D,), eps=EPS), shift, scale).to(bf16),
            bytes_fwd=B * N * D * (4 + 2) + 2 * B * D * e, bytes_bwd=B * N * D * (2 + 4 + 4) + 3 * B * D * e,
            backends=("dispatch", "adaln_modulate"), shape=dict(B=B, L=N, D=D, x="float32", h="bfloat16")))

    if "gated_residual_adaln" in wanted:
        def gated_ref(x, branch, gate, shift, scale):
            r = x + gate.unsqueeze(1) * branch
            return r, modulate(F.layer_norm(r, (D,), eps=EPS), shift, scale)

        cases.append(Case(
            "gated_residual_adaln", dict(x=rnd(B, N, D), branch=rnd(B, N, D), gate=rnd(B, D), shift=rnd(B, D), scale=rnd(B, D)),
            lambda x, branch, gate, shift, scale: ops.gated_residual_adaln(x, branch, gate, shift, scale, EPS),
            gated_ref,
            bytes_fwd=4 * B * N * D * e + 3 * B * D * e, bytes_bwd=6 * B * N * D * e + 6 * B * D * e,
            backends=("dispatch", "gated_residual_adaln"), shape=dict(B=B, L=N, D=D)))

    if "attention" in wanted:
        qkv = dict(q=rnd(B, N, H, Dh), k=rnd(B, N, H, Dh), v=rnd(B, N, H, Dh))
        io = B * N * H * Dh * e
        cases.append(Case(
            "attention", qkv,
            lambda q, k, v: ops.attention(q, k, v),
            lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2),
            bytes_fwd=4 * io, bytes_bwd=8 * io, backends=("attention", False),
            shape=dict(B=B, L=N, H=H, Dh=Dh), flops_fwd=4.0 * B * H * N * N * Dh))

    if "attention_mdt_bias" in wanted:
        index = attention_mod.relative_position_index(grid).to(device)
        table = rnd(attention_mod.relative_position_table_size(grid), H)
        bias_module = RelPosBias(grid, H).to(device, dtype)
        bias_module.relative_position_index = index
        scale = Dh ** -0.5

        def mdt_ref(q, k, v, table, ids_keep):
            # MDT: explicit softmax, bias gathered to [B, H, K, K] at the kept tokens
            bias = torch.func.functional_call(bias_module, {"relative_position_bias_table": table}, (ids_keep,))
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            attn = (q @ k.transpose(-2, -1)) * scale + bias  # MDT scales the [B, H, K, K] scores
            return (attn.softmax(dim=-1) @ v).transpose(1, 2)

        io = B * K * H * Dh * e
        cases.append(Case(
            "attention_mdt_bias", dict(q=rnd(B, K, H, Dh), k=rnd(B, K, H, Dh), v=rnd(B, K, H, Dh), table=table, ids_keep=ids_keep),
            lambda q, k, v, table, ids_keep: ops.attention(q, k, v, rel_pos_bias=(table, index), positions=ids_keep),
            mdt_ref,
            bytes_fwd=4 * io + B * K * 8 + table.numel() * e, bytes_bwd=8 * io + table.numel() * e,
            backends=("attention", True), shape=dict(B=B, L=K, N=N, H=H, Dh=Dh, bias="MDT rel-pos"),
            flops_fwd=4.0 * B * H * K * K * Dh))
    if "linear_gelu" in wanted:  # the MLP's fc1 + GELU over all tokens, no gradient (sampling)
        cases.append(Case(
            "linear_gelu", dict(x=rnd(B, N, D), weight=rnd(4 * D, D) * D ** -0.5, bias=rnd(4 * D)),
            lambda x, weight, bias: ops.linear_gelu(x, weight, bias),
            lambda x, weight, bias: F.gelu(F.linear(x, weight, bias), approximate="tanh"),
            bytes_fwd=(B * N * D + 4 * D * D + 4 * D + 4 * B * N * D) * e, bytes_bwd=0,
            backends=("forward_only", "cuBLASLt GELU epilogue" if device.type == "cuda" else "the reference"),
            shape=dict(B=B, L=N, D=D, hidden=4 * D), flops_fwd=2.0 * B * N * D * 4 * D))
    if "mlp_gelu" in wanted:  # the whole MLP with a derivative (training); its cuda backend is opt-in
        tokens, weights = B * N * D, 2 * 4 * D * D + 5 * D
        cases.append(Case(
            "mlp_gelu", dict(x=rnd(B, N, D), w1=rnd(4 * D, D) * D ** -0.5, b1=rnd(4 * D),
                             w2=rnd(D, 4 * D) * (4 * D) ** -0.5, b2=rnd(D)),
            lambda x, w1, b1, w2, b2: ops.mlp_gelu(x, w1, b1, w2, b2),
            mlp_reference,  # fc1, GELU, fc2 as the official blocks run them
            # forward: x and the weights in, out and the two saved [M, 4D] activations out; backward: dout, x,
            # the weights and the saved activations in, dx and the weight gradients out
            bytes_fwd=(2 * tokens + weights + 8 * tokens) * e, bytes_bwd=(3 * tokens + 2 * weights + 8 * tokens) * e,
            backends=("dispatch", "mlp_gelu"), shape=dict(B=B, L=N, D=D, hidden=4 * D),
            flops_fwd=2 * 2.0 * B * N * D * 4 * D, flops_bwd_ratio=2.0))
    return cases


#################################################################################
#                                  Measuring                                    #
#################################################################################


def copy_bandwidth_gbps(device: torch.device, nbytes: int, iters: int) -> float:
    """GB/s of ``dst.copy_(src)`` on a large buffer (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = common.time_loop(lambda: dst.copy_(src), iters, device, warmup=1)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def implementations(case: Case, device: torch.device, dtype: torch.dtype, mode: str, compile_ref: bool):
    """(impl name, context manager factory or None, skip reason or None, use_reference)."""
    kind, arg = case.backends
    no_bwd = "no derivative: benchmarked forward only" if kind == "forward_only" and mode != "fwd" else None
    out = []
    if kind == "dispatch":
        registered = dispatch._IMPLS.get(arg, {})
        for name in dispatch.BACKENDS:
            if name not in registered:
                out.append((f"backend:{name}", None, f"op {arg!r} has no {name} backend", False))
                continue
            ok, why = dispatch.availability(name, device.type)
            out.append((f"backend:{name}", (lambda n=name: dispatch.use_backend(n)), None if ok else why, False))
    elif kind == "forward_only":  # one implementation (named by arg), no derivative
        out.append((f"op ({arg})", contextlib.nullcontext, no_bwd, False))
    else:
        for name in attention_mod.BACKENDS:
            reason = None
            try:
                with attention_mod.use_attention_backend(name):
                    attention_mod.select_backend(device.type, dtype, case.shape["Dh"], biased=arg,
                                                 requires_grad=mode == "fwd+bwd")
            except (RuntimeError, ValueError) as err:
                reason = str(err)
            out.append((f"backend:{name}", (lambda n=name: attention_mod.use_attention_backend(n)), reason, False))
    out.append(("reference:eager", contextlib.nullcontext, no_bwd, True))
    out.append(("reference:compile", contextlib.nullcontext, no_bwd or (
        None if compile_ref else "torch.compile of the reference is off (default on CPU; --compile on)"), True))
    return out


def make_step(fn: Callable, case: Case, mode: str) -> Callable:
    inputs = dict(case.inputs)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(**inputs)
        return step
    leaves = {k: v.detach().clone().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        outs = fn(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def step():
        for t in leaves.values():
            t.grad = None
        res = fn(**leaves)
        torch.autograd.backward(res if isinstance(res, tuple) else (res,), grads)
    return step


def measure(case: Case, size: str, device: torch.device, dtype: torch.dtype, args, copy_gbps: float) -> list[dict]:
    rows = []
    compiled = {}
    for mode in MODES:
        for impl, ctx, skip, use_ref in implementations(case, device, dtype, mode, args.compile_ref):
            row = dict(op=case.op, size=size, impl=impl, mode=mode, dtype=str(dtype).replace("torch.", ""),
                       shape=case.shape, status="skipped", reason=skip, ms=None, gbps=None, pct_copy_bw=None,
                       tflops=None)
            rows.append(row)
            if skip:
                continue
            fn = case.reference if use_ref else case.call
            if impl == "reference:compile":
                fn = compiled.setdefault("ref", torch.compile(case.reference, backend=args.compile_backend))
            try:
                with ctx():
                    step = make_step(fn, case, mode)
                    ms = common.time_loop(step, args.iters, device, warmup=args.warmup)
            except Exception as err:  # noqa: BLE001  (recorded, the other implementations still run)
                row.update(status="error", reason=common.error_line(err))
                if args.verbose:
                    traceback.print_exc()
                continue
            nbytes = case.bytes_fwd + (case.bytes_bwd if mode == "fwd+bwd" else 0)
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(status="ok", reason=None, ms=ms, gbps=gbps, pct_copy_bw=100.0 * gbps / copy_gbps, bytes=nbytes)
            if case.flops_fwd:
                flops = case.flops_fwd * (1.0 + case.flops_bwd_ratio if mode == "fwd+bwd" else 1.0)
                row["tflops"] = flops / (ms * 1e-3) / 1e12
            print(f"{size:4s} {case.op:22s} {mode:7s} {impl:20s} {ms:9.4f} ms {gbps:9.1f} GB/s "
                  f"({row['pct_copy_bw']:5.1f}% of copy)", flush=True)
    # speedup of each implementation over the eager reference, per mode
    for mode in MODES:
        ref = next((r for r in rows if r["mode"] == mode and r["impl"] == "reference:eager" and r["status"] == "ok"), None)
        for r in rows:
            if r["mode"] == mode and r["status"] == "ok" and ref:
                r["speedup_vs_reference"] = ref["ms"] / r["ms"]
    return rows


#################################################################################
#                                     Main                                      #
#################################################################################


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--size", choices=("full", "toy"), default="full", help="toy: tiny shapes (CPU tests)")
    p.add_argument("--sizes", type=common.csv_choices(("xl2", "s2")), default=["xl2", "s2"], help="shapes of --size full")
    p.add_argument("--ops", type=common.csv_choices(OPS), default=list(OPS))
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 50 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10 GPU, 1 CPU)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the reference (auto: on GPU only)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    common.add_output_args(p, seed=False)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    gpu = device.type == "cuda"
    args.iters = args.iters if args.iters is not None else (50 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    args.compile_ref = args.compile == "on" or (args.compile == "auto" and gpu)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    if gpu:
        torch.cuda.set_device(device)
    env = common.environment(device)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}", flush=True)
    copy_bytes = (1 << 30) if gpu else (16 << 20)
    copy_gbps = copy_bandwidth_gbps(device, copy_bytes, iters=20 if gpu else 2)
    print(f"# copy bandwidth {copy_gbps:.1f} GB/s ({copy_bytes >> 20} MiB buffer)", flush=True)
    sizes = ["toy"] if args.size == "toy" else args.sizes
    rows, path = [], None
    for size in sizes:
        for case in build_cases(size, dtype, device, args.ops):
            rows.extend(measure(case, size, device, dtype, args, copy_gbps))
            common.free_memory(device)
            # Written after every op: a run stopped by a time limit (gpu_session.sh) keeps what it measured.
            payload = {"kind": "ops", **env,
                       "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "tag")},
                       "copy_bandwidth_gbps": copy_gbps, "copy_buffer_bytes": copy_bytes,
                       "sizes": {s: SIZES[s] for s in sizes},
                       "bytes": "ideal kernel traffic: inputs read once, outputs written once (index tensors included)",
                       "results": rows}
            path = common.write_results(payload, args.out_dir, "ops", key_fields=("op", "size", "impl", "mode", "dtype"),
                                        tag=args.tag)
    print(f"# wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
