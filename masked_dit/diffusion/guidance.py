"""Classifier-free guidance: combination rules, scale schedules and a batched model wrapper.

* DiT and MDTv2 guide only channels 0-2 of the (eps, sigma) output (``forward_with_cfg``): a quirk kept
  because the published FIDs depend on it. MaskDiT and REPA guide every channel.
* MDTv2 anneals the scale with a power-cosine schedule of the (original, 0..999) timestep; REPA applies
  the constant scale only inside a guidance interval of t.
* The conditional and unconditional halves always go through the model as one batch (one call).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

ScaleSchedule = Callable[..., "float | torch.Tensor"]


#################################################################################
#                               Combination rule                                #
#################################################################################

def _per_sample(scale, like: torch.Tensor):
    """A float stays a float; a [B] tensor becomes [B, 1, ..., 1], widened to like's dtype if that is
    wider (a float32 scale keeps a bf16 output's combination in float32, as MDT's tensor scale does)."""
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        return scale.to(torch.promote_types(scale.dtype, like.dtype)).view(-1, *([1] * (like.dim() - 1)))
    return scale


def _check_guided_channels(guided_channels, out_channels=None) -> None:
    # More channels than the output has would silently guide a learned-sigma half too.
    if guided_channels is None:
        return
    if isinstance(guided_channels, bool) or not isinstance(guided_channels, int) or guided_channels < 1 or (
            out_channels is not None and guided_channels > out_channels):
        limit = "" if out_channels is None else f" (the model outputs {out_channels})"
        raise ValueError(f"guided_channels must be None (all) or an int in [1, output channels]{limit}, "
                         f"got {guided_channels!r}")


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale, guided_channels: int | None = None) -> torch.Tensor:
    """uncond + scale * (cond - uncond) on channels [0, guided_channels) (all when None); the remaining
    channels are taken from `cond` unchanged, as DiT's forward_with_cfg leaves them.

    scale: a float or a per-sample [B] tensor.
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {list(cond.shape)} and uncond {list(uncond.shape)} differ in shape")
    _check_guided_channels(guided_channels, cond.shape[1])
    scale = _per_sample(scale, cond)
    if guided_channels is None or guided_channels == cond.shape[1]:
        return uncond + scale * (cond - uncond)
    g = guided_channels
    guided = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)


#################################################################################
#                                Scale schedules                                #
#################################################################################

def constant_scale(t, cfg_scale: float):
    """The same scale at every step."""
    return cfg_scale


def power_cosine_scale(t, cfg_scale: float, scale_pow: float = 4.0, num_timesteps: int = 1000):
    """MDTv2's schedule: s = (1 - cos(((1 - t/T) ** pow) * pi)) / 2, scale = (cfg - 1) * s + 1.

    t is the original-schedule timestep (0..T-1), a float or a tensor; the scale rises from 1 at t = T
    to cfg at t = 0.
    """
    if isinstance(t, torch.Tensor):
        s = (1 - torch.cos(((1 - t / num_timesteps) ** scale_pow) * math.pi)) / 2
    else:
        s = (1 - math.cos(((1 - t / num_timesteps) ** scale_pow) * math.pi)) / 2
    return (cfg_scale - 1) * s + 1


def in_guidance_interval(t, low: float = 0.0, high: float = 1.0):
    """low <= t <= high (closed interval, as REPA); a bool for a float t, a bool tensor for a tensor t.

    Samplers with a host-side time grid can test a float t and skip the unconditional half outside.
    """
    if isinstance(t, torch.Tensor):
        return (t >= low) & (t <= high)
    return low <= t <= high


def interval_scale(t, cfg_scale: float, low: float = 0.0, high: float = 1.0):
    """REPA's guidance interval: cfg_scale where low <= t <= high, 1 (no guidance) elsewhere."""
    if isinstance(t, torch.Tensor):
        dtype = torch.promote_types(t.dtype, torch.float32)
        return torch.where(in_guidance_interval(t, low, high), cfg_scale, 1.0).to(dtype)
    return cfg_scale if in_guidance_interval(t, low, high) else 1.0


def _resolve_scale(cfg_scale, schedule: ScaleSchedule | None, t):
    if callable(cfg_scale):
        return cfg_scale(t)
    return cfg_scale if schedule is None else schedule(t, cfg_scale)


#################################################################################
#                                Model wrappers                                 #
#################################################################################

