"""RUN_DIR: where a scoring job's outputs live, how they are named, who may write them, and the reads
and rewrites of its manifests that the steps after scoring share (re-flagging, the scored set).

Every file is written under a temporary name and renamed, so no partial file is ever visible under
its final name. A shard is done when its stats file exists (it is written after its manifest part); a
re-run of `score` scores one again whose input's stamp (a local file's size and mtime, a remote object's
size and version) differs from what that file recorded. Beside it, `<stem>_clean.json` marks the
shard split by `clean` (what its tars were written from and what they are: sanitizer.clean.marker_key).
One job at a time: an advisory lock on RUN_DIR/.lock, released by the kernel if the job dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sanitizer.atomic import (
    deferred_dir_syncs,
    remove,
    remove_stale_temps,
    sync_deferred_dirs,
    write_json_atomic,
)
from sanitizer.data.shards import STAMP_FORM, ShardRef, file_stamps, is_file_stamp, stamp_differs
from sanitizer.errors import UsageError
from sanitizer.joblock import job_lock, job_lock_for_steps, no_job_meanwhile, refuse_busy, refuse_foreign
from sanitizer.manifest import (
    SCHEMA_VERSION,
    flag_counts,
    own_thresholds,
    read_manifest,
    same_values,
    set_flags,
    write_manifest,
)
from sanitizer.records import RecordError, check_fields, lookup, read_object
from sanitizer.thresholds import parse_rule

RUN_FORMAT = "sanitizer-run/1"
# What a job writes directly under RUN_DIR, its .lock aside (what tells a damaged run from no run).
RUN_ENTRIES = ("run.json", "manifest", "stats", "clean", "quarantine", "sizes.json", "report")


# A clean/ that run.json holds no record of: verify counts it, the report says it (its tiles are gone).
STALE_CLEAN = (
    "run.json has no record of clean, but clean/ exists (a `score` re-run since changed the flags, "
    "or a clean did not finish): run `sanitizer clean` again"
)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def sizes_json(self) -> Path:
        return self.root / "sizes.json"

    @property
    def clean_sizes_json(self) -> Path:
        return self.root / "clean" / "sizes.json"

    def manifest(self, stem: str) -> Path:
        return self.root / "manifest" / f"{stem}.parquet"

    def stats(self, stem: str) -> Path:
        return self.root / "stats" / f"{stem}_stats.json"

    def split_marker(self, stem: str) -> Path:
        return self.root / "stats" / f"{stem}_clean.json"

    def clean(self, stem: str) -> Path:
        return self.root / "clean" / f"{stem}.tar"

    def quarantine(self, stem: str) -> Path:
        return self.root / "quarantine" / f"{stem}.tar"

    def sizes(self, kept: dict[str, int]) -> dict[Path, dict[str, int]]:
        """The two sizes.json files for clean tars holding `kept` samples by stem: RUN_DIR's, keyed by
        path in RUN_DIR, and clean/'s, keyed by file name, where open_clip looks for it."""
        return {
            self.sizes_json: {
                self.clean(stem).relative_to(self.root).as_posix(): n for stem, n in kept.items()
            },
            self.clean_sizes_json: {self.clean(stem).name: n for stem, n in kept.items()},
        }

    def stale_clean(self, info: dict) -> bool:
        """Whether clean/ holds tars that do not match the flags: run.json dropped its record of clean."""
        return info.get("clean") is None and (self.root / "clean").is_dir()

    def is_done(self, stem: str) -> bool:
        return self.stats(stem).is_file()

    def finished_stats(self, shards: list[ShardRef]) -> dict[str, dict]:
        """Each finished shard's stats marker, by stem: read once by a job, as a re-run of a large run
        has thousands."""
        return {s.stem: self.read_stats(s.stem) for s in shards if self.is_done(s.stem)}

    def changed_inputs(self, shards: list[ShardRef], stats: dict[str, dict]) -> list[ShardRef]:
        """The done shards (those with `stats`, finished_stats) whose input changed since their stats
        markers were written (a local file in size or mtime, a remote object in size or version: it
        was still being downloaded, or was replaced): their manifests no longer describe them."""
        done = [s for s in shards if s.stem in stats]
        now = file_stamps([s.url for s in done])
        return [s for s, n in zip(done, now, strict=True) if stamp_differs(stats[s.stem].get("input"), n)]

    def unmark(self, stem: str) -> None:
        """Forget a done shard, its stats marker first: until it is scored again it is a shard never
        scored, so a job killed meanwhile, or a new read that fails, leaves no stale manifest or
        clean and quarantine tars of its old samples behind. The markers' removal is durable before
        the rest goes, so that a crash of the machine leaves no marker of a manifest removed."""
        with deferred_dir_syncs():  # a sync a directory
            for path in (self.stats(stem), self.split_marker(stem)):
                remove(path)
            sync_deferred_dirs()
            for path in (self.manifest(stem), self.clean(stem), self.quarantine(stem)):
                remove(path)

    def manifests_digest(self, stems: list[str]) -> str:
        """The sha256 of the manifests of `stems`, each after its stem, in their order: the same for
        the same outputs, however they were written (a killed job resumed, a RUN_DIR copied)."""
        found = hashlib.sha256()
        for stem in stems:
            found.update(f"{stem}\0".encode())
            try:
                with open(self.manifest(stem), "rb") as f:
                    found.update(hashlib.file_digest(f, "sha256").digest())
            except OSError:  # gone: a damaged run, which no digest recorded matches
                found.update(b"unreadable")
        return found.hexdigest()

    def done(self, shards: list[ShardRef]) -> list[str]:
        """The stems of the finished shards, in input order: what every step after scoring reads."""
        return [s.stem for s in shards if self.is_done(s.stem)]

    def is_run(self) -> bool:
        """Whether the directory holds anything a job writes: one that lost its run.json is a damaged
        run, not some other directory (an input folder, a DECODER_DIR)."""
        return any((self.root / name).exists() for name in RUN_ENTRIES)

    def read_run(self, optional: dict[str, type | tuple] | None = None) -> dict | None:
        """run.json, None before the first run; a file that is not a JSON object, or holds one of the
        `optional` fields (check_fields) in another form, is a usage error."""
        if not self.run_json.is_file():
            return None
        info = _read_object(self.run_json)
        try:
            check_fields(info, {}, optional or {})
        except RecordError as e:
            raise _damaged(self.run_json, str(e)) from None
        return info

    def write_run(self, run: dict) -> None:
        """run.json in this version's format (a record read back from it is written as it is)."""
        write_json_atomic(self.run_json, {**run, "format": RUN_FORMAT})

    def read_stats(self, stem: str) -> dict:
        """A finished shard's counts, checked for the fields every reader takes from them."""
        stats = _read_object(self.stats(stem))
        by, statuses = stats.get("flagged_by"), stats.get("status_counts")
        counts = [stats.get(k) for k in ("count", "ok", "flagged")]
        counts += [by.get(k) for k in ("score", "collapse")] if isinstance(by, dict) else [None]
        counts += list(statuses.values()) if isinstance(statuses, dict) else [None]
        if not all(type(c) is int for c in counts):
            raise _damaged(self.stats(stem), "its counts are missing or not whole numbers")
        stamp = stats.get("input")  # None: an input with no stamp, or a marker of an earlier version
        if stamp is not None and not is_file_stamp(stamp):
            raise _damaged(self.stats(stem), f"its input stamp is not {STAMP_FORM}")
        return stats

    def refuse_foreign(self) -> None:
        """A directory holding other files and no run.json is not a RUN_DIR to write into (all a job
        writes before run.json is its lock and run.json's temp file)."""
        refuse_foreign(self.root, self.run_json.name, "score")

    def remove_stale_temps(self) -> int:
        """Temp files of a killed job: never visible under a final name, removed on the next start."""
        subdirs = ("", "manifest", "stats", "clean", "quarantine")
        return sum(remove_stale_temps(self.root / d) for d in subdirs if (self.root / d).is_dir())

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive for the job's lifetime; a second job on the same RUN_DIR is refused at once."""
        return job_lock(self.root, "RUN_DIR")

    def lock_for_steps(self) -> contextlib.AbstractContextManager[None]:
        """lock() for a job that runs score, clean and report in this process; the steps' own take it."""
        return job_lock_for_steps(self.root, "RUN_DIR")

    def refuse_busy(self) -> None:
        """Refuse a RUN_DIR a job holds now, for a reader whose checks a job still writing would fail."""
        refuse_busy(self.root)

    def no_job_meanwhile(self, reader: str) -> contextlib.AbstractContextManager[None]:
        """Refused if a job holds RUN_DIR as `reader` starts, or took it before `reader` ended."""
        return no_job_meanwhile(self.root, reader)


