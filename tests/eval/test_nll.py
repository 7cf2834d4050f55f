"""Bits per dimension under a SiT or REPA-SiT model (masked_dit.eval.nll and `masked-dit likelihood`)."""
import json
import math
from types import SimpleNamespace

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
    dataset, what = likelihood_data(cfg.data, cfg.model, None)
    images, labels = load_digits_tensor("heldout", cfg.data.image_size)
    assert what == "heldout digits" and len(dataset) == len(labels) == 297
    assert torch.equal(dataset[5]["x"], images[5]) and dataset[5]["y"] == labels[5]
    dataset, what = likelihood_data(cfg.data, cfg.model, "train")
    assert what == "train digits" and torch.equal(dataset[0]["x"], load_digits_tensor("train", cfg.data.image_size)[0][0])
    cfg.data.source, cfg.data.path = "latents", "somewhere"
    with pytest.raises(ValueError, match=r"^--split heldout: splits are the embedded digits'; this run's data is "
                                         r"--data.source=latents"):
        likelihood_data(cfg.data, cfg.model, "heldout")


class CountingNet(torch.nn.Module):
    """A small nonlinear velocity net (dense Jacobian: Hutchinson's estimate depends on its draws)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = torch.nn.Parameter(torch.randn(5, 8, generator=g) / 2)
        self.w2 = torch.nn.Parameter(torch.randn(8, 4, generator=g) / 4)
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        h = torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)
        return (torch.tanh(h @ self.w1) @ self.w2).reshape(x.shape) - x + 0.1 * y[:, None].to(x.dtype)


def test_score_batches_same_figures_for_any_ranks_and_across_a_resume(tmp_path):
    """Batch b draws from its own (seed, b) generator: two ranks writing one parts folder, a resume that
    finds some batches done, and one pass in memory give the same log-likelihoods; done batches are not
    recomputed, and a parts folder made with other settings is refused."""
    from masked_dit.eval.generate import PartsFolder
    from masked_dit.eval.nll import score_batches

    g = torch.Generator().manual_seed(0)
    dataset = [{"x": torch.randn(4, generator=g), "y": torch.tensor(i % 3)} for i in range(5)]
    obj, net = TransportObjective("Linear", "velocity"), CountingNet()
    kw = dict(batch_size=2, method="euler", steps=4, seed=3)
    whole = score_batches(obj, net, dataset, 5, **kw)
    per_batch = net.calls // 3
    assert whole.shape == (5,) and whole.dtype == torch.float64
    assert not torch.equal(whole, score_batches(obj, net, dataset, 5, **{**kw, "seed": 4}))

    out = tmp_path / "n.json"
    rank = lambda r: SimpleNamespace(rank=r, size=2, is_main=r == 0, distributed=False)  # noqa: E731
    PartsFolder(out, {"k": 1}).open(is_main=True)  # rank 0's settings.json precedes every batch (a barrier)
    assert score_batches(obj, net, dataset, 5, parts=PartsFolder(out, {"k": 1}), world=rank(1), **kw) is None
    parts = PartsFolder(out, {"k": 1})
    assert parts.done(1) and not parts.done(0) and not parts.done(2)
    assert torch.equal(score_batches(obj, net, dataset, 5, parts=parts, world=rank(0), **kw), whole)

    parts.path(2).unlink()  # as if killed before the last batch
    net.calls = 0
    assert torch.equal(score_batches(obj, net, dataset, 5, parts=parts, **kw), whole)
    assert net.calls == per_batch  # batches 0 and 1 were read back, not recomputed
    with pytest.raises(ValueError, match=r"^likelihood: ranks hand their batches to rank 0 through a parts"):
        score_batches(obj, net, dataset, 5, world=rank(0), **kw)
    with pytest.raises(ValueError, match=r"holds batches made with other settings \(k differ\)"):
        score_batches(obj, net, dataset, 5, parts=PartsFolder(out, {"k": 2}), **kw)


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
    assert not (tmp_path / "a.json.parts").exists()  # kept only until the summary is written
    (tmp_path / "stale.json.parts").mkdir()
    (tmp_path / "stale.json.parts" / "settings.json").write_text('{"seed": 7}')
    torch.save({}, tmp_path / "stale.json.parts" / "batch_000000.npz")  # one batch done with those settings
    assert main(["likelihood", str(run), "--out", str(tmp_path / "stale.json"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"masked-dit likelihood: error: {tmp_path}/stale.json.parts "
                                                      f"holds batches made with other settings (")
    (tmp_path / "stale.json.parts" / "batch_000000.npz").unlink()  # none done: the new settings take it over
    assert score("stale", "--ode-method", "euler", "--steps", "8")["num"] == 3
    capsys.readouterr()
    assert main(["likelihood", str(run), "--out", str(tmp_path / "r.json"), "--device", "cpu", "--num-samples", "1",
                 "--rtol", "1e200"]) == 2  # tolerances no step can meet: one line, not the solver's traceback
    assert capsys.readouterr().err.strip().startswith("masked-dit likelihood: error: dopri5 step size underflow or "
                                                      "non-finite (dt=nan)")
    euler = score("euler", "--ode-method", "euler", "--steps", "8")
    assert score("euler2", "--ode-method", "euler", "--steps", "8") == euler  # same seed: the same draws
    assert euler["ode_method"] == "euler" and euler["bits_per_dim"] != first["bits_per_dim"]
    assert score("seed", "--ode-method", "euler", "--steps", "8", "--seed", "1")["bits_per_dim"] != euler["bits_per_dim"]
    capsys.readouterr()
    assert main(["likelihood", str(run), "--out", str(tmp_path / "t.json"), "--device", "cpu", "--ode-method", "euler",
                 "--atol", "1e-2"]) == 2  # a fixed-step method: the tolerance would be ignored (and recorded)
    assert capsys.readouterr().err.strip().startswith("masked-dit likelihood: error: --atol is a step-size tolerance")


KWARGS = {"depth": 1, "hidden_size": 32, "num_heads": 2, "input_size": 8, "in_channels": 3, "num_classes": 2}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A small SiT checkpoint file (official layout) and latents extracted from six images."""
    from masked_dit.data import extract_latents
    from masked_dit.models import build_model
    from tests.data.test_encoders import _Images, _PoolVAE

    root = tmp_path_factory.mktemp("official")
    torch.save(build_model("SiT-S/2", **KWARGS).state_dict(), root / "sit.pt")
    extract_latents(_Images(), root / "latents", _PoolVAE(), shard_size=4, batch_size=2, progress=False)
    return root


