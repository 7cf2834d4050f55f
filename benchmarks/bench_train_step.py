"""Training-step throughput of every family, ours against the official repos' way of running it.

    python benchmarks/bench_train_step.py                                   # all families, S..XL, GPU
    python benchmarks/bench_train_step.py --families dit --sizes XL --batch 256
    python benchmarks/bench_train_step.py --size toy --device cpu --out-dir /tmp/r   # seconds, for tests

One step = objective (forward + loss; MDTv2 runs its two passes: ours backpropagate the full pass before
the masked one runs, as the trainer, the reference variants sum them into one backward, as MDT's
train_util) + backward + grad clip (if the
recipe clips) + optimizer step + EMA update, on random 32x32x4 latents. REPA: ours train on precomputed
features (random, DINOv2-B-shaped [B, 256, 768]), the official step runs its frozen DINOv2-B/14 on the raw
images every step, so the reference variants do too (random uint8 images [B, 3, 256, 256]; off with
--ref-no-encoder; each REPA row's ``encoder_forward`` says which). The VAE runs in no variant. The
reference variants also read back to the host what the official loop reads every step (``loss.item()``;
MDT: 18 loss reads and every parameter's and gradient's norm; reference_style.OfficialHostReads; off with
--ref-no-host-reads; row field ``host_reads_per_step``); ours read once per step, as our trainer does (the
loss terms and the gradient norm, for its non-finite skip).
Variants (all measured in the same run, same weights):

    reference            benchmarks/reference_style.py with the repo's precision/optimizer (RECIPES), eager
                         (official MaskDiT also wraps its model in torch.compile: its ratio is vs eager)
    reference_bf16       the same reference code at our precision (bf16 autocast, TF32): separates
                         what precision buys from what the implementation buys
    eager                our modules, bf16 autocast, ops on the torch backend (unfused; attention
                         stays on its fastest kernel, not the torch switch's chunked math path)
    eager_fused          ... ops on the 'auto' backend (fused kernels where the device has them)
    compiled             torch.compile (per block, or whole with --compile whole), torch backend
    compiled_fused       ... auto backend
    compiled_fused_mlp   ... + the MLP as one op with its GELU in cuBLASLt epilogues (ops.mlp_gelu, opt-in;
                         where the extension cannot run it, the same as compiled_fused)
    compiled_fused_fsdp  ... + FSDP2 fully_shard per block on a 1-rank process group (bf16 params)

Batch: ``--batch N``, else (GPU) a search doubling from ``--batch-start`` until out of memory or
``--batch-cap``; the reference variants are searched each, ours once (the first of ours that runs,
normally eager; a compiled variant searches with its eager twin, not compiling per probed batch) and
reused by the others (halved while it does not fit; MDTv2 probes at its lowest mask ratio, the most
kept tokens). Timing: ``--warmup`` steps (compiled: more until two steps compile nothing), then the
median of three windows of ``--steps`` in all (``step_ms_windows``). MFU from the analytic FLOPs of
:mod:`masked_dit.models.flops` (training = 3 x forward) against the datasheet peak and the measured
GEMM ceiling. Results: ``<out-dir>/train_step-<device>-<date>[-<tag>].json``, rewritten after every variant (a run
cut off by a deadline keeps what it measured); rows of earlier runs of the day
(other families, sizes) are kept, the same (model, variant) measured again replaces its row.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `masked_dit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn as nn

from benchmarks import common, profiling
from benchmarks.reference_style import (RECIPES, OfficialHostReads, dinov2_for_repa, reference_like,
                                        repa_features)
from masked_dit.train.optim import use_fused
from masked_dit.train.parallel import COMPILE_MODES, fsdp_supported

FAMILIES = ("dit", "sit", "mdtv2", "maskdit", "repa_sit")
PREFIX = {"dit": "DiT", "sit": "SiT", "mdtv2": "MDTv2", "maskdit": "MaskDiT", "repa_sit": "REPA-SiT"}
SIZES = ("S", "B", "L", "XL")
VARIANTS = ("reference", "reference_bf16", "eager", "eager_fused", "compiled", "compiled_fused", "compiled_fused_mlp",
            "compiled_fused_fsdp")
# Mask ratio the FLOPs are counted at: MDTv2 draws 0.3 + 0.2 U(0, 1) per step (mean 0.4), MaskDiT 0.5.
FLOPS_MASK_RATIO = {"mdtv2": 0.4, "maskdit": 0.5}


class VariantSkipped(Exception):
    """This torch or device cannot run the variant (recorded as status "skipped" with the reason)."""


DINOV2_B = (256, 768)  # REPA's encoder features per image: 256 patch tokens of width 768

# Toy models: hidden 64, depth 2 (MDTv2: 4 with 2 decoder blocks) on 8x8x4 latents, 10 classes.
_TOY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)
TOY_KWARGS = {
    "dit": _TOY, "sit": _TOY,
    "mdtv2": dict(_TOY, depth=4, decode_layer=2, mask_ratio=0.3),
    "maskdit": dict(_TOY, decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2),
    "repa_sit": dict(_TOY, encoder_depth=1, z_dims=[32], projector_dim=64),
}


#################################################################################
#                               Models and steps                                #
#################################################################################

def model_kwargs(family: str, size: str) -> tuple[str, dict]:
    """(display name, constructor kwargs) of a family at a size ('toy' or S/B/L/XL at patch 2)."""
    if size == "toy":
        return f"{PREFIX[family]}-toy", dict(TOY_KWARGS[family])
    from masked_dit.models import MODEL_CONFIGS

    name = f"{PREFIX[family]}-{size}/2"
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model {name} is not registered")
    kwargs = dict(MODEL_CONFIGS[name][1])
    if family == "mdtv2":
        kwargs["mask_ratio"] = 0.3  # trains with masks (the mask token is a parameter)
    return name, kwargs


def make_objective(family: str):
    from masked_dit.diffusion import objectives as obj

    return {"dit": obj.ADMObjective, "sit": obj.TransportObjective, "mdtv2": obj.MDTv2Objective,
            "maskdit": obj.EDMMaskDiTObjective, "repa_sit": obj.REPAObjective}[family]()


def make_batch(family: str, kwargs: dict, batch: int, device: torch.device, raw_images: bool = False) -> dict:
    """Random latents [B, C, H, W] and labels (REPA: random encoder features, or with ``raw_images`` the
    uint8 images [B, 3, 8H, 8W] the reference step's online encoder reads, as REPA's loader gives them)."""
    size, channels = kwargs.get("input_size", 32), kwargs.get("in_channels", 4)
    out = {"x": torch.randn(batch, channels, size, size, device=device),
           "y": torch.randint(0, kwargs.get("num_classes", 1000), (batch,), device=device)}
    if family == "repa_sit" and raw_images:
        out["raw_image"] = torch.randint(0, 256, (batch, 3, 8 * size, 8 * size), dtype=torch.uint8, device=device)
    elif family == "repa_sit":
        tokens = (size // kwargs.get("patch_size", 2)) ** 2
        out["zs"] = [torch.randn(batch, tokens, z, device=device) for z in kwargs.get("z_dims", [DINOV2_B[1]])]
    return out


def make_optimizer(name: str, params, fused: bool):
    params = [p for p in params if p.requires_grad]
    if name == "adan":
        from masked_dit.train.optim import Adan

        return Adan(params, lr=1e-4, fused=None if fused else False)  # fused: the Triton step where it runs
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused or None)


class ReferenceEMA:
    """The official ``update_ema``: a Python loop of ``mul_`` + ``add_`` over named parameters."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay, self.model = decay, model
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self):
        for name, p in self.model.named_parameters():
            self.shadow[name].mul_(self.decay).add_(p.data, alpha=1 - self.decay)


