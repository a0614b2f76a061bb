"""`sanitizer verify RUN_DIR`: check a finished run against its inputs, byte for byte.

Every input shard is read again (as raw bytes, nothing decoded or unpickled) and compared with
what the run wrote: one manifest row per input sample in input order; statuses, scores and flags
consistent with the threshold; clean/ plus quarantine/ holding exactly the ok rows, each member
under its exact name with the same sha256; stats, sizes.json and run.json totals agreeing with the
manifests. Each violation is one line naming the shard, the sample and the member. Nothing is
ever written, extracted or opened by a member name: names are only compared as strings.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sanitizer.atomic import is_temp
from sanitizer.data.decode import DECODE_STATUSES, image_differs
from sanitizer.data.shards import STAMP_FORM, ShardRef, changed_since, is_file_stamp
from sanitizer.data.tario import (
    READ_STATUSES,
    STATUS_OK,
    TAR_ENCODING,
    TAR_ERRORS,
    ShardError,
    describe,
    iter_samples,
    printable,
    sha256_hex,
    split_key,
)
from sanitizer.manifest import (
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    STATUS_NONFINITE_SCORE,
    flag_counts,
    schema_difference,
)
from sanitizer.records import RecordError, check_fields, lookup
from sanitizer.rundir import (
    CLEAN_RECORD_FIELDS,
    OPTIONAL_RUN_FIELDS,
    STALE_CLEAN,
    RunDir,
    check_rules,
    neighbours_threshold,
    not_a_run,
    shard_entry,
)
from sanitizer.wording import counted

KNOWN_STATUSES = frozenset((*DECODE_STATUSES, STATUS_NONFINITE_SCORE)) | READ_STATUSES
FINISHED = ("complete", "incomplete")  # run.json states of a job that ran to its end
MAX_PER_SHARD = 20  # violations listed per shard before the rest are counted
_CHUNK = 1 << 20


def q(text: str, limit: int = 80) -> str:
    """A name as it is safe to print: printable, quoted, control characters escaped, cut short."""
    text = printable(str(text))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


@dataclass
class _Report:
    """Collects violations, at most MAX_PER_SHARD listed per shard, the rest counted."""

    lines: list[str] = field(default_factory=list)
    per_shard: Counter = field(default_factory=Counter)

    def add(self, message: str, shard: str | None = None) -> None:
        if shard is None:
            self.lines.append(message)
            return
        self.per_shard[shard] += 1
        if self.per_shard[shard] <= MAX_PER_SHARD:
            self.lines.append(f"shard {shard}: {message}")

    def finish(self) -> list[str]:
        for shard, n in self.per_shard.items():
            if n > MAX_PER_SHARD:
                self.lines.append(f"shard {shard}: ... and {counted(n - MAX_PER_SHARD, 'more violation')}")
        return self.lines


def _read_json(path: Path) -> tuple[object | None, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:
        return None, f"unreadable ({describe(e)})"


def _tar_members(path: Path) -> Iterator[tuple[str, str | None, str | None]]:
    """(name, sha256, problem) of every entry of an output tar, streamed; never extracts to disk.

    A non-regular entry (link, directory, device) yields a problem; a tar that cannot be read to
    its end yields one last entry whose name is None.
    """
    try:
        with (
            open(path, "rb") as f,
            tarfile.open(fileobj=f, mode="r|", encoding=TAR_ENCODING, errors=TAR_ERRORS) as tar,
        ):
            for info in tar:
                tar.members = []  # stream mode keeps every TarInfo otherwise
                if not info.isreg():
                    yield info.name, None, f"is not a regular file (tar type {info.type!r})"
                    continue
                digest = hashlib.sha256()
                fileobj = tar.extractfile(info)
                while fileobj is not None and (chunk := fileobj.read(_CHUNK)):
                    digest.update(chunk)
                yield info.name, digest.hexdigest(), None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        yield None, None, f"cannot be read to its end: {describe(e)}"  # type: ignore[misc]


class _OutputTar:
    """One output tar read in step with the input: members are pulled as samples are expected."""

    def __init__(
        self, path: Path, label: str, stem: str, report: _Report, whose: Callable[[str], str]
    ) -> None:
        self.label, self.stem, self.report, self.whose = label, stem, report, whose
        self.members = _tar_members(path) if path.is_file() else iter(())
        self.missing = self.broken = not path.is_file()
        self.samples = 0
        self._pushed: list[tuple[str, str | None, str | None]] = []
        if self.broken:
            report.add(f"{label}/{stem}.tar is missing", stem)

    def expect(self, index: int, key: str, members: list[tuple[str, str]]) -> None:
        """The next members of this tar must be ``members`` (name, sha256), in this order."""
        self.samples += 1
        if self.broken:
            return
        where = f"{self.label}/{self.stem}.tar, sample {index} key {q(key)}"
        for name, digest in members:
            got = self._next()
            if got is None:
                self.report.add(f"{where}: member {q(name)} is missing (tar ends early)", self.stem)
                self.broken = True
                return
            got_name, got_digest, problem = got
            if got_name is None:
                self.report.add(f"{self.label}/{self.stem}.tar {problem}", self.stem)
                self.broken = True
                return
            if got_name != name:
                found = f"member {q(got_name)} {self.whose(got_name)}"
                self.report.add(f"{where}: {found} found where {q(name)} should be", self.stem)
                self.broken = True  # out of step: further comparisons would only repeat this
                return
            if problem is not None:
                self.report.add(f"{where}: member {q(name)} {problem}", self.stem)
            elif got_digest != digest:
                self.report.add(f"{where}: member {q(name)} differs from the input (sha256)", self.stem)

    def held(self) -> int | None:
        """The samples found in step with the input; None when the tar is missing: none to count."""
        return None if self.missing else self.samples

    def _next(self) -> tuple[str, str | None, str | None] | None:
        return self._pushed.pop() if self._pushed else next(self.members, None)

    def skip_if_next(self, members: list[tuple[str, str]]) -> None:
        """Pass over a sample whose manifest row is missing, if it comes next (already reported)."""
        if self.broken:
            return
        taken = []
        for name, _ in members:
            got = self._next()
            if got is None:
                break
            taken.append(got)
            if got[0] != name:
                break
        else:
            self.samples += 1
            return
        self._pushed.extend(reversed(taken))

    def finish(self) -> None:
        if self.broken:
            if hasattr(self.members, "close"):
                self.members.close()  # closes the file
            return
        extra = self._pushed[::-1] + list(self.members)
        for name, _, problem in extra[:3]:
            if name is None:
                self.report.add(f"{self.label}/{self.stem}.tar {problem}", self.stem)
            else:
                self.report.add(
                    f"{self.label}/{self.stem}.tar: unexpected member {q(name)} {self.whose(name)} "
                    "after the last sample",
                    self.stem,
                )
        if len(extra) > 3:
            self.report.add(
                f"{self.label}/{self.stem}.tar: {len(extra) - 3} more unexpected members", self.stem
            )


@dataclass
class _ShardResult:
    rows: int
    ok: int
    flagged: int
    flagged_by: dict[str, int]
    status_counts: Counter
    kept: int | None  # None: the clean tar is missing (reported), so sizes.json is not held to it
    quarantined: int | None


def _read_manifest(path: Path, stem: str, report: _Report) -> pa.Table | None:
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        report.add(f"manifest/{stem}.parquet is missing but the shard is marked done", stem)
        return None
    except Exception as e:  # noqa: BLE001 - a corrupt Parquet file is a violation, not a crash
        report.add(f"manifest/{stem}.parquet cannot be read: {describe(e)}", stem)
        return None
    if (why := schema_difference(schema)) is not None:
        report.add(f"manifest/{stem}.parquet is not {SCHEMA_VERSION}: {why}", stem)
        return None
    try:
        return pq.read_table(path, schema=MANIFEST_SCHEMA)
    except Exception as e:  # noqa: BLE001
        report.add(f"manifest/{stem}.parquet cannot be read: {describe(e)}", stem)
        return None


def _whose(rows: list[dict]) -> Callable[[str], str]:
    """Describe which manifest row an output member belongs to, by its key (for messages only)."""
    by_key: dict[str, list[dict]] = {}

    def whose(name: str) -> str:
        if not by_key:
            for row in rows:
                by_key.setdefault(row["key"], []).append(row)
        found = by_key.get(printable(split_key(name)[0]), [])
        if not found:
            return "(no manifest row)"
        row = found[0]
        if row["status"] != STATUS_OK:
            return f"(sample {row['index']}, status {row['status']})"
        return f"(flagged sample {row['index']})" if row["flagged"] else f"(sample {row['index']})"

    return whose


@dataclass(frozen=True)
class RunThreshold:
    """run.json's score threshold, and whether the collapse pass set each ok row's own from its
    neighbours' scores (rows that are not ok keep `value`)."""

    value: float | None
    by_row: bool

    @classmethod
    def of(cls, info: dict) -> RunThreshold:
        value = lookup(info, "threshold.value")
        value = float(value) if isinstance(value, int | float) else None
        return cls(value, neighbours_threshold(info) is not None)


