"""Triton kernel for the Adan step (masked_dit.train.optim.Adan): every parameter in one launch.

Per element: read p, g, pre_grad, exp_avg, exp_avg_diff, exp_avg_sq; write p, the three moments
and pre_grad (= g): 11 fp32 accesses, no temporaries. The foreach path makes ~39 passes and holds
five full-size fp32 temporaries (diff, corrected, denom, update, v / bc2).

Multi-tensor: a table of the tensors' addresses and a table of BLOCK-element chunks (tensor, start)
let one launch update a whole parameter group (MDTv2-XL/2: 365 tensors; one launch each cost the host
~365 Triton launches per step). Chunks that end inside their tensor run unmasked, and where all six
tensors are 16-byte aligned the pointers are declared so: 16-byte vector accesses, as a per-tensor
launch specialised on divisibility gets (checked in tests/ops/test_triton_codegen.py).

The arithmetic follows the foreach ops one by one, in fp32: lerp as ATen computes it, IEEE-rounded
division and square root (``div_rn`` / ``sqrt_rn``; Triton's ``/`` and ``sqrt`` are approximate
on GPU). Hyper-parameters and bias corrections are runtime float arguments, so a new lr each
step (the trainer's schedule) never recompiles. Contiguous fp32 tensors only.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from masked_dit.ops.triton_kernels import device_guard

BLOCK = 1024  # 8 fp32 per thread at 4 warps: two 16-byte accesses per tensor
NUM_WARPS = 4
ROLES = 6  # p, g, pre_grad, exp_avg, exp_avg_diff, exp_avg_sq: rows of the address table

# -----------------------------------------------------------------------------
# Kernel
# -----------------------------------------------------------------------------


@triton.jit
def _lerp(a, b, w):
    """ATen's lerp(a, b, w) with a scalar weight (two formulas, exact at both ends)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _pointer(ADDR, role, num_tensors, i, ALIGNED: tl.constexpr):
    ptr = tl.load(ADDR + role * num_tensors + i).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _adan_chunk(P, G, PREV, M, V, N, offs, mask, other,
                lr, w1, w2, b2, b3, w3, sqrt_bc3, eps, bc1, bc2, wd_mul, wd_div, NO_PROX: tl.constexpr):
    g = tl.load(G + offs, mask=mask, other=other)
    prev = tl.load(PREV + offs, mask=mask, other=other)
    m = tl.load(M + offs, mask=mask, other=other)
    v = tl.load(V + offs, mask=mask, other=other)
    n = tl.load(N + offs, mask=mask, other=other)
    p = tl.load(P + offs, mask=mask, other=other)

    diff = g - prev
    m = _lerp(m, g, w1)
    v = _lerp(v, diff, w2)
    corrected = g + b2 * diff
    n = n * b3
    n = n + w3 * corrected * corrected
    denom = tl.math.div_rn(tl.sqrt_rn(n), sqrt_bc3) + eps
    update = tl.math.div_rn(m, bc1) + b2 * tl.math.div_rn(v, bc2)
    update = tl.math.div_rn(update, denom)
    if NO_PROX:
        p = p * wd_mul - lr * update
    else:
        p = tl.math.div_rn(p - lr * update, wd_div)

    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    tl.store(N + offs, n, mask=mask)
    tl.store(PREV + offs, g, mask=mask)


