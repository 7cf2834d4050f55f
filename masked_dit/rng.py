"""Random draws from an optional ``torch.Generator`` that may live on another device than the data.

``torch.randn(..., generator=g, device=d)`` fails when ``g`` is a CPU generator and ``d`` is CUDA (a
common setup: one seeded CPU generator for a reproducible run on any device). These draw on the
generator's own device and move the result, so the numbers depend on the seed only, not on where
the data lives; without a generator they use the global RNG of the target device.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# Seeds are 32-bit: batch generators pack (seed, batch index) into one 64-bit seed, so a larger seed
# would silently repeat another seed's draws.
SEED_LIMIT = 1 << 32


def check_seed(seed: int, name: str) -> None:
    """One-line ValueError unless ``seed`` (option ``name``) lies in [0, 2**32)."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**32) (got {seed})")


def derived_seed(value: int) -> int:
    """A seed computed from a run's seed (times primes, plus rank or step), wrapped into the 64 bits
    ``manual_seed`` takes; unchanged wherever it already fits."""
    return value % (1 << 64)


def _draw(fn: Callable, shape, device, dtype, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    out = fn(shape, generator=generator, device=generator.device, dtype=dtype)
    return out if device is None else out.to(device)


def randn(shape, *, device=None, dtype=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal draw of ``shape`` on ``device``."""
    return _draw(torch.randn, tuple(shape), device, dtype, generator)


def rand(shape, *, device=None, dtype=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform [0, 1) draw of ``shape`` on ``device``."""
    return _draw(torch.rand, tuple(shape), device, dtype, generator)


def randint(high: int, shape, *, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Integers uniform in [0, high) of ``shape`` on ``device``."""
    return _draw(lambda s, **kw: torch.randint(0, high, s, **kw), tuple(shape), device, None, generator)
