"""The one adaLN-Zero transformer block every family runs on, built from the fused ops.

Parameter names match facebookresearch/DiT's ``DiTBlock`` (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``), MDT's extras (``skip_linear``,
``attn.rel_pos_bias.*``), so official state_dicts load unchanged.

Tokens come dense ``[B, L, D]`` or packed ``[T, D]`` (with ``cu_seqlens``: each sample keeps a
different number of tokens). Packed tokens are modulated per token by expanding the per-sample
conditioning over its segment, which lets the same fused ops run on ``[T, 1, D]``.

Dropping it into another DiT-style codebase (facebookresearch/DiT, SiT, REPA, fast-DiT, ...)
is a three-line swap: same constructor, same ``forward(x, c)``, same state_dict keys, so existing
checkpoints keep loading (REPA's ``SiTBlock`` also takes ``**block_kwargs``: pass ``qk_norm`` only, as
attention is always fused here)::

    from masked_dit.nn import FusedDiTBlock                      # 1. import
    self.blocks = nn.ModuleList([                                # 2. in the model's __init__
        FusedDiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
    model.load_state_dict(torch.load("DiT-XL-2-256x256.pt"))     # 3. unchanged: keys match

(Codebases whose block takes a separate conditioning width, like MaskDiT's decoder, pass
``cond_size=``.) Its ``norm1``/``norm2`` have no parameters, so nothing is missing.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from masked_dit import ops
from masked_dit.ops.adaln import gated_sum
from masked_dit.ops.linear_gelu import linear_input_dtype, needs_grad


#################################################################################
#                                 Sub-modules                                   #
#################################################################################

class RelativePositionBias(nn.Module):
    """MDT/BEiT relative-position bias: a learnable ``[(2g-1)^2 + 3, H]`` table indexed by a
    fixed ``[N, N]`` buffer. The bias is never materialised here: the attention op reads it."""

    def __init__(self, grid_size: int, num_heads: int):
        super().__init__()
        from masked_dit.ops.attention import relative_position_index

        num_rel = (2 * grid_size - 1) ** 2 + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid_size), persistent=True)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.relative_position_bias_table, self.relative_position_index


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection ([q; k; v] rows, head-major).

    ``qk_norm`` (REPA's ``--qk-norm``): LayerNorm over each head's q and k before attention, timm's
    ``Attention(qk_norm=True)`` with its LayerNorm (eps 1e-5, affine; keys ``q_norm``/``k_norm``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rel_pos_grid: int | None = None,
                 qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(rel_pos_grid, num_heads) if rel_pos_grid else None

    def forward(self, x, *, positions=None, cu_seqlens=None, max_seqlen=None):
        lead = x.shape[:-1]  # (B, N) dense or (T,) packed
        q, k, v = self.qkv(x).reshape(*lead, 3, self.num_heads, self.head_dim).unbind(-3)
        if self.q_norm is not None:  # autocast runs LayerNorm in fp32; attention then casts back, as SDPA does
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        out = ops.attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, rel_pos_bias=bias,
                            positions=positions if bias is not None else None)
        # explicit width (not -1): an empty batch has no elements to infer it from
        return self.proj(out.reshape(*lead, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm's Mlp without dropout). Where no gradient is needed (sampling),
    fc1 and the GELU run as one GEMM (``ops.linear_gelu``: the GELU in cuBLASLt's epilogue on CUDA);
    in training, the whole MLP runs as ``ops.mlp_gelu`` where its cuBLASLt backend is opted in."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if not needs_grad(x, self.fc1.weight, self.fc1.bias):
            return self.fc2(ops.linear_gelu(x, self.fc1.weight, self.fc1.bias))
        if ops.mlp_gelu_is_fused(x, self.fc1.weight, self.fc2.weight):
            return ops.mlp_gelu(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(self.fc1(x)))  # the modules themselves, as hooks and wrappers expect


#################################################################################
#                               The fused block                                 #
#################################################################################

def _per_sample(c: torch.Tensor, x: torch.Tensor, packed_index) -> torch.Tensor:
    """One conditioning row ``c [1, C]`` for a dense batch ``x [B, L, D]`` -> ``[B, C]``: the official
    blocks broadcast it in ``modulate``, while the fused ops take one row per sample."""
    if packed_index is None and c.dim() == 2 and c.shape[0] == 1 and x.dim() == 3 and x.shape[0] != 1:
        return c.expand(x.shape[0], -1)
    return c


def apply_pending(x: torch.Tensor, pending) -> torch.Tensor:
    """``x + gate * branch``: the MLP residual a block left pending (``defer=True``), applied plainly
    (``pending`` None: x as it is). ``branch`` has x's shape; ``gate`` is [B, D] (dense) or [T, D] (packed)."""
    if pending is None:
        return x
    branch, gate = pending
    # The fused op's arithmetic (float32 accumulation): a bf16 gate * branch rounded before the add made
    # a block's output depend on whether the next op was fused (activation checkpointing is not).
    return gated_sum(x, branch, gate.unsqueeze(1) if branch.dim() == 3 else gate)


