"""Activation checkpointing: a checkpointed block saves only its own inputs, and changes no number."""
import copy

import pytest
import torch

from masked_dit.models import build_model
from masked_dit.train.parallel import apply_activation_checkpointing, transformer_blocks

FAMILIES = {"DiT-S/2": {}, "SiT-S/2": {}, "MDTv2-S/2": {},
            "MaskDiT-S/2": {"decoder_hidden_size": 32, "decoder_depth": 1, "decoder_num_heads": 4},
            "REPA-SiT-S/2": {"encoder_depth": 2, "z_dims": (16,)}}


def _model(name):
    torch.manual_seed(0)
    m = build_model(name, input_size=8, in_channels=4, num_classes=10, depth=4, hidden_size=64, num_heads=4,
                    **FAMILIES[name])
    with torch.no_grad():  # a non-zero residual branch (adaLN-zero makes every gate 0)
        for n, p in m.named_parameters():
            if "adaLN" in n or "final_layer" in n or "decoder_layer" in n:
                p.normal_(0, 0.05)
    return m.eval()  # no label dropout: both copies must see the same labels


def _forward_backward(model, name):
    x, y = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2, 3, 4])
    t = torch.tensor([0.1, 0.4, 2.0, 0.7]) if name.startswith("MaskDiT") else (
        torch.tensor([1, 200, 500, 999]) if name[:3] in ("DiT", "MDT") else torch.tensor([0.1, 0.4, 0.6, 0.9]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_checkpointed_blocks_leave_no_residual_pending_and_change_no_number(name):
    """A block's MLP residual left pending for the next block's fused op (the unchecked chaining) would
    make every checkpointed block save the previous block's branch and gate as inputs: 2.1x its x. With
    checkpointing each block finishes its own residual, in the fused op's arithmetic: bf16 outputs and
    gradients bit-identical to the unchecked model's."""
    plain = _model(name)
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed)
    pendings = []
    for block in transformer_blocks(checkpointed):
        block.register_forward_pre_hook(lambda mod, args, kwargs: pendings.append(kwargs.get("pending")),
                                        with_kwargs=True)
    want, want_grads = _forward_backward(plain, name)
    got, got_grads = _forward_backward(checkpointed, name)
    assert pendings and all(p is None for p in pendings)
    assert torch.equal(got, want)
    for n, g in want_grads.items():
        assert (g is None and got_grads[n] is None) or torch.equal(got_grads[n], g), n
