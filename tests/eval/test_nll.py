"""Bits per dimension under a SiT or REPA-SiT model (masked_dit.eval.nll and `masked-dit likelihood`)."""
import json
import math

import pytest
import torch

from masked_dit.cli import main
from masked_dit.diffusion import Transport
from masked_dit.diffusion.objectives import TransportObjective
from masked_dit.eval.nll import bits_per_dim, likelihood_data
from tests.diffusion.test_likelihood import S, exact_model, gaussian_logp


class ExactGaussianNet(torch.nn.Module):
    """The exact velocity network for data N(0, diag(S^2)), with SiT's (x, t, y) interface."""

    def __init__(self, transport):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the device the scorer reads
        self.exact = exact_model(transport)

    def forward(self, x, t, y):
        return self.exact(x, t)


def test_bits_per_dim_is_the_data_density_on_gaussian_data():
    """With the exact flow the likelihood is the data's own density: bits/dim, its standard error and
    the NLL in nats follow from log N(x; 0, diag S^2), batch by batch (10 samples in batches of 4)."""
    objective = TransportObjective("Linear", "velocity")
    x = torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * S
    out = bits_per_dim(objective, ExactGaussianNet(objective.transport), x,
                       torch.zeros(10, dtype=torch.long), batch_size=4, atol=1e-9, rtol=1e-9)
    bpd = -gaussian_logp(x, S ** 2) / (5 * math.log(2))
    assert out["num"] == 10 and out["dims"] == 5
    assert torch.allclose(torch.tensor(out["per_sample_bits_per_dim"], dtype=torch.float64), bpd, rtol=1e-6)
    assert out["bits_per_dim"] == pytest.approx(bpd.mean().item(), rel=1e-6)
    assert out["bits_per_dim_stderr"] == pytest.approx(bpd.std().item() / math.sqrt(10), rel=1e-5)
    assert out["nll_nats"] == pytest.approx(-gaussian_logp(x, S ** 2).mean().item(), rel=1e-6)
    one = bits_per_dim(objective, ExactGaussianNet(objective.transport), x[:1],
                       torch.zeros(1, dtype=torch.long))
    assert one["bits_per_dim_stderr"] is None  # one sample has none (and JSON has no NaN)


class ExactGaussianREPANet(torch.nn.Module):
    """The exact velocity for data N(0, diag(S^2)) in REPA's time (t = 0 data, x_t = a x + s eps), returned
    with projector features as REPA-SiT does: E[a' x + s' eps | x_t] = x_t (a a' S^2 + s s') / (a^2 S^2 + s^2)."""

    def __init__(self, path_type):
        super().__init__()
        self.anchor, self.path_type = torch.nn.Parameter(torch.zeros(())), path_type

    def forward(self, x, t, y):
        from masked_dit.diffusion.repa import repa_interpolant

        a, s, da, ds = repa_interpolant(t.to(x.dtype).view(-1, 1), self.path_type)
        return x * (a * da * S ** 2 + s * ds) / (a ** 2 * S ** 2 + s ** 2), [torch.zeros(len(x), 1, 1)]


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_bits_per_dim_of_a_repa_model_is_the_data_density(path_type):
    """REPA's flow runs in reversed time; scored through SiT's, the exact model again gives the data's density."""
    from masked_dit.diffusion.objectives import REPAObjective

    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * S
    out = bits_per_dim(REPAObjective(path_type=path_type), ExactGaussianREPANet(path_type), x,
                       torch.zeros(6, dtype=torch.long), atol=1e-9, rtol=1e-9)
    bpd = -gaussian_logp(x, S ** 2) / (5 * math.log(2))
    assert torch.allclose(torch.tensor(out["per_sample_bits_per_dim"], dtype=torch.float64), bpd, rtol=1e-6)


def test_bits_per_dim_refuses_objectives_without_a_flow():
    from masked_dit.diffusion.objectives import ADMObjective

    with pytest.raises(ValueError, match=r"^the probability-flow likelihood needs an interpolant model \(objective "
                                         r"transport or repa\), not adm$"):
        bits_per_dim(ADMObjective(), ExactGaussianNet(Transport("Linear", "velocity")), torch.zeros(1, 5),
                     torch.zeros(1, dtype=torch.long))


