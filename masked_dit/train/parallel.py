"""Everything that makes a model parallel and fast, applied in one place (torchtitan style).

``parallelize(model, cfg, world)`` applies, in order:
  1. activation checkpointing of each transformer block (recompute in backward),
  2. ``torch.compile`` of each block (in place: parameter names do not change),
  3. data parallelism: FSDP2 ``fully_shard`` per block then the root (bf16 parameters and fp32
     gradient reduction with ``--parallel.precision=bf16``), or DDP.
It returns the module to call in the training loop; ``unwrap`` gets the user module back.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from masked_dit.nn.block import FusedDiTBlock


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every adaLN transformer block (DiT blocks, MDT encoder/decoder/side blocks, MaskDiT decoder)."""
    return [m for m in model.modules() if isinstance(m, FusedDiTBlock)]


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def apply_activation_checkpointing(model: nn.Module) -> None:
    # Wraps the bound forward instead of the module, so state_dict keys stay official.
    for block in transformer_blocks(model):
        block.forward = _checkpointed(block.forward)
        block.activation_checkpointed = True  # run_blocks: no residual left pending across it


RECOMPILE_LIMIT = 64


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def apply_compile(model: nn.Module, backend: str = "inductor", mode: str = "default") -> None:
    # Every block shares one forward code object. MDT's variants (with/without skip_linear, kept vs
    # all tokens, side block, train/eval) each need their own graph: more than dynamo's default
    # limit of 8, past which blocks would silently run uncompiled.
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(cfg, limit, max(getattr(cfg, limit), RECOMPILE_LIMIT))
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not valid; choose one of: {', '.join(COMPILE_MODES)}")
    # Inductor's modes only: another backend (aot_eager in tests) takes none
    kwargs = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    for block in transformer_blocks(model):
        block.compile(backend=backend, **kwargs)


def fsdp_supported(device_type: str) -> tuple[bool, str]:
    """Whether this torch's FSDP2 runs on ``device_type``, and why not: it orders its collectives with
    stream events, which the CPU stream of torch 2.6 does not have (later versions do)."""
    if device_type == "cpu" and not hasattr(torch.cpu.Stream, "record_event"):
        return False, f"FSDP2 of torch {torch.__version__} cannot run on CPU (its CPU stream has no record_event)"
    return True, ""


def apply_fsdp(model: nn.Module, world, precision: str) -> nn.Module:
    ok, why = fsdp_supported(world.device.type)
    if not ok:
        raise ValueError(f"--parallel.mode=fsdp: {why}; use --parallel.mode=ddp, a GPU or a newer torch")
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once in backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    root_mp = mp
    network = getattr(model, "preconditioned_network", None)
    if network is not None and precision == "bf16":
        # A preconditioning wrapper (MaskDiT's EDM D = c_skip x + c_out F) does its arithmetic in fp32,
        # as the official fp16 AMP does: cast at the network's input, not the wrapper's. A bf16 x and D
        # erase c_out F at small sigma (D identical with F = 0 in 71% of entries at sigma 0.002).
        fully_shard(getattr(model, network), mesh=mesh, mp_policy=mp)
        root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    return model


def apply_ddp(model: nn.Module, world) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # No buffer broadcast: every buffer here is a constant (positions, relative-position index) built
    # identically on each rank, and the broadcast's in-place copy at each forward bumped the version of
    # a buffer the previous forward had saved for backward (MDT's two passes: an autograd error on torch 2.11).
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)


def parallelize(model: nn.Module, cfg, world) -> nn.Module:
    """AC, per-block compile and FSDP2/DDP, as ``cfg.parallel`` asks. ``model`` is on its device."""
    pc = cfg.parallel
    if pc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if pc.compile:
        apply_compile(model, mode=pc.compile_mode)
    if pc.mode == "fsdp" and world.distributed:
        return apply_fsdp(model, world, pc.precision)
    if pc.mode == "fsdp" and pc.precision == "bf16":
        # One process: no sharding; bf16 compute through autocast (FSDP2 bf16 numerics, up to rounding).
        return model
    if world.distributed:
        return apply_ddp(model, world)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool):
    """Context for gradient accumulation: no all-reduce / reduce-scatter until the last micro-step."""
    import contextlib

    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()
