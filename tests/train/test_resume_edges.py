"""Resume edge cases: checkpoints of an abandoned trajectory, resumes with another world size."""
import re

import pytest
import torch

from masked_dit.train import Trainer
from masked_dit.train import checkpoint as ckpt
from tests.train.tiny import assert_same_weights_and_ema, full_and_resumed, tiny_config


@pytest.mark.parametrize("keep_last", [1, 2])
def test_resume_from_an_older_checkpoint_makes_its_saves_the_latest(tmp_path, keep_last):
    """Resumed from an older checkpoint (backing off a divergence), the run's own saves must be what
    --resume latest continues, and retention must never delete the checkpoint it just wrote. Before the
    fix the abandoned run's newer step_6 stayed 'latest' and, with keep_last=1, step_5 was deleted at once."""
    over = {"train.steps": 8, "train.ckpt_every": 2, "train.keep_last": 3}
    Trainer(tiny_config("digits-dit", tmp_path, **over)).fit(stop_at=6)
    root = tmp_path / "digits-dit" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000004", "step_00000006"]
    branch = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "train.ckpt_every": 1, "train.keep_last": keep_last,
                                                            "run.resume": str(root / "step_00000004")}))
    assert branch.step == 4
    branch.fit(stop_at=5)  # saves step 5, then is killed
    names = [p.name for p in ckpt.list_checkpoints(root)]
    assert names[-1] == "step_00000005" and len(names) == keep_last, names
    assert ckpt.resolve_resume("latest", root).name == "step_00000005"
    resumed = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    assert resumed.step == 5
    assert_same_weights_and_ema(branch, resumed)


@pytest.mark.parametrize("seed", [0, (1 << 32) - 1])
def test_resume_with_another_world_size_does_not_replay_the_first_steps_draws(tmp_path, seed):
    """A checkpoint of another world size cannot give this rank its RNG stream back. The stream used to
    restart from the step-0 seed, so the resumed steps drew the very noise, timesteps and label dropout of
    steps 1, 2, ...; now it is seeded with the step too (and still deterministic). The largest valid seed
    made that step-seeded value overflow torch.manual_seed's 64 bits (a ValueError at resume)."""
    import json

    over = {"train.steps": 4, "train.ckpt_every": 2, "run.seed": seed}
    Trainer(tiny_config("digits-dit", tmp_path / "a", **over)).fit(stop_at=2)
    meta_path = tmp_path / "a" / "digits-dit" / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "world_size": 2}))  # as if written by 2 ranks
    Trainer(tiny_config("digits-dit", tmp_path / "b", **over))
    at_step_0 = torch.get_rng_state()
    resumed = Trainer(tiny_config("digits-dit", tmp_path / "a", **{**over, "run.resume": "latest"}))
    assert resumed.step == 2
    after_resume = torch.get_rng_state()
    assert not torch.equal(after_resume, at_step_0)
    Trainer(tiny_config("digits-dit", tmp_path / "a", **{**over, "run.resume": "latest"}))
    assert torch.equal(torch.get_rng_state(), after_resume)  # reproducible


def test_resume_is_bit_exact_with_adan_warmup_accumulation_and_flips(tmp_path):
    """The settings the base resume test leaves out: Adan (MDTv2's optimizer, its pre_grad state), an lr
    warmup spanning the checkpoint, a fast EMA and random flips (all passed before this audit: a guard)."""
    over = {"train.steps": 5, "train.ckpt_every": 2, "train.global_batch": 8, "train.micro_batch": 2,
            "optim.name": "adan", "optim.betas": [0.98, 0.92, 0.99], "optim.warmup_steps": 4,
            "optim.grad_clip": 0.5, "optim.ema_decay": 0.5, "data.random_flip": True}
    full, resumed = full_and_resumed("digits-dit", tmp_path, over)
    assert resumed.resume_step == 2
    assert_same_weights_and_ema(full, resumed)
    assert full.stream.state_dict() == resumed.stream.state_dict()