def run_blocks(blocks, x: torch.Tensor, c: torch.Tensor, **kwargs) -> torch.Tensor:
    """``x`` through ``blocks`` in order, each block's MLP residual fused into the next block's first
    LN + modulate (``gated_residual_adaln``): per block, one pass over the fp32 residual stream less in
    the forward and the gradient add, the gate's product and a norm backward merged in the backward."""
    pending = None
    for block in blocks:
        if getattr(block, "activation_checkpointed", False):
            # A checkpointed block saves its inputs: a pending (branch, gate) would be two more
            # full-size tensors per block (2.1x its x), so such a block finishes its own residual.
            x, pending = block(apply_pending(x, pending), c, **kwargs), None
        else:
            x, pending = block(x, c, pending=pending, defer=True, **kwargs)
    return apply_pending(x, pending)


class FusedDiTBlock(nn.Module):
    """adaLN-Zero DiT block: LN+modulate -> attention -> gated residual fused with the second
    LN+modulate -> MLP -> gated residual.

    Options: ``cond_size`` (conditioning width, if not ``hidden_size``: MaskDiT's decoder),
    ``skip`` (MDT long skip: ``Linear(2D -> D)`` over ``cat([x, skip])`` before attention),
    ``rel_pos_grid`` (MDT relative-position bias over a grid of that side), ``qk_norm`` (REPA's, see
    :class:`Attention`).

    Chaining (:func:`run_blocks`): ``defer=True`` returns ``(r, (branch, gate))`` without the final
    ``r + gate * branch``; the next block takes that as ``pending`` and applies it in its first fused op.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, cond_size: int | None = None,
                 skip: bool = False, rel_pos_grid: int | None = None, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, rel_pos_grid=rel_pos_grid, qk_norm=qk_norm)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 6 * hidden_size))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(self, x, c, *, skip=None, positions=None, cu_seqlens=None, max_seqlen=None, segment_ids=None,
                pending=None, defer=False):
        """x [B, L, D] (or packed [T, D] with cu_seqlens and segment_ids [T]), c [B, C]; ``pending``/``defer``:
        the previous block's / this block's MLP residual left for the next fused op (class docstring)."""
        self._check_inputs(x, c, cu_seqlens)
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block has a skip_linear and needs a skip input")
            x = apply_pending(x, pending)
            dtype = linear_input_dtype(x)
            if dtype is not None:  # autocast's cast before the concatenation: it then moves half the bytes
                x, skip = x.to(dtype), skip.to(dtype)
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
            pending = None
        mod = self.adaLN_modulation(_per_sample(c, x, cu_seqlens))
        if cu_seqlens is not None:
            # Packed: per-token conditioning, and the fused ops see [T, 1, D].
            if segment_ids is None:
                raise ValueError("packed tokens need segment_ids (sample index of each token)")
            mod = mod.index_select(0, segment_ids)
            x = x.unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h_dtype = linear_input_dtype(x)  # h feeds qkv / fc1 only
        if pending is None:
            h = ops.adaln_modulate(x, shift_msa, scale_msa, self.eps, out_dtype=h_dtype)
        else:  # the previous block's MLP residual, fused with this block's first LN + modulate
            branch, gate = pending
            branch = branch.unsqueeze(1) if cu_seqlens is not None else branch
            x, h = ops.gated_residual_adaln(x, branch, gate, shift_msa, scale_msa, self.eps, out_dtype=h_dtype)
        if cu_seqlens is not None:
            a = self.attn(h.squeeze(1), positions=positions, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).unsqueeze(1)
        else:
            a = self.attn(h, positions=positions)
        x, h = ops.gated_residual_adaln(x, a, gate_msa, shift_mlp, scale_mlp, self.eps, out_dtype=h_dtype)
        m = self.mlp(h)
        if cu_seqlens is not None:
            x, m = x.squeeze(1), m.squeeze(1)
        return (x, (m, gate_mlp)) if defer else apply_pending(x, (m, gate_mlp))

    def _check_inputs(self, x, c, cu_seqlens) -> None:
        """One line naming x or c (shapes only: no device sync), not an op's name for an inner tensor."""
        cond = self.adaLN_modulation[1].in_features
        if x.dim() != (2 if cu_seqlens is not None else 3) or x.shape[-1] != self.hidden_size:
            want = "[T, D] (packed)" if cu_seqlens is not None else "[B, L, D]"
            raise ValueError(f"FusedDiTBlock: x must be {want} with D = hidden_size {self.hidden_size}, got "
                             f"shape {list(x.shape)}")
        if c.dim() != 2 or c.shape[-1] != cond:
            raise ValueError(f"FusedDiTBlock: c must be [B, {cond}] (one conditioning row per sample), got shape "
                             f"{list(c.shape)}")
        if cu_seqlens is None and c.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"FusedDiTBlock: c has {c.shape[0]} rows for a batch of {x.shape[0]} (one per sample, "
                             f"or one for all)")


