"""FSDP2 bf16 numerics and the step's host reads, in one process (a gloo group of size 1)."""
import copy
import types

import pytest
import torch
import torch.distributed as dist

from masked_dit.diffusion.edm import edm_loss
from masked_dit.models import build_model
from masked_dit.train.dist import World
from masked_dit.train.parallel import apply_fsdp
from masked_dit.train.trainer import Trainer
from tests.train.tiny import cpu_fsdp_skip


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
    dist.destroy_process_group()


def _maskdit():
    torch.manual_seed(0)
    m = build_model("MaskDiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64, num_heads=4,
                    decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=4, mae_loss_coef=0.0)
    with torch.no_grad():  # a non-zero F (the adaLN-zero init makes F = 0, hiding any rounding of it)
        for n, p in m.named_parameters():
            if "adaLN" in n or "final_layer" in n or "decoder_layer" in n:
                p.normal_(0, 0.05)
    return m


@cpu_fsdp_skip()
def test_maskdit_preconditioning_stays_fp32_under_fsdp_bf16(group):
    """EDM's D = c_skip x + c_out F in bf16 erases c_out F at small sigma (official MaskDiT's AMP keeps it
    in fp32): the wrapper gets fp32 x and sigma, the network bf16, and the loss gradient at sigma 0.002 is
    as close to fp32 as autocast's (it was 60% off with the cast at the wrapper's input)."""
    m = _maskdit()
    seen = {}

    def spy(role):
        def hook(module, args):
            seen[role] = [a.dtype for a in args[:2]]
        return hook
    fsdp = apply_fsdp(copy.deepcopy(m), group, "bf16")
    fsdp.register_forward_pre_hook(spy("wrapper"))
    fsdp.model.register_forward_pre_hook(spy("network"))
    B = 64
    x0, noise = torch.randn(B, 4, 8, 8) * 0.8, torch.randn(B, 4, 8, 8)
    labels = torch.nn.functional.one_hot(torch.arange(B) % 10, 10).float()
    sigma = torch.full((B,), 0.002)

    def grad(model, ctx):
        with ctx:
            edm_loss(model, x0, labels, sigma=sigma, noise=noise)["loss"].mean().backward()
        return torch.cat([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().flatten()
                          for p in model.parameters() if p.grad is not None])

    ref = grad(copy.deepcopy(m), torch.enable_grad())
    autocast = grad(copy.deepcopy(m), torch.autocast("cpu", dtype=torch.bfloat16))
    got = grad(fsdp, torch.enable_grad())
    assert seen == {"wrapper": [torch.float32, torch.float32], "network": [torch.bfloat16, torch.bfloat16]}
    err = lambda g: float((g - ref).norm() / ref.norm())  # noqa: E731
    assert err(got) < 2 * err(autocast) + 1e-3, (err(got), err(autocast))
    out = fsdp(x0, sigma, labels)
    assert out.dtype == torch.float32


@cpu_fsdp_skip()
def test_other_roots_still_cast_their_inputs(group):
    """DiT's root is the network: its inputs are cast to bf16 at the root (the patch embedding's weight is bf16)."""
    torch.manual_seed(0)
    m = build_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64, num_heads=4)
    fsdp = apply_fsdp(m, group, "bf16")
    out = fsdp(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3]))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 8, 8)


def _agree_host(group, sums, signum=0):
    """Runs Trainer._agree as a 2-rank world would (the group has one rank: MAX is the identity)."""
    host = types.SimpleNamespace(world=World(rank=0, local_rank=0, size=2, device=torch.device("cpu")),
                                 stop=types.SimpleNamespace(signum=signum), stop_signum=None)
    reads = []
    real = torch.Tensor.tolist

    def counted(t):
        reads.append(t.numel())
        return real(t)
    torch.Tensor.tolist = counted
    try:
        totals, finite = Trainer._agree(host, sums)
    finally:
        torch.Tensor.tolist = real
    return totals, finite, host.stop_signum, reads


def test_distributed_agreement_is_read_with_the_values_in_one_host_read(group):
    sums = {"loss": torch.tensor(0.5), "mse": torch.tensor(0.25), "grad_norm": torch.tensor(2.0)}
    totals, finite, signum, reads = _agree_host(group, sums)
    assert totals == {"loss": 0.5, "mse": 0.25, "grad_norm": 2.0} and finite and signum is None
    assert reads == [5]  # the three values and the two agreed flags, together
    totals, finite, signum, reads = _agree_host(group, {**sums, "mse": torch.tensor(float("nan"))}, signum=15)
    assert not finite and signum == 15 and reads == [5] and totals["loss"] == 0.5