# A stem names files under RUN_DIR: one that could name anything else is never followed.
SAFE_STEM = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
# What clean and report read from run.json, and the type each must have (optional ones may be absent).
RUN_FIELDS = {
    "identity": dict, "identity.shards": list, "identity.scoring": dict, "identity.decoder_sha256": str,
    "config": dict, "config.decoder_dir": str,
}  # fmt: skip
OPTIONAL_RUN_FIELDS = {
    "threshold": dict, "threshold.rule": str, "threshold.value": (int, float),
    "threshold.neighbours": (int, float), "totals": dict,
    "collapse": dict, "collapse.rule": str, "collapse.value": (int, float), "failed_shards": list,
}  # fmt: skip
# run.json's record of clean, as score weighs it and report shows it. `clean` reads none of it and
# writes it afresh, so a damaged one does not stop the command that repairs it.
CLEAN_RECORD_FIELDS = {"clean": dict, "clean.kept": int, "clean.quarantined": int, "clean.shards": int}


def open_run(
    run_dir: Path, also: dict[str, type | tuple] | None = None
) -> tuple[RunDir, dict, list[ShardRef]]:
    """A scored run as clean and report read it: the directory, its run.json (checked for what they
    read from it, and for the optional fields `also` names) and its input shards."""
    run = RunDir(Path(run_dir))
    info = run.read_run()
    if info is None:
        raise not_a_run(run_dir)
    try:
        check_fields(info, RUN_FIELDS, OPTIONAL_RUN_FIELDS | (also or {}))
        check_rules(info)
        shards = [shard_entry(entry) for entry in info["identity"]["shards"]]
    except RecordError as e:
        raise _damaged(run.run_json, str(e)) from None
    refuse_other_manifests(run_dir, info)
    return run, info, shards