class TrainerHostReads:
    """Our trainer's one host read per step (``Trainer.train_step``): the loss terms and the total gradient
    norm (computed even without clipping), stacked and read with ``.tolist()`` before the optimizer step,
    for the non-finite skip. The same interface as ``reference_style.OfficialHostReads``."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]

    def per_step(self) -> int:
        return 1

    def after_loss(self, out: dict) -> None:
        pass

    def before_step(self, out: dict, grad_norm) -> None:
        from masked_dit.train.trainer import grad_norm_and_clip

        norm = grad_norm_and_clip(self.params, 0.0) if grad_norm is None else grad_norm
        values = [torch.as_tensor(v).detach().float().reshape(()).to(norm.device) for v in out.values()]
        torch.stack([*values, norm.reshape(())]).tolist()

    def after_step(self, out: dict, grad_norm) -> None:
        pass


class StepRunner:
    """One training step of a (possibly wrapped) model: objective, backward, clip, optimizer, EMA."""

    def __init__(self, model, objective, optimizer, ema, *, autocast_dtype=None, scaler=None, grad_clip=0.0,
                 backend: str = "auto", opt_in: tuple = (), device: torch.device):
        self.model, self.objective, self.optimizer, self.ema = model, objective, optimizer, ema
        self.autocast_dtype, self.scaler, self.grad_clip = autocast_dtype, scaler, grad_clip
        self.backend, self.opt_in, self.device = backend, opt_in, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.raw_images = False  # True: the objective encodes batch['raw_image'] online (REPA's reference)
        self.pass_by_pass = False  # True: each objective pass backpropagated before the next runs (our trainer)
        self.host_reads = None   # reference_style.OfficialHostReads: the official loop's per-step syncs

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, batch: dict) -> None:
        with ops_backend(self.backend, self.opt_in):
            reads = self.host_reads
            if self.pass_by_pass and self.scaler is None:  # as Trainer.train_step: one pass's graph at a time
                from masked_dit.diffusion.objectives import backward_by_pass

                out, loss = backward_by_pass(self.objective, self.model, batch, lambda _: self._autocast()), None
            else:
                with self._autocast():
                    out = self.objective(self.model, batch)
                loss = out["loss"]
            if reads is not None:
                reads.after_loss(out)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            elif loss is not None:  # (backward_by_pass has backpropagated)
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0 else None
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, which .tolist() refuses
                grad_norm = grad_norm.full_tensor()
            if reads is not None:
                reads.before_step(out, grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update()
            if reads is not None:
                reads.after_step(out, grad_norm)


@contextlib.contextmanager
def ops_backend(backend: str, opt_in: tuple = ()):
    """Fused-op backend for a step. 'torch' unfuses the elementwise ops and gathers but keeps
    attention on its automatic choice (flash/SDPA): the torch switch alone would select the chunked
    math attention, and the variants compare fusion, not attention kernels. ``opt_in``: ops whose
    opt-in backends auto may pick (``mlp_gelu``)."""
    from masked_dit.ops import opt_in as ops_opt_in, use_backend
    from masked_dit.ops.attention import use_attention_backend

    with use_backend(backend), ops_opt_in(*opt_in), use_attention_backend("auto"):
        yield


def attention_choice(device: torch.device, kwargs: dict, backend: str, dtype=torch.bfloat16) -> str:
    """Which attention kernel our model gets (dense tokens; MDT: with the relative-position bias)."""
    from masked_dit.ops.attention import select_backend

    head_dim = kwargs.get("hidden_size", 1152) // kwargs.get("num_heads", 16)
    with ops_backend(backend):
        try:
            dense = select_backend(device.type, dtype, head_dim)[0]
            biased = select_backend(device.type, dtype, head_dim, biased=True)[0]
        except RuntimeError as err:
            return f"unusable: {err}"
    return f"{dense} (MDT bias: {biased})"


def init_single_rank_group(device: torch.device) -> None:
    """A 1-rank process group (NCCL on GPU, gloo on CPU) so FSDP2 runs in one process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def add_online_encoder(objective, family: str, kwargs: dict, device: torch.device, args) -> dict:
    """The reference step's REPA objective gets the official per-step DINOv2 forward (unless
    ``--ref-no-encoder``), built on ``device`` for the latents' images (8x the latent side); returns the
    row's info. z_dims 768 (every registered REPA-SiT): DINOv2-B/14; another width (the toy's 32): a
    one-block encoder that wide, whose 14 px patches give the toy model's token grid."""
    if family != "repa_sit":
        return {}
    if args.ref_no_encoder:
        return {"encoder_forward": "precomputed (--ref-no-encoder)"}
    (z_dim,) = kwargs.get("z_dims", [DINOV2_B[1]])
    toy = z_dim != DINOV2_B[1]
    attention = args.ref_attention or "sdpa"
    resolution = 8 * kwargs.get("input_size", 32)
    with torch.device(device):
        encoder = dinov2_for_repa(resolution, attention, **(dict(embed_dim=z_dim, depth=1, num_heads=2) if toy else {}))
    objective.encoder = repa_features(encoder)
    image_side = 224 * resolution // 256
    return {"encoder_forward": f"online dinov2-{'toy' if toy else 'b/14'} ({attention}, {image_side} px)",
            "encoder_flops_per_image": encoder.forward_flops(image_side)}