def _model_tensor(out):
    """The prediction tensor of a model output: a tensor, the first item of a tuple, or dict['x']."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict) and "x" in out:
        return out["x"]
    raise ValueError(f"cannot find the prediction in a model output of type {type(out).__name__}")


# The official DiT/SiT/MDT forward_with_cfg guides channels 0-2 only (kept for published FIDs).
OFFICIAL_GUIDED_CHANNELS = 3


def guided_channel_count(guide_channels, in_channels: int) -> int:
    """``guide_channels`` of a model's ``forward_with_cfg``: ``"all"``, an int in [1, in_channels], or
    None for the official channels 0-2 (every data channel when a model has fewer than 3)."""
    if guide_channels is None:
        return min(OFFICIAL_GUIDED_CHANNELS, in_channels)
    if guide_channels == "all":
        return in_channels
    if not isinstance(guide_channels, int) or not 1 <= guide_channels <= in_channels:
        raise ValueError(f"guide_channels must be 'all' or an int in [1, {in_channels}], got {guide_channels!r}")
    return guide_channels


def forward_with_cfg(model_fn: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale,
                     guided_channels: int | None = 3, schedule: ScaleSchedule | None = None, **model_kwargs):
    """The official ``forward_with_cfg`` contract on a doubled batch.

    x, t, y hold [cond; uncond] halves (y's second half the null label). Only x's first half is used
    (duplicated), the model runs once on 2B, and both output halves get the guided channels while the
    other channels keep each half's own output. cfg_scale: a float, or a schedule applied to t (e.g.
    ``power_cosine_scale`` for MDTv2, which uses the scale of the first half's timesteps).
    """
    if x.shape[0] % 2:
        raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]}")
    half = x[: x.shape[0] // 2]
    out = _model_tensor(model_fn(torch.cat([half, half], dim=0), t, y, **model_kwargs))
    cond, uncond = out.chunk(2, dim=0)
    scale = _resolve_scale(cfg_scale, schedule, t)
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        scale = scale[: half.shape[0]]
    g = out.shape[1] if guided_channels is None else min(guided_channels, out.shape[1])
    guided = uncond[:, :g] + _per_sample(scale, out) * (cond[:, :g] - uncond[:, :g])
    return torch.cat([torch.cat([guided, guided], dim=0), out[:, g:]], dim=1)


class ClassifierFreeGuidance:
    """Wrap ``model_fn(x, t, y, **kw)`` so that a call on a batch of B samples runs cond and uncond as one
    2B batch and returns the guided [B] prediction (see `cfg_combine`).

    This is the cond half of the official doubled-batch sampling, without carrying the ignored uncond
    half of the state through the sampler.

    cfg_scale: float (or a callable t -> scale); schedule: optional ``schedule(t, cfg_scale)`` such as
    `power_cosine_scale` or `interval_scale` (bind extra options with functools.partial).
    null_label: the unconditional label: a tensor like y, a scalar (e.g. 1000 for DiT's null class), or
    None for float (one-hot) labels, whose null label is the zero vector (MaskDiT).
    The label is read from the third positional argument or the keyword `label_key`.
    Tensor keyword arguments whose first dimension is B are duplicated; others pass unchanged.
    """

    def __init__(self, model_fn: Callable, cfg_scale, null_label=None, guided_channels: int | None = None,
                 schedule: ScaleSchedule | None = None, label_key: str = "y"):
        _check_guided_channels(guided_channels)
        self.model_fn, self.cfg_scale, self.null_label = model_fn, cfg_scale, null_label
        self.guided_channels, self.schedule, self.label_key = guided_channels, schedule, label_key

    def _null_like(self, y: torch.Tensor) -> torch.Tensor:
        if self.null_label is None:
            if not y.is_floating_point():
                raise ValueError("null_label is required for integer class labels (e.g. num_classes for DiT)")
            return torch.zeros_like(y)
        if isinstance(self.null_label, torch.Tensor):
            return self.null_label.to(device=y.device, dtype=y.dtype).expand_as(y)
        return torch.full_like(y, self.null_label)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *args, **kwargs):
        positional = bool(args)
        if positional:
            y, args = args[0], args[1:]
        elif self.label_key in kwargs:
            y = kwargs.pop(self.label_key)
        else:
            raise ValueError(f"ClassifierFreeGuidance needs the class label as the third argument or {self.label_key}=")
        B = x.shape[0]
        if not isinstance(y, torch.Tensor):
            raise ValueError("classifier-free guidance (cfg_scale != 1) needs class labels as a tensor, got "
                             f"{type(y).__name__}")
        if y.shape[0] != B:
            raise ValueError(f"labels have batch {y.shape[0]}, x has {B}")
        scale = _resolve_scale(self.cfg_scale, self.schedule, t)
        if not isinstance(scale, torch.Tensor) and scale == 1.0:
            # No guidance at this step: the conditional output alone, without the doubled batch.
            out = (self.model_fn(x, t, y, *args, **kwargs) if positional
                   else self.model_fn(x, t, *args, **{self.label_key: y}, **kwargs))
            return _model_tensor(out)
        yy = torch.cat([y, self._null_like(y)], dim=0)
        tt = torch.cat([t, t], dim=0) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
        kw = {k: torch.cat([v, v], dim=0) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v
              for k, v in kwargs.items()}
        xx = torch.cat([x, x], dim=0)
        out = self.model_fn(xx, tt, yy, *args, **kw) if positional else self.model_fn(xx, tt, *args, **{self.label_key: yy}, **kw)
        cond, uncond = _model_tensor(out).chunk(2, dim=0)
        return cfg_combine(cond, uncond, scale, self.guided_channels)