def _official_argv(root, out, *extra):
    return ["likelihood", str(root / "sit.pt"), "--model", "SiT-S/2", "--model-kwargs", json.dumps(KWARGS),
            "--out", str(out), "--device", "cpu", "--ode-method", "euler", "--steps", "4", *extra]


def test_likelihood_command_on_an_official_checkpoint_needs_data(official, tmp_path, capsys):
    """An official checkpoint brings no data: one line asks for --data-path; a folder that is not
    latents gives the latents' own one-line error; extracted latents are scored (one posterior draw each)."""
    base = _official_argv(official, tmp_path / "n.json")
    capsys.readouterr()
    assert main(base) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit likelihood: error: {official / 'sit.pt'} names no data "
                                               f"to score: pass --data-path (latents made by `masked-dit "
                                               f"extract-latents`)")
    assert main([*base, "--data-path", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit likelihood: error: no manifest.json in "
                                               f"'{tmp_path / 'none'}': run `masked-dit extract-latents` first")
    assert not (tmp_path / "n.json").exists()
    assert main([*base, "--data-path", str(official / "latents")]) == 0
    out = json.loads((tmp_path / "n.json").read_text())
    assert out["num"] == 6 and out["dims"] == 3 * 8 * 8 and math.isfinite(out["bits_per_dim"])
    assert out["data"] == f"latents {official / 'latents'}"


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_figures(official, tmp_path):
    """Two ranks share the batches (gloo on CPU) and give the single process's figures exactly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    options = ("--data-path", str(official / "latents"), "--batch-size", "2")
    assert main(_official_argv(official, tmp_path / "one.json", *options)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "masked_dit",
           *_official_argv(official, tmp_path / "two.json", *options)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two == one and two["num"] == 6


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


def test_resume_refuses_other_weights_and_names_a_damaged_batch(tmp_path, capsys, monkeypatch):
    """A likelihood run killed after one batch resumes only with the same weights (the run trained on
    meanwhile must not mix old and new figures), and a batch file damaged since is named in one line."""
    import masked_dit.diffusion.likelihood as lik
    from safetensors.torch import load_file, save_file

    from masked_dit.train import Trainer
    from tests.train.tiny import tiny_config

    Trainer(tiny_config("digits-sit", tmp_path, **{"train.steps": 2, "train.ckpt_every": 2})).fit()
    run, out = tmp_path / "digits-sit", tmp_path / "n.json"
    argv = ["likelihood", str(run), "--out", str(out), "--device", "cpu", "--num-samples", "3", "--batch-size", "1",
            "--ode-method", "euler", "--steps", "3"]
    real, calls = lik.ode_likelihood, []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lik, "ode_likelihood", dies_after_one)
    assert main(argv) == 130
    assert sorted(p.name for p in (tmp_path / "n.json.parts").iterdir()) == ["batch_000000.npz", "settings.json"]
    monkeypatch.setattr(lik, "ode_likelihood", real)
    ema = run / "export" / "ema.safetensors"
    weights = load_file(str(ema))
    save_file({k: v + 1e-3 if k == "final_layer.linear.bias" else v for k, v in weights.items()}, str(tmp_path / "e"))
    (tmp_path / "e").replace(ema)  # the run moved on
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit likelihood: error: {tmp_path}/n.json.parts holds batches "
                                               f"made with other settings (weights differ): remove it or choose "
                                               f"another --out")
    save_file(weights, str(tmp_path / "e"))
    (tmp_path / "e").replace(ema)  # the weights it started with
    (tmp_path / "n.json.parts" / "batch_000000.npz").write_bytes(b"PK\x03")  # damaged since
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit likelihood: error: {tmp_path}/n.json.parts/batch_000000.npz "
                                               f"is damaged (not a readable batch): remove it and run again to redo "
                                               f"that batch")
    (tmp_path / "n.json.parts" / "batch_000000.npz").unlink()
    assert main(argv) == 0 and json.loads(out.read_text())["num"] == 3
