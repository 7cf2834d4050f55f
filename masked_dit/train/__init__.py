"""Training: config -> run folder (see ``trainer``); parallelism in ``parallel``; DCP checkpoints."""
from masked_dit.train.optim import Adan, build_optimizer
from masked_dit.train.trainer import Trainer, train

__all__ = ["Adan", "Trainer", "build_optimizer", "train"]