def _check_row(row: dict, sample, i: int, stem: str, threshold: RunThreshold, report: _Report) -> None:
    where = f"row {i} key {q(row['key'])}"
    if row["shard"] != stem:
        report.add(f"{where}: shard column says {q(row['shard'])}", stem)
    status = row["status"]
    if status not in KNOWN_STATUSES:
        report.add(f"{where}: unknown status {q(status)}", stem)
    if sample.status != STATUS_OK and status != sample.status:
        report.add(f"{where}: status {status} but the input reads as {sample.status}", stem)
    score, flagged, row_threshold = row["score"], row["flagged"], row["threshold"]
    if status == STATUS_OK:
        if score is None or not math.isfinite(score):
            report.add(f"{where}: status ok without a finite score", stem)
        if row["error"] is not None:
            report.add(f"{where}: status ok with an error message", stem)
    if image_differs(sample, status, row["sha256"]):
        report.add(f"{where}: sha256 does not match the input's image member", stem)
    if status != STATUS_OK:
        if score is not None:
            report.add(f"{where}: status {status} has a score", stem)
        if not row["error"]:
            report.add(f"{where}: status {status} without an error message", stem)
    if threshold.by_row and status == STATUS_OK:
        if row_threshold is None:
            report.add(f"{where}: no threshold, but run.json says the collapse pass set each ok row's", stem)
    elif (row_threshold is None) != (threshold.value is None) or (
        threshold.value is not None and np.float32(row_threshold) != np.float32(threshold.value)
    ):  # a row flagged at a threshold run.json no longer holds counts too (it passed)
        report.add(f"{where}: threshold {row_threshold} but run.json says {threshold.value}", stem)
    collapse, collapse_threshold = row["collapse"], row["collapse_threshold"]
    ok = status == STATUS_OK
    tests = (("score", score, row_threshold), ("collapse", collapse, collapse_threshold))
    reason = "+".join(
        name
        for name, value, limit in tests
        if ok and None not in (value, limit) and np.float32(value) > np.float32(limit)
    )
    if bool(flagged) != bool(reason) or row["flag_reason"] != (reason or None):
        report.add(
            f"{where}: flagged={flagged} ({row['flag_reason']}) but status {status}, score {score} "
            f"(threshold {row_threshold}), collapse {collapse} (threshold {collapse_threshold})",
            stem,
        )


