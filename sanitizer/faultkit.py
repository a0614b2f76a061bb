"""Fault injection around real jobs: run the CLI, start a job in its own session, kill its whole process
tree as a crash would, fake a full disk, and compare what runs wrote.

Used by tests/test_faults.py and bench/faults.py (and by anyone who wants to crash-test a deployment),
beside the hostile corpus of `sanitizer.data.hostile`. Linux only: process trees are read from /proc.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq

from sanitizer.cli import main

REPO = Path(__file__).resolve().parents[1]


class CliResult(NamedTuple):
    rc: int
    out: str
    err: str


def cli(*argv: object, cwd: Path | None = None) -> CliResult:
    """Run the CLI in-process, capturing what it prints."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        rc = main([str(a) for a in argv])
    return CliResult(rc, out.getvalue(), err.getvalue())


# -- process trees ---------------------------------------------------------------------------------
def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[3])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes() -> dict[int, tuple[str, int, int]]:
    """Every live (not zombie) process: pid -> (state, ppid, session id)."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := _stat(name)) is not None and s[0] != "Z":
            found[int(name)] = s
    return found


def session_pids(sid: int) -> list[int]:
    """Live processes of a session: a job started by start_job and all it started."""
    return sorted(pid for pid, s in _processes().items() if s[2] == sid)


def descendants(root: int) -> list[int]:
    parents = {pid: s[1] for pid, s in _processes().items()}
    found, changed = {root}, True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return sorted(found - {root})


def start_job(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`sanitizer ...` in its own session (so it can be killed whole), with its own local Ray if it uses one;
    its output is appended to `log`."""
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "sanitizer.cli", *args],
            cwd=cwd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_job(proc: subprocess.Popen, timeout: float = 30) -> bool:
    """SIGKILL the job, then every process of its session (its Ray, if any), as a crash would.

    Returns False if the job had already ended by itself; raises RuntimeError if processes survive.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while left := session_pids(proc.pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the killed job survive: {left}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    return proc.returncode == -signal.SIGKILL


# -- a full disk ------------------------------------------------------------------------------------
def full_disk(real: Callable, at: int, write_partial: Callable) -> Callable:
    """`real`, except that its call number `at` does what a full disk lets through (`write_partial`,
    given the same arguments) and fails with ENOSPC."""
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            write_partial(*args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return fake


def half_parquet(real_write: Callable) -> Callable:
    """A partial pq.write_table: half its bytes, to the open file the package writes a manifest to."""

    def half(table, where, **kwargs):
        buf = io.BytesIO()
        real_write(table, buf, **kwargs)
        where.write(buf.getvalue()[: len(buf.getvalue()) // 2])

    return half


def half_tar_member(tar, info, fileobj=None) -> None:
    """A partial TarFile.addfile: a header's worth of a member's bytes."""
    tar.fileobj.write(b"\0" * 700)


# -- runs ------------------------------------------------------------------------------------------
def outputs(run: Path) -> dict[str, object]:
    """What must not depend on faults: manifests as tables, stats and split markers without the times
    they hold (a scoring's seconds, the stamps of the tars split), tar bytes."""
    out: dict[str, object] = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if path.is_dir() or rel == ".lock":
            continue
        if rel.endswith(".parquet"):
            out[rel] = pq.read_table(path)
        elif rel.startswith("stats/"):
            out[rel] = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("seconds", "tars")}
        elif rel == "run.json":
            info = json.loads(path.read_text())
            keep = ("identity", "state", "threshold", "totals", "failed_shards", "clean")
            out[rel] = {k: info.get(k) for k in keep}
        else:
            out[rel] = path.read_bytes()
    return out


def stats_count(run: Path) -> int:
    """Shards whose stats marker is written, i.e. finished."""
    return len(list((run / "stats").glob("*_stats.json"))) if (run / "stats").is_dir() else 0
