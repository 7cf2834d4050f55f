"""The ``masked-dit`` command: default training end to end (reduced steps), sampling, errors."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from masked_dit.cli import main


def test_default_train_then_sample(tmp_path, capsys):
    # the embedded default (MDTv2 on digits), shortened: 2 steps, 5 sampling steps, 2 per class
    rc = main(["train", f"--run.out_dir={tmp_path}", "--train.steps=2", "--train.global_batch=16",
               "--sample.steps=5", "--sample.num_per_class=2", "--train.progress=false"])
    assert rc == 0
    run = tmp_path / "digits-mdtv2"
    for name in ("config.json", "metrics.jsonl", "samples.png", "export/ema.safetensors", "export/config.json"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "step_00000002" / "meta.json").exists()
    assert json.loads((run / "config.json").read_text())["objective"]["kind"] == "mdtv2"
    grid = Image.open(run / "samples.png")
    assert grid.height > 10 * 16  # ten labelled rows of digits

    rc = main(["sample", str(run), "--out", str(tmp_path / "s.npz"), "--num", "3", "--steps", "3",
               "--batch-size", "2", "--device", "cpu"])
    assert rc == 0
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].dtype == np.uint8  # ADM evaluator layout
    assert npz["arr_1"].shape == (3,) and npz["arr_1"].max() < 10
    rc = main(["sample", str(run), "--out", str(tmp_path / "g.png"), "--per-class", "1", "--classes", "3", "7",
               "--steps", "2", "--sampler", "ddim", "--cfg-scale", "1.5", "--device", "cpu"])
    assert rc == 0 and (tmp_path / "g.png").exists()


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    # the default run folder is ./runs/<name>: after the README's `masked-dit train` in the repo root it holds
    # checkpoints, and the run-folder error came before the data error checked here
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--optim.name=sgd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "masked-dit train: error: --optim.name='sgd' is not valid; choose one of: adamw, adan"
    assert main(["train", "--data.source=folder", f"--data.path={tmp_path / 'none'}", "--model.in_channels=3"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["train", "--list-presets"]) == 0
    assert "imagenet256-mdtv2-xl2" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "masked_dit", "train", "--print-config", "--train.steps=7"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["train"]["steps"] == 7


def test_sample_official_checkpoint(tmp_path):
    """An official-layout checkpoint (``{'ema': state_dict}``) sampled with --model and --model-kwargs."""
    import torch

    from masked_dit.models import build_model
    kw = {"depth": 1, "hidden_size": 32, "num_heads": 2, "in_channels": 1, "num_classes": 10}
    torch.manual_seed(0)
    model = build_model("DiT-S/4", input_size=16, **kw)
    torch.save({"model": model.state_dict(), "ema": model.state_dict()}, tmp_path / "ckpt.pt")
    rc = main(["sample", str(tmp_path / "ckpt.pt"), "--model", "DiT-S/4", "--model-kwargs", json.dumps(kw),
               "--out", str(tmp_path / "o.png"), "--per-class", "1", "--steps", "2", "--device", "cpu"])
    assert rc == 0 and (tmp_path / "o.png").exists()


def test_sample_official_mdt_checkpoint_at_its_own_input_size(tmp_path):
    """An official MDT checkpoint at another size than the preset's 32x32 latents samples at its own
    size (read off pos_embed); the CLI used to take the preset's 32, and the model refused the noise."""
    import torch

    from masked_dit.models import build_model
    for name in ("MDTv2-S/2", "MDTv1-S/2"):
        kw = {"depth": 4, "hidden_size": 32, "num_heads": 2, "num_classes": 10, "decode_layer": 2}
        torch.manual_seed(0)
        model = build_model(name, input_size=8, **kw)
        assert model.input_size == 8
        torch.save(model.state_dict(), tmp_path / "mdt.pt")
        out = tmp_path / f"{name[:5]}.npz"
        rc = main(["sample", str(tmp_path / "mdt.pt"), "--model", name, "--model-kwargs", json.dumps(kw),
                   "--out", str(out), "--num-samples", "2", "--steps", "2", "--cfg-scale", "2", "--device", "cpu"])
        assert rc == 0 and np.load(out)["arr_0"].shape == (2, 8, 8, 3), name