@pytest.mark.parametrize("damage", ["empty", "torn"])
def test_latest_skips_a_checkpoint_whose_rank_file_is_unreadable(tmp_path, damage):
    """A node crash right after a save can leave a renamed checkpoint whose small rank file (RNG, data
    position) never reached the disk: empty or torn. It was 'latest' anyway (only its presence was
    checked) and every --resume latest then died in torch.load; now it is skipped like a torn shard."""
    over = {"train.steps": 6, "train.ckpt_every": 2}
    Trainer(tiny_config("digits-dit", tmp_path, **over)).fit(stop_at=4)
    root = tmp_path / "digits-dit" / "checkpoints"
    rank_file = root / "step_00000004" / "rank_00000.pt"
    rank_file.write_bytes(b"" if damage == "empty" else rank_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step_00000004 is damaged: rank_00000.pt is unreadable"):
        assert ckpt.resolve_resume("latest", root, world_size=1) == root / "step_00000002"
    with pytest.warns(UserWarning, match="is damaged"):
        resumed = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    assert resumed.step == 2


def test_latest_with_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    """With none usable, --resume latest started over at step 0: the run's metrics were cut to nothing
    and its checkpoints set aside as superseded, on a warning per checkpoint."""
    over = {"train.steps": 4, "train.ckpt_every": 2}
    Trainer(tiny_config("digits-dit", tmp_path, **over)).fit()
    root = tmp_path / "digits-dit" / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:08d}" / "rank_00000.pt").write_bytes(b"")
    metrics = (tmp_path / "digits-dit" / "metrics.jsonl").read_text()
    with pytest.warns(UserWarning, match="is damaged"), pytest.raises(ValueError, match=(
            r"--resume latest: every checkpoint in .* is damaged \(2; newest: .*step_00000004 is damaged: "
            r"rank_00000.pt is unreadable.*\); move them aside to start anew, or restore one")):
        Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    assert (tmp_path / "digits-dit" / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004"]


@pytest.mark.parametrize("preset,betas", [("digits-dit", (0.5, 0.6)), ("digits-mdtv2", (0.5, 0.6, 0.7))])
def test_resume_applies_this_runs_optimizer_settings(tmp_path, capsys, preset, betas):
    """The checkpoint's param_groups came back with its state: a resume with another weight decay, betas or
    eps recorded them in config.json but kept the saved ones (Adan's gradient clip then used the new eps)."""
    over = {"train.steps": 4, "train.ckpt_every": 2}
    Trainer(tiny_config(preset, tmp_path, **over)).fit(stop_at=2)
    same = Trainer(tiny_config(preset, tmp_path, **{**over, "run.resume": "latest"}))
    assert "this run's settings" not in capsys.readouterr().err  # unchanged: nothing to say
    new = {"optim.weight_decay": 0.1, "optim.betas": betas, "optim.eps": 1e-3}
    changed = Trainer(tiny_config(preset, tmp_path, **{**over, **new, "run.resume": "latest"}))
    assert "optimizer betas, eps, weight_decay: this run's settings, not the checkpoint's" in capsys.readouterr().err
    for group in changed.optimizer.param_groups:
        assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.1, betas, 1e-3)
    # the moments are the checkpoint's all the same
    a, b = same.optimizer.state_dict()["state"], changed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i] if torch.is_tensor(a[i][k]))


def test_a_resume_with_other_settings_names_them(tmp_path, capsys):
    """A resume takes its own command line; one that differs from the run's saved config.json (a bare
    `--resume latest` after a run started with overrides silently trained on with the preset's mask ratio,
    EMA decay and precision) says which settings changed; extending --train.steps is not a change."""
    over = {"train.steps": 4, "train.ckpt_every": 2, "objective.mask_ratio": 0.5, "optim.ema_decay": 0.99}
    Trainer(tiny_config("digits-mdtv2", tmp_path, **over)).fit(stop_at=2)
    capsys.readouterr()
    Trainer(tiny_config("digits-mdtv2", tmp_path, **{**over, "train.steps": 6, "run.resume": "latest"}))
    assert "resumed with settings other than" not in capsys.readouterr().err
    bare = {k: v for k, v in over.items() if not k.startswith(("objective", "optim"))}
    Trainer(tiny_config("digits-mdtv2", tmp_path, **{**bare, "run.resume": "latest"}))
    err = capsys.readouterr().err
    assert "resumed with settings other than" in err and "this run's apply" in err
    assert "objective.mask_ratio 0.5 -> 0.3" in err and "optim.ema_decay 0.99 -> 0.995" in err, err


