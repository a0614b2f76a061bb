"""One job at a time in a directory (a RUN_DIR, a DECODER_DIR): an advisory lock on DIR/.lock, which
the kernel releases when the job ends, even on SIGKILL.

A lock file rather than the directory itself: NFS clients emulate flock with POSIX locks, and an
exclusive one needs a file open for writing, which a directory cannot be.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from sanitizer.atomic import is_temp_of
from sanitizer.errors import Busy, UsageError, shortlist

LOCK = ".lock"  # "PID on HOST" of the last job that held the lock (before, the pid alone)
# Directories (resolved) that a job of several steps in this process holds for all of them
_HELD_FOR_STEPS: set[Path] = set()


def _held_for_steps(root: Path) -> bool:
    """Held by this process's job for its steps: known by the path, as the steps must neither flock
    it again (a second open file of the lock conflicts with the first, even in one process) nor open
    and close it (on NFS, whose flock is a POSIX lock, closing any descriptor of the file drops it)."""
    return Path(os.path.realpath(root)) in _HELD_FOR_STEPS


@contextlib.contextmanager
def job_lock_for_steps(root: Path, role: str) -> Iterator[None]:
    """job_lock for a job that runs several commands in this process (`jobs/score_job.py`: score,
    clean, report), held from its start to its end: a second job is refused as it starts, rather than
    taking the directory between two steps and leaving the first job `busy` with its work half done.
    The steps' own job_lock and refuse_busy take it for theirs."""
    with job_lock(root, role):
        key = Path(os.path.realpath(root))
        _HELD_FOR_STEPS.add(key)
        try:
            yield
        finally:
            _HELD_FOR_STEPS.discard(key)


@contextlib.contextmanager
def job_lock(root: Path, role: str) -> Iterator[None]:
    """Exclusive for the job's lifetime; a second job on the same directory is refused at once.
    `role` names the directory in the refusal of one that cannot be made (RUN_DIR, --out). The
    directories it made are removed again if the job wrote nothing there (it was refused)."""
    if _held_for_steps(root):  # a step of the job that holds it
        yield
        return
    made = [d for d in (root, *root.parents) if not d.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:  # mkdir's word for a file there; "File exists" reads as if a directory did
        raise UsageError(f"cannot use {root} as {role}: it is a file, not a directory") from None
    except OSError as e:
        raise UsageError(f"cannot use {root} as {role}: {e.strerror or e}") from None
    held = False
    try:
        _try_lock(root, fd, fcntl.LOCK_EX)
        held = True
        if os.fstat(fd).st_nlink == 0:  # its holder removed it as we opened it: it ended a moment ago
            raise in_use(root, fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        if made and held:
            _remove_if_unused(made)
        os.close(fd)


def _remove_if_unused(made: list[Path]) -> None:
    """Remove the directories a job that holds the lock made (innermost first) when all it left there
    is its lock file, unlinked while still held (a job that opened it meanwhile sees it gone and is
    refused)."""
    root = made[0]
    with contextlib.suppress(OSError):
        if [p.name for p in root.iterdir()] != [LOCK]:
            return
        (root / LOCK).unlink()
        for directory in made:
            directory.rmdir()


def refuse_foreign(root: Path, marker: str, step: str, leftovers: tuple[str, ...] = ()) -> None:
    """A job's --out holds that job's files only: a directory holding others and no `marker` (the
    file that says a job of `step`'s kind made it) is refused, so that an --out naming the input's
    folder or a home directory is never written into (nor its hidden temp-like files removed).
    `leftovers` are what such a job, killed, may leave before its marker, besides the marker's temp
    files and the lock."""
    if not root.is_dir() or (root / marker).is_file():
        return
    others = sorted(p.name for p in root.iterdir() if not _left_by_a_job(p.name, marker, leftovers))
    if others:
        shown = shortlist([repr(n) for n in others])
        raise UsageError(
            f"--out {root} holds other files ({shown}) and no {marker}; {step} into a new or empty directory"
        )


def _left_by_a_job(name: str, marker: str, leftovers: tuple[str, ...]) -> bool:
    return name in (LOCK, *leftovers) or any(is_temp_of(name, n) for n in (marker, *leftovers))


def refuse_busy(root: Path) -> None:
    """Refuse a directory whose lock a job holds now; nothing is written (a read-only RUN_DIR can be
    checked) and nothing stays held (a job started a moment later is not refused with a stale pid)."""
    if _held_for_steps(root):  # this job's own
        return
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except OSError:  # no job ever locked it, or it cannot be opened: nothing tells of one running
        return
    try:
        _try_lock(root, fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _try_lock(root: Path, fd: int, mode: int) -> None:
    """flock without waiting: a job holding it is `in_use`, a filesystem without locks `unlockable`."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise in_use(root, fd) from None
    except OSError as e:
        raise unlockable(root, e) from None


def unlockable(root: Path, e: OSError) -> UsageError:
    """A filesystem that has no locks (NFS without its lock daemon: ENOLCK; Lustre mounted without
    flock: ENOSYS) gave a bare `No locks available`, exit 1, as if a disk filled, naming no path. It
    will fail the same way until the directory moves or the mount changes: a usage error."""
    return UsageError(
        f"cannot lock {root / LOCK}: {e.strerror or e}; a job needs a filesystem with file locks there "
        "(a local disk, NFS with its lock service, Lustre mounted with flock) to keep two jobs apart"
    )


@contextlib.contextmanager
def no_job_meanwhile(root: Path, reader: str) -> Iterator[None]:
    """For a reader that holds no lock (`verify`: holding one would refuse the next job naming a stale
    pid): refused if a job holds `root` as it starts, and as it ends if a job took the lock since, as a
    scheduled `score` or `clean` does during an hours-long verify: what it read may mix that job's files
    from before and after, and would show as violations of a run that has none."""
    before = _stamp(root)  # before the check: a job that locks it between the two is seen at the end
    refuse_busy(root)
    yield
    refuse_busy(root)
    after = _stamp(root)
    if after != before:
        holder = _holder(after[2] if after else b"")
        raise Busy(
            f"another sanitizer job (pid {holder}) used {root} while {reader} read it; run {reader} again"
        )


def _stamp(root: Path) -> tuple[int, int, bytes] | None:
    """The lock file as the last job that took the lock left it: it writes its pid and host anew."""
    try:
        with open(root / LOCK, "rb") as f:
            st = os.fstat(f.fileno())
            return st.st_ino, st.st_mtime_ns, f.read(HOLDER_BYTES)
    except OSError:
        return None


HOLDER_BYTES = 320  # "PID on HOST": a host name is at most 253 characters


def _holder(text: bytes) -> str:
    return text.decode(errors="replace").strip() or "unknown"


def in_use(root: Path, fd: int) -> Busy:
    """The refusal of a directory a job holds, naming the pid and host the job wrote into the lock
    file: on a filesystem that several hosts share, a pid alone does not say which process it is."""
    return Busy(f"another sanitizer job (pid {_holder(os.pread(fd, HOLDER_BYTES, 0))}) is using {root}")


def recorded_pid(root: Path) -> int | None:
    """The pid the last job that locked `root` recorded (on whichever host); None where none did."""
    try:
        return int((root / LOCK).read_text().split(maxsplit=1)[0])
    except (OSError, ValueError, IndexError):
        return None
