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
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"another sanitizer job (pid {holder}) is using {root}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