def _check_shard(
    run: RunDir, shard: ShardRef, stats: object, threshold: RunThreshold, cleaned: bool, report: _Report
) -> _ShardResult | None:
    """A finished shard's manifest against its input and output tars; its counts come from the
    manifest, so that a shard whose input cannot be read again still adds up in the totals."""
    stem = shard.stem
    table = _read_manifest(run.manifest(stem), stem, report)
    if table is None:
        return None
    rows = table.to_pylist()
    by_index: dict[int, dict] = {}
    for row in rows:
        if row["index"] in by_index:
            report.add(f"index {row['index']} has more than one row (key {q(row['key'])})", stem)
        else:
            by_index[row["index"]] = row
    if [r["index"] for r in rows] != sorted(by_index):
        report.add("manifest rows are not in index order", stem)
    split = _check_input(run, shard, stats, rows, by_index, threshold, cleaned, report)
    if split is None:  # the tars were not read in step with the input: they hold what clean wrote
        split = _split_of(rows)
    statuses = Counter(r["status"] for r in rows)
    return _ShardResult(
        rows=len(rows),
        ok=statuses.get(STATUS_OK, 0),
        **flag_counts(table),  # from flag_reason, which _check_row holds to the scores and thresholds
        status_counts=statuses,
        kept=split[0],
        quarantined=split[1],
    )