def test_likelihood_data_takes_the_held_out_digits_by_default():
    from masked_dit.configs import get_preset
    from masked_dit.data import load_digits_tensor

    cfg = get_preset("digits-sit")
    x, y, what = likelihood_data(cfg.data, cfg.model, None, None, 0)
    images, labels = load_digits_tensor("heldout", cfg.data.image_size)
    assert what == "heldout digits" and torch.equal(x, images) and torch.equal(y, labels)
    x, _, what = likelihood_data(cfg.data, cfg.model, "train", 5, 0)
    assert what == "train digits" and torch.equal(x, load_digits_tensor("train", cfg.data.image_size)[0][:5])
    cfg.data.source, cfg.data.path = "latents", "somewhere"
    with pytest.raises(ValueError, match=r"^--split heldout: splits are the embedded digits'; this run's data is "
                                         r"--data.source=latents"):
        likelihood_data(cfg.data, cfg.model, "heldout", None, 0)


def test_likelihood_command_scores_a_sit_run(tmp_path, capsys):
    """`masked-dit likelihood` on a trained SiT run: the held-out digits' bits/dim, reproducible for a
    seed, with the run's ODE unless one is given; the JSON holds the per-sample figures and settings."""
    from masked_dit.train import Trainer
    from tests.train.tiny import tiny_config

    Trainer(tiny_config("digits-sit", tmp_path, **{"train.steps": 30, "train.ckpt_every": 30})).fit()
    run = tmp_path / "digits-sit"

    def score(name, *options):
        out = tmp_path / f"{name}.json"
        assert main(["likelihood", str(run), "--out", str(out), "--num-samples", "3", "--device", "cpu",
                     *options]) == 0
        return json.loads(out.read_text())

    first = score("a")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{first['bits_per_dim']:.4f} ± ") and "bits/dim over 3 heldout digits (dopri5)" in line
    assert first["num"] == 3 and len(first["per_sample_bits_per_dim"]) == 3 and first["dims"] == 256
    assert math.isfinite(first["bits_per_dim"]) and first["data"] == "heldout digits"
    assert (first["ode_method"], first["atol"], first["rtol"], first["precision"]) == ("dopri5", 1e-6, 1e-3, "fp32")
    assert score("b") == first  # same seed: the same Hutchinson draws
    euler = score("euler", "--ode-method", "euler", "--steps", "8")
    assert euler["ode_method"] == "euler" and euler["bits_per_dim"] != first["bits_per_dim"]
    assert score("seed", "--seed", "1")["bits_per_dim"] != first["bits_per_dim"]


def test_likelihood_command_on_an_official_checkpoint_needs_data(tmp_path, capsys):
    """An official checkpoint brings no data: one line asks for --data-path; a folder that is not
    latents gives the latents' own one-line error; extracted latents are scored (one posterior draw each)."""
    from masked_dit.data import extract_latents
    from masked_dit.models import build_model
    from tests.data.test_encoders import _Images, _PoolVAE

    kwargs = {"depth": 1, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 3, "num_classes": 2}
    torch.save(build_model("SiT-S/2", **kwargs).state_dict(), tmp_path / "sit.pt")
    base = ["likelihood", str(tmp_path / "sit.pt"), "--model", "SiT-S/2", "--model-kwargs", json.dumps(kwargs),
            "--out", str(tmp_path / "n.json"), "--device", "cpu", "--ode-method", "euler", "--steps", "4"]
    capsys.readouterr()
    assert main(base) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit likelihood: error: {tmp_path / 'sit.pt'} names no data "
                                               f"to score: pass --data-path (latents made by `masked-dit "
                                               f"extract-latents`)")
    assert main([*base, "--data-path", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit likelihood: error: no manifest.json in "
                                               f"'{tmp_path / 'none'}': run `masked-dit extract-latents` first")
    assert not (tmp_path / "n.json").exists()
    extract_latents(_Images(), tmp_path / "latents", _PoolVAE(), shard_size=4, batch_size=2, progress=False)
    assert main([*base, "--data-path", str(tmp_path / "latents")]) == 0
    out = json.loads((tmp_path / "n.json").read_text())
    assert out["num"] == 6 and out["dims"] == 3 * 8 * 8 and math.isfinite(out["bits_per_dim"])
    assert out["data"] == f"latents {tmp_path / 'latents'}"


def test_likelihood_command_scores_a_repa_run(tmp_path):
    """REPA-SiT runs (REPA's reversed time) are scored through the same flow; the digits' labels condition it."""
    from masked_dit.train import Trainer
    from tests.train.tiny import tiny_config

    Trainer(tiny_config("digits-repa-sit", tmp_path, **{"train.steps": 2, "train.ckpt_every": 2})).fit()
    out = tmp_path / "n.json"
    assert main(["likelihood", str(tmp_path / "digits-repa-sit"), "--out", str(out), "--num-samples", "2", "--device",
                 "cpu", "--ode-method", "euler", "--steps", "4"]) == 0
    result = json.loads(out.read_text())
    assert result["num"] == 2 and math.isfinite(result["bits_per_dim"]) and result["ode_method"] == "euler"
