"""Deterministic, resumable batches for one rank.

Each epoch is a seeded permutation of the dataset (and seeded flip bits). Global batches (one
optimizer step: micro-batch x ranks x accumulation) are consecutive slices of it, and an epoch holds
whole global batches only, so the samples of a step do not depend on how it is split into micro-batches
and ranks, and no step straddles two epochs. Rank r takes its micro-batch slices of each. The position
``(epoch, batch)`` counts batches the trainer *consumed* (not ones prefetched by workers), so a
resumed run continues with exactly the batches the interrupted one would have seen.
"""
from __future__ import annotations

import atexit
import weakref

import torch


def batches_per_epoch(num_items: int, per_batch: int, accum: int) -> int:
    """Micro-batch positions (``per_batch`` samples over all ranks each) in an epoch of whole steps."""
    return num_items // (per_batch * accum) * accum


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's lists of ``(index, flip)`` keys, starting at ``(epoch, batch)``."""

    def __init__(self, num_items: int, micro_batch: int, *, rank: int = 0, world: int = 1, accum: int = 1,
                 seed: int = 0, shuffle: bool = True, random_flip: bool = False, epoch: int = 0, batch: int = 0):
        self.num_items, self.micro_batch, self.rank, self.world = num_items, micro_batch, rank, world
        self.seed, self.shuffle, self.random_flip = seed, shuffle, random_flip
        self.start_epoch, self.start_batch = epoch, batch
        # Micro-batch j of step s on rank r reads order[s*G + (j*world + r)*micro:][:micro] (G the global
        # batch), which is position b = s*accum + j below; the epoch ends at its last whole step.
        self.batches_per_epoch = batches_per_epoch(num_items, micro_batch * world, accum)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {num_items} items is smaller than one global batch "
                             f"({micro_batch} x {world} ranks x {accum} accumulation steps)")

    def epoch_keys(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=g) if self.shuffle else torch.arange(self.num_items)
        flips = torch.rand(self.num_items, generator=g) < 0.5 if self.random_flip else torch.zeros(self.num_items, dtype=torch.bool)
        return order, flips

    def __iter__(self):
        epoch, batch = self.start_epoch, self.start_batch
        while True:
            order, flips = self.epoch_keys(epoch)
            for b in range(batch, self.batches_per_epoch):
                start = (b * self.world + self.rank) * self.micro_batch
                idx = order[start: start + self.micro_batch].tolist()
                fl = flips[start: start + self.micro_batch].tolist()
                yield list(zip(idx, fl))
            epoch, batch = epoch + 1, 0

    def __len__(self) -> int:  # infinite; a nominal length for DataLoader
        return self.batches_per_epoch


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """A group-wide SIGTERM (scancel, a container stop) or Ctrl-C reaches the loader's workers too;
    one killed by it makes the DataLoader raise in the main process before the trainer can finish the
    step and checkpoint (see train/signals.py). Workers end when the loader closes (``BatchStream.close``,
    also at interpreter exit: multiprocessing's own exit hook would SIGTERM them and wait forever), or
    with their parent (torch's watchdog)."""
    import signal

    from masked_dit.train.signals import STOP_SIGNALS  # here: masked_dit.train imports this module

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _resource_tracker_ignores_stop_signals() -> None:
    """Under spawn and forkserver, multiprocessing starts a resource-tracker process that ignores SIGINT and
    SIGTERM but not SIGUSR1: a group-wide SIGUSR1 (SLURM's --signal=USR1 without B:) killed it, and its
    relaunch printed a warning and a KeyError traceback per tracked name. Started here with the stop
    signals ignored, which it keeps across exec (a Python handler would not survive it); a no-op once it
    runs, under fork (workers are forked, no tracker needed) and off the main thread (no signal.signal)."""
    import multiprocessing
    import signal
    import threading
    from multiprocessing import resource_tracker

    from masked_dit.train.signals import STOP_SIGNALS

    if multiprocessing.get_start_method() == "fork" or threading.current_thread() is not threading.main_thread():
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        resource_tracker.ensure_running()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# Loader iterators with live workers, stopped by one exit hook registered after multiprocessing's (so it
# runs first). Kept by iterator, not by stream: an iterator can outlive its stream (a frame or a traceback
# that holds it), and its ignoring workers would then hang multiprocessing's exit hook.
_LIVE_ITERATORS = weakref.WeakSet()
_EXIT_HOOK = []