def _split_of(rows: list[dict]) -> tuple[int, int]:
    """(kept, quarantined) as clean splits a manifest's rows: the ok ones, by their flag."""
    flags = [bool(r["flagged"]) for r in rows if r["status"] == STATUS_OK]
    return flags.count(False), flags.count(True)


def _check_input(
    run: RunDir,
    shard: ShardRef,
    stats: object,
    rows: list[dict],
    by_index: dict[int, dict],
    threshold: RunThreshold,
    cleaned: bool,
    report: _Report,
) -> tuple[int | None, int | None] | None:
    """Reads the input in step with the manifest rows and the output tars; returns the samples found
    in clean/ and quarantine/, or None when the input changed since it was scored or cannot be read
    (reported once: row by row it would differ everywhere)."""
    stem = shard.stem
    if _changed_since_scored(shard, stats, report):
        return None
    whose = _whose(rows)
    clean = _OutputTar(run.clean(stem), "clean", stem, report, whose) if cleaned else None
    quarantine = _OutputTar(run.quarantine(stem), "quarantine", stem, report, whose) if cleaned else None
    n = 0
    try:
        for sample in iter_samples(shard.url):
            i, n = sample.index, sample.index + 1
            key = printable(sample.key)
            row = by_index.get(i)
            members = [(m.name, sha256_hex(m.data)) for m in sample.members] if cleaned else []
            if row is None or row["key"] != key:
                mismatch = "has no manifest row" if row is None else f"but row {i} has key {q(row['key'])}"
                report.add(f"input sample {i} key {q(key)} {mismatch}", stem)
                if cleaned:  # already reported: pass over its members, wherever they were copied
                    clean.skip_if_next(members)
                    quarantine.skip_if_next(members)
                continue
            _check_row(row, sample, i, stem, threshold, report)
            if cleaned and row["status"] == STATUS_OK:
                (quarantine if row["flagged"] else clean).expect(i, key, members)
    except ShardError as e:
        report.add(
            f"input {q(shard.url, 200)} cannot be read ({e.message}) but the shard is marked done", stem
        )
        return None
    except OSError as e:
        report.add(f"input {q(shard.url, 200)} cannot be read: {describe(e)}", stem)
        return None
    extra = sorted(i for i in by_index if not 0 <= i < n)
    if extra:
        report.add(f"{counted(len(extra), 'row')} with no input sample, indexes {extra[:5]}", stem)
    if n != len(rows):
        report.add(f"manifest has {len(rows)} rows, the input has {n} samples", stem)
    if clean is None or quarantine is None:
        return 0, 0
    clean.finish()
    quarantine.finish()
    return clean.held(), quarantine.held()


