"""Loads the optional compiled extension ``masked_dit._C`` once and remembers why it failed.

"Loaded" also means the kernels can run on every visible GPU: an extension built for other
architectures would fail at the first launch ("no kernel image is available"), so it counts as
not loaded and the ops fall back (triton, torch) instead.
"""
from __future__ import annotations

import re

_state: dict[str, object] = {}


def _parse_archs(archs: str) -> list[tuple[int, int, str, bool]] | None:
    """TORCH_CUDA_ARCH_LIST entries ("8.0,9.0+PTX", ';' or ',' separated) as (major, minor,
    suffix, ptx); None when any entry is not a plain number (e.g. "Ampere"): then we cannot tell."""
    entries = [e for e in re.split(r"[;,\s]+", archs.strip()) if e]
    parsed = []
    for entry in entries:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if m is None:
            return None
        parsed.append((int(m[1]), int(m[2]), m[3], m[4] is not None))
    return parsed or None


def arch_runs_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` runs on a GPU of compute ``capability`` (True if unknown).

    Machine code for sm_XY runs on X.Y' with Y' >= Y (same major); PTX is compiled by the driver
    for any newer GPU; arch-specific targets (9.0a) run on exactly that GPU."""
    parsed = _parse_archs(archs)
    if parsed is None:
        return True
    for major, minor, suffix, ptx in parsed:
        if suffix == "a":
            if (major, minor) == tuple(capability):
                return True
        elif major == capability[0] and minor <= capability[1]:
            return True
        elif ptx and (major, minor) <= tuple(capability):
            return True
    return False


def _unsupported_gpu(archs: str) -> str:
    import torch

    if not archs or not torch.cuda.is_available():
        return ""
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)  # no CUDA context is created
        if not arch_runs_on(archs, capability):
            return (f"built for TORCH_CUDA_ARCH_LIST={archs.replace(',', ';')}, which does not cover cuda:{index} "
                    f"(sm_{capability[0]}{capability[1]}); rebuild with that arch in TORCH_CUDA_ARCH_LIST")
    return ""


def _load() -> None:
    if _state:
        return
    try:
        import torch  # noqa: F401  (the extension links against torch)

        from masked_dit import _C

        problem = _unsupported_gpu(str(getattr(_C, "cuda_archs", "")))
        _state.update(loaded=not problem, error=problem)
    except ImportError as exc:
        _state.update(loaded=False, error=f"not built or not importable: {exc}")
    except OSError as exc:  # wrong CUDA / torch ABI
        _state.update(loaded=False, error=f"failed to load: {exc}")


def loaded() -> bool:
    _load()
    return bool(_state["loaded"])


def load_error() -> str:
    _load()
    return str(_state["error"])