def refuse_other_manifests(run_dir: Path, info: dict) -> None:
    """A run scored by a version that wrote another manifest schema (run.json's identity.manifest;
    none before manifest-v2) is refused: read in this one's schema, a column it lacks reads as
    nulls, and a re-flag would write those nulls back under this version's name."""
    version = info["identity"].get("manifest")
    if version != SCHEMA_VERSION:
        its = (
            f"its manifests are {version}"
            if isinstance(version, str)
            else "its run.json names no manifest version"
        )
        raise UsageError(
            f"{run_dir} was scored by another version of sanitizer ({its}, this one reads {SCHEMA_VERSION}): "
            "score its input again into a new --out"
        )


@contextlib.contextmanager
def locked_run(
    run_dir: Path, also: dict[str, type | tuple] | None = None
) -> Iterator[tuple[RunDir, dict, list[ShardRef]]]:
    """open_run's run, read once RUN_DIR's lock is held: a job that held it until then (a `score`
    finishing) has written its last run.json, which a read before the lock would miss and overwrite.
    A path that holds no run is refused first, so that no lock file is made there; a run that lost its
    run.json is a damaged run (`sanitizer score` would refuse that directory as another's)."""
    run = RunDir(Path(run_dir))
    if not run.run_json.is_file():
        raise _damaged(run.run_json, "it is missing") if run.is_run() else not_a_run(run_dir)
    with RunDir(Path(run_dir)).lock():
        yield open_run(run_dir, also)


def check_rules(info: dict) -> None:
    """A RecordError when run.json's threshold or collapse rule is not one (edited by hand): it would
    read as a mistyped option of the command that reads it."""
    for name in ("threshold.rule", "collapse.rule"):
        rule = lookup(info, name)
        try:
            if rule is not None:
                parse_rule(rule)
        except UsageError as e:
            raise RecordError(f"{name}: {e}") from None


