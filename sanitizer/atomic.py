"""Atomic file writes: a file appears under its final name complete or not at all.

A killed job leaves only hidden ``.<name>.tmp-<pid>-<random>`` files behind, never a partial
file under a final name; ``remove_stale_temps`` clears them on the next run.

Each file is fsynced before its rename, so that a file under a final name is complete after a crash
of the machine too. Its rename is durable once its directory is fsynced: at once, or, for the writes
inside `deferred_dir_syncs`, once per directory at the block's end or at `sync_deferred_dirs` (a job
writing thousands of small files spent a third of its time syncing the same two directories).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TMP_MARK = ".tmp-"
# The directories holding renames the enclosing deferred_dir_syncs block has yet to make durable
_UNSYNCED: ContextVar[set[Path] | None] = ContextVar("unsynced_dirs", default=None)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; some filesystems cannot fsync a directory, which is not fatal."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to ``final``; publish it with ``os.replace`` only on clean exit.

    The temp file lives in the same directory so the rename is atomic on POSIX filesystems.
    On an exception the temp file is removed and the exception propagates.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_temp_prefix(final.name)}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(final)  # a failed write (ENOSPC) names no file; say which output it was
        raise
    _sync_dir_of(final)


def remove(path: Path) -> None:
    """Delete a file, durably as an atomic write publishes one: its directory is synced at once, or
    at the end of the enclosing deferred_dir_syncs block (a file already gone costs no sync)."""
    try:
        Path(path).unlink()
    except FileNotFoundError:
        return
    _sync_dir_of(Path(path))


def _sync_dir_of(path: Path) -> None:
    """Make the rename or removal of `path` durable: now, or with the enclosing block's syncs."""
    unsynced = _UNSYNCED.get()
    if unsynced is None:
        _fsync_dir(path.parent)
    else:
        unsynced.add(path.parent)


@contextmanager
def deferred_dir_syncs() -> Iterator[None]:
    """Atomic writes inside the block leave their directories' fsyncs to its end, one per directory;
    on an error too, so that what was written stays written. Whatever relies on those renames being
    durable (a record that the job finished) is written after the block, or after sync_deferred_dirs."""
    token = _UNSYNCED.set(set())
    try:
        yield
    finally:
        sync_deferred_dirs()
        _UNSYNCED.reset(token)


def sync_deferred_dirs() -> None:
    """Make the renames of the enclosing deferred_dir_syncs block durable now (outside one, each
    write made its own so): before a write that must not outlast them in a crash, a shard's done
    marker after its manifest."""
    unsynced = _UNSYNCED.get() or set()
    for directory in sorted(unsynced):
        _fsync_dir(directory)
    unsynced.clear()


@dataclass
class Marking:
    """Markers that record finished work (a shard scored, a shard split), written together at most
    `every_s` after the last marking, once the renames before them are durable: a marker must not
    outlast what it records in a crash of the machine, and a sync of each directory per marking, not
    per marker, is what deferred_dir_syncs saves. A job killed between markings redoes that work."""

    every_s: float
    pending: list[tuple[Path, Any]] = field(default_factory=list)
    marked_at: float = -math.inf  # time.monotonic() of the last marking

    def add(self, path: Path, marker: Any) -> None:
        """Write `marker` as JSON to `path` at the next marking."""
        self.pending.append((path, marker))

    def tick(self) -> None:
        """Mark, if markers wait and the last marking was `every_s` ago: called as work goes on, so
        that a marker follows its work within about `every_s`."""
        if self.pending and time.monotonic() - self.marked_at >= self.every_s:
            self.mark()

    def mark(self) -> None:
        """Sync the enclosing block's directories, then write the pending markers. Should a write fail,
        the markers after it stay unwritten: a re-run redoes their work."""
        pending, self.pending = self.pending, []
        sync_deferred_dirs()
        for path, marker in pending:
            write_json_atomic(path, marker)
        self.marked_at = time.monotonic()

    @contextmanager
    def block(self) -> Iterator[None]:
        """deferred_dir_syncs, left by a marking, on an error too, so that a re-run keeps the work
        finished; should that marking fail as well, the block's own error is the one raised."""
        with deferred_dir_syncs():
            try:
                yield
            except BaseException:
                with contextlib.suppress(Exception):
                    self.mark()
                raise
            self.mark()


def _temp_prefix(name: str) -> str:
    return f".{name}{_TMP_MARK}"


def is_temp(name: str) -> bool:
    """Whether the file ``name`` is a temp file of some write (output names never start with a dot)."""
    return name.startswith(".") and _TMP_MARK in name


def is_temp_of(name: str, final_name: str) -> bool:
    """Whether the file ``name`` is a temp file of a write to ``final_name`` in the same directory."""
    return name.startswith(_temp_prefix(final_name))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON with sorted keys and a trailing newline: stable bytes for identical content."""
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files left by killed writers in ``directory``; return how many were removed.

    Call it only where no other live writer shares the directory: it cannot tell a stale
    temp file from one being written right now.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.iterdir():
        if is_temp(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