def test_an_open_log_window_resumed_on_another_world_size_averages_every_old_rank(tmp_path):
    """The window's sums are per rank; resumed on another world size every rank took rank 0's, so the
    record closing the window was not the mean over ranks of the same steps. Two old ranks are made by
    giving the checkpoint a second rank file with other sums."""
    import json

    over = {"train.steps": 4, "train.ckpt_every": 2, "train.log_every": 4}
    Trainer(tiny_config("digits-dit", tmp_path, **over)).fit(stop_at=2)
    step = tmp_path / "digits-dit" / "checkpoints" / "step_00000002"
    rank0 = torch.load(step / "rank_00000.pt", weights_only=False)
    rank1 = {**rank0, "metrics": {**rank0["metrics"], "sums": {k: v * 3 for k, v in rank0["metrics"]["sums"].items()}}}
    torch.save(rank1, step / "rank_00001.pt")
    meta = json.loads((step / "meta.json").read_text())
    (step / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    resumed = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    assert resumed.metrics.count == rank0["metrics"]["count"] == 2
    for key, value in rank0["metrics"]["sums"].items():
        assert resumed.metrics.sums[key] == pytest.approx(2 * value)  # (1 + 3) / 2 of rank 0's


def test_save_syncs_the_small_files_and_the_rename(tmp_path, monkeypatch):
    """DCP fsyncs its shards; the rank files, meta.json and the folder renames must reach the disk
    before the checkpoint counts as complete, or a node crash can keep the name without the bytes."""
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    Trainer(tiny_config("digits-dit", tmp_path, **{"train.steps": 2, "train.ckpt_every": 1})).fit(stop_at=1)
    root = tmp_path / "digits-dit" / "checkpoints"
    names = {os.path.basename(p) for p in synced}
    assert {"rank_00000.pt", "meta.json"} <= names, names
    assert str(root) in synced  # the folder holding the renamed checkpoint


def test_a_kill_while_re_saving_a_step_keeps_it_resumable_with_keep_last_1(tmp_path, monkeypatch):
    """Re-saving a step that is already on disk (a resumed run's stop signal, the last step saved
    twice) moves the old copy to step_X.old, then the new one into place. With keep_last=1 a kill
    between the two renames left no complete checkpoint: --resume latest started the run over."""
    import os

    over = {"train.steps": 8, "train.ckpt_every": 2, "train.keep_last": 1}
    Trainer(tiny_config("digits-dit", tmp_path, **over)).fit(stop_at=4)
    root = tmp_path / "digits-dit" / "checkpoints"
    again = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    assert again.step == 4
    real_replace = os.replace

    def killed_at_the_second_rename(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        again.save()
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (root / "step_00000004").exists() and (root / "step_00000004.old" / "meta.json").exists()
    assert ckpt.resolve_resume("latest", root, world_size=1) == root / "step_00000004.old"
    resumed = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    assert resumed.step == 4
    assert_same_weights_and_ema(again, resumed)
    resumed.fit(stop_at=6)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006"]  # the .old and .tmp are cleared


@pytest.mark.parametrize("where", ["run", "export"])
def test_maskdit_unmasking_fine_tune_starts_from_the_masked_run(tmp_path, where):
    """README's MaskDiT recipe: imagenet256-maskdit-xl2 (MAE loss: the model has a mask_token) then the
    -unmask preset (no MAE loss: no mask_token) with --run.init_from=<the masked run>. The extra
    mask_token was refused as an unexpected key, so the fine-tune of a finished 2M-step run could not
    start. It is dropped (the unmasked model never places mask tokens); everything else loads exactly."""
    masked = Trainer(tiny_config("digits-maskdit", tmp_path / "src", **{"train.steps": 2}))
    assert masked.cfg.objective.mae_loss_coef > 0
    masked.fit()
    source = tmp_path / "src" / "digits-maskdit"
    init_from = source if where == "run" else source / "export"
    ft = Trainer(tiny_config("digits-maskdit", tmp_path / "ft", **{
        "train.steps": 3, "objective.mask_ratio": 0.0, "objective.mae_loss_coef": 0.0,
        "run.init_from": str(init_from)}))
    own = ft.module.state_dict()
    assert not any(k.endswith("mask_token") for k in own)
    weights = masked.module.state_dict() if where == "run" else masked.ema.full_state_dict(masked.module)
    for k, v in own.items():
        assert torch.equal(v, weights[k]), k
    for k, v in ft.ema.shadow.items():
        assert torch.equal(v, masked.ema.shadow[k]), k
    ft.fit()
    assert ft.step == 3


def test_resume_past_the_asked_end_says_so(tmp_path, capsys):
    """--resume latest with a smaller --train.steps than the checkpoint's step ended at once without a word."""
    over = {"train.steps": 4, "train.ckpt_every": 2}
    Trainer(tiny_config("digits-dit", tmp_path, **over)).fit(stop_at=2)
    capsys.readouterr()
    Trainer(tiny_config("digits-dit", tmp_path, **{**over, "train.steps": 1, "run.resume": "latest"}))
    assert "warning: step 2 is past --train.steps=1: nothing to train" in capsys.readouterr().err
    Trainer(tiny_config("digits-dit", tmp_path, **{**over, "train.steps": 2, "run.resume": "latest"}))
    assert "past --train.steps" not in capsys.readouterr().err  # a finished run re-exported: as asked


@pytest.mark.parametrize("where", ["dcp", "rank_file"])
def test_a_full_disk_while_saving_is_one_line_naming_the_checkpoint_left(tmp_path, monkeypatch, where):
    """DCP wraps the writer's ENOSPC in a CheckpointException (a BaseException, so the CLI printed its
    60-line multi-rank traceback), and torch.save's zip writer on a full disk says only "unexpected pos"."""
    import errno
    import os

    over = {"train.steps": 8, "train.ckpt_every": 2}
    trainer = Trainer(tiny_config("digits-dit", tmp_path, **over))
    trainer.fit(stop_at=2)
    root = tmp_path / "digits-dit" / "checkpoints"
    if where == "dcp":
        real_fsync = os.fsync

        def full(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".distcp"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", full)
        cause = r"OSError: \[Errno 28\] No space left on device"
    else:
        def full(obj, f, *args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

        monkeypatch.setattr(ckpt.torch, "save", full)
        cause = r"RuntimeError: \[enforce fail at inline_container.cc:672\] . unexpected pos 704 vs 598"
    with pytest.raises(OSError) as exc:
        trainer.fit(stop_at=4)
    message = str(exc.value)
    assert "\n" not in message
    assert re.fullmatch(rf"saving checkpoint {re.escape(str(root))}/step_00000004.tmp failed \({cause}\); "
                        r"\d+ MiB free on its disk; the last complete checkpoint, step_00000002, is intact", message)
    monkeypatch.undo()
    resumed = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    assert resumed.step == 2


_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from masked_dit.train.lock import hold_folder
class Owner: pass
owner = Owner()
hold_folder({folder!r}, owner, "run folder", "")
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_training_in_a_busy_run_folder_is_refused(tmp_path, capsys):
    """A job re-launched (or requeued) while the first still runs: both passed the start-up checks, then
    renamed each other's checkpoints .superseded, deleted each other's .tmp saves and interleaved
    metrics.jsonl. The run folder's lock refuses the second before it writes; the same process's own
    trainers share it (the Python API), and the lock goes with the process."""
    import subprocess
    import sys
    from pathlib import Path

    from masked_dit.cli import main

    over = {"train.steps": 4, "train.ckpt_every": 2}
    first = Trainer(tiny_config("digits-dit", tmp_path, **over))
    first.fit(stop_at=2)
    again = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))  # same process
    assert again.step == 2
    del first, again
    run = tmp_path / "digits-dit"
    repo = str(Path(__file__).resolve().parents[2])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=repo, folder=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        tiny_config("digits-dit", tmp_path, **{**over, "train.steps": 6}).save(tmp_path / "again.json")
        capsys.readouterr()
        assert main(["train", "--config", str(tmp_path / "again.json"), "--resume", "latest"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"masked-dit train: error: run folder {run} is in use by another process (pid {holder.pid}): "
                       "wait for that training to end (or stop it), or use another --run.name / --run.out_dir"), err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    finally:
        holder.kill()
        holder.wait()
    resumed = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))  # the lock went
    assert resumed.step == 2
