"""MDTv2's Min-SNR-weighted ADM loss: official fixture and the weight's definition."""
import pytest
import torch
from safetensors.torch import load_file

from masked_dit.diffusion import create_diffusion, min_snr_weight

from .test_adm import analytic_model, rel_err


def test_minsnr_losses_fixture(fixtures_dir):
    f = load_file(str(fixtures_dir / "diffusion" / "mdt_minsnr_losses.safetensors"))
    out = create_diffusion("").training_losses(analytic_model, f["x_start"], f["t"], noise=f["noise"],
                                               weighting="min_snr")
    for key in ("loss", "mse", "vb"):
        assert rel_err(out[key], f[key]) <= 1e-6, key


def test_minsnr_weight_values():
    d = create_diffusion("", coefficient_dtype=torch.float64)
    t = torch.tensor([0, 100, 400, 999])
    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    w = min_snr_weight(snr, 5.0, "eps")
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 1e-3 and w[-1] == 1.0                     # high-SNR steps are down-weighted, noisy ones kept
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "x0"), torch.clamp(snr, max=5.0))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.clamp(snr, max=5.0) / (snr + 1))


def test_weighting_forms_agree():
    d = create_diffusion("")
    x0 = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([2, 300, 900])
    noise = torch.randn_like(x0)
    a = d.training_losses(analytic_model, x0, t, noise=noise, weighting="min_snr")
    b = d.training_losses(analytic_model, x0, t, noise=noise, weighting="min_snr_5")
    w = min_snr_weight(d.snr(t, torch.float32).double(), 5.0)
    c = d.training_losses(analytic_model, x0, t, noise=noise, weighting=w)
    plain = d.training_losses(analytic_model, x0, t, noise=noise)
    assert torch.equal(a["loss"], b["loss"])
    torch.testing.assert_close(c["loss"], a["loss"])
    torch.testing.assert_close(a["mse"], w * plain["mse"])
    torch.testing.assert_close(a["vb"], plain["vb"])         # the VLB term is not weighted
    with pytest.raises(ValueError, match="weighting"):
        d.training_losses(analytic_model, x0, t, noise=noise, weighting="p2")


def _mdt_min_snr_weights(T=1000, gamma=5.0):
    """MDT's gaussian_diffusion.training_losses, written out: float32 sqrt(abar) and sqrt(1 - abar) (ADM's
    _extract_into_tensor), snr = (alpha / sigma)^2 and min(snr, gamma) / snr in float32."""
    import numpy as np

    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))  # ADM's linear schedule
    alpha = torch.from_numpy(np.sqrt(abar)).float()
    sigma = torch.from_numpy(np.sqrt(1.0 - abar)).float()
    snr = (alpha / sigma) ** 2
    return torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr


def test_min_snr_weight_is_mdts_float32_arithmetic():
    """The weight at every t equals MDT's to the bit. It came from the rounded ratio abar / (1 - abar),
    1-2 float32 ulps from MDT's (alpha / sigma)^2 at 78 of the 1000 steps (the high-SNR ones)."""
    ref = _mdt_min_snr_weights()
    t = torch.arange(1000)
    torch.manual_seed(0)
    x0 = torch.randn(1000, 4, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    d = create_diffusion("")
    plain = d.training_losses(analytic_model, x0, t, noise=noise)
    weighted = d.training_losses(analytic_model, x0, t, noise=noise, weighting="min_snr")
    assert torch.equal(weighted["mse"], ref.double() * plain["mse"])
    # MDTv2's objective: both passes weighted so (the analytic model ignores the mask)
    from masked_dit.diffusion.objectives import MDTv2Objective

    from .test_objectives import AnalyticADM

    out = MDTv2Objective()(AnalyticADM(), {"x": x0, "y": torch.zeros(1000, dtype=torch.long)}, t=t, noise=noise,
                           ids_keep=torch.arange(3).repeat(1000, 1))
    torch.testing.assert_close(out["loss_full"], (ref.double() * plain["mse"] + plain["vb"]).mean(),
                               rtol=1e-14, atol=0)
