"""Loads the optional compiled extension ``masked_dit._C`` once and remembers why it failed."""
from __future__ import annotations

_state: dict[str, object] = {}


def _load() -> None:
    if _state:
        return
    try:
        import torch  # noqa: F401  (the extension links against torch)

        from masked_dit import _C  # noqa: F401

        _state.update(loaded=True, error="")
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
