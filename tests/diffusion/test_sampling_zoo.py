"""Every family's sampler on a model of the zoo: bf16 autocast, reproducible from a generator."""
import pytest
import torch

from masked_dit.diffusion.objectives import build_objective
from masked_dit.train.build import build_model_from_config
from tests.train.tiny import tiny_config

# A stochastic sampler per family, so the generator matters.
CASES = [("digits-dit", "ddpm"), ("digits-mdtv2", "ddpm"), ("digits-sit", "sde"), ("digits-repa-sit", "sde"),
         ("digits-maskdit", "heun")]


@pytest.mark.parametrize("preset,sampler", CASES)
def test_sampler_bf16_autocast_and_generator(preset, sampler, tmp_path):
    cfg = tiny_config(preset, tmp_path)
    torch.manual_seed(0)
    model = build_model_from_config(cfg).eval()
    for p in model.parameters():  # adaLN-Zero init outputs zeros: give the net a real signal
        p.data.add_(0.02 * torch.randn_like(p))
    objective = build_objective(cfg.objective, model, pixel_space=True)
    y = torch.tensor([0, 3, 7])
    noise = torch.randn(3, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size,
                       generator=torch.Generator().manual_seed(1))

    def run(seed):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return objective.sample(model, noise, y, sampler=sampler, steps=4, cfg_scale=2.0,
                                    generator=torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert a.shape == noise.shape and a.dtype == noise.dtype
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), "same generator seed must give the same samples"
    if sampler != "heun":  # EDM Heun without churn is deterministic given the initial noise
        assert not torch.equal(a, c), "the per-step noise must come from the generator"