def _stop_live_workers() -> None:
    for it in list(_LIVE_ITERATORS):
        it._shutdown_workers()


class BatchStream:
    """Infinite iterator of collated batches with a resumable ``state_dict()``."""

    def __init__(self, dataset, micro_batch: int, *, rank: int = 0, world: int = 1, accum: int = 1, seed: int = 0,
                 random_flip: bool = False, num_workers: int = 0, state: dict | None = None):
        self.dataset, self.micro_batch = dataset, micro_batch
        self.kw = dict(rank=rank, world=world, accum=accum, seed=seed, random_flip=random_flip)
        self.num_workers = num_workers
        self.epoch, self.batch = (state["epoch"], state["batch"]) if state else (0, 0)
        per_batch = micro_batch * world  # samples one position step covers, over all ranks
        saved = (state or {}).get("samples_per_batch", per_batch)
        if saved != per_batch:
            # Resumed with another micro-batch or world size: keep the number of samples consumed in
            # the epoch (the position is in batches); exact for the same global batch (checkpoints are
            # taken between steps), a remainder means a few samples come again.
            consumed = self.batch * saved
            self.batch = consumed // per_batch
            if consumed % per_batch:
                import warnings
                warnings.warn(f"data position: {consumed} samples of epoch {self.epoch} were consumed in batches of "
                              f"{saved}; continuing in batches of {per_batch} repeats {consumed % per_batch} of them",
                              stacklevel=2)
        saved_len = (state or {}).get("dataset_len")
        if saved_len is not None and saved_len != len(dataset):
            import warnings
            warnings.warn(f"data position: the dataset has {len(dataset)} samples, the run was saved with {saved_len}; "
                          f"epoch {self.epoch} continues at batch {self.batch} of another shuffle (samples may repeat "
                          f"or be missed in this epoch)", stacklevel=2)
        self._it = None

    def _start(self):
        per_epoch = batches_per_epoch(len(self.dataset), self.micro_batch * self.kw["world"], self.kw["accum"])
        if per_epoch and self.batch >= per_epoch:  # a converted position past this epoch's last batch
            self.epoch, self.batch = self.epoch + 1, 0
        sampler = ResumableBatchSampler(len(self.dataset), self.micro_batch, epoch=self.epoch, batch=self.batch, **self.kw)
        self.batches_per_epoch = sampler.batches_per_epoch
        # A private generator: creating the iterator must not draw from the global RNG (which
        # holds the training draws and is checkpointed), or a resumed run would shift it.
        g = torch.Generator().manual_seed(self.kw["seed"] * 7919 + self.kw["rank"])
        if self.num_workers:
            _resource_tracker_ignores_stop_signals()
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                             persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                             generator=g,
                                             worker_init_fn=_worker_ignores_stop_signals if self.num_workers else None)
        self._it = iter(loader)
        if self.num_workers:
            _LIVE_ITERATORS.add(self._it)
            if not _EXIT_HOOK:  # registered once the workers run, after multiprocessing's own hook
                _EXIT_HOOK.append(atexit.register(_stop_live_workers))

    def close(self) -> None:
        """Stops the loader's workers (idempotent; a later ``next`` starts them again at the position)."""
        it, self._it = self._it, None
        if it is not None:
            _LIVE_ITERATORS.discard(it)
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        try:
            out = next(self._it)
        except (ValueError, OSError) as exc:
            # A worker's error (bad image, NaN latents) comes back with the worker's whole traceback in
            # its message; keep the one line that names the file, as with num_workers=0.
            text = str(exc).strip()
            if "DataLoader worker process" not in text or "\n" not in text:
                raise
            last = text.splitlines()[-1]
            raise type(exc)(last.split(": ", 1)[1] if ": " in last else last) from None
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "samples_per_batch": self.micro_batch * self.kw["world"],
                "dataset_len": len(self.dataset)}