def not_a_run(run_dir: Path) -> UsageError:
    return UsageError(f"{run_dir} is not a RUN_DIR (no run.json); run `sanitizer score` first")


def shard_entry(entry: object) -> ShardRef:
    """One input shard as run.json's identity.shards records it; a RecordError if it is not one."""
    if not isinstance(entry, dict) or set(entry) != {"url", "stem"} or not isinstance(entry["stem"], str):
        raise RecordError(f"identity.shards holds {entry!r}, not a url and a stem")
    if SAFE_STEM.match(entry["stem"]) is None:
        raise RecordError(f"shard stem {entry['stem']!r} is not a safe file name")
    return ShardRef(**entry)


def _read_object(path: Path) -> dict:
    try:
        return read_object(path)
    except RecordError as e:
        raise _damaged(path, str(e)) from None


def check_record(run: RunDir, info: dict, check: Callable[[dict], None]) -> None:
    """A damaged run.json if `check`, a reader's own checks of what it reads from run.json beyond
    open_run's, raises a RecordError."""
    try:
        check(info)
    except RecordError as e:
        raise _damaged(run.run_json, str(e)) from None


def _damaged(path: Path, why: str) -> UsageError:
    return UsageError(f"{path} is damaged: {why}; restore it, or score into a new RUN_DIR")


# -- what every step after scoring reads from the manifests, and how it re-flags them


def flagged_totals(run: RunDir, stems: list[str]) -> dict:
    """flag_counts summed over finished shards' stats files."""
    by: Counter = Counter({"score": 0, "collapse": 0})
    flagged = 0
    for stem in stems:
        stats = run.read_stats(stem)
        flagged += stats["flagged"]
        by.update(stats["flagged_by"])
    return {"flagged": flagged, "flagged_by": dict(by)}


def rewrite(run: RunDir, stems: list[str], update: Callable[[str, pa.Table], pa.Table]) -> int:
    """Pass each finished shard's manifest through `update`; write back (manifest, then stats) those
    it changed, and the stats whose counts disagree with their manifest (a rewrite killed between the
    two writes). A stats marker whose counts the new flags keep is not written again: it would be the
    same bytes. Returns how many shards it wrote, so a finished run re-run rewrites nothing.

    The directories are synced once, on return: the order of a manifest's and its stats' renames
    does not matter after a crash, as a re-run mends either one alone, and run.json, the record that
    the flags are final, is written after this returns."""
    changed = 0
    with deferred_dir_syncs():
        for stem in stems:
            table = read_manifest(run.manifest(stem))
            updated = update(stem, table)
            stats, counts, same = run.read_stats(stem), flag_counts(updated), same_values(updated, table)
            counted = all(stats.get(k) == v for k, v in counts.items())
            if same and counted:
                continue
            if not same:
                write_manifest(run.manifest(stem), updated)
            if not counted:
                write_json_atomic(run.stats(stem), {**stats, **counts})
            changed += 1
    return changed


def apply_threshold(run: RunDir, stems: list[str], threshold: float | None) -> int:
    """Re-flag finished shards by a new score threshold, or where None by each row's own, as the
    collapse pass set them (collapse flags stay as they are)."""

    def update(_: str, table: pa.Table) -> pa.Table:
        return set_flags(table, own_thresholds(table) if threshold is None else threshold)

    return rewrite(run, stems, update)


def neighbours_threshold(info: dict) -> float | None:
    """run.json's threshold on the score evidence plus the neighbours', where the collapse pass set
    each ok row's score threshold from its neighbours' scores; None where it did not."""
    value = lookup(info, "threshold.neighbours")
    return float(value) if isinstance(value, int | float) else None


def ok_scores(run: RunDir, stems: list[str]) -> np.ndarray:
    """Scores of every ok row of the finished shards: what data-dependent rules look at."""
    parts = [table_ok_scores(read_manifest(run.manifest(stem), ["status", "score"])) for stem in stems]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def table_ok_scores(table: pa.Table) -> np.ndarray:
    """The scores of a manifest table's ok rows (it holds `status` and `score`)."""
    ok = pc.equal(table.column("status"), "ok")
    return table.filter(ok).column("score").to_numpy().astype(np.float32)