def test_sample_an_unfinished_run_and_a_checkpoint(tmp_path):
    """Before the export exists, `sample <run>` takes the newest checkpoint's EMA weights (FID during
    training); a checkpoint folder works too; both equal sampling a model holding those weights."""
    import torch

    from masked_dit.train import Trainer
    from tests.train.tiny import tiny_config

    trainer = Trainer(tiny_config("digits-dit", tmp_path, **{"train.steps": 4, "train.ckpt_every": 1}))
    trainer.fit(stop_at=2)
    run = tmp_path / "digits-dit"
    assert not (run / "export").exists()
    common = ["--out", None, "--num-samples", "2", "--steps", "2", "--device", "cpu", "--precision", "fp32"]
    outs = []
    for i, source in enumerate([run, run / "checkpoints" / "step_00000002"]):
        argv = ["sample", str(source), *common]
        argv[argv.index(None)] = str(tmp_path / f"{i}.npz")
        assert main(argv) == 0
        outs.append(np.load(tmp_path / f"{i}.npz")["arr_0"])
    assert np.array_equal(outs[0], outs[1])
    # the same weights through an official-style file give the same samples
    from safetensors.torch import save_file
    ema = {k: v.contiguous() for k, v in trainer.ema.full_state_dict(trainer.module).items()}
    save_file(ema, str(tmp_path / "ema.safetensors"))
    kwargs = json.dumps(trainer.model_kwargs)
    assert main(["sample", str(tmp_path / "ema.safetensors"), "--model", trainer.model_name, "--model-kwargs", kwargs,
                 "--out", str(tmp_path / "2.npz"), "--num-samples", "2", "--steps", "2", "--device", "cpu",
                 "--precision", "fp32", "--sampler", "ddpm", "--cfg-scale",
                 str(trainer.cfg.sample.cfg_scale)]) == 0
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "2.npz")["arr_0"]), torch.from_numpy(outs[0]))


