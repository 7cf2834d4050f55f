"""FusedDiTBlock against a plain PyTorch DiTBlock (written here the way DiT's models.py does it)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from masked_dit.nn import FinalLayer, FusedDiTBlock


#################################################################################
#                     Plain reference (DiT models.py structure)                 #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PlainAttention(nn.Module):
    """qk_norm: timm's Attention(qk_norm=True) as REPA builds it (timm's default norm_layer then was
    nn.LayerNorm: eps 1e-5, affine), applied to [B, H, N, Dh] after the split."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class PlainMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PlainDiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = PlainAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = PlainMlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class PlainFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                    Tests                                      #
#################################################################################

D, H, N, B = 64, 4, 24, 3  # head dim 16


def _random_plain(seed=0, qk_norm=False):
    torch.manual_seed(seed)
    plain = PlainDiTBlock(D, H, qk_norm=qk_norm)
    for p in plain.parameters():  # adaLN-Zero init would hide everything: use random weights
        nn.init.normal_(p, std=1 / math.sqrt(D))
    x, c = torch.randn(B, N, D), torch.randn(B, D)
    return plain, x, c


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


QK_NORM = pytest.mark.parametrize("qk_norm", [False, True], ids=["", "qk_norm"])


@QK_NORM
def test_plain_state_dict_loads_strictly(qk_norm):
    plain, _, _ = _random_plain(qk_norm=qk_norm)
    fused = FusedDiTBlock(D, H, qk_norm=qk_norm)
    assert set(fused.state_dict()) == set(plain.state_dict())
    fused.load_state_dict(plain.state_dict(), strict=True)


@QK_NORM
def test_fp32_matches_plain_block(qk_norm):
    plain, x, c = _random_plain(qk_norm=qk_norm)
    fused = FusedDiTBlock(D, H, qk_norm=qk_norm)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        ref64 = plain.double()(x.double(), c.double())
        out = fused(x, c)
    assert _rel(out, ref64) <= 2e-6


@QK_NORM
def test_fp32_gradients_match_plain_block(qk_norm):
    plain, x, c = _random_plain(1, qk_norm=qk_norm)
    fused = FusedDiTBlock(D, H, qk_norm=qk_norm)
    fused.load_state_dict(plain.state_dict())
    x1, c1 = x.clone().requires_grad_(), c.clone().requires_grad_()
    x2, c2 = x.clone().requires_grad_(), c.clone().requires_grad_()
    g = torch.randn(B, N, D)
    (plain(x1, c1) * g).sum().backward()
    (fused(x2, c2) * g).sum().backward()
    assert _rel(x2.grad, x1.grad) <= 1e-5
    assert _rel(c2.grad, c1.grad) <= 1e-5
    pg = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        if name == "attn.k_norm.bias":  # a shift of every key moves each query's logits by one constant:
            # softmax ignores it, so this gradient is 0 and both blocks hold rounding noise
            assert max(p.grad.abs().max(), pg[name].grad.abs().max()) <= 1e-5 * x1.grad.abs().max()
            continue
        assert _rel(p.grad, pg[name].grad) <= 1e-5, name


@QK_NORM
def test_bf16_error_no_worse_than_plain_bf16(qk_norm):
    """bf16 (weights and activations): the fused block's error against a float64 reference stays
    within 2x the plain bf16 block's own error (and below 3% relative: bf16 has 8 mantissa bits)."""
    plain, x, c = _random_plain(2, qk_norm=qk_norm)
    fused = FusedDiTBlock(D, H, qk_norm=qk_norm)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        ref64 = PlainDiTBlock(D, H, qk_norm=qk_norm).double()
        ref64.load_state_dict(plain.state_dict())
        ref = ref64(x.double(), c.double())
        plain_err = _rel(plain.bfloat16()(x.bfloat16(), c.bfloat16()), ref)
        fused_out = fused.bfloat16()(x.bfloat16(), c.bfloat16())
    assert fused_out.dtype == torch.bfloat16
    fused_err = _rel(fused_out, ref)
    assert fused_err <= max(2 * plain_err, 1e-3), (fused_err, plain_err)
    assert fused_err <= 3e-2


