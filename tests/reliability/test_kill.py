"""Kill -9 anywhere: a real ``masked-dit train`` process SIGKILLed at 20 seeded random moments and
at every step of a checkpoint write never leaves an unreadable latest checkpoint, and
``--resume latest`` continues with the losses (and final EMA weights) of an uninterrupted run.
"""
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.reliability.common import FAULTY, REPO, child_env, cli_args, load_latest, records, run_cli, tiny_config

STEPS = 100
RANDOM_KILLS = 20
# Exact points inside a checkpoint save / the end of the run (see faulty_train.py).
TARGETED = ["dcp_save:2", "rank_file:2", "meta:2", "rmtree:1", "rmtree:3", "export:1"]


def _kill_after(args, delay_from_start: float | None, delay_from_step: float | None, timeout=60):
    """Starts the CLI and SIGKILLs it ``delay_from_start`` s after launch, or ``delay_from_step`` s
    after its first logged step; returns (returncode, stderr)."""
    proc = subprocess.Popen([sys.executable, FAULTY, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=child_env(), cwd=REPO)
    stepped = threading.Event()
    lines = []

    def read():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(("step ", "resumed from", "done:")):
                stepped.set()  # a step was logged (or, for a finished run, there are none to wait for)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if delay_from_start is not None:
            time.sleep(delay_from_start)
        else:
            deadline = time.monotonic() + timeout
            while not stepped.wait(0.05) and proc.poll() is None and time.monotonic() < deadline:
                pass
            time.sleep(delay_from_step)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    return proc.returncode, "".join(lines)


@pytest.mark.slow
def test_kill_anywhere_then_resume_latest(tmp_path):
    ref = run_cli(cli_args(tmp_path / "ref", **{"train.steps": STEPS}))
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_loss = {r["step"]: r["loss"] for r in records(tmp_path / "ref" / "digits-dit")}
    assert sorted(ref_loss) == list(range(1, STEPS + 1))

    args = cli_args(tmp_path / "victim", **{"train.steps": STEPS}) + ["--resume", "latest"]
    cfg = tiny_config(tmp_path / "victim", **{"train.steps": STEPS})
    rng = random.Random(0)
    plan = [("random", i) for i in range(RANDOM_KILLS)]
    plan[4:4] = [("targeted", t) for t in TARGETED[:-1]]  # mid-run: inside checkpoint saves and deletes
    plan.append(("targeted", TARGETED[-1]))               # the export at the end of the run
    latest, killed = 0, 0
    for kind, what in plan:
        if kind == "random":
            # Half the kills land during start-up / checkpoint loading, half during steps and saves.
            if rng.random() < 0.3:
                code, err = _kill_after(args, rng.uniform(0.2, 4.0), None)
            else:
                code, err = _kill_after(args, None, rng.uniform(0.0, 0.5))
        else:
            proc = run_cli(args, kill=what)
            code, err = proc.returncode, proc.stderr
        assert code in (0, -signal.SIGKILL), f"{kind} {what}: exit {code}\n{err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
        killed += code == -signal.SIGKILL
        step = load_latest(cfg)  # the newest complete checkpoint always loads
        assert step is not None or latest == 0, f"after {kind} {what}: checkpoints lost"
        assert (step or 0) >= latest, f"after {kind} {what}: latest went back from {latest} to {step}"
        latest = step or 0
        print(kind, what, code, latest, flush=True)
    assert killed >= RANDOM_KILLS

    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-2000:]
    got = records(tmp_path / "victim" / "digits-dit")
    assert {r["step"] for r in got} == set(ref_loss)
    for r in got:  # every record, re-done steps included, has the uninterrupted run's loss
        assert r["loss"] == ref_loss[r["step"]], (r["step"], r["loss"], ref_loss[r["step"]])
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "ref" / "digits-dit" / "export" / "ema.safetensors"))
    b = load_file(str(tmp_path / "victim" / "digits-dit" / "export" / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latest_skips_a_damaged_checkpoint(tmp_path):
    """A newest checkpoint damaged after the fact (a shard truncated on disk) is skipped with a
    warning; an explicit --resume of it names the damaged file."""
    from masked_dit.train import checkpoint as ckpt
    from masked_dit.train import train

    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.progress": False})
    train(cfg)
    root = tmp_path / "digits-dit" / "checkpoints"
    newest = root / "step_00000002"
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.warns(UserWarning, match="step_00000002 is damaged: __0_0.distcp is missing or truncated"):
        assert ckpt.resolve_resume("latest", root, world_size=1) == root / "step_00000001"
    with pytest.raises(ValueError, match="is damaged: __0_0.distcp"):
        ckpt.resolve_resume(str(newest), root, world_size=1)


def test_delete_unmarks_first(tmp_path, monkeypatch):
    """remove_checkpoint takes meta.json away before any shard, so a kill mid-delete cannot leave a
    'complete' checkpoint with missing files."""
    import shutil

    from masked_dit.train import checkpoint as ckpt

    folder = tmp_path / "step_00000003"
    folder.mkdir()
    for name in ("meta.json", "__0_0.distcp", ".metadata"):
        (folder / name).write_text("x")
    seen = []
    monkeypatch.setattr(shutil, "rmtree", lambda p, **k: seen.append(sorted(q.name for q in p.iterdir())))
    ckpt.remove_checkpoint(folder)
    assert seen == [[".metadata", "__0_0.distcp"]]  # meta.json was already gone when the shards went
    assert ckpt.list_checkpoints(tmp_path) == []
