"""fp32 exponential moving average of the weights that works on plain, DDP and FSDP2 models.

The shadow copies have the parameters' own type: under FSDP2 they are DTensors sharded like the
parameters, so each rank averages only its shard (no communication) and DCP saves / reshards them
like any other state. Updates run on the local shards with one fused multi-tensor lerp.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` for every parameter (frozen ones included, as DiT)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        decay = self.decay if decay is None else decay
        shadows = [_local(self.shadow[n]) for n in self.names]
        params = [_local(p).float() for p in self.params]
        torch._foreach_lerp_(shadows, params, 1.0 - decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        with torch.no_grad():
            for n, t in self.shadow.items():
                _local(t).copy_(_local(state[n]))

    def full_state_dict(self, model: nn.Module) -> dict:
        """Unsharded EMA weights with the model's buffers, on the CPU (a collective under FSDP:
        every rank must call it)."""
        out = {}
        for n, t in self.shadow.items():
            out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
        for n, b in model.named_buffers():
            if n in model.state_dict():
                out[n] = (b.full_tensor() if hasattr(b, "full_tensor") else b).detach().cpu()
        return out

    @torch.no_grad()
    def copy_to(self, target: nn.Module) -> None:
        """Loads the EMA weights into an unsharded ``target`` (e.g. a sampling copy)."""
        params = dict(target.named_parameters())
        for n, t in self.shadow.items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            params[n].copy_(full.to(params[n].dtype))