@triton.jit
def _adan_kernel(
    ADDR, NUMEL, CHUNK_TENSOR, CHUNK_START, num_tensors,
    lr, w1, w2, b2, b3, w3, sqrt_bc3, eps, bc1, bc2, wd_mul, wd_div,
    NO_PROX: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One Adan step on one BLOCK-element chunk of one tensor. ADDR: [6, num_tensors] int64 addresses
    (rows: p, g, pre_grad, exp_avg, exp_avg_diff, exp_avg_sq); NUMEL: [num_tensors] int64; program c
    updates tensor CHUNK_TENSOR[c] from element CHUNK_START[c] (int64: a tensor may pass 2^31).
    w_i = 1 - b_i (lerp / addcmul weights), sqrt_bc3 = sqrt(bc3), wd_mul = 1 - lr wd (no_prox),
    wd_div = 1 + lr wd (prox)."""
    c = tl.program_id(0)
    i = tl.load(CHUNK_TENSOR + c)
    start = tl.multiple_of(tl.load(CHUNK_START + c), BLOCK)
    numel = tl.load(NUMEL + i)
    P = _pointer(ADDR, 0, num_tensors, i, ALIGNED)
    G = _pointer(ADDR, 1, num_tensors, i, ALIGNED)
    PREV = _pointer(ADDR, 2, num_tensors, i, ALIGNED)
    M = _pointer(ADDR, 3, num_tensors, i, ALIGNED)
    V = _pointer(ADDR, 4, num_tensors, i, ALIGNED)
    N = _pointer(ADDR, 5, num_tensors, i, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # a whole chunk: no mask, so the accesses can be vectors
        _adan_chunk(P, G, PREV, M, V, N, offs, None, None,
                    lr, w1, w2, b2, b3, w3, sqrt_bc3, eps, bc1, bc2, wd_mul, wd_div, NO_PROX)
    else:
        _adan_chunk(P, G, PREV, M, V, N, offs, offs < numel, 0.0,
                    lr, w1, w2, b2, b3, w3, sqrt_bc3, eps, bc1, bc2, wd_mul, wd_div, NO_PROX)


# -----------------------------------------------------------------------------
# Launch helper: address and chunk tables, cached
# -----------------------------------------------------------------------------

_TABLES: dict = {}  # (device, values) -> int tensor on device; a few entries (see _table)
_MAX_TABLES = 16


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-made table on the device without a host sync (pinned memory, stream-ordered copy)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _table(device: torch.device, key: tuple, make) -> tuple:
    """Tables are cached by their content (addresses, sizes): grads that come back at the same addresses
    (the caching allocator's steady state) cost no copy; an entry is never stale (its key is its content).
    Least recently used goes first: grads at new addresses every step (FSDP2's reduce-scatter outputs)
    must not push out the chunk table every group uses."""
    found = _TABLES.pop((device, key), None)  # re-inserted below: the dict's order is least recently used first
    if found is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        found = tuple(_to_device(t, device) for t in make())
    _TABLES[(device, key)] = found
    return found


def _chunks(numels: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts  # each tensor's first chunk
    start = (torch.arange(len(tensor), dtype=torch.int64) - first[tensor]) * BLOCK
    return tensor, start


def _launch(device: torch.device, addrs: list, numels: tuple, aligned: bool, scalars: tuple, no_prox: bool) -> None:
    """addrs: each tensor's six addresses, in ROLES order."""
    flat = tuple(a[role] for role in range(ROLES) for a in addrs)
    (addr_table,) = _table(device, ("addr", flat), lambda: (torch.tensor(flat, dtype=torch.int64),))
    numel_table, chunk_tensor, chunk_start = _table(
        device, ("chunks", numels), lambda: (torch.tensor(numels, dtype=torch.int64), *_chunks(numels)))
    with device_guard(device):
        _adan_kernel[(chunk_tensor.numel(),)](
            addr_table, numel_table, chunk_tensor, chunk_start, len(numels), *scalars,
            NO_PROX=bool(no_prox), ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )


def adan_step_(tensors, *, lr: float, betas, eps: float, bc1: float, bc2: float, bc3: float,
               weight_decay: float, no_prox: bool) -> None:
    """In place, for each (p, g, pre_grad, exp_avg, exp_avg_diff, exp_avg_sq) of ``tensors``: p, the
    moments and pre_grad (<- g). Each six: contiguous fp32 of one shape on one device (the caller
    checks). One launch per device for the tensors whose six addresses are 16-byte aligned (in practice
    all), one for the rest. wd = 0 takes the same code as wd > 0 (x * 1 and x / 1 are exact),
    so there is one compiled variant per mode.
    """
    b1, b2, b3 = (float(b) for b in betas)
    lr, wd = float(lr), float(weight_decay)  # floats: an int 0 or 1 would be specialised (recompiles)
    scalars = (lr, 1.0 - b1, 1.0 - b2, b2, b3, 1.0 - b3, float(bc3) ** 0.5, float(eps), float(bc1), float(bc2),
               1.0 - lr * wd, 1.0 + lr * wd)
    groups = {}  # (device, aligned) -> (addresses, numels)
    for t in tensors:
        numel = t[0].numel()
        if numel:
            addrs = tuple(x.data_ptr() for x in t)
            addrs_numels = groups.setdefault((t[0].device, all(a % 16 == 0 for a in addrs)), ([], []))
            addrs_numels[0].append(addrs)
            addrs_numels[1].append(numel)
    for (device, aligned), (addrs, numels) in groups.items():
        _launch(device, addrs, tuple(numels), aligned, scalars, no_prox)
