"""Preemption: SIGTERM / SIGINT / SIGUSR1 finish the step in flight, save a checkpoint and exit with
128 + the signal; ``--resume latest`` then continues as if nothing happened. Under torchrun a signal
to one rank stops every rank at the same step (the stop flag rides the step's one collective)."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from masked_dit.train import checkpoint as ckpt
from masked_dit.train.parallel import fsdp_supported
from masked_dit.train.signals import Preempted, StopRequest
from masked_dit.train.trainer import Trainer
from tests.reliability.common import FAULTY, REPO, child_env, cli_args, load_latest, records, run_cli
from tests.reliability.common import tiny_config as cli_tiny_config
from tests.train.tiny import assert_same_weights_and_ema, tiny_config


def _signal_before_step(trainer, step: int, signum: int):
    """Delivers ``signum`` to this process just before step ``step`` (1-based) starts."""
    real = trainer.train_step

    def train_step():
        if trainer.step + 1 == step:
            signal.raise_signal(signum)
        return real()
    trainer.train_step = train_step


def test_stop_request_records_the_first_signal_and_a_second_ctrl_c_interrupts():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGTERM)  # the first one is kept
        assert stop.signum == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_checkpoints_the_step_and_resume_matches_one_run(tmp_path, signum):
    over = {"train.steps": 6, "train.ckpt_every": 1000, "train.log_every": 4, "train.global_batch": 8,
            "train.micro_batch": 4, "optim.grad_clip": 1.0}
    full = Trainer(tiny_config("digits-mdtv2", tmp_path / "a", **over))
    full.fit()
    part = Trainer(tiny_config("digits-mdtv2", tmp_path / "b", **over))
    _signal_before_step(part, 3, signum)
    before = signal.getsignal(signum)
    with pytest.raises(Preempted, match=rf"stopped by {signal.Signals(signum).name} at step 3 of 6: checkpoint "
                                        rf".*step_00000003; continue with --resume latest") as info:
        part.fit()
    assert info.value.signum == signum and signal.getsignal(signum) is before
    run_b = tmp_path / "b" / "digits-mdtv2"
    assert [p.name for p in ckpt.list_checkpoints(run_b / "checkpoints")] == ["step_00000003"]
    assert records(run_b) == []  # the open log window (steps 1-3) went into the checkpoint
    assert not (run_b / "export").exists()
    resumed = Trainer(tiny_config("digits-mdtv2", tmp_path / "b", **{**over, "run.resume": "latest"}))
    assert resumed.step == 3
    resumed.fit()
    losses = [[(r["step"], r["loss"], r["mse"]) for r in records(run)] for run in (tmp_path / "a" / "digits-mdtv2", run_b)]
    assert losses[0] == losses[1] and [s for s, _, _ in losses[0]] == [4, 6]  # step 4 averages steps 1-4 in both
    assert_same_weights_and_ema(full, resumed)


def test_signal_on_a_checkpoint_step_saves_once_and_last_step_finishes(tmp_path):
    over = {"train.steps": 4, "train.ckpt_every": 2}
    t = Trainer(tiny_config("digits-dit", tmp_path, **over))
    _signal_before_step(t, 2, signal.SIGTERM)
    with pytest.raises(Preempted, match="at step 2 of 4: checkpoint .*step_00000002"):
        t.fit()
    # a signal during the last step: the run is finished normally (final checkpoint and export)
    t = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    _signal_before_step(t, 4, signal.SIGTERM)
    assert t.fit()["step"] == 4
    assert (tmp_path / "digits-dit" / "export" / "ema.safetensors").exists()


def _one_run_and_one_stopped_at_its_grid_step(tmp_path) -> dict:
    """Run a: 4 steps with grids at 2 and 4; run b: the same, SIGTERM before step 2 (a grid step).
    Returns the config overrides both use."""
    over = {"train.steps": 4, "train.sample_every": 2, "train.ckpt_every": 1000, "sample.eval_num": 10}
    Trainer(tiny_config("digits-dit", tmp_path / "a", **over)).fit()
    part = Trainer(tiny_config("digits-dit", tmp_path / "b", **over))
    _signal_before_step(part, 2, signal.SIGTERM)
    with pytest.raises(Preempted, match="at step 2 of 4"):
        part.fit()
    return over


def test_signal_at_a_grid_step_owes_its_grid_and_digits_record_to_the_resumed_run(tmp_path):
    """The stop skips the grid step's sampling (the deadline is near); the resumed run makes the grid and
    the digits record first, from the checkpointed EMA: the same files and records as one run."""
    import json

    over = _one_run_and_one_stopped_at_its_grid_step(tmp_path)
    run_a, run_b = tmp_path / "a" / "digits-dit", tmp_path / "b" / "digits-dit"
    assert not (run_b / "samples" / "step_00000002.png").exists()
    resumed = Trainer(tiny_config("digits-dit", tmp_path / "b", **{**over, "run.resume": "latest"}))
    assert resumed.sample_owed
    resumed.fit()
    assert not resumed.sample_owed
    grid = "samples/step_00000002.png"
    assert (run_a / grid).read_bytes() == (run_b / grid).read_bytes()

    def evaluations(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["digits_cond_acc"], r["digits_fd"]) for r in rows if "digits_fd" in r]
    assert evaluations(run_a) == evaluations(run_b) and [s for s, _, _ in evaluations(run_a)] == [2, 4]
    # a checkpoint made at a grid step in the normal way owes nothing
    again = Trainer(tiny_config("digits-dit", tmp_path / "b", **{**over, "train.steps": 6, "run.resume": "latest"}))
    assert again.step == 4 and not again.sample_owed


def test_a_kill_after_the_owed_grid_leaves_one_digits_record_per_step(tmp_path):
    """The resumed run made the owed grid and digits record, then died before its next checkpoint: the run
    resumed again from the same (owing) checkpoint re-makes them, and metrics.jsonl keeps one record."""
    import json

    over = _one_run_and_one_stopped_at_its_grid_step(tmp_path)
    resume = {**over, "run.resume": "latest"}
    killed = Trainer(tiny_config("digits-dit", tmp_path / "b", **resume))
    assert killed.sample_owed
    killed.fit(stop_at=3)  # the owed grid and record, one more step, then "killed" (no checkpoint after step 2)
    again = Trainer(tiny_config("digits-dit", tmp_path / "b", **resume))
    assert again.step == 2 and again.sample_owed
    again.fit()

    def evaluations(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["digits_cond_acc"], r["digits_fd"]) for r in rows if "digits_fd" in r]
    run_a, run_b = tmp_path / "a" / "digits-dit", tmp_path / "b" / "digits-dit"
    assert [s for s, _, _ in evaluations(run_b)] == [2, 4]
    assert evaluations(run_a) == evaluations(run_b)


def _start_and_wait_for_a_step(cmd, env):
    # a session of its own: a failed test kills the whole group, torchrun's workers included
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    stepped, lines = threading.Event(), []

    def read():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("step "):
                stepped.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not stepped.wait(0.05) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if not stepped.is_set():
        _kill_group(proc)
    assert stepped.is_set(), "".join(lines)[-3000:]
    return proc, reader, lines


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_to_the_cli_exits_143_with_one_line_and_resumes(tmp_path, workers):
    """With DataLoader workers the signal goes to the whole process group (as scancel or Ctrl-C send
    it): a worker it killed used to make the loader raise in the main process, before the checkpoint."""
    args = cli_args(tmp_path, **{"train.steps": 100000, "train.ckpt_every": 100000, "data.num_workers": workers})
    proc, reader, lines = _start_and_wait_for_a_step([sys.executable, FAULTY, *args], child_env())
    try:
        if workers:
            time.sleep(0.5)  # the workers are up and prefetching
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        _kill_group(proc)
    reader.join(5)
    err = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("masked-dit train: stopped by SIGTERM at step ") and "Traceback" not in err, err[-3000:]
    step = int(last.split(" at step ")[1].split()[0])
    assert load_latest(cli_tiny_config(tmp_path, **{"train.steps": 100000})) == step
    done = run_cli(cli_args(tmp_path, **{"train.steps": step + 2, "run.resume": "latest"}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in records(tmp_path / "digits-dit")][-1] == step + 2


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also what is left of it after it exited
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
def test_unexpected_error_with_workers_still_exits(tmp_path):
    """The workers ignore SIGTERM, so multiprocessing's exit hook (SIGTERM, then an unbounded join)
    could not stop them: an uncaught error (a CUDA OOM, an NCCL error) left the process hanging."""
    args = cli_args(tmp_path, **{"train.steps": 100, "data.num_workers": 2})
    proc = subprocess.run([sys.executable, FAULTY, *args], capture_output=True, text=True, cwd=REPO,
                          env=child_env(raise_at=3), timeout=120, start_new_session=True)
    assert proc.returncode == 1 and "RuntimeError: injected failure before step 3" in proc.stderr, proc.stderr[-2000:]


class _Numbers(torch.utils.data.Dataset):
    """Item i is {"x": [i]} (BatchStream asks for (index, flip) keys)."""

    def __len__(self):
        return 12

    def __getitem__(self, key):
        return {"x": torch.tensor([float(key[0])])}


def test_closed_stream_restarts_at_its_position():
    from masked_dit.data import BatchStream

    data = _Numbers()
    a, b = BatchStream(data, 2, num_workers=1), BatchStream(data, 2, num_workers=0)
    first = [next(a)["x"] for _ in range(3)]
    a.close()
    a.close()  # idempotent
    rest = [next(a)["x"] for _ in range(5)]
    a.close()
    for got, want in zip(first + rest, [next(b)["x"] for _ in range(8)]):
        assert torch.equal(got, want)


_ORPHANED_ITERATOR = """
import sys, torch
sys.path.insert(0, {repo!r})
from masked_dit.data import BatchStream
from tests.reliability.test_preempt import _Numbers
stream = BatchStream(_Numbers(), 2, num_workers=2)
next(stream)
kept = stream._it  # as a frame or a traceback can keep it
del stream
print("exiting", flush=True)
"""


def test_interpreter_exits_when_a_loader_iterator_outlives_its_stream():
    """The workers ignore SIGTERM, so multiprocessing's exit hook cannot stop them: the loader's own
    exit hook has to, for every live iterator, including one whose stream was collected."""
    proc = subprocess.run([sys.executable, "-c", _ORPHANED_ITERATOR.format(repo=str(REPO))], capture_output=True,
                          text=True, env=child_env(), timeout=60, start_new_session=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "exiting", proc.stderr[-2000:]


_TRACKER_UNDER = """
import multiprocessing, os, signal, sys, time
sys.path.insert(0, {repo!r})
multiprocessing.set_start_method({method!r})
from multiprocessing import resource_tracker
from masked_dit.data import BatchStream
from tests.reliability.test_preempt import _Numbers
stream = BatchStream(_Numbers(), 2, num_workers=1)
next(stream)
pid = resource_tracker._resource_tracker._pid
os.kill(pid, signal.SIGUSR1)  # as SLURM's --signal=USR1 sends it to every process of the job
time.sleep(0.5)
print("alive" if os.waitpid(pid, os.WNOHANG) == (0, 0) else "killed", flush=True)
stream.close()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_the_resource_tracker_survives_a_group_wide_sigusr1(method):
    """Under spawn and forkserver the loader's workers bring up multiprocessing's resource tracker, which
    ignores SIGINT and SIGTERM but not SIGUSR1: killed by a group-wide SIGUSR1, its relaunch printed a
    warning and a KeyError traceback per tracked name after the run's "stopped by SIGUSR1" line."""
    proc = subprocess.run([sys.executable, "-c", _TRACKER_UNDER.format(repo=str(REPO), method=method)],
                          capture_output=True, text=True, env=child_env(), timeout=120, start_new_session=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stdout + proc.stderr[-2000:]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the torchrun workers through /proc")
@pytest.mark.parametrize("target", ["rank1", "torchrun"])
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, target):
    """rank1: only rank 1 is signalled; torchrun: the launcher is (a job scheduler's SIGTERM), and it
    forwards the signal to its workers."""
    mode = "fsdp" if fsdp_supported("cpu")[0] else "ddp"  # FSDP's collective save when this torch can
    args = cli_args(tmp_path, **{"train.steps": 100000, "train.ckpt_every": 100000, "parallel.mode": mode})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           "--max-restarts=0", "--monitor-interval=0.5", FAULTY, *args]
    proc, reader, lines = _start_and_wait_for_a_step(cmd, child_env())
    try:
        workers = {_rank_of(c): c for c in _children(proc.pid)}
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1] if target == "rank1" else proc.pid, signal.SIGTERM)  # rank1: rank 0 gets nothing
        proc.wait(120)
    finally:
        _kill_group(proc)
    reader.join(5)
    err = "".join(lines)
    stopped = [line for line in err.splitlines() if line.startswith("masked-dit train: stopped by SIGTERM")]
    assert len(stopped) == 1, err[-4000:]  # by rank 0 alone (every rank printed it)
    step = int(stopped[0].split(" at step ")[1].split()[0])
    found = ckpt.list_checkpoints(tmp_path / "digits-dit" / "checkpoints")
    assert [p.name for p in found] == [f"step_{step:08d}"], err[-4000:]
    ckpt.verify_checkpoint(found[-1], world_size=2)  # both ranks' files: they stopped at the same step


@pytest.mark.parametrize("command", ["train", "eval"])
def test_ctrl_c_outside_the_step_loop_is_one_line(command, monkeypatch, capsys, tmp_path):
    """A second Ctrl-C (or one during start-up, sampling or evaluation) ends with one line, exit 130."""
    from masked_dit import cli
    from masked_dit.eval import cli as eval_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    monkeypatch.setattr(eval_cli, "main", interrupted)
    argv = cli_args(tmp_path) if command == "train" else ["eval", str(tmp_path / "x.npz")]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"masked-dit {command}: interrupted"