class FinalLayer(nn.Module):
    """adaLN (shift, scale — shift first) + LN + Linear to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, cond_size: int | None = None,
                 eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 2 * hidden_size))

    def forward(self, x, c, *, segment_ids=None):
        """x [B, L, D] (or packed [T, D] with segment_ids [T]: MaskDiT's decoder_layer on kept tokens), c [B, C]."""
        mod = self.adaLN_modulation(_per_sample(c, x, segment_ids))
        if segment_ids is not None:
            mod = mod.index_select(0, segment_ids)
            return self.linear(ops.adaln_modulate(x.unsqueeze(1), *mod.chunk(2, dim=1), self.eps,
                                                  out_dtype=linear_input_dtype(x))).squeeze(1)
        shift, scale = mod.chunk(2, dim=1)
        return self.linear(ops.adaln_modulate(x, shift, scale, self.eps, out_dtype=linear_input_dtype(x)))


#################################################################################
#                               Initialisation                                  #
#################################################################################

def init_dit_weights(model: nn.Module) -> None:
    """DiT's adaLN-Zero init: xavier Linears, zero modulation and output layers, conv as Linear,
    embedders N(0, 0.02). Applied by every family (each then sets its own positions)."""
    def _basic(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    model.apply(_basic)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # patch embed: like nn.Linear
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
        if isinstance(m, (FusedDiTBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)
        if isinstance(m, RelativePositionBias):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
    for name, m in model.named_modules():
        if name.endswith("t_embedder"):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)
        if name.endswith("y_embedder"):
            nn.init.normal_(m.embedding_table.weight, std=0.02)
