import os
from pathlib import Path

# Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it
# (through masked_dit.ops): set it before collection so Triton kernels run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

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
