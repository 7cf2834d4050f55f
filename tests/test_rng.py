"""masked_dit.rng: draws from a generator on its own device, moved to the data's device, so a CPU
generator seeds a run on any device. (A CPU generator with CUDA tensors made torch.randn fail; a
`meta` target stands in for the other device here: it consumes no randomness unless drawn elsewhere.)"""
import pytest
import torch

from masked_dit import rng
from masked_dit.diffusion.gaussian import GaussianDiffusion, get_named_beta_schedule
from masked_dit.diffusion.repa import sample_repa_time
from masked_dit.diffusion.sde import draw_noise
from masked_dit.diffusion.transport import create_transport
from masked_dit.nn.masking import random_masking, sample_mdt_mask_ratio


@pytest.mark.parametrize("fn,args", [(rng.randn, ()), (rng.rand, ()), (rng.randint, (7,))])
def test_draws_on_the_generators_device_then_moves(fn, args):
    g_meta, g_cpu = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = fn(*args, (2, 5), device="meta", generator=g_meta)
    assert out.device.type == "meta" and out.shape == (2, 5)
    assert fn(*args, (2, 5), generator=g_cpu).device.type == "cpu"
    # the meta-bound draw consumed exactly what the CPU draw did: the next draws agree
    assert torch.equal(fn(*args, (2, 5), generator=g_meta), fn(*args, (2, 5), generator=g_cpu))


def test_global_rng_without_generator():
    torch.manual_seed(0)
    a = rng.randn((4,), dtype=torch.float64)
    torch.manual_seed(0)
    assert torch.equal(a, torch.randn(4, dtype=torch.float64))


def _consumes(draw) -> bool:
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    draw(g)
    return not torch.equal(before, g.get_state())


@pytest.mark.parametrize("name", ["adm_timesteps", "sde_noise", "transport", "repa_time", "masking", "mdt_ratio"])
def test_samplers_and_losses_draw_from_the_generator_for_data_on_another_device(name):
    x = torch.empty(2, 4, 8, 8, device="meta")
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule("linear", 40))  # (20: beta_end = 1, refused)
    draws = {
        "adm_timesteps": lambda g: diffusion.sample_timesteps(2, "meta", g),
        "sde_noise": lambda g: draw_noise(None, 0, x, g),
        "transport": lambda g: create_transport().sample_time_and_noise(x, g),
        "repa_time": lambda g: sample_repa_time(2, "meta", torch.float32, "lognormal", "linear", g),
        "masking": lambda g: random_masking(2, 16, 0.5, generator=g, device="meta"),
        "mdt_ratio": lambda g: sample_mdt_mask_ratio(generator=g, device="meta"),
    }
    assert _consumes(draws[name])


def test_batch_generators_refuse_seeds_that_would_alias():
    """(seed, batch) pack into one 64-bit seed on CUDA (Philox keeps 64 bits): seed 2**32 used to draw what
    seed 0 draws. A CPU generator keeps the low 32 bits, so there the seed is mixed first: mix32(seed) + batch."""
    from masked_dit.eval.generate import _mix32, batch_generator

    last = batch_generator((1 << 32) - 1, (1 << 24) - 1, torch.device("cpu"))
    assert last.initial_seed() == (_mix32((1 << 32) - 1) + (1 << 24) - 1) & 0xFFFFFFFF
    assert batch_generator(1, 0, torch.device("cpu")).initial_seed() != batch_generator(0, 1, "cpu").initial_seed()
    assert batch_generator(256, 0, "cpu").initial_seed() != batch_generator(0, 0, "cpu").initial_seed()
    assert len({_mix32(x) for x in range(1 << 16)}) == 1 << 16  # one-to-one: no two seeds share a start
    for seed, index in (((1 << 32), 0), (-1, 0)):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
            batch_generator(seed, index, torch.device("cpu"))
    with pytest.raises(ValueError, match="batch index 16777216"):
        batch_generator(0, 1 << 24, torch.device("cpu"))
