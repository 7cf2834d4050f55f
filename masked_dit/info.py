"""``masked-dit info``: versions, the compiled extension, and which backend each op would use."""
from __future__ import annotations

import platform
import sys


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - any import failure is just "not available"
        return f"not available ({type(exc).__name__})"


def report() -> str:
    import torch

    import masked_dit
    from masked_dit import _ext, ops  # noqa: F401  (importing ops registers every backend)
    from masked_dit.ops import dispatch

    lines = [
        f"masked-dit {masked_dit.__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (built with CUDA {torch.version.cuda or 'none'})",
        f"triton {_version('triton')}",
        f"CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))" if torch.cuda.is_available() else ""),
        f"masked_dit._C: {'loaded' if _ext.loaded() else _ext.load_error()}",
        f"backend request: {dispatch.ENV_VAR}={dispatch.requested()}, "
        f"opted in: {dispatch.OPT_IN_ENV_VAR}={','.join(sorted(dispatch.opted_in())) or '(none)'}",
        "",
        f"{'op':<32} {'device':<6} backend  why",
    ]
    for op in dispatch.registered_ops():
        for device in ("cpu", "cuda"):
            try:
                backend, why = dispatch.select(op, device)
            except (RuntimeError, ValueError) as exc:
                backend, why = "-", str(exc)
            lines.append(f"{op:<32} {device:<6} {backend:<8} {why}")
    try:
        from masked_dit.ops.attention import attention_backend
    except ImportError:
        attention_backend = None
    if attention_backend is not None:
        for device in ("cpu", "cuda"):
            for packed, biased in ((False, False), (True, False), (False, True)):
                form = "packed" if packed else ("rel-pos bias" if biased else "dense")
                try:
                    name, why = attention_backend(device, packed=packed, biased=biased)
                except Exception as exc:  # noqa: BLE001
                    name, why = "-", str(exc)
                lines.append(f"{'attention (' + form + ')':<32} {device:<6} {name:<8} {why}")
    # linear_gelu is no dispatched op: a fixed rule (masked_dit/ops/linear_gelu.py), said here too
    lines.append(f"{'linear_gelu (no-grad forwards)':<32} {'cpu':<6} {'torch':<8} F.linear then gelu")
    lines.append(f"{'linear_gelu (no-grad forwards)':<32} {'cuda':<6} {'cublasLt':<8} "
                 "torch._addmm_activation: GELU in the GEMM epilogue")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
