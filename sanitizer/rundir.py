"""RUN_DIR: where a scoring job's outputs live, how they are named, and who may write them.

Every file is written under a temporary name and renamed, so no partial file is ever visible under
its final name. A shard is done when its stats file exists (it is written after its manifest part).
One job at a time: an advisory lock on RUN_DIR/.lock, released by the kernel if the job dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sanitizer.atomic import remove_stale_temps, write_json_atomic
from sanitizer.data.shards import ShardRef
from sanitizer.errors import UsageError

RUN_FORMAT = "sanitizer-run/1"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def sizes_json(self) -> Path:
        return self.root / "sizes.json"

    def manifest(self, stem: str) -> Path:
        return self.root / "manifest" / f"{stem}.parquet"

    def stats(self, stem: str) -> Path:
        return self.root / "stats" / f"{stem}_stats.json"

    def clean(self, stem: str) -> Path:
        return self.root / "clean" / f"{stem}.tar"

    def quarantine(self, stem: str) -> Path:
        return self.root / "quarantine" / f"{stem}.tar"

    def is_done(self, stem: str) -> bool:
        return self.stats(stem).is_file()

    def read_run(self) -> dict | None:
        if not self.run_json.is_file():
            return None
        return json.loads(self.run_json.read_text())

    def write_run(self, run: dict) -> None:
        write_json_atomic(self.run_json, {"format": RUN_FORMAT, **run})

    def read_stats(self, stem: str) -> dict:
        return json.loads(self.stats(stem).read_text())

    def remove_stale_temps(self) -> int:
        """Temp files of a killed job: never visible under a final name, removed on the next start."""
        subdirs = ("", "manifest", "stats", "clean", "quarantine")
        return sum(remove_stale_temps(self.root / d) for d in subdirs if (self.root / d).is_dir())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive for the job's lifetime; a second job on the same RUN_DIR is refused at once."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot use {self.root} as RUN_DIR: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise UsageError(f"another sanitizer job (pid {holder}) is using {self.root}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)


def open_run(run_dir: Path) -> tuple[RunDir, dict, list[ShardRef]]:
    """A scored run as clean and report read it: the directory, its run.json and its input shards."""
    run = RunDir(Path(run_dir))
    info = run.read_run()
    if info is None:
        raise UsageError(f"{run_dir} is not a RUN_DIR (no run.json); run `sanitizer score` first")
    return run, info, [ShardRef(**s) for s in info["identity"]["shards"]]
