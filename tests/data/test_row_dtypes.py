"""Latent and feature rows leave the data set in their stored dtype; the trainer widens them on the device."""
import numpy as np
import pytest
import torch

from masked_dit.data.latents import _all_finite
from masked_dit.train.trainer import _to_device


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_exponent_bit_check_agrees_with_isfinite(dtype):
    info = np.finfo(dtype)
    specials = [0.0, -0.0, 1.0, -2.5, float(info.max), float(-info.max), float(info.tiny), float(info.smallest_subnormal)]
    base = np.array(specials, dtype=dtype)
    assert _all_finite(base)
    for bad in (np.nan, np.inf, -np.inf):
        row = base.copy()
        row[3] = bad
        assert not _all_finite(row)
        assert not _all_finite(row.reshape(2, 4)[::-1])  # any layout
    rng = np.random.default_rng(0)
    raw = rng.integers(0, np.iinfo(base.view(f"u{base.itemsize}").dtype).max, 4096, dtype=f"u{base.itemsize}")
    for chunk in raw.view(dtype).reshape(64, 64):  # random bit patterns: NaNs, infs and finite values alike
        assert _all_finite(chunk) == bool(np.isfinite(chunk).all())


def test_to_device_widens_half_precision_rows_exactly():
    batch = {"mean": torch.randn(2, 4, 8, 8).half(), "std": torch.rand(2, 4, 8, 8).half(), "y": torch.tensor([1, 2]),
             "zs": [torch.randn(2, 16, 32).half()], "name": "kept as is"}
    out = _to_device(batch, torch.device("cpu"))
    assert out["mean"].dtype == out["std"].dtype == out["zs"][0].dtype == torch.float32
    assert out["y"].dtype == torch.int64 and out["name"] == "kept as is"
    assert torch.equal(out["mean"], batch["mean"].float()) and torch.equal(out["zs"][0], batch["zs"][0].float())
