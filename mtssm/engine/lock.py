"""An exclusive lock on a run folder, so that two runs never write into the same ``--out``.

The lock is :func:`fcntl.flock` on ``RUN/.lock``, a file that holds the PID of the process
holding it. The kernel drops the lock when that process exits, however it exits (``kill -9``
included), so a lock file left behind never blocks a later run. Taking the lock again in the
process that holds it is allowed (the training loop and the CLI around it both take it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "RunFolderBusyError", "lock_run_folder"]

LOCK_FILE = ".lock"

# Run folders this process holds: resolved path -> [file descriptor, depth].
_held: dict[Path, list[int]] = {}


class RunFolderBusyError(RuntimeError):
    """Another process holds the run folder; the message names the folder and that process."""


@contextlib.contextmanager
def lock_run_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of run folder ``out`` (created if needed) for the ``with`` block.

    Raises :class:`RunFolderBusyError` at once (without waiting) when another process holds it.
    """
    path = Path(out).resolve()
    if path in _held:
        _held[path][1] += 1
        try:
            yield path
        finally:
            _held[path][1] -= 1
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusyError(
            f"{path} is in use by another run (process {holder}); wait for it to end, or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = [fd, 1]
    try:
        yield path
    finally:
        del _held[path]
        os.close(fd)  # closing the only descriptor releases the lock
