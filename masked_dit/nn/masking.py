"""Token masks for masked diffusion training (MAE recipe), dense and packed variable-length.

Conventions follow MAE: per-sample noise is argsorted; the ``len_keep`` tokens with the smallest
noise are kept (``ids_keep``, in shuffled order), ``ids_restore`` inverts the shuffle, and
``mask`` is 1 where a token is *removed*, 0 where it is kept.

Dense masks keep the same number of tokens in every sample (``[B, K]`` indices), as MDT and
MaskDiT do. Packed masks let each sample keep its own number of tokens: the kept indices of all
samples are concatenated into ``[T]`` and delimited by ``cu_seqlens`` (FlashAttention varlen
layout), so no padding is ever computed.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from masked_dit import ops, rng
from masked_dit.nn.embed import can_check_values
from masked_dit.ops.tokens import check_cu_seqlens_values, check_ids_values


class PackedMask(NamedTuple):
    """A variable-length mask: sample ``b`` keeps ``ids_keep[cu_seqlens[b]:cu_seqlens[b+1]]``."""
    ids_keep: torch.Tensor      # [T] int64, token positions within each sample
    cu_seqlens: torch.Tensor    # [B + 1] int32, cumulative keep counts starting at 0
    segment_ids: torch.Tensor   # [T] int64, sample index of each kept token
    max_seqlen: int             # largest keep count (attention kernels need it on the host)
    ids_restore: torch.Tensor   # [B, N] int64, inverse of each sample's shuffle
    mask: torch.Tensor          # [B, N] float32, 1 = removed, 0 = kept


#################################################################################
#                                 Helpers                                       #
#################################################################################

def _check_noise(noise: torch.Tensor, batch_size: int, num_tokens: int) -> None:
    if noise.shape != (batch_size, num_tokens):
        raise ValueError(f"noise must have shape [{batch_size}, {num_tokens}], got {list(noise.shape)}")


def _draw_noise(batch_size, num_tokens, generator, noise, device) -> torch.Tensor:
    if noise is None:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        return rng.rand((batch_size, num_tokens), generator=generator, device=device)
    _check_noise(noise, batch_size, num_tokens)
    return noise


def keep_count(num_tokens: int, mask_ratio) -> int:
    """``int(N * (1 - mask_ratio))`` exactly as the references compute it (a float32 tensor ratio
    is multiplied in float32, like MDT's sampled ratio)."""
    if isinstance(mask_ratio, torch.Tensor):
        if mask_ratio.numel() != 1:
            raise ValueError(f"mask_ratio must be a scalar, got shape {list(mask_ratio.shape)}")
        r = mask_ratio.detach().reshape(()).cpu()  # one host read (the keep count sets shapes); CPU float32 math
        ratio = float(r)
        len_keep = int(num_tokens * (1 - r))
    else:
        ratio = float(mask_ratio)
        len_keep = int(num_tokens * (1 - ratio))
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    if len_keep < 1:
        raise ValueError(f"mask_ratio {ratio} keeps no token out of {num_tokens}")
    return len_keep


#################################################################################
#                               Dense masks                                     #
#################################################################################

def random_masking(batch_size: int, num_tokens: int, mask_ratio, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None, device=None):
    """MAE random masking with the same keep count for every sample.

    Returns ``(ids_keep [B, K], ids_restore [B, N], mask [B, N])`` with ``K = int(N (1 - mask_ratio))``.
    ``noise`` ([B, N], e.g. ``torch.rand``) replaces the random draw, so a reference's draw can be
    replayed; otherwise it is drawn from ``generator`` (on ``device``).
    """
    len_keep = keep_count(num_tokens, mask_ratio)
    noise = _draw_noise(batch_size, num_tokens, generator, noise, device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # A token is removed iff its rank in the shuffle is >= len_keep.
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_keep, ids_restore, mask


def sample_mdt_mask_ratio(mask_ratio: float = 0.3, generator: torch.Generator | None = None,
                          ratio_noise: torch.Tensor | None = None, spread: float = 0.2, device=None) -> torch.Tensor:
    """MDTv2's per-step mask ratio ``mask_ratio + spread * U(0, 1)`` as a float32 tensor of shape [1]
    (one ratio for the whole batch). ``ratio_noise`` replaces the uniform draw."""
    if ratio_noise is None:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        ratio_noise = rng.rand((1,), generator=generator, device=device)
    elif ratio_noise.numel() != 1:
        raise ValueError(f"ratio_noise must hold one value, got shape {list(ratio_noise.shape)}")
    return ratio_noise.reshape(1).to(torch.float32) * spread + mask_ratio


# MaskDiT's mask-ratio schedules over a run (train_utils/helper.get_mask_ratio_fn).
MASK_RATIO_FNS = ("constant", "cosine2", "cosine3", "cosine4", "cosine5", "cosine6", "exp", "linear")


def scheduled_mask_ratio(progress: float, name: str = "constant", mask_ratio: float = 0.5,
                         mask_ratio_min: float = 0.0) -> float:
    """MaskDiT's mask ratio at ``progress`` (the fraction of the run done, clipped to [0, 1]): constant
    ``mask_ratio``; ``cosineP`` falls from ``mask_ratio`` to ``mask_ratio_min`` as cos(pi x / 2)^P (its
    unmasking fine-tune: cosine4 from 0.5 to 0); ``exp`` as exp(-7 x); ``linear`` rises from
    ``mask_ratio_min`` to ``mask_ratio`` (as MaskDiT's)."""
    if name not in MASK_RATIO_FNS:
        raise ValueError(f"unknown mask ratio schedule {name!r}; valid: {', '.join(MASK_RATIO_FNS)}")
    x = min(max(float(progress), 0.0), 1.0)
    span = mask_ratio - mask_ratio_min
    if name == "constant":
        return mask_ratio
    if name == "exp":
        return span * math.exp(-7 * x) + mask_ratio_min
    if name == "linear":
        return span * x + mask_ratio_min
    return span * math.cos(math.pi * x / 2) ** int(name[len("cosine"):]) + mask_ratio_min


#################################################################################
#                         Packed variable-length masks                          #
#################################################################################

def keep_counts_from_ratios(num_tokens: int, mask_ratios) -> torch.Tensor:
    """Per-sample keep counts ``int(N (1 - r_b))`` (int64 [B]) from per-sample mask ratios, each as
    :func:`keep_count` computes it: Python floats in float64, a tensor's ratios in its own dtype."""
    # Not torch.as_tensor(list): it rounds 0.3 to float32 first, and int(10 * (1 - 0.3f)) is 6, not 7.
    ratios = mask_ratios if isinstance(mask_ratios, torch.Tensor) else torch.as_tensor(mask_ratios, dtype=torch.float64)
    return torch.tensor([keep_count(num_tokens, r) for r in ratios.detach().cpu().flatten().unbind()],
                        dtype=torch.int64)


def packed_masking(keep_counts: Sequence[int] | torch.Tensor, num_tokens: int,
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                   device=None) -> PackedMask:
    """MAE random masking where sample ``b`` keeps ``keep_counts[b]`` tokens (1..N).

    Sample ``b``'s kept indices equal ``random_masking(..)`` of that sample with the same noise row
    and a ratio keeping ``keep_counts[b]`` tokens, so a packed forward is comparable sample by sample.
    """
    counts = torch.as_tensor(keep_counts, dtype=torch.int64).flatten()
    batch_size = counts.numel()
    if batch_size == 0:
        raise ValueError("keep_counts is empty")
    if int(counts.min()) < 1 or int(counts.max()) > num_tokens:
        raise ValueError(f"keep_counts must lie in [1, {num_tokens}], got {counts.tolist()}")
    noise = _draw_noise(batch_size, num_tokens, generator, noise, device)
    counts = counts.to(noise.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep_slot = torch.arange(num_tokens, device=noise.device)[None] < counts[:, None]  # [B, N] in shuffled order
    ids_keep = ids_shuffle[keep_slot]  # row-major: sample 0's tokens, then sample 1's, ...
    mask = (ids_restore >= counts[:, None]).to(torch.float32)
    cu_seqlens = torch.zeros(batch_size + 1, dtype=torch.int32, device=noise.device)
    cu_seqlens[1:] = torch.cumsum(counts, 0)
    segment_ids = torch.repeat_interleave(torch.arange(batch_size, device=noise.device), counts)
    return PackedMask(ids_keep, cu_seqlens, segment_ids, int(counts.max()), ids_restore, mask)


def packed_from_dense(ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Dense kept indices [B, K] -> packed ``(ids_keep [T], cu_seqlens, segment_ids, max_seqlen)``."""
    B, K = ids_keep.shape
    cu_seqlens = torch.arange(0, (B + 1) * K, K, dtype=torch.int32, device=ids_keep.device)
    segment_ids = torch.arange(B, device=ids_keep.device).repeat_interleave(K)
    return ids_keep.reshape(-1), cu_seqlens, segment_ids, K


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Sample index of every packed token (int64 [T]) from ``cu_seqlens`` [B + 1]."""
    counts = cu_seqlens.diff().long()
    B = counts.numel()
    return torch.repeat_interleave(torch.arange(B, device=cu_seqlens.device), counts, output_size=total)


#################################################################################
#                   Kept tokens: what an encoder sees in a forward              #
#################################################################################

class KeptTokens:
    """The tokens a masked encoder runs on, dense or packed, with the moves every family needs.

    Dense: ``ids_keep`` [B, K] (same K per sample). Packed: ``ids_keep`` [T] positions within each
    sample with ``cu_seqlens`` [B + 1] int32 (``segment_ids`` [T] and ``max_seqlen`` are derived
    when not given; pass them to stay free of host syncs under ``torch.compile``).
    """

    def __init__(self, ids_keep: torch.Tensor, num_tokens: int, batch_size: int, *,
                 cu_seqlens: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                 max_seqlen: int | None = None):
        if ids_keep.dtype != torch.int64:
            raise ValueError(f"ids_keep must be int64, got {ids_keep.dtype}")
        self.num_tokens, self.batch_size = num_tokens, batch_size
        self.ids_keep, self.cu_seqlens = ids_keep, cu_seqlens
        # Once here, on any device: the ops check values on CPU only, and off it out-of-range ids read
        # outside the sample.
        if can_check_values(ids_keep):
            check_ids_values(ids_keep, num_tokens)
        if cu_seqlens is None:
            if ids_keep.dim() != 2 or ids_keep.shape[0] != batch_size or not 1 <= ids_keep.shape[1] <= num_tokens:
                raise ValueError(f"ids_keep must be [B={batch_size}, K] with 1 <= K <= {num_tokens}, "
                                 f"got {list(ids_keep.shape)} (packed ids need cu_seqlens)")
            self.segment_ids, self.max_seqlen = None, ids_keep.shape[1]
            return
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.shape != (batch_size + 1,):
            raise ValueError(f"cu_seqlens must be int32 [B+1={batch_size + 1}], got {cu_seqlens.dtype} "
                             f"{list(cu_seqlens.shape)}")
        if ids_keep.dim() != 1:
            raise ValueError(f"packed ids_keep must be 1-D [T], got {list(ids_keep.shape)}")
        if can_check_values(cu_seqlens):
            check_cu_seqlens_values(cu_seqlens, ids_keep.shape[0], max_len=num_tokens)
        if segment_ids is None:
            segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, ids_keep.shape[0])
        elif segment_ids.shape != ids_keep.shape:
            raise ValueError(f"segment_ids must match ids_keep [T={ids_keep.shape[0]}], got {list(segment_ids.shape)}")
        elif can_check_values(cu_seqlens) and can_check_values(segment_ids) and not torch.equal(
                segment_ids.long(), segment_ids_from_cu_seqlens(cu_seqlens, ids_keep.shape[0]).long()):
            # the blocks' per-token conditioning reads them: others than cu_seqlens say mix samples silently
            raise ValueError("segment_ids must be each token's sample index as cu_seqlens lays them out "
                             "(or leave them out: they are derived)")
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max())  # host sync: pass max_seqlen to avoid it
        self.segment_ids, self.max_seqlen = segment_ids, max_seqlen

    @classmethod
    def from_args(cls, ids_keep, num_tokens: int, batch_size: int, *, cu_seqlens=None, segment_ids=None,
                  max_seqlen=None) -> "KeptTokens | None":
        """The models' keyword arguments -> ``KeptTokens``, or None when no mask is given."""
        if ids_keep is None:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens needs ids_keep (packed kept indices)")
            return None
        return cls(ids_keep, num_tokens, batch_size, cu_seqlens=cu_seqlens, segment_ids=segment_ids,
                   max_seqlen=max_seqlen)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> kept tokens [B, K, D] (dense) or [T, D] (packed)."""
        if self.packed:
            return ops.gather_tokens_varlen(x, self.ids_keep, self.cu_seqlens)
        return ops.gather_tokens(x, self.ids_keep)

    def scatter(self, x_keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Kept tokens back to [B, N, D]; every removed position holds ``fill`` (any shape with D
        elements, e.g. a ``[1, 1, D]`` mask token, or a full [B, N, D] tensor)."""
        if fill.dim() != 3 or fill.shape[:2] != (self.batch_size, self.num_tokens):
            fill = fill.reshape(-1)
        fill = fill.to(x_keep.dtype)
        if self.packed:
            return ops.scatter_tokens_varlen(x_keep, self.ids_keep, self.cu_seqlens, fill, self.num_tokens)
        return ops.scatter_tokens(x_keep, self.ids_keep, fill, self.num_tokens)

    def block_kwargs(self) -> dict:
        """Keyword arguments of :class:`FusedDiTBlock` for these tokens (positions feed MDT's bias)."""
        if self.packed:
            return dict(positions=self.ids_keep, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen,
                        segment_ids=self.segment_ids)
        return dict(positions=self.ids_keep)

    def removed(self) -> torch.Tensor:
        """bool [B, N]: True where a token was removed (the float ``mask`` of MAE as booleans)."""
        kept = torch.zeros(self.batch_size, self.num_tokens, dtype=torch.bool, device=self.ids_keep.device)
        if self.packed:
            kept = kept.index_put((self.segment_ids, self.ids_keep), torch.ones((), dtype=torch.bool,
                                                                                  device=kept.device))
        else:
            kept = kept.scatter(1, self.ids_keep, True)
        return ~kept
