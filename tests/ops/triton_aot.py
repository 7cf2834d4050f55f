"""The ahead-of-time Triton compile the codegen tests use (``ASTSource(fn, signature, constexprs)`` and
``GPUTarget``), or a skip naming what this triton lacks (triton 3.2, torch 2.6's, has another API)."""
import inspect

import pytest


def require_aot_api() -> None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"triton has no ahead-of-time compile API here: {err}")
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip(f"triton {triton.__version__}'s ASTSource takes no constexprs= (the sm_90 compile is checked "
                    f"with triton 3.6 and newer; the GPU tests compile the kernels on a device)")
