"""Non-finite steps: skipped (no optimizer or EMA update), counted and logged; a streak of
``--train.max_nonfinite_steps`` stops the run with one line, keeping the last good checkpoint."""
import copy

import pytest
import torch

from masked_dit.train import checkpoint as ckpt
from masked_dit.train.trainer import NonFiniteError, Trainer
from tests.reliability.common import cli_args, records, run_cli, tiny_config
from tests.reliability.faulty_train import Poisoned


def _snapshot(t: Trainer) -> dict:
    return {"params": [p.detach().clone() for p in t.module.parameters()],
            "ema": {n: v.clone() for n, v in t.ema.shadow.items()},
            "optim": copy.deepcopy(t.optimizer.state_dict())}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _poison(t: Trainer, steps: set, where: str = "loss"):
    """Makes the objective's loss (or only the gradients) NaN at the given 1-based steps."""
    if where == "grad":  # finite loss, NaN gradient of one weight
        next(p for p in t.module.parameters() if p.requires_grad).register_hook(
            lambda g: torch.full_like(g, float("nan")) if t.step + 1 in steps else g)
        return
    t.objective = Poisoned(t.objective, t, steps)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped(tmp_path, where):
    t = Trainer(tiny_config(tmp_path, **{"train.steps": 4, "train.max_nonfinite_steps": 3}))
    _poison(t, {2}, where)
    t.train_step()
    before = _snapshot(t)
    values = t.train_step()  # step 2: poisoned
    assert values.get("skipped") == 1.0 and t.step == 2
    assert t.nonfinite_streak == 1 and t.nonfinite_total == 1
    after = _snapshot(t)
    assert _same(before, after), "a skipped step changed weights, EMA or optimizer state"
    assert all(p.grad is None for p in t.module.parameters())  # nothing left to leak into the next step
    values = t.train_step()  # step 3: a good step updates again and ends the streak
    assert "skipped" not in values and t.nonfinite_streak == 0 and t.nonfinite_total == 1


def test_streak_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
    args = cli_args(tmp_path, **{"train.steps": 10, "train.ckpt_every": 2, "train.max_nonfinite_steps": 3})
    proc = run_cli(args, nan_steps="4,5,6")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    run = tmp_path / "digits-dit"
    last_good = run / "checkpoints" / "step_00000002"
    assert lines[-1] == (f"masked-dit train: error: stopped at step 6: 3 consecutive steps had a non-finite loss "
                         f"or gradient (--train.max_nonfinite_steps=3); last good checkpoint: {last_good}")
    for step, streak in ((4, 1), (5, 2)):
        assert any(line.startswith(f"step {step}: non-finite") and f"({streak} in a row" in line for line in lines)
    # no checkpoint was written during the streak (step 4 would have been one)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert [r["step"] for r in records(run)] == [1, 2, 3]  # skipped steps have no loss to log


def test_short_streak_is_survived_and_counted(tmp_path):
    proc = run_cli(cli_args(tmp_path, **{"train.steps": 6, "train.max_nonfinite_steps": 3}), nan_steps="3,4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = records(tmp_path / "digits-dit")
    assert [r["step"] for r in got] == [1, 2, 5, 6]
    assert got[-1]["nonfinite_steps"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in got)
    # the count is part of the checkpoint: a resumed run keeps counting from it
    more = run_cli(cli_args(tmp_path, **{"train.steps": 7, "train.max_nonfinite_steps": 3}) + ["--resume", "latest"])
    assert more.returncode == 0, more.stderr[-2000:]
    assert records(tmp_path / "digits-dit")[-1] == {**records(tmp_path / "digits-dit")[-1], "step": 7,
                                                    "nonfinite_steps": 2}


def test_raises_in_process(tmp_path):
    t = Trainer(tiny_config(tmp_path, **{"train.steps": 5, "train.max_nonfinite_steps": 2}))
    _poison(t, {1, 2})
    with pytest.raises(NonFiniteError, match="stopped at step 2: 2 consecutive steps"):
        t.fit()


def test_a_run_whose_every_step_was_skipped_ends_with_a_warning_not_a_wrong_error(tmp_path):
    """Fewer steps than max_nonfinite_steps, all non-finite: the run ended with exit 2 and "metrics.jsonl:
    no metrics file in the run folder" (plotting what was never logged) after its checkpoint and export."""
    proc = run_cli(cli_args(tmp_path, **{"train.steps": 2, "train.max_nonfinite_steps": 3, "sample.eval_num": 0}),
                   nan_steps="1,2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("warning: all 2 steps had a non-finite loss or gradient and were skipped: the weights are the initial "
            "ones") in proc.stderr
    assert (tmp_path / "digits-dit" / "export" / "ema.safetensors").is_file()