def test_sample_a_finished_run_extended_and_stopped_takes_its_newest_checkpoint(tmp_path, capsys):
    """A finished run has an export (its end's EMA); extended (--train.steps) and stopped, its newest
    checkpoint is past that export: `sample <run>` takes the checkpoint (it took the stale export), as
    --run.init_from does, and says so. An export written before it recorded its step counts as its run's end."""
    from masked_dit.train import Trainer
    from tests.train.tiny import tiny_config

    Trainer(tiny_config("digits-dit", tmp_path, **{"train.steps": 2, "train.ckpt_every": 1})).fit()
    run = tmp_path / "digits-dit"
    assert json.loads((run / "export" / "config.json").read_text())["step"] == 2
    Trainer(tiny_config("digits-dit", tmp_path, **{"train.steps": 5, "train.ckpt_every": 1,
                                                    "run.resume": "latest"})).fit(stop_at=3)
    common = ["--num-samples", "2", "--steps", "2", "--device", "cpu", "--precision", "fp32", "--out"]
    outs = {}
    for name, source in [("run", run), ("step3", run / "checkpoints" / "step_00000003"), ("export", run / "export")]:
        capsys.readouterr()
        assert main(["sample", str(source), *common, str(tmp_path / f"{name}.npz")]) == 0
        outs[name] = np.load(tmp_path / f"{name}.npz")["arr_0"]
        if name == "run":
            assert "checkpoint step 3 is past the export's step 2: sampling the checkpoint's EMA" in capsys.readouterr().err
    assert np.array_equal(outs["run"], outs["step3"]) and not np.array_equal(outs["run"], outs["export"])
    info = json.loads((run / "export" / "config.json").read_text())
    del info["step"]  # an older export: its run_config's train.steps (2) is its step
    (run / "export" / "config.json").write_text(json.dumps(info))
    assert main(["sample", str(run), *common, str(tmp_path / "old.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "old.npz")["arr_0"], outs["step3"])


def test_a_model_name_over_a_presets_pinned_sizes_says_so(capsys):
    """--model.name picks the family; the digits presets pin a tiny size, which stays unless given too: a
    name of another size (DiT-B/8) trained width 96 without a word."""
    assert main(["train", "--preset", "digits-dit", "--model.name=DiT-B/8", "--print-config"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["model"]["depth"] == 6
    assert out.err.strip() == ("masked-dit train: warning: --model.name=DiT-B/8 keeps digits-dit's model depth=6 (the "
                               "name's 12), hidden_size=96 (the name's 768), num_heads=4 (the name's 12), "
                               "patch_size=4 (the name's 8): pass --model.<key>=none for the name's")
    sizes = ["--model.depth=none", "--model.hidden_size=none", "--model.num_heads=none", "--model.patch_size=none"]
    assert main(["train", "--preset", "digits-dit", "--model.name=DiT-B/8", *sizes, "--print-config"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["model"]["depth"] is None and out.err == ""
    assert main(["train", "--preset", "digits-dit", "--model.name=SiT-S/2", "--objective.kind=transport",
                 "--sample.sampler=ode", "--model.depth=6", "--model.hidden_size=96", "--model.num_heads=4",
                 "--model.patch_size=4", "--print-config"]) == 0
    assert capsys.readouterr().err == ""  # every size given: nothing kept silently


def test_config_error_is_said_once_under_torchrun(tmp_path, capsys, monkeypatch):
    """Every torchrun rank validates the same argv: rank 0 prints the line, the others only exit 2.
    Errors that may differ per rank (a file missing on one node) are still printed by every rank."""
    from masked_dit.train import trainer
    from masked_dit.train.dist import World

    argv = ["train", "--preset", "digits-dit", f"--run.out_dir={tmp_path}", "--optim.lr=-1"]
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun starts the ranks, without the process group
    monkeypatch.setattr(trainer, "init_world", lambda device="auto": World(rank=3, local_rank=3, size=4))
    for rank, printed in (("0", True), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert (err.splitlines()[-1].startswith("masked-dit train: error: --optim.lr") if printed else err == ""), err
    monkeypatch.setenv("RANK", "3")
    assert main(["train", "--preset", "digits-dit", f"--run.out_dir={tmp_path}", "--data.source=folder",
                 f"--data.path={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "digits-dit").exists()


def _trained_sampler(preset: str, tmp_path, **overrides):
    """Trains a tiny ``preset`` run for 30 steps (past the zero init); returns ``draw(name, *options)``: two
    samples of ``masked-dit sample`` (4 steps, fp32, CPU) from it, as an array."""
    from masked_dit.train import Trainer
    from tests.train.tiny import tiny_config

    Trainer(tiny_config(preset, tmp_path, **{"train.steps": 30, "train.ckpt_every": 30, **overrides})).fit()

    def draw(name, *options):
        out = tmp_path / f"{name}.npz"
        assert main(["sample", str(tmp_path / preset), "--out", str(out), "--num-samples", "2", "--steps", "4",
                     "--device", "cpu", "--precision", "fp32", *options]) == 0
        return np.load(out)["arr_0"]

    return draw


def test_sample_takes_sits_ode_and_sde_options(tmp_path):
    """`masked-dit sample` on a SiT run: SiT's sample.py options (--ode-method, --sde-method, --diffusion-form,
    --last-step, ...) reach the samplers; left out, the run's --sample.* values (SiT's defaults) apply."""
    draw = _trained_sampler("digits-sit", tmp_path)
    assert np.array_equal(draw("euler", "--sampler", "euler"), draw("ode-euler", "--sampler", "ode", "--ode-method", "euler"))
    assert not np.array_equal(draw("euler2", "--sampler", "euler"), draw("midpoint", "--sampler", "ode", "--ode-method", "midpoint"))
    sde = draw("sde", "--sampler", "sde")
    assert np.array_equal(sde, draw("sde-defaults", "--sampler", "sde", "--sde-method", "Euler", "--diffusion-form",
                                    "sigma", "--last-step", "Mean", "--last-step-size", "0.04"))
    assert not np.array_equal(sde, draw("sde-sbdm", "--sampler", "sde", "--diffusion-form", "SBDM", "--last-step", "None"))
    # "None" given is SDE's no-last-step (it used to read as "not given": the run's Mean)
    assert not np.array_equal(sde, draw("sde-none", "--sampler", "sde", "--last-step", "None"))


def test_sample_takes_maskdits_edm_sampler_options(tmp_path, capsys):
    """`masked-dit sample` on a MaskDiT run: MaskDiT's / EDM's sample.py options (--S-churn, --discretization,
    --schedule, --scaling, ...) reach EDM's sampler, --sampler euler is its Euler solver; left out, the run's
    --sample.* values apply (here a run trained with --sample.discretization=ve)."""
    draw = _trained_sampler("digits-maskdit", tmp_path, **{"sample.discretization": "ve"})
    run = tmp_path / "digits-maskdit"
    runs = draw("runs", "--sampler", "heun")
    assert np.array_equal(runs, draw("ve", "--discretization", "ve", "--S-churn", "0", "--schedule", "linear"))
    assert not np.array_equal(runs, draw("edm", "--discretization", "edm"))
    assert not np.array_equal(runs, draw("euler", "--sampler", "euler"))
    assert not np.array_equal(runs, draw("vp", "--discretization", "vp", "--schedule", "vp", "--scaling", "vp"))
    churn = draw("churn", "--S-churn", "10", "--S-noise", "1.007")
    assert np.array_equal(churn, draw("churn2", "--S-churn", "10", "--S-noise", "1.007"))  # the seed's draws
    assert not np.array_equal(churn, runs)
    capsys.readouterr()
    assert main(["sample", str(run), "--out", str(tmp_path / "g.png"), "--device", "cpu", "--S-min", "5",
                 "--S-max", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("masked-dit sample: error: --S-min 5.0 must be <= --S-max 1.0 (churn "
                                               "applies for sigma in [S_min, S_max])")
    for options, message in [(["--discretization", "vp", "--rho", "3"],
                              "--rho is the Karras grid's exponent: --discretization vp does not read it"),
                             (["--S-noise", "1.003"], "--S-noise bounds or scales churn, which --S-churn 0 turns off")]:
        assert main(["sample", str(run), "--out", str(tmp_path / "g.png"), "--device", "cpu", *options]) == 2
        assert capsys.readouterr().err.strip() == f"masked-dit sample: error: {message}"


def test_sample_takes_ddim_eta(tmp_path):
    """`masked-dit sample` on a DiT run: --eta reaches ADM's DDIM; left out, the run's --sample.eta applies
    (here a run trained with --sample.sampler=ddim --sample.eta=0.5); a stochastic eta follows the seed."""
    draw = _trained_sampler("digits-dit", tmp_path, **{"sample.sampler": "ddim", "sample.eta": 0.5})
    runs = draw("runs")
    assert np.array_equal(runs, draw("given", "--sampler", "ddim", "--eta", "0.5"))
    assert not np.array_equal(runs, draw("seed1", "--seed", "1"))
    deterministic = draw("eta0", "--eta", "0")
    assert not np.array_equal(runs, deterministic)
    assert not np.array_equal(deterministic, draw("ddpm", "--sampler", "ddpm"))


def test_sit_options_the_sampler_does_not_read_are_refused(tmp_path, capsys):
    from masked_dit.train import Trainer
    from tests.train.tiny import tiny_config

    Trainer(tiny_config("digits-sit", tmp_path, **{"train.steps": 1})).fit()
    base = ["sample", str(tmp_path / "digits-sit"), "--out", str(tmp_path / "g.png"), "--device", "cpu"]
    capsys.readouterr()
    for options, message in [(["--sampler", "euler", "--ode-method", "rk4"],
                              "--ode-method is read by the ode sampler only (this run samples with euler)"),
                             (["--sampler", "ode", "--diffusion-form", "SBDM"],
                              "--diffusion-form is read by the sde sampler only (this run samples with ode)"),
                             (["--sampler", "sde", "--atol", "1e-5"],
                              "--atol is read by the ode sampler only (this run samples with sde)"),
                             (["--sampler", "ode", "--last-step", "None"],
                              "--last-step is read by the sde sampler only (this run samples with ode)"),
                             (["--sampler", "ode", "--ode-method", "euler", "--rtol", "1e-2"],
                              "--rtol is a step-size tolerance: --ode-method euler takes fixed steps (adaptive: "
                              "dopri5, dopri8, bosh3, fehlberg2, adaptive_heun)"),
                             (["--cfg-scale", "2", "--scale-pow", "1"], "--scale-pow sets MDT's power-cosine "
                              "schedule: it applies to that family only (objective transport)"),
                             (["--cfg-scale", "2", "--guidance-high", "0.7"], "--guidance-high sets REPA's guidance "
                              "interval: it applies to that family only (objective transport)")]:
        assert main([*base, *options]) == 2
        assert capsys.readouterr().err.strip() == f"masked-dit sample: error: {message}"
    assert not (tmp_path / "g.png").exists()