def build_runner(variant: str, family: str, kwargs: dict, base_state: dict, device: torch.device, args):
    """(runner, info) for one variant; every variant starts from the same weights ``base_state`` (None: a
    fresh init, for counting that needs shapes, not weights: roofline_step.py at XL on a small machine)."""
    from masked_dit.diffusion.objectives import unwrap
    from masked_dit.models import build
    from masked_dit.train.ema import EMA
    from masked_dit.train.parallel import apply_compile, apply_fsdp

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    RECOMPILE_LIMIT_HITS.count = 0
    with torch.device(device):  # initialised where it runs: a CPU init of XL costs seconds per variant
        model = build(family, **kwargs)
    if base_state is not None:
        model.load_state_dict(base_state)
    model.to(device).train()
    objective = make_objective(family)
    recipe = RECIPES[family]
    info = {"encoder_forward": "precomputed"} if family == "repa_sit" else {}
    if variant.startswith("reference"):
        ref = reference_like(model, kwargs, attention=args.ref_attention).train()
        del model
        info.update(add_online_encoder(objective, family, kwargs, device, args))
        raw_images = getattr(objective, "encoder", None) is not None  # the batch carries images, not features
        host_reads = None if getattr(args, "ref_no_host_reads", False) else OfficialHostReads(family, ref.parameters())
        info["host_reads_per_step"] = host_reads.per_step() if host_reads else "0 (--ref-no-host-reads)"
        fused_optimizer = recipe["fused_optimizer"] and device.type == "cuda"  # the recipe's, in both rows
        if variant == "reference_bf16":  # the same code as `reference`, only the precision differs
            optimizer = make_optimizer(recipe["optimizer"], ref.parameters(), fused=fused_optimizer)
            info.update(precision="bf16 autocast (TF32 matmuls)", attention=args.ref_attention or recipe["attention"],
                        optimizer=recipe["optimizer"], fused_optimizer=fused_optimizer,
                        cudnn_benchmark=recipe["cudnn_benchmark"], ops_backend="reference modules")
            runner = StepRunner(ref, objective, optimizer, ReferenceEMA(ref), autocast_dtype=torch.bfloat16,
                                grad_clip=recipe["grad_clip"], backend="torch", device=device)
            runner.tf32, runner.raw_images, runner.host_reads = True, raw_images, host_reads
            runner.cudnn_benchmark = recipe["cudnn_benchmark"]
            return runner, info
        fp16 = recipe["precision"] == "fp16"
        scaler = torch.amp.GradScaler(device.type) if fp16 and device.type == "cuda" else None
        optimizer = make_optimizer(recipe["optimizer"], ref.parameters(), fused=fused_optimizer)
        info.update(precision=("fp16 autocast + GradScaler" if fp16 else "fp32") +
                    (" (TF32 matmuls)" if recipe["tf32"] else ""), cudnn_benchmark=recipe["cudnn_benchmark"],
                    attention=args.ref_attention or recipe["attention"], optimizer=recipe["optimizer"],
                    fused_optimizer=fused_optimizer,
                    ops_backend="reference modules", recipe=recipe["source"])
        # On CPU fp16 autocast is emulated and slow: the toy run uses fp32 there (recorded).
        dtype = torch.float16 if fp16 and device.type == "cuda" else None
        if fp16 and device.type != "cuda":
            info["precision"] = "fp32 (fp16 AMP needs CUDA; toy CPU run)"
        runner = StepRunner(ref, objective, optimizer, ReferenceEMA(ref), autocast_dtype=dtype, scaler=scaler,
                            grad_clip=recipe["grad_clip"], backend="torch", device=device)
        runner.tf32, runner.cudnn_benchmark = recipe["tf32"], recipe["cudnn_benchmark"]
        runner.raw_images, runner.host_reads = raw_images, host_reads
        return runner, info

    compiled = variant.startswith("compiled")
    fused = "fused" in variant
    fsdp = variant.endswith("fsdp")
    opt_in = ("mlp_gelu",) if variant.endswith("_mlp") else ()
    if opt_in:  # the row says what ran: on a GPU without the extension it would be compiled_fused's step
        from masked_dit.ops import dispatch

        with ops_backend("auto", opt_in):
            backend, why = dispatch.select("mlp_gelu", device.type)
        if device.type == "cuda" and backend != "cuda":
            raise VariantSkipped(f"the cuBLASLt MLP cannot run here: {why}")
        info["mlp_gelu_backend"] = f"{backend} ({why})"
    info.update(ops_backend=("auto" if fused else "torch") + "".join(f" + {op} (opt-in)" for op in opt_in),
                optimizer=recipe["optimizer"],
                attention=attention_choice(device, kwargs, "auto" if fused else "torch"))
    if compiled:
        info["compile"] = f"{args.compile} ({args.compile_backend}" + \
            (f", {args.compile_mode})" if args.compile_mode != "default" and args.compile_backend == "inductor" else ")")
        if args.compile == "block":
            apply_compile(model, args.compile_backend, args.compile_mode)  # the trainer's per-block compile
        else:
            model = torch.compile(model, backend=args.compile_backend,
                                  **({"mode": args.compile_mode} if args.compile_backend == "inductor" else {}))
    if fsdp:
        init_single_rank_group(device)
        apply_fsdp(unwrap(model), SimpleNamespace(device=device, size=1), "bf16")
        info["precision"] = "FSDP2 bf16 params, fp32 grad reduction (no autocast)"
        autocast_dtype = None
    else:
        info["precision"] = "bf16 autocast"
        autocast_dtype = torch.bfloat16
    module = unwrap(model)
    optimizer = make_optimizer(recipe["optimizer"], module.parameters(),  # as the trainer
                               fused=use_fused(recipe["optimizer"], device.type, fsdp))
    runner = StepRunner(model, objective, optimizer, EMA(module), autocast_dtype=autocast_dtype,
                        grad_clip=recipe["grad_clip"], backend="auto" if fused else "torch", opt_in=opt_in,
                        device=device)
    runner.host_reads = TrainerHostReads(module.parameters())
    runner.pass_by_pass = True
    info["host_reads_per_step"] = runner.host_reads.per_step()
    runner.tf32 = True  # as our trainer (--parallel.tf32): only fp32 matmuls outside autocast see it
    return runner, info


