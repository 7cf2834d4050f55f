"""Backend choice for the fused ops: one place decides, every op asks.

Backends: ``torch`` (reference, runs everywhere), ``triton`` (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1`` for tests), ``cuda`` (the compiled extension ``masked_dit._C``).
The choice is read when an op is *called* (so it also holds inside ``torch.compile`` graphs,
where our custom ops are opaque; except the torch backend, which the public op functions trace inline
there so that Inductor fuses it: :func:`inline_reference`): the innermost :func:`use_backend` context, else the
environment variable ``MASKED_DIT_BACKEND=auto|torch|triton|cuda``. ``auto`` picks the
first backend available for the tensor's device in a fixed order: cuda > triton > torch on GPU,
torch on CPU (the Triton interpreter is a test tool, never fast). The GPU order is not measured yet
(``benchmarks/bench_ops.py`` times each backend).

Opt-in backends: a backend registered with ``auto=False`` (the cuBLASLt MLP, until a GPU shows it
pays) is never picked by ``auto`` unless its op is opted in: ``with opt_in("mlp_gelu"): ...`` or
``MASKED_DIT_OPT_IN=mlp_gelu`` (comma-separated op names). Requesting the backend by name also runs it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "MASKED_DIT_BACKEND"
OPT_IN_ENV_VAR = "MASKED_DIT_OPT_IN"

_IMPLS: dict[str, dict[str, Callable]] = {}
_OPT_IN_ONLY: set[tuple[str, str]] = set()  # (op, backend) pairs that auto takes only when the op is opted in
# The contexts' stacks are process-wide, not thread-local: autograd runs CUDA backward ops on its own
# device threads, which must see the caller's choice (with thread-local stacks every GPU backward
# silently ran the default backend; CPU backward runs on the calling thread and did not show it).
# Each context removes its own entry (by identity), so contexts of overlapping threads cannot pop another's.
_requests: list[list[str]] = []
_opt_ins: list[list[str]] = []


def register(op: str, backend: str, auto: bool = True) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend`` (``auto=False``: only when opted in or requested)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        if not auto:
            _OPT_IN_ONLY.add((op, backend))
        return fn

    return deco


def requested() -> str:
    """The backend asked for right now (context manager first, then the environment)."""
    if _requests:
        return _requests[-1][0]
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; valid: {', '.join(CHOICES)}")
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("triton"): ...`` forces a backend for ops called inside."""
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(CHOICES)}")
    with _pushed(_requests, [name]):
        yield


def _forward_name(op: str) -> str:
    """An op's backward follows the op's opt-in: ``mlp_gelu_backward`` -> ``mlp_gelu``."""
    return op[: -len("_backward")] if op.endswith("_backward") else op


def _opt_in_ops() -> set[str]:
    return {_forward_name(op) for op, _ in _OPT_IN_ONLY}


def opted_in() -> frozenset[str]:
    """Ops whose opt-in backends ``auto`` may pick right now (contexts, then the environment)."""
    names = {n.strip().lower() for n in os.environ.get(OPT_IN_ENV_VAR, "").split(",") if n.strip()}
    unknown = sorted(names - _opt_in_ops())
    if unknown:
        raise ValueError(f"{OPT_IN_ENV_VAR} names {', '.join(map(repr, unknown))}, which has no opt-in backend; "
                         f"ops that have one: {', '.join(sorted(_opt_in_ops()))}")
    for ops in _opt_ins:
        names.update(ops)
    return frozenset(names)


@contextlib.contextmanager
def opt_in(*ops: str) -> Iterator[None]:
    """``with opt_in("mlp_gelu"): ...`` lets ``auto`` pick the opt-in backends of ``ops`` inside."""
    known = _opt_in_ops()
    unknown = [op for op in ops if op not in known]
    if unknown:
        raise ValueError(f"no opt-in backend for {', '.join(map(repr, unknown))}; ops that have one: "
                         f"{', '.join(sorted(known))}")
    with _pushed(_opt_ins, list(ops)):
        yield


