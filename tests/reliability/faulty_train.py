"""``python tests/reliability/faulty_train.py <masked-dit args>``: the CLI with injected faults.

Faults are chosen by environment variables so that the same real ``masked-dit train`` process
(or each torchrun worker) can be made to die or misbehave at an exact point:

    MDIT_FAULT_KILL=<point>:<n>     SIGKILL this process at the n-th (1-based) hit of <point>:
                                      dcp_save    right after DCP wrote the shards of a checkpoint
                                      rank_file   right after the per-rank RNG/data file
                                      meta        right after meta.json (before the rename)
                                      rmtree      half-way through deleting a checkpoint folder
                                      export      right after ema.safetensors of the export
    MDIT_FAULT_NAN_STEPS=3,4,5      the objective returns NaN (loss and gradients) at these steps
    MDIT_FAULT_RAISE_AT=<k>         a RuntimeError (as a CUDA OOM or NCCL error would be) before step k
    MDIT_FAULT_RANK_KILL=<r>:<k>    rank r SIGKILLs itself before step k on the first torchrun
                                    attempt only (TORCHELASTIC_RESTART_COUNT == 0)

Only test code patches anything: the package itself has no fault hooks.
"""
import os
import shutil
import signal
import sys

import torch


def _die():
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _counted(point: str, n: int, fn):
    hits = [0]

    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        hits[0] += 1
        if hits[0] == n:
            _die()
        return out
    wrapper.__wrapped__ = fn
    return wrapper


def install_kill(spec: str) -> None:
    from masked_dit.train import checkpoint as ckpt
    import torch.distributed.checkpoint as dcp

    point, n = spec.split(":")
    n = int(n)
    if point == "dcp_save":
        dcp.save = _counted(point, n, dcp.save)
    elif point == "rank_file":
        real = torch.save
        hits = [0]

        def save(obj, f, *a, **k):
            real(obj, f, *a, **k)
            if str(f).endswith(".pt") and "rank_" in str(f):
                hits[0] += 1
                if hits[0] == n:
                    _die()
        ckpt.torch.save = save  # checkpoint.py calls torch.save through its module global
    elif point == "meta":
        real_replace = os.replace
        hits = [0]

        def replace(src, dst, *a, **k):
            if str(src).endswith(".tmp") and os.path.exists(os.path.join(src, "meta.json")):
                hits[0] += 1
                if hits[0] == n:
                    _die()  # meta.json is written, the folder is not renamed yet
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    elif point == "rmtree":
        real_rmtree = shutil.rmtree
        hits = [0]

        def rmtree(path, *a, **k):
            files = sorted(os.listdir(path)) if os.path.isdir(path) else []
            if files and "step_" in os.path.basename(str(path)):
                hits[0] += 1
                if hits[0] == n:
                    # the worst order a real rmtree may take: shards go, meta.json stays
                    for name in files:
                        if name != "meta.json":
                            os.unlink(os.path.join(path, name))
                            break
                    _die()
            return real_rmtree(path, *a, **k)
        shutil.rmtree = rmtree
    elif point == "export":
        ckpt.export_ema = _counted(point, n, ckpt.export_ema)
    else:
        raise SystemExit(f"unknown MDIT_FAULT_KILL point {point!r}")


class Poisoned:
    """The objective, with a NaN loss (hence NaN gradients) at the given 1-based steps."""

    def __init__(self, objective, trainer, steps: set):
        self.objective, self.trainer, self.steps = objective, trainer, steps

    def __call__(self, model, batch):
        terms = self.objective(model, batch)
        if self.trainer.step + 1 in self.steps:  # trainer.step counts finished steps
            terms = dict(terms, loss=terms["loss"] * float("nan"))
        return terms

    def __getattr__(self, name):  # sample(), etc.
        return getattr(self.objective, name)


def install_nan(steps: set) -> None:
    from masked_dit.train import trainer as trainer_mod

    real_init = trainer_mod.Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.objective = Poisoned(self.objective, self, steps)
    trainer_mod.Trainer.__init__ = init


def install_rank_kill(spec: str) -> None:
    from masked_dit.train import trainer as trainer_mod

    rank, step = (int(v) for v in spec.split(":"))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return
    real_step = trainer_mod.Trainer.train_step

    def train_step(self):
        if self.world.rank == rank and self.step + 1 == step:
            _die()
        return real_step(self)
    trainer_mod.Trainer.train_step = train_step


def install_raise(step: int) -> None:
    from masked_dit.train import trainer as trainer_mod

    real_step = trainer_mod.Trainer.train_step

    def train_step(self):
        if self.step + 1 == step:
            raise RuntimeError(f"injected failure before step {step}")
        return real_step(self)
    trainer_mod.Trainer.train_step = train_step


def main() -> int:
    torch.set_num_threads(1)
    if os.environ.get("MDIT_FAULT_KILL"):
        install_kill(os.environ["MDIT_FAULT_KILL"])
    if os.environ.get("MDIT_FAULT_NAN_STEPS"):
        install_nan({int(s) for s in os.environ["MDIT_FAULT_NAN_STEPS"].split(",")})
    if os.environ.get("MDIT_FAULT_RAISE_AT"):
        install_raise(int(os.environ["MDIT_FAULT_RAISE_AT"]))
    if os.environ.get("MDIT_FAULT_RANK_KILL"):
        install_rank_kill(os.environ["MDIT_FAULT_RANK_KILL"])
    from masked_dit.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