@contextlib.contextmanager
def tf32(enabled: bool, cudnn_benchmark: bool = False):
    """TF32 matmuls on or off; cuDNN convolutions keep TF32 (torch's default, which no official repo turns
    off: MDT and MaskDiT leave it, DiT/SiT/REPA set it), and cuDNN autotuning where the recipe sets it."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = old


def runner_flags(runner):
    """The backend flags a runner's steps run under (its ``tf32``; the reference's cudnn.benchmark)."""
    return tf32(runner.tf32, getattr(runner, "cudnn_benchmark", False))


#################################################################################
#                                  Measuring                                    #
#################################################################################

class _RecompileLimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: past the limit a function runs eager
    (silently slower), e.g. per-block compile of MDTv2, whose blocks differ in skip/bias/token count."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if "hit config." in record.getMessage():
            self.count += 1


RECOMPILE_LIMIT_HITS = _RecompileLimitHits()
logging.getLogger("torch._dynamo.convert_frame").addHandler(RECOMPILE_LIMIT_HITS)


def dynamo_stats() -> dict:
    """Graphs compiled, graph breaks and recompile-limit hits so far (silent eager fallbacks show here)."""
    counters = torch._dynamo.utils.counters
    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompile_limit_hits": RECOMPILE_LIMIT_HITS.count}


def measure(runner: StepRunner, family: str, kwargs: dict, batch: int, device: torch.device, args) -> dict:
    data = make_batch(family, kwargs, batch, device, runner.raw_images)
    with runner_flags(runner):
        warmup = 0
        for _ in range(args.warmup):
            runner.step(data)
            warmup += 1
        # Compiled variants: go on while graphs are still being compiled (MDTv2's kept-token counts
        # recompile), until two steps in a row compile nothing, at most WARMUP_EXTRA more steps.
        quiet, graphs = 0, dynamo_stats()["unique_graphs"]
        while graphs and quiet < 2 and warmup < args.warmup + WARMUP_EXTRA:
            runner.step(data)
            warmup += 1
            now = dynamo_stats()["unique_graphs"]
            quiet, graphs = (quiet + 1, now) if now == graphs else (0, now)
        common.synchronize(device)
        common.reset_peak_memory(device)
        before = dynamo_stats()
        windows = [common.time_loop(lambda: runner.step(data), n, device) for n in _windows(args.steps)]
    after = dynamo_stats()
    ms = sorted(windows)[len(windows) // 2]
    out = {"batch": batch, "step_ms": ms, "img_per_s": batch * 1e3 / ms, "step_ms_windows": windows,
           "warmup_steps": warmup, "peak_mem_gib": common.peak_memory_gib(device)}
    if after["unique_graphs"]:
        # Graphs compiled inside the timed loop mean the warmup was too short (e.g. MDTv2's kept-token count).
        out["dynamo"] = dict(after, compiled_while_timing=after["unique_graphs"] - before["unique_graphs"])
    return out


WARMUP_EXTRA = 20


def _windows(steps: int) -> list[int]:
    """Three back-to-back timing windows of ``steps`` in all (one when fewer than 3): the median is the
    result and the three show the spread."""
    if steps < 3:
        return [steps]
    return [steps // 3 + (1 if i < steps % 3 else 0) for i in range(3)]


def probe(runner: StepRunner, family: str, kwargs: dict, device: torch.device):
    """try_batch(b): two steps at batch b (the second allocates the optimizer state's steady footprint).
    MDTv2 draws its mask ratio per step: the probe runs at the lowest ratio (most kept tokens, most
    memory), so a timed step cannot keep more tokens than the probe did and run out of memory."""
    def try_batch(b):
        data = make_batch(family, kwargs, b, device, runner.raw_images)
        objective = runner.objective
        jitter = getattr(objective, "mask_ratio_jitter", None)
        try:
            if jitter is not None:
                objective.mask_ratio_jitter = 0.0
            with runner_flags(runner):
                for _ in range(2):
                    runner.step(data)
            common.synchronize(device)
        finally:
            if jitter is not None:
                objective.mask_ratio_jitter = jitter
    return try_batch


def run_family(family: str, size: str, device: torch.device, args, peaks: dict, on_row=None) -> list[dict]:
    """Every variant of one model; ``on_row(rows)`` after each (the caller writes the JSON as it goes)."""
    from masked_dit.models import build
    from masked_dit.models.flops import flops_per_image

    name, kwargs = model_kwargs(family, size)
    torch.manual_seed(args.seed)
    with torch.device(device):
        base = build(family, **kwargs)
    flops = float(flops_per_image(base, mask_ratio=FLOPS_MASK_RATIO.get(family, 0.0), training=True))
    base_state = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()}  # off the GPU's memory
    del base
    common.free_memory(device)
    rows, batches = [], {}
    for variant in args.variants:
        row = {"model": name, "family": family, "size": size, "variant": variant, "flops_per_image": flops,
               "flops_mask_ratio": FLOPS_MASK_RATIO.get(family, 0.0)}
        runner = None
        try:
            if variant.endswith("fsdp") and device.type == "cuda" and not torch.distributed.is_available():
                raise RuntimeError("torch.distributed is not available")
            fsdp_ok, why = fsdp_supported(device.type)
            if variant.endswith("fsdp") and not fsdp_ok:
                raise VariantSkipped(why)
            group = variant if variant.startswith("reference") else "ours"
            if args.batch:
                batch = args.batch
            elif not args.search_batch:
                batch = args.batch_start
            elif group in batches:
                batch = batches[group]
            else:
                # A compiled variant would compile (or recompile) at every probed batch: minutes at XL.
                # Its eager twin searches instead (compiled steps need no more memory than eager ones).
                searcher_variant = ("eager_fused" if "fused" in variant else "eager") \
                    if variant.startswith("compiled") else variant
                searcher, _ = build_runner(searcher_variant, family, kwargs, base_state, device, args)
                try:
                    batch, log = common.largest_fitting_batch(probe(searcher, family, kwargs, device),
                                                              args.batch_start, args.batch_cap, device)
                finally:
                    searcher = None
                    common.free_memory(device)
                row["batch_search"] = log
                if searcher_variant != variant:
                    row["batch_search_variant"] = searcher_variant
                batches[group] = batch
            runner, info = build_runner(variant, family, kwargs, base_state, device, args)
            row.update(info)
            result = {}
            while not common.run_or_oom(lambda: result.update(measure(runner, family, kwargs, batch, device, args))):
                common.free_memory(device)
                if batch == 1:
                    raise RuntimeError("out of memory at batch 1")
                batch //= 2  # back off
                row["backed_off"] = True
                if group in batches:
                    batches[group] = batch  # the next variants start where this one fits
            row.update(result)
            row.update(common.mfu_fields(row["img_per_s"], flops, peaks))
            row["status"] = "ok"
            _print_row(row)
            if args.profile:  # N more steps by kernel category (profiling.py)
                data = make_batch(family, kwargs, row["batch"], device, runner.raw_images)
                with runner_flags(runner):
                    profiling.profile_into(row, f"{name}-{variant}-b{row['batch']}", lambda: runner.step(data),
                                           args.profile, device, args.out_dir, args.trace)
        except VariantSkipped as why:  # this torch / device cannot run it: not an error of ours
            row.update(status="skipped", reason=str(why))
        except Exception as err:  # noqa: BLE001  (one failing variant must not lose the others)
            row.update(status="error", reason=common.error_line(err))
            if args.verbose:
                traceback.print_exc()
        finally:
            runner = None  # drop the model, optimizer and compiled graphs before the next variant
            common.free_memory(device)
        rows.append(row)
        if row["status"] != "ok":
            _print_row(row)
        if on_row is not None:
            on_row(rows)
    ref = next((r for r in rows if r["variant"] == "reference" and r["status"] == "ok"), None)
    ref16 = next((r for r in rows if r["variant"] == "reference_bf16" and r["status"] == "ok"), None)
    for r in rows:
        if ref and r["status"] == "ok":
            r["speedup_vs_reference"] = r["img_per_s"] / ref["img_per_s"]
        if ref16 and r["status"] == "ok":
            r["speedup_vs_reference_bf16"] = r["img_per_s"] / ref16["img_per_s"]
    return rows


def _print_row(r: dict) -> None:
    if r["status"] != "ok":
        print(f"{r['model']:>16} {r['variant']:>20}  {r['status']}: {r.get('reason', '')}", flush=True)
        return
    mfu = f"{100 * r['mfu_datasheet']:5.1f}%" if r.get("mfu_datasheet") is not None else "   n/a"
    mem = f"{r['peak_mem_gib']:6.1f} GiB" if r.get("peak_mem_gib") is not None else "      n/a"
    tfl = f"{r['tflops']:7.1f}" if r.get("tflops") is not None else "    n/a"
    print(f"{r['model']:>16} {r['variant']:>20}  batch {r['batch']:4d}  {r['img_per_s']:9.1f} img/s  "
          f"{tfl} TFLOP/s  MFU {mfu}  {mem}", flush=True)


#################################################################################
#                                     CLI                                       #
#################################################################################

def add_reference_args(p: argparse.ArgumentParser) -> None:
    """How the reference step is built (build_runner reads these); roofline_step takes them too."""
    p.add_argument("--ref-attention", choices=("softmax", "sdpa"), default=None,
                   help="force the reference attention (default: each repo's own, see reference_style.RECIPES; "
                        "also REPA's DINOv2: sdpa as dinov2 main, softmax as its 2024 code)")
    p.add_argument("--ref-no-encoder", action="store_true",
                   help="REPA's reference step without its per-step DINOv2 forward (precomputed features, as "
                        "the baseline ran before it had the encoder: compares with old results; its FLOPs are "
                        "otherwise on top of the analytic model count)")
    p.add_argument("--ref-no-host-reads", action="store_true",
                   help="the reference steps without the official loops' per-step host reads (loss.item(), MDT's "
                        "per-parameter norms, which read every parameter and gradient once more; row field "
                        "host_reads_per_step): compares with older results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--size", choices=("full", "toy"), default="full", help="toy: tiny models on 8x8 latents")
    p.add_argument("--sizes", type=common.csv_choices(SIZES), default=list(SIZES), help="model sizes at patch 2 (full)")
    p.add_argument("--families", type=common.csv_choices(FAMILIES), default=list(FAMILIES))
    p.add_argument("--variants", type=common.csv_choices(VARIANTS), default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=0, help="fixed per-GPU batch (0: search on GPU)")
    p.add_argument("--batch-start", type=int, default=None, help="first batch of the search (default 8 GPU, 2 CPU)")
    p.add_argument("--batch-cap", type=int, default=1024)
    p.add_argument("--search-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="search the largest batch (default: on GPU yes, on CPU no: --batch-start is used)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 1 CPU)")
    p.add_argument("--compile", choices=("block", "whole"), default="block")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="Inductor mode of the compiled variants (the trainer's --parallel.compile_mode)")
    p.add_argument("--recompile-limit", type=int, default=0,
                   help="dynamo's per-function recompile limit (0: the trainer's, parallel.RECOMPILE_LIMIT)")
    add_reference_args(p)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps per variant: time by kernel category (row 'profile')")
    p.add_argument("--trace", action="store_true", help="with --profile: also write a gzipped Chrome trace per variant")
    common.add_output_args(p)
    args = p.parse_args(argv)
    if args.trace and not args.profile:
        p.error("--trace needs --profile N (N > 0)")
    for name in ("batch", "batch_cap", "profile"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    gpu = device.type == "cuda"
    args.batch_start = args.batch_start or (8 if gpu else 2)
    args.search_batch = gpu if args.search_batch is None else args.search_batch
    args.steps = args.steps if args.steps is not None else (20 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if gpu:
        torch.cuda.set_device(device)
    if args.recompile_limit:
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, args.recompile_limit)
    env = common.environment(device)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}", flush=True)
    sizes = ["toy"] if args.size == "toy" else args.sizes
    rows = []

    def write(current=()) -> Path:
        """The JSON after every variant: a run cut off by a deadline keeps the rows it measured."""
        payload = {"kind": "train_step", **env,
                   "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "tag")},
                   "latent": "random 4 x 32 x 32 (toy: 4 x 8 x 8); REPA features random [B, 256, 768] (toy [B, 16, 32]); "
                             "REPA reference rows: random uint8 images [B, 3, 256, 256] (toy 64) through DINOv2 "
                             "(row field encoder_forward)",
                   "flops": "analytic (masked_dit.models.flops), training = 3 x forward, MDTv2 both passes at mask 0.4; "
                            "the model's only (REPA's encoder forward: encoder_flops_per_image, not in tflops/MFU)",
                   "results": rows + list(current)}
        return common.write_results(payload, args.out_dir, "train_step", key_fields=("model", "variant"), tag=args.tag)

    for size in sizes:
        for family in args.families:
            rows.extend(run_family(family, size, device, args, env["peaks"], on_row=write))
    path = write()
    print(f"# wrote {path}", flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return path


if __name__ == "__main__":
    main()