def register_autograd_following_request(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd`` with a backward that runs under the backend request (and opt-ins) current at
    the forward: ``with use_backend("triton"): y = op(x)`` then ``y.sum().backward()`` outside it runs the
    Triton backward, not whatever is requested when (and on whichever thread) autograd runs it. (Compiled
    graphs call the backward ops directly: they follow the request current when they run.)"""
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.backend_request = requested(), tuple(opted_in())

    def grad(ctx, *grads):
        request, ops = ctx.backend_request
        with use_backend(request), opt_in(*ops):
            return backward(ctx, *grads)

    op.register_autograd(grad, setup_context=setup)


@contextlib.contextmanager
def _pushed(stack: list, entry: list) -> Iterator[None]:
    """``entry`` on ``stack`` for the block; on exit that entry itself goes (the last element that *is* it),
    wherever other threads' contexts left theirs. Each context passes a new list, so identity is its own."""
    stack.append(entry)
    try:
        yield
    finally:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is entry:
                del stack[i]
                break


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def availability(backend: str, device_type: str) -> tuple[bool, str]:
    """Whether ``backend`` can run on tensors of ``device_type``, and why (not)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device visible"
    if backend == "torch":
        return True, "reference implementation runs on every device"
    if backend == "triton":
        if not triton_importable():
            return False, "triton is not installed"
        if device_type == "cuda":
            return True, "triton installed and tensor on CUDA"
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return True, "TRITON_INTERPRET=1: Triton interpreter on CPU (slow, for tests)"
            return False, "CPU tensor and TRITON_INTERPRET is not 1"
        return False, f"triton does not run on {device_type} tensors"
    if backend == "cuda":
        from masked_dit import _ext

        if device_type != "cuda":
            return False, f"the CUDA extension runs on CUDA tensors, not {device_type}"
        if not _ext.loaded():
            return False, f"masked_dit._C not loaded ({_ext.load_error()})"
        return True, "masked_dit._C loaded and tensor on CUDA"
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


def select(op: str, device_type: str) -> tuple[str, str]:
    """(backend, reason) that ``op`` will use for tensors on ``device_type``."""
    impls = _IMPLS.get(op, {})
    req = requested()
    if req == "auto":
        order = ("cuda", "triton", "torch") if device_type == "cuda" else ("torch",)
        reasons, skipped = [], []
        for backend in order:
            if backend not in impls:
                continue
            if (op, backend) in _OPT_IN_ONLY and _forward_name(op) not in opted_in():
                skipped.append(f"{backend} is opt-in: {OPT_IN_ENV_VAR}={_forward_name(op)}")
                continue
            ok, why = availability(backend, device_type)
            if ok:
                return backend, f"auto: {why}" + "".join(f" ({note})" for note in skipped)
            reasons.append(f"{backend}: {why}")
        if not impls:
            raise RuntimeError(f"no backend registered for op {op!r}")
        raise RuntimeError(f"no backend of op {op!r} can run on {device_type}: {'; '.join(reasons)}")
    if req not in impls:
        raise RuntimeError(f"op {op!r} has no {req!r} backend; it has: {', '.join(sorted(impls))}")
    ok, why = availability(req, device_type)
    if not ok:
        raise RuntimeError(f"{ENV_VAR}={req} requested for op {op!r} but unavailable: {why}")
    return req, f"requested: {why}"


def impl(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to run on tensors of ``device``."""
    backend, _ = select(op, device.type)
    return _IMPLS[op][backend]


@torch._dynamo.assume_constant_result
def _selects_torch(op: str, device_type: str) -> bool:
    return select(op, device_type)[0] == "torch"


def inline_reference(op: str, device: torch.device) -> bool:
    """Whether a public op function should run ``op``'s torch reference inline instead of the custom op:
    under ``torch.compile`` when the torch backend would run it. An opaque custom op would run the
    reference's separate kernels inside the graph; inline, Inductor fuses it with its neighbours.
    Decided when the graph is traced (the backend request of that moment, without a guard)."""
    return torch.compiler.is_compiling() and _selects_torch(op, device.type)


def implementation(op: str, backend: str) -> Callable:
    """``op``'s implementation on ``backend`` as registered (no availability check: the caller chose it)."""
    return _IMPLS[op][backend]


def backends_of(op: str) -> tuple[str, ...]:
    """The backends ``op`` has (registered), in BACKENDS order."""
    return tuple(b for b in BACKENDS if b in _IMPLS.get(op, {}))


def registered_ops() -> list[str]:
    return sorted(_IMPLS)
