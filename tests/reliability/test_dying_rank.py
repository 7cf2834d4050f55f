"""A dying rank under torchrun (2 gloo ranks on the CPU, --max-restarts=1): rank 1 SIGKILLs itself
before step 4 on the first attempt; the elastic agent restarts both workers, which resume from the
newest checkpoint on their own (no --resume given) and finish the run."""
import subprocess
import sys

import pytest

from masked_dit.train import checkpoint as ckpt
from tests.reliability.common import FAULTY, REPO, child_env, cli_args, records


@pytest.mark.slow
def test_rank_killed_mid_run_is_survived(tmp_path):
    args = cli_args(tmp_path, **{"train.steps": 6, "train.ckpt_every": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           "--max-restarts=1", "--monitor-interval=0.5", FAULTY, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(rank_kill="1:4"), timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "digits-dit"
    assert "resumed from" in proc.stderr and "step_00000002 at step 2" in proc.stderr, proc.stderr[-4000:]
    # steps 1-3 from the first attempt, then 3-6 again from the step-2 checkpoint: metrics.jsonl keeps one
    # record per step (the first attempt's step 3 dropped on resume); the log shows step 3 twice, equal
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    step3 = [line.split(" | img_per_s")[0] for line in proc.stderr.splitlines() if line.startswith("step 3 | ")]
    assert len(step3) == 2 and step3[0] == step3[1], f"the redone step differs: {step3}"
    assert ckpt.list_checkpoints(run / "checkpoints")[-1].name == "step_00000006"
    assert (run / "export" / "ema.safetensors").exists()