def _changed_since_scored(shard: ShardRef, stats: object, report: _Report) -> bool:
    """Whether the input's stamp differs from the one its stats marker recorded (reported); a marker
    whose stamp is damaged is reported too, and tells nothing: the input is then read and compared."""
    stamp = stats.get("input") if isinstance(stats, dict) else None
    if stamp is not None and not is_file_stamp(stamp):
        report.add(f"stats input is {stamp!r}, not {STAMP_FORM}", shard.stem)
        return False
    if not changed_since(stamp, shard.url):
        return False
    report.add(
        f"input {q(shard.url, 200)} changed since it was scored (its size, mtime or version is not "
        "what its stats marker recorded): run `sanitizer score` again",
        shard.stem,
    )
    return True


def _check_stats(
    shard: ShardRef, stats: object, problem: str | None, result: _ShardResult, report: _Report
) -> None:
    if not isinstance(stats, dict):
        report.add(f"stats/{shard.stem}_stats.json is {problem or 'not a JSON object'}", shard.stem)
        return
    expected = {
        "shard": shard.stem,
        "url": shard.url,
        "count": result.rows,
        "ok": result.ok,
        "flagged": result.flagged,
        "flagged_by": result.flagged_by,
        "status_counts": dict(result.status_counts),
    }
    for name, value in expected.items():
        if stats.get(name) != value:
            source = "run.json" if name in ("shard", "url") else "the manifest"
            report.add(f"stats {name} is {stats.get(name)!r}, {source} says {value!r}", shard.stem)


def _parse_shards(info: dict, report: _Report) -> list[ShardRef] | None:
    """run.json's input shards, each checked as clean and report check it; those that are not
    (a stem that would name a file outside RUN_DIR among them) are reported and never followed."""
    entries = lookup(info, "identity.shards")
    if not isinstance(entries, list):
        report.add("run.json: identity.shards is missing or not a list")
        return None
    shards = []
    for entry in entries:
        try:
            shards.append(shard_entry(entry))
        except RecordError as e:
            report.add(f"run.json: {e}")
    for stem, count in Counter(s.stem for s in shards).items():
        if count > 1:
            report.add(f"run.json: shard stem {q(stem)} appears {count} times")
    return shards


def _check_files(run: RunDir, stems: set[str], done: set[str], cleaned: bool, report: _Report) -> None:
    """Files under RUN_DIR that no shard accounts for, and temp files left by a killed writer."""
    expected = {
        "manifest": {run.manifest(s).name for s in stems},
        "stats": {run.stats(s).name for s in stems} | {run.split_marker(s).name for s in done},
        "clean": {run.clean(s).name for s in done} | {run.clean_sizes_json.name},
        "quarantine": {run.quarantine(s).name for s in done},
    }
    for sub, names in expected.items():
        directory = run.root / sub
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if is_temp(path.name):
                report.add(f"{sub}/{q(path.name)[1:-1]}: temporary file left by an interrupted job")
            elif path.name not in names or not path.is_file() or path.is_symlink():
                report.add(f"{sub}/{q(path.name)[1:-1]}: not an output of this run")
    for path in sorted(run.root.iterdir()):
        if is_temp(path.name):
            report.add(f"{q(path.name)[1:-1]}: temporary file left by an interrupted job")
    if not cleaned:
        for name in ("sizes.json", "quarantine"):
            if (run.root / name).exists():
                report.add(f"{name} exists but clean/ does not")


def _check_sizes(run: RunDir, kept: dict[str, int], unchecked: set[str], report: _Report) -> None:
    """sizes.json against the samples found in each clean tar; shards whose manifest could not be
    checked (already reported) are passed over."""
    skipped = run.sizes(dict.fromkeys(unchecked, 0))
    for path, expected in run.sizes(kept).items():
        name = path.relative_to(run.root).as_posix()
        sizes, problem = _read_json(path)
        if not isinstance(sizes, dict):
            report.add(f"{name} is {problem or 'not a JSON object'}")
            continue
        for tar in sorted((set(sizes) | set(expected)) - set(skipped[path])):
            got, want = sizes.get(tar), expected.get(tar)
            if want is None:
                report.add(f"{name}: {q(tar)} is not a clean tar of this run")
            elif got != want:
                report.add(f"{name}: {q(tar)} is {got!r}, but that clean tar holds {want!r} samples")


