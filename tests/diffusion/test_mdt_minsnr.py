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
