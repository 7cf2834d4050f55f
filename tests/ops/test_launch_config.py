"""Launch heuristics of the Triton kernels obey the hardware rules the interpreter does not check.

Compiled Triton needs power-of-two ``tl.arange`` sizes and block shapes; a CUDA grid's y/z
dims stop at 65535; every row must fit one program's block. The interpreter accepts all of
these broken, so they are checked here on the pure-Python helpers, for every D up to 16384.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from masked_dit.ops.triton_kernels import adaln as ka  # noqa: E402
from masked_dit.ops.triton_kernels import tokens as kt  # noqa: E402

WIDTHS = list(range(1, 2049)) + [2304, 3072, 4095, 4096, 4097, 6144, 8191, 8192, 8193, 12288, 16384]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def test_tokens_blocks_are_powers_of_two_and_bounded():
    for D in WIDTHS:
        block_r, block_d = kt._blocks(D)
        assert _pow2(block_r) and _pow2(block_d), D
        assert block_d <= 256 and block_r * block_d <= 4096, D  # ~4K elements per program
        assert block_d >= min(D, 256), D
        assert triton.cdiv(D, block_d) <= 65535, D  # grid dim 1
    assert kt._blocks(0) == (4096, 1)  # D = 0: sized before the empty launch is skipped, must not divide by 0


def test_adaln_block_holds_the_row_with_sane_warps():
    for D in WIDTHS:
        block_d = ka._block_d(D)
        assert _pow2(block_d) and block_d >= D, D
        for per_thread in (8, 4):
            warps = ka._num_warps(block_d, per_thread)
            assert _pow2(warps) and 4 <= warps <= 32, (D, warps)


@pytest.mark.parametrize("B,L", [(1, 1), (1, 4096), (256, 256), (70000, 2), (3, 0), (0, 5)])
def test_adaln_backward_chunks(B, L):
    chunks = ka._num_chunks(B, L, torch.device("cpu"))
    assert 1 <= chunks <= max(L, 1)
    # the backward grid is 1-D (B * chunks programs), so B > 65535 launches
    assert B * chunks < 2**31


def test_adaln_backward_launches_a_one_dimensional_grid(monkeypatch):
    """B programs must not sit on grid dim 1 (<= 65535 on a GPU): record the launch grid."""
    grids = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(ka, "_adaln_bwd_kernel", Recorder(ka._adaln_bwd_kernel))
    monkeypatch.setattr(ka, "_gated_bwd_kernel", Recorder(ka._gated_bwd_kernel))
    B, L, D = 70000, 2, 8
    x = torch.empty(B, L, D)
    mod = torch.empty(B, D)
    stats = torch.empty(B, L)
    ka.adaln_modulate_bwd(x, x, mod, stats, stats)
    ka.gated_residual_adaln_bwd(x, x, x, x, mod, mod, stats, stats)
    chunks = ka._num_chunks(B, L, x.device)
    assert grids == [(B * chunks,), (B * chunks,)]
