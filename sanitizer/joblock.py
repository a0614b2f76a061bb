"""One job at a time in a directory (a RUN_DIR, a DECODER_DIR): an advisory lock on DIR/.lock, which
the kernel releases when the job ends, even on SIGKILL.

A lock file rather than the directory itself: NFS clients emulate flock with POSIX locks, and an
exclusive one needs a file open for writing, which a directory cannot be.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from sanitizer.errors import UsageError

LOCK = ".lock"  # holds the pid of the last job that held the lock


@contextlib.contextmanager
def job_lock(root: Path, role: str) -> Iterator[None]:
    """Exclusive for the job's lifetime; a second job on the same directory is refused at once.
    `role` names the directory in the refusal of one that cannot be made (RUN_DIR, --out)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot use {root} as {role}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise in_use(root, fd) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def refuse_busy(root: Path) -> None:
    """Refuse a directory whose lock a job holds now; nothing is written (a read-only RUN_DIR can be
    checked) and nothing stays held (a job started a moment later is not refused with a stale pid)."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except OSError:  # no job ever locked it, or it cannot be opened: nothing tells of one running
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise in_use(root, fd) from None
    finally:
        os.close(fd)


def in_use(root: Path, fd: int) -> UsageError:
    """The refusal of a directory a job holds, naming the pid the job wrote into the lock file."""
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    return UsageError(f"another sanitizer job (pid {holder}) is using {root}")