def _check_totals(
    info: dict, shards: list[ShardRef], results: dict[str, _ShardResult], report: _Report
) -> None:
    totals = info.get("totals")
    if not isinstance(totals, dict):
        report.add("run.json has no totals: the job did not finish; re-run `sanitizer score`")
        return
    statuses: Counter = Counter()
    flagged_by = Counter({"score": 0, "collapse": 0})
    for r in results.values():
        statuses.update(r.status_counts)
        flagged_by.update(r.flagged_by)
    expected = {
        "samples": sum(r.rows for r in results.values()),
        "ok": sum(r.ok for r in results.values()),
        "flagged": sum(r.flagged for r in results.values()),
        "flagged_by": dict(sorted(flagged_by.items())),
        "status_counts": dict(sorted(statuses.items())),
        "shards": len(shards),
        "shards_done": len(results),
    }
    for name, value in expected.items():
        got = totals.get(name)
        if (dict(got) if isinstance(got, dict) else got) != value:
            report.add(f"run.json totals.{name} is {got!r}, the manifests add up to {value!r}")


@dataclass
class Verdict:
    """What verify found: the violations of the run's invariants, and the input shards the run lists
    as failed, which hold none of them (no rows, no tars) but were never scored: a run can be
    consistent and still incomplete, as `score` and `clean` say with exit 1."""

    violations: list[str]
    shards: int = 0
    unscored: dict[str, str] = field(default_factory=dict)  # each failed input shard's error, by stem

    def unscored_lines(self) -> list[str]:
        return [
            f"shard {stem}: never scored ({q(error, 200)[1:-1]}): in neither clean/ nor quarantine/"
            for stem, error in self.unscored.items()
        ]

    def summary(self, run_dir: Path) -> str:
        line = f"verify: {counted(len(self.violations), 'violation')} in {run_dir}"
        if self.unscored:
            line += f"; incomplete: {len(self.unscored)} of {counted(self.shards, 'shard')} never scored"
        return line


def verify_run(run_dir: Path) -> list[str]:
    """Every violation of the run's invariants, one human-readable line each; [] when all hold."""
    return verify(run_dir).violations


def verify(run_dir: Path) -> Verdict:
    """The run checked against its inputs. A path that holds no run at all is a usage error, as for
    clean and report."""
    run = RunDir(Path(run_dir))
    if not run.is_run():
        raise not_a_run(run_dir)
    with run.no_job_meanwhile("verify"):  # a job writing it would show as violations
        return _verify(run)


def _verify(run: RunDir) -> Verdict:
    report = _Report()
    info, problem = _read_json(run.run_json)
    if not isinstance(info, dict):
        return Verdict([f"run.json is {problem or 'not a JSON object'}: {run.root} is not a finished run"])
    shards = _parse_shards(info, report)
    if shards is None:
        return Verdict(report.finish())
    failed = _check_state(info, {s.stem for s in shards}, report)
    if info.get("state") not in FINISHED:  # its rows and totals are not final: that one line says it
        return Verdict(report.finish())
    cleaned = (run.root / "clean").is_dir()
    results = _check_shards(run, info, shards, failed, cleaned, report)
    _check_totals(info, shards, results, report)
    done = set(run.done(shards)) - set(failed)
    _check_files(run, {s.stem for s in shards}, done, cleaned, report)
    if cleaned:
        _check_clean_record(run, info, results, done - set(results), report)
    unscored = {s.stem: failed[s.stem] for s in shards if s.stem in failed}
    return Verdict(report.finish(), len(shards), unscored)


