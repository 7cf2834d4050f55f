import os
from pathlib import Path

# Triton reads TRITON_INTERPRET when a kernel is defined, and any test module may import them
# (through masked_dit.ops): set it before collection so Triton kernels run on CPU tensors. Not with
# a GPU: there the `gpu` tests must run the compiled kernels (interpreted ones would copy every
# tensor to the host and test nothing of the compiled code).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest

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
