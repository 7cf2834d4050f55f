"""--run.init_from: a fine-tune starts from another run's model and EMA weights, with a fresh optimizer,
step and data position; from a run / checkpoint / export folder or an official training dict."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from masked_dit.cli import main
from masked_dit.train import Trainer
from tests.train.tiny import cpu_fsdp_skip, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished tiny DiT run (2 steps, checkpoint at step 2) and its final weights."""
    root = tmp_path_factory.mktemp("src")
    trainer = Trainer(tiny_config("digits-dit", root, **{"train.steps": 2}))
    trainer.fit()
    model = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
    ema = {k: v.detach().clone() for k, v in trainer.ema.shadow.items()}
    assert any(not torch.equal(model[k], ema[k]) for k in ema)  # the two differ, so a mix-up shows
    return root / "digits-dit", model, ema


def _fresh(tmp_path, init_from, **over):
    return Trainer(tiny_config("digits-dit", tmp_path, **{"run.name": "ft", "run.init_from": str(init_from), **over}))


def _assert_weights(trainer, model, ema):
    for k, v in trainer.module.state_dict().items():
        assert torch.equal(v, model[k]), k
    for k, v in trainer.ema.shadow.items():
        assert torch.equal(v, ema[k]), k


@pytest.mark.parametrize("where", ["run", "checkpoint"])
def test_from_a_run_or_checkpoint_folder(source, where, tmp_path):
    run, model, ema = source
    target = run if where == "run" else run / "checkpoints" / "step_00000002"
    trainer = _fresh(tmp_path, target)
    _assert_weights(trainer, model, ema)
    assert trainer.step == 0 and not trainer.optimizer.state  # fresh optimizer and step
    trainer.fit()
    assert trainer.step == 3


def test_ema_only_reads_no_raw_weights(source, monkeypatch):
    """`masked-dit sample` of a checkpoint needs the EMA only: DCP is asked for the EMA and the buffers."""
    import torch.distributed.checkpoint as dcp

    from masked_dit.train.build import build_model_from_config
    from masked_dit.train.warm_start import initial_weights

    run, _, ema = source
    asked = []
    real_load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda state, **k: (asked.append({s: set(v) for s, v in state.items()}),
                                                         real_load(state, **k))[1])
    cfg = tiny_config("digits-dit", run.parent)
    model = build_model_from_config(cfg)
    raw, got = initial_weights(str(run), model, ema_only=True)
    params = {n for n, _ in model.named_parameters()}
    assert raw is None and set(got) == set(model.state_dict())
    assert not asked[0]["model"] & params and asked[0]["ema"] == params
    for k in ema:
        assert torch.equal(got[k], ema[k]), k


def test_from_an_export_folder(source, tmp_path):
    run, _, ema = source
    exported = load_file(str(run / "export" / "ema.safetensors"))
    trainer = _fresh(tmp_path, run / "export")
    _assert_weights(trainer, exported, exported)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_from_an_official_training_dict(source, tmp_path):
    """{'model', 'ema', 'opt'} with DDP's 'module.' prefix (MaskDiT / DiT training checkpoints)."""
    _, model, ema = source
    path = tmp_path / "0002000.pt"
    torch.save({"model": {"module." + k: v for k, v in model.items()},
                "ema": {k: v for k, v in model.items() if k not in ema} | ema, "opt": {}, "args": None}, path)
    trainer = _fresh(tmp_path, path)
    _assert_weights(trainer, model, ema)


def test_resume_wins_over_init_from(source, tmp_path):
    run, _, _ = source
    first = _fresh(tmp_path, run, **{"train.steps": 4, "train.ckpt_every": 1})
    first.fit(stop_at=1)
    again = _fresh(tmp_path, run, **{"train.steps": 4, "train.ckpt_every": 1, "run.resume": "latest"})
    assert again.step == 1


def test_bad_init_from_is_one_line(source, tmp_path, capsys):
    run, _, _ = source
    base = ["train", "--preset", "digits-dit", f"--run.out_dir={tmp_path}", "--train.steps=1"]
    assert main([*base, f"--run.init_from={tmp_path / 'nothing'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit train: error: --run.init_from {tmp_path / 'nothing'}: "
                                               "no such file or folder")
    assert main([*base, f"--run.init_from={run}", "--model.hidden_size=64"]) == 2  # another width
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"masked-dit train: error: checkpoint {run}/checkpoints/step_00000002 does not fit DiT-S/2")
    assert "\n" not in err and not (tmp_path / "digits-dit" / "checkpoints").exists()


@pytest.mark.slow
@cpu_fsdp_skip()
def test_fsdp_two_ranks_load_model_and_ema_shards(source, tmp_path):
    """FSDP2 on 2 gloo ranks from the run (model != EMA): with lr 1e-30 (a step moves nothing visible)
    and EMA decay 0.5, the exported EMA is lerp(EMA, model, 0.5) of the source only if both the model
    and the EMA shards loaded (a wrong one would be off by a quarter of their difference or more)."""
    run, model, ema = source
    over = {"run.name": "ft", "run.out_dir": str(tmp_path), "run.init_from": str(run), "optim.lr": 1e-30,
            "optim.ema_decay": 0.5, "parallel.mode": "fsdp", "train.steps": 1, "train.ckpt_every": 1}
    cfg = tiny_config("digits-dit", tmp_path, **over)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "masked_dit",
           "train", "--config", str(tmp_path / "c.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "ft" / "export" / "ema.safetensors"))
    for k, v in ema.items():
        torch.testing.assert_close(got[k], torch.lerp(v, model[k].float(), 0.5), rtol=0, atol=1e-7, msg=k)