def test_final_layer_matches_plain():
    torch.manual_seed(3)
    plain = PlainFinalLayer(D, 2, 8)
    for p in plain.parameters():
        nn.init.normal_(p, std=1 / math.sqrt(D))
    fused = FinalLayer(D, 2, 8)
    fused.load_state_dict(plain.state_dict(), strict=True)
    x, c = torch.randn(B, N, D), torch.randn(B, D)
    with torch.no_grad():
        assert _rel(fused(x, c), plain.double()(x.double(), c.double())) <= 2e-6


def test_skip_block_needs_skip():
    block = FusedDiTBlock(D, H, skip=True)
    with pytest.raises(ValueError, match="skip"):
        block(torch.randn(B, N, D), torch.randn(B, D))


def test_autocast_stores_h_in_the_linear_dtype_with_the_same_results(monkeypatch):
    """Under autocast the adaLN ops write h in autocast's dtype (the qkv/fc1/final Linear would cast it
    anyway): outputs and every gradient equal the cast-after path bit for bit, and the Linears see bf16."""
    import masked_dit.nn.block as block_mod

    torch.manual_seed(0)
    blk, final = FusedDiTBlock(64, 4), FinalLayer(64, 2, 4)
    for p in [*blk.parameters(), *final.parameters()]:
        nn.init.normal_(p, std=0.05)
    x0, c = torch.randn(2, 16, 64), torch.randn(2, 64)

    def run():
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = final(blk(x, c), c)
        out.float().square().sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in [*blk.parameters(), *final.parameters()]]
        for p in [*blk.parameters(), *final.parameters()]:
            p.grad = None
        return out, grads

    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
             for m in (blk.attn.qkv, blk.mlp.fc1, final.linear)]
    out, grads = run()
    assert seen == [torch.bfloat16] * 3
    monkeypatch.setattr(block_mod, "linear_input_dtype", lambda x: None)  # the cast-after path
    seen.clear()
    ref, ref_grads = run()
    assert seen == [torch.float32] * 3  # autocast casts inside the Linear
    for h in hooks:
        h.remove()
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_linear_input_dtype_follows_autocast():
    from masked_dit.ops.linear_gelu import linear_input_dtype

    x = torch.randn(1, 2, 4)
    assert linear_input_dtype(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_input_dtype(x) == torch.bfloat16
        assert linear_input_dtype(x.double()) is None  # autocast leaves fp64 alone, so must we


def test_shape_only_forward_on_meta():
    """The adaLN ops have fake kernels, so a block runs on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        blk, final = FusedDiTBlock(64, 4), FinalLayer(64, 2, 4)
        x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
        out = final(blk(x, c), c)
        packed = final(x.reshape(32, 64), c, segment_ids=torch.arange(2).repeat_interleave(16))
    assert out.shape == (2, 16, 16) and out.device.type == "meta" and packed.shape == (32, 16)


#################################################################################
#                    Chained blocks: the MLP residual deferred                  #
#################################################################################

def _random_blocks(n, seed=3, **kwargs):
    torch.manual_seed(seed)
    blocks = nn.ModuleList([FusedDiTBlock(D, H, **kwargs) for _ in range(n)])
    for p in blocks.parameters():
        nn.init.normal_(p, std=1 / math.sqrt(D))
    return blocks


def _plain_chain(blocks, x, c, **kwargs):
    for block in blocks:
        x = block(x, c, **kwargs)
    return x


def _outputs_and_grads(fn, blocks, x, c):
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    blocks.zero_grad(set_to_none=True)
    out = fn(x, c)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [x.grad, c.grad] + [p.grad for p in blocks.parameters()]


@pytest.mark.parametrize("packed", [False, True])
def test_run_blocks_equals_the_plain_chain(packed):
    """Each block's MLP residual applied in the next block's fused op: same outputs and gradients as
    applying it at the end of its own block (fp32: to rounding), dense and packed tokens."""
    from masked_dit.nn import run_blocks

    blocks = _random_blocks(3)
    x, c = torch.randn(B, N, D), torch.randn(B, D)
    kwargs = {}
    if packed:  # samples keep 5, 24 and 11 tokens
        lengths = torch.tensor([5, N, 11])
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        x = torch.randn(int(lengths.sum()), D)
        kwargs = dict(cu_seqlens=cu, max_seqlen=N, segment_ids=torch.arange(B).repeat_interleave(lengths))
    out, grads = _outputs_and_grads(lambda x, c: run_blocks(blocks, x, c, **kwargs), blocks, x, c)
    ref, ref_grads = _outputs_and_grads(lambda x, c: _plain_chain(blocks, x, c, **kwargs), blocks, x, c)
    assert _rel(out, ref) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) <= 1e-5


def test_run_blocks_fuses_each_seam_into_one_op():
    """n chained blocks run 1 adaln_modulate and 2n - 1 gated_residual_adaln (plain: n and n)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from masked_dit.nn import run_blocks

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.name()))
            return func(*args, **(kwargs or {}))

    blocks = _random_blocks(4)
    x, c = torch.randn(B, N, D), torch.randn(B, D)
    counts = []
    for fn in (run_blocks, _plain_chain):
        with Count() as mode:
            fn(blocks, x, c)
        counts.append((mode.names.count("masked_dit::adaln_modulate"), mode.names.count("masked_dit::gated_residual_adaln")))
    assert counts == [(1, 7), (4, 4)]


