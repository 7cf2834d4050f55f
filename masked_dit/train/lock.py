"""One writer per folder: an advisory POSIX lock on ``<folder>/.lock``, held while its owner lives.

Two trainings in one run folder (a job re-launched, or requeued while the old one lingers) destroyed
each other's checkpoints (renamed .superseded, .tmp folders deleted as stale) and interleaved
metrics.jsonl. The start-up checks cannot see a process that has not written yet; the lock can. It
goes with the process however it ends (a SIGKILL too), so a crashed job leaves nothing to clean up.
``lockf`` locks belong to the process: a second trainer of the same process (the Python API, tests)
shares the lock; another process is refused. No lock where ``fcntl`` is missing (Windows).
"""
from __future__ import annotations

import os
import weakref

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_HELD: dict[str, list] = {}  # lock path -> [fd, number of live owners]


def hold_folder(folder, owner, what: str, hint: str) -> None:
    """Locks ``folder`` for this process while ``owner`` lives; ValueError (one line naming the folder,
    the holder's pid and ``hint``) if another process holds it."""
    if fcntl is None:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.realpath(os.path.join(folder, ".lock"))
    if path in _HELD:
        _HELD[path][1] += 1
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{what} {folder} is in use by another process (pid {pid}): {hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[path] = [fd, 1]
    weakref.finalize(owner, _release, path)


def _release(path: str) -> None:
    entry = _HELD.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _HELD[path]
        os.close(entry[0])  # closing the process's last descriptor of the file drops its lock