def _check_state(info: dict, known: set[str], report: _Report) -> dict[str, str]:
    """run.json's state, failed shards and field types; returns the failed shards' errors by stem."""
    failed: dict[str, str] = {}
    for entry in info.get("failed_shards") or []:
        if isinstance(entry, dict) and isinstance(entry.get("stem"), str):
            failed[entry["stem"]] = str(entry.get("error"))
        else:
            report.add(f"run.json: malformed failed_shards entry {entry!r}")
    for stem in sorted(set(failed) - known):
        report.add(f"run.json lists failed shard {q(stem)}, which is not an input of this run")
    state = info.get("state")
    if state not in FINISHED:
        report.add(
            f"run.json state is {state!r}: the job did not finish; run `sanitizer score` again to finish it"
        )
    elif failed and state == "complete":
        report.add("run.json state is 'complete' but lists failed shards")
    elif not failed and state == "incomplete":
        report.add("run.json state is 'incomplete' but lists no failed shard")
    try:
        check_fields(info, {}, OPTIONAL_RUN_FIELDS | CLEAN_RECORD_FIELDS)
        check_rules(info)
    except RecordError as e:
        report.add(f"run.json: {e}")
    return failed


def _check_shards(
    run: RunDir, info: dict, shards: list[ShardRef], failed: dict[str, str], cleaned: bool, report: _Report
) -> dict[str, _ShardResult]:
    """Each finished shard against its input, its stats marker and, when the run was `cleaned`, its
    clean and quarantine tars; the others against run.json."""
    threshold = RunThreshold.of(info)
    results: dict[str, _ShardResult] = {}
    for shard in shards:
        stem, done, has_manifest = shard.stem, run.is_done(shard.stem), run.manifest(shard.stem).exists()
        if stem in failed and (done or has_manifest):
            marker = "a stats marker" if done else "a manifest"
            report.add(f"listed as failed in run.json but has {marker}", stem)
        elif stem in failed:
            _check_failed(shard, report)
        elif not done:
            found = "(manifest present) " if has_manifest else "and no manifest "
            report.add(f"has no stats marker {found}and is not listed as failed in run.json", stem)
        else:  # its stats marker, read once: the input stamp and the counts
            stats, problem = _read_json(run.stats(stem))
            if (result := _check_shard(run, shard, stats, threshold, cleaned, report)) is not None:
                _check_stats(shard, stats, problem, result, report)
                results[stem] = result
    return results


def _check_failed(shard: ShardRef, report: _Report) -> None:
    """A shard listed as failed must still fail to read: one that reads now (replaced by a good tar)
    has samples with no manifest row."""
    try:
        samples = sum(1 for _ in iter_samples(shard.url))
    except (ShardError, OSError):
        return
    report.add(
        f"listed as failed but now reads ({samples} samples, no manifest rows): run `sanitizer score` again",
        shard.stem,
    )


def _check_clean_record(
    run: RunDir, info: dict, results: dict[str, _ShardResult], unchecked: set[str], report: _Report
) -> None:
    """sizes.json and run.json's clean record against what the clean and quarantine tars hold."""
    kept = {stem: r.kept for stem, r in results.items() if r.kept is not None}
    _check_sizes(run, kept, unchecked | (set(results) - set(kept)), report)
    if info.get("clean") is None:
        report.add(STALE_CLEAN)
        return
    try:
        check_fields(info, {}, CLEAN_RECORD_FIELDS)
    except RecordError:  # _check_state named it: a damaged record is one violation, not two
        return
    expected = {
        "kept": sum(kept.values()),
        "quarantined": sum(r.quarantined or 0 for r in results.values()),
        "shards": len(results),
    }
    if info.get("clean") != expected:
        report.add(
            f"run.json clean is {info.get('clean')!r}, the clean and quarantine tars hold {expected!r}"
        )