def test_a_skip_block_applies_the_pending_residual_first():
    """MDT's skip blocks concatenate the materialised stream with the skip: a pending residual is applied
    before (the fused seam cannot reach across the skip Linear)."""
    from masked_dit.nn import apply_pending

    first, skip_block = _random_blocks(1)[0], _random_blocks(1, seed=4, skip=True)[0]
    x, c, skip = torch.randn(B, N, D), torch.randn(B, D), torch.randn(B, N, D)
    with torch.no_grad():
        r, pending = first(x, c, defer=True)
        assert torch.equal(apply_pending(r, pending), first(x, c))
        out = skip_block(r, c, skip=skip, pending=pending)
        ref = skip_block(first(x, c), c, skip=skip)
    assert torch.equal(out, ref)


def test_skip_concatenation_runs_in_the_autocast_dtype_with_the_same_results():
    """Under autocast the skip block casts the stream and the skip before concatenating them (the cat moves
    bf16, not fp32): outputs and gradients bit-identical to concatenating first and letting the Linear cast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CatDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.cat.default:
                self.dtypes.append(args[0][0].dtype)
            return func(*args, **(kwargs or {}))

    block = _random_blocks(1, seed=5, skip=True)[0]
    x, c, skip = torch.randn(B, N, D), torch.randn(B, D), torch.randn(B, N, D)
    results = []
    for cast_first in (True, False):
        xx, ss = x.clone().requires_grad_(), skip.clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), CatDtypes() as mode:
            if cast_first:
                out = block(xx, c, skip=ss)
            else:  # the Linear's own cast of an fp32 concatenation, then the rest of the block
                linear, block.skip_linear = block.skip_linear, None
                try:
                    out = block(linear(torch.cat([xx, ss], dim=-1)), c)
                finally:
                    block.skip_linear = linear
        assert mode.dtypes[0] == (torch.bfloat16 if cast_first else torch.float32)
        out.float().sum().backward()
        results.append([out, xx.grad, ss.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_qk_norm_packed_tokens_equal_each_sample_dense():
    """Packed [T, D] tokens normalise q and k per token and head, as each sample's dense forward."""
    block = _random_blocks(1, qk_norm=True)[0]
    lengths = [5, N, 11]
    xs, c = [torch.randn(1, n, D) for n in lengths], torch.randn(B, D)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    seg = torch.arange(B).repeat_interleave(torch.tensor(lengths))
    with torch.no_grad():
        packed = block(torch.cat(xs, 1)[0], c, cu_seqlens=cu, max_seqlen=N, segment_ids=seg)
        dense = torch.cat([block(x, c[i:i + 1])[0] for i, x in enumerate(xs)])
    assert _rel(packed, dense) <= 1e-6


def test_block_names_a_wrong_x_or_c():
    """The drop-in block's own inputs, named: not torch's matmul message or an inner op's 'shift'."""
    block = FusedDiTBlock(32, 2)
    x, c = torch.randn(2, 4, 32), torch.randn(2, 32)
    for bad_x, bad_c, match in [(x, torch.randn(2, 16), r"c must be \[B, 32\] .* got shape \[2, 16\]"),
                                (x, torch.randn(32), r"c must be \[B, 32\] .* got shape \[32\]"),
                                (x, torch.randn(3, 32), "c has 3 rows for a batch of 2"),
                                (torch.randn(2, 4, 16), c, r"x must be \[B, L, D\] with D = hidden_size 32")]:
        with pytest.raises(ValueError, match=match):
            block(bad_x, bad_c)
    assert block(x, c[:1]).shape == x.shape  # one row for the whole batch, as the official modulate broadcasts
