"""Stop requests: SIGTERM / SIGINT / SIGUSR1 end training at a step boundary with a checkpoint.

Clusters announce preemption with a signal (SLURM: SIGTERM at the time limit or ``--signal=USR1@90``;
Kubernetes and torchrun: SIGTERM), then kill a few seconds to minutes later. Dying inside the step
loses everything since the last checkpoint, so the handler only records the signal; the trainer
finishes the step in flight, agrees with the other ranks (a rank that got no signal stops at the
same step), saves, and exits with 128 + the signal number. A second Ctrl-C interrupts at once.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s)


class Preempted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint (one-line message; ``signum`` set)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """Records the first stop signal; ``with StopRequest() as stop:`` installs and restores the handlers
    (only in the main thread, where Python allows handlers)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed from C, which Python cannot put back; the default is closest
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
        if self.signum is None:
            self.signum = signum

    @staticmethod
    def name(signum: int) -> str:
        try:
            return signal.Signals(signum).name
        except ValueError:
            return f"signal {signum}"
