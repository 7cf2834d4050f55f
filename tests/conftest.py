import logging
import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET when a kernel is defined, and any test module may import them
# (through masked_dit.ops): set it before collection so Triton kernels run on CPU tensors. Not with
# a GPU: there the `gpu` tests must run the compiled kernels (interpreted ones would copy every
# tensor to the host and test nothing of the compiled code).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# Subprocesses the tests start (torchrun ranks, CLI runs) print every thread's Python stack if they
# die on a signal (SIGABRT, SIGSEGV), so a rare crash in CI says where it happened.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import pytest  # noqa: E402

FIXTURES = Path(os.environ.get("MASKED_DIT_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (set MASKED_DIT_FIXTURES)")
    return FIXTURES


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slower CPU test")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is now (capsys swaps it per test)."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def _library_loggers_follow_capture():
    """diffusers, transformers and huggingface_hub give their root logger a StreamHandler bound to
    ``sys.stderr`` of the moment they first log (diffusers binds its ``flush`` too): under capsys a
    stream closed after that test, so every later log call printed a "--- Logging error ---" traceback
    into another test's stderr. Point them at the current stderr instead (before and after each test,
    as a library may be imported during one)."""
    def rebind():
        for name in ("diffusers", "transformers", "huggingface_hub"):
            if name in sys.modules:
                for handler in logging.getLogger(name).handlers:
                    if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _CurrentStderr):
                        handler.stream = _CurrentStderr()  # not setStream: it flushes the old, maybe closed, stream
                        handler.__dict__.pop("flush", None)  # diffusers binds flush to the old stderr's too
    rebind()
    yield
    rebind()
