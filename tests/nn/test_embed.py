"""Embedders: sin-cos positions (MAE recipe), timestep features, patchify/unpatchify, labels."""
import math

import numpy as np
import pytest
import torch

from masked_dit.nn import (LabelEmbedder, OneHotLabelEmbedder, PatchEmbed, check_labels, sincos_pos_embed_2d,
                           timestep_embedding, unpatchify)


def _mae_sincos(embed_dim, grid_size):
    """MAE util/pos_embed.py recipe in numpy: meshgrid(w, h), first half from grid[0] (columns)."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,grid", [(96, 4), (1152, 16), (64, 3)])
def test_sincos_matches_mae_recipe(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)
    ref = torch.from_numpy(_mae_sincos(dim, grid)).float()
    assert ours.shape == (grid * grid, dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(66, 4)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 0.37, 999.0])
    emb = timestep_embedding(t, 256)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    ref = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(emb.double(), ref, rtol=0, atol=2e-4)  # float32 args at t=999
    assert timestep_embedding(t, 7).shape == (4, 7)


def test_unpatchify_inverts_patch_order():
    """PatchEmbed's conv reads patch (i, j) channel-major; unpatchify(patchify(x)) == x."""
    B, C, p, g = 2, 3, 2, 4
    x = torch.randn(B, C, g * p, g * p)
    tokens = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)
    torch.testing.assert_close(unpatchify(tokens, p, C), x)
    with pytest.raises(ValueError, match="square"):
        unpatchify(tokens[:, :15], p, C)


def test_patch_embed_shape_error():
    pe = PatchEmbed(8, 2, 4, 16)
    assert pe(torch.randn(1, 4, 8, 8)).shape == (1, 16, 16)
    with pytest.raises(ValueError, match=r"\[B, 4, 8, 8\]"):
        pe(torch.randn(1, 4, 6, 8))


def test_label_dropout_and_null_row():
    emb = LabelEmbedder(10, 8, 0.1)
    assert emb.embedding_table.num_embeddings == 11
    y = torch.arange(10)
    dropped = emb.token_drop(y, force_drop_ids=(y % 2 == 0).long())
    assert torch.equal(dropped, torch.where(y % 2 == 0, 10, y))
    assert LabelEmbedder(10, 8, 0.0).embedding_table.num_embeddings == 10


def test_check_labels():
    check_labels(torch.tensor([0, 9]), 10, "y")
    with pytest.raises(ValueError, match=r"^y: class labels must be in \[0, 9\]"):
        check_labels(torch.tensor([0, 10]), 10, "y")


def test_check_labels_reads_nothing_back_off_the_cpu():
    """On an accelerator the check is an async device assert: a host read would sync every forward
    (250 times per DDPM sample). A meta tensor has no values to read: a host check raised there."""
    check_labels(torch.tensor([0, 12], device="meta"), 10, "y")


@pytest.mark.parametrize("one_hot", [False, True])
def test_label_dropout_draws_from_a_generator_on_another_device(one_hot):
    """Training-time label dropout draws from the caller's generator on the generator's device (as the masks
    do: a CPU generator seeds a CUDA run; a meta target stands in for the other device and must consume it)."""
    emb = OneHotLabelEmbedder(10, 8, 0.5) if one_hot else LabelEmbedder(10, 8, 0.5)
    y = torch.arange(6)
    labels = torch.nn.functional.one_hot(y, 10).float() if one_hot else y
    drop = torch.rand(6, generator=torch.Generator().manual_seed(4)) < 0.5
    assert 0 < int(drop.sum()) < 6
    out = emb(labels, True, generator=torch.Generator().manual_seed(4))  # CPU: the same draw as above
    null = torch.zeros(8) if one_hot else emb.embedding_table.weight[10]
    ref = emb(labels, False)
    assert torch.equal(out[drop], null.expand(int(drop.sum()), 8)) and torch.equal(out[~drop], ref[~drop])
    g = torch.Generator().manual_seed(4)
    before = g.get_state()
    emb.to("meta")(labels.to("meta"), True, generator=g)
    assert not torch.equal(before, g.get_state())
