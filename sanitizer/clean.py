"""`sanitizer clean`: split each scored shard into clean/ and quarantine/ tars, byte for byte.

Samples are copied with every member (image, caption, json, anything, opaque bytes) under the same
name, in input order, with fixed tar metadata, so re-running gives identical files. A new threshold
re-flags the manifest first, without re-scoring. The input shard is read again and checked against
the manifest (keys, image hashes), so a shard changed since scoring is refused, not mis-split.

It is incremental: a marker per shard split, stats/<stem>_clean.json, keeps what its tars were written
from and what they are (marker_key, still_split). A scheduled job over a growing input then splits the
new and re-flagged shards only, not the whole dataset at every run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sanitizer import __version__
from sanitizer.atomic import Marking, remove, write_json_atomic
from sanitizer.checkpoint import read_run_meta
from sanitizer.data.decode import image_differs
from sanitizer.data.shards import ShardRef, file_stamps, path_stamp, pins_content
from sanitizer.data.tario import STATUS_OK, ShardError, ShardReadError, TarWriter, iter_samples, printable
from sanitizer.decoder_meta import ScoreSettings, required_calibration
from sanitizer.errors import ReadFailed, UsageError
from sanitizer.manifest import read_manifest
from sanitizer.records import RecordError, read_object
from sanitizer.rundir import (
    RunDir,
    apply_threshold,
    flagged_totals,
    locked_run,
    neighbours_threshold,
    ok_scores,
)
from sanitizer.thresholds import ThresholdRule, parse_rule, resolve_threshold


@dataclass
class CleanSummary:
    shards: int
    kept: int
    quarantined: int
    threshold: float | None  # None: no shard was scored, and a data rule found no scores
    skipped_shards: list[str]
    split: int  # of `shards`, those split by this run; the tars of the others already held their split
    # run.json's threshold.neighbours: the collapse pass set each ok row's score threshold; None if not
    neighbours: float | None = None

    def threshold_text(self) -> str:
        """The threshold as `sanitizer clean` names it."""
        if self.neighbours is None:
            return f"threshold {self.threshold:.6g}"
        return (
            f"threshold {self.threshold:.6g}, each ok row's own from its neighbours' scores "
            f"(score evidence threshold {self.neighbours:.6g})"
        )

    def skipped_lines(self) -> list[str]:
        """A line per shard left out, as `sanitizer clean` and examples/audit_manifest.py print them."""
        return [f"skipped shard {stem}: it was not scored (see run.json)" for stem in self.skipped_shards]


def resolve_rule(rule: ThresholdRule, run: RunDir, info: dict, done: list[str]) -> float | None:
    """A threshold for a finished run; quantile rules read the decoder's calibration. None for a rule
    that needs scores on a run with no finished shard: nothing is split at any threshold."""
    if rule.needs_scores and not done:
        return None
    calibration = None
    if rule.kind == "quantile":
        meta = read_run_meta(Path(info["config"]["decoder_dir"]), info["identity"]["decoder_sha256"])
        settings = ScoreSettings.from_dict(info["identity"]["scoring"])
        calibration = required_calibration(meta, settings, str(rule), "mad:K or value:X")
    return resolve_threshold(rule, calibration, ok_scores(run, done) if rule.needs_scores else None)


def changed_since_scored(shard: ShardRef, why: str) -> UsageError:
    """A shard whose content is not what its manifest describes, and how to get past it: `score`
    scores a shard again when its size, mtime or remote version changed, which a local copy that kept
    size and mtime hides (a store that gives no version hides a remote one of the same size)."""
    return UsageError(
        f"{shard.url} changed since it was scored ({why}): score it again (`sanitizer score` re-scores "
        "a shard whose size, mtime or version changed; `touch` a local one if none did), then clean"
    )


# Finished splits are marked together, at most this long after the last marking: the tars' two
# directories and stats/ synced once a marking, not once a shard. A clean killed in between splits
# those shards again.
MARK_EVERY_S = 1.0

# What a split reads of a manifest, row by row: the tars it writes follow from these and the input alone.
SPLIT_COLUMNS = ("key", "status", "flagged", "sha256")


def split_rows(run: RunDir, stem: str) -> dict[str, list]:
    """The manifest's SPLIT_COLUMNS, as lists."""
    table = read_manifest(run.manifest(stem), list(SPLIT_COLUMNS))
    return {column: table.column(column).to_pylist() for column in SPLIT_COLUMNS}


def rows_digest(rows: dict[str, list]) -> str:
    """The sha256 of a split's rows. Not of the manifest file: the collapse pass of a grown run
    rewrites every old manifest's collapse columns, and a new threshold every one's threshold
    column, while most shards' flags, and so their tars, stay as they were."""
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def split_shard(run: RunDir, shard: ShardRef, rows: dict[str, list]) -> tuple[int, int]:
    """Write clean/<stem>.tar and quarantine/<stem>.tar from the input and the manifest's `rows`
    (split_rows); returns (kept, quarantined)."""
    keys, status, flagged, digests = (rows[column] for column in SPLIT_COLUMNS)
    seen = 0
    with TarWriter(run.clean(shard.stem)) as clean, TarWriter(run.quarantine(shard.stem)) as quarantine:
        try:
            for sample in iter_samples(shard.url):
                i = sample.index
                if i >= len(keys) or keys[i] != printable(sample.key):
                    raise changed_since_scored(shard, f"sample {i} differs")
                seen += 1
                if image_differs(sample, status[i], digests[i]):
                    raise changed_since_scored(shard, f"image of {keys[i]!r} differs")
                if status[i] == STATUS_OK:
                    (quarantine if flagged[i] else clean).write(sample)
        except ShardError as e:
            why = f"cannot read {shard.url} again to clean it: {e.message}"
            if isinstance(e, ShardReadError):  # not the user's doing: exit 1, and a re-run may read it
                raise ReadFailed(f"{why}; run clean again") from None
            raise UsageError(why) from None
        if seen != len(keys):
            raise changed_since_scored(shard, f"{seen} samples, manifest has {len(keys)}")
    return clean.count, quarantine.count


COUNTS = ("kept", "quarantined")


def marker_key(rows: dict[str, list], source: dict | None) -> dict:
    """What a shard's split marker must hold for its tars to be what a split would write now: the
    version, the digest of the rows split (rows_digest) and the input's stamp. A marker per shard,
    stats/<stem>_clean.json, not a record in run.json: a run of 60,000 shards would make run.json
    megabytes that every reader reads and every save rewrites."""
    return {"sanitizer": __version__, "rows": rows_digest(rows), "input": source}


def still_split(run: RunDir, shard: ShardRef, key: dict) -> dict | None:
    """The shard's marker if it holds `key` and the stamps of the tars as they are now; else None.
    A remote input counts only where its stamp holds a version (pins_content): a size alone stays
    the same when an object is replaced by one of the same size, so only reading it again would show
    that it still matches its manifest."""
    now = {**key, "tars": tar_stamps(run, shard)}
    if not pins_content(key["input"]) or None in now["tars"].values():
        return None
    marker = read_marker(run.split_marker(shard.stem))
    counted = marker is not None and all(type(marker.get(k)) is int for k in COUNTS)
    return marker if counted and all(marker.get(k) == v for k, v in now.items()) else None


def split_and_mark(run: RunDir, shard: ShardRef, rows: dict[str, list], key: dict, marks: Marking) -> dict:
    """Split the shard, then leave its marker to `marks`: `key`, the stamps of the tars as written,
    the counts. Its old marker goes first, as its tars are being replaced (should a crash of the
    machine undo that removal, the old marker's tar stamps differ from the new tars')."""
    remove(run.split_marker(shard.stem))
    counts = dict(zip(COUNTS, split_shard(run, shard, rows), strict=True))
    marker = {**key, "tars": tar_stamps(run, shard), **counts}
    marks.add(run.split_marker(shard.stem), marker)
    return marker


def read_marker(path: Path) -> dict | None:
    """A split marker; None where there is none or it is damaged: its shard is split again."""
    try:
        return read_object(path)
    except (OSError, RecordError):
        return None


def tar_stamps(run: RunDir, shard: ShardRef) -> dict[str, dict[str, int] | None]:
    """The file stamps of a shard's two tars (None: no such file): what a marker holds of them."""
    return {
        "clean": path_stamp(run.clean(shard.stem)),
        "quarantine": path_stamp(run.quarantine(shard.stem)),
    }


def clean_run(run_dir: Path, threshold: str | None = None) -> CleanSummary:
    with locked_run(run_dir) as (run, info, shards):
        run.remove_stale_temps()
        done = run.done(shards)
        if threshold is not None:
            rule = parse_rule(threshold)
            info["threshold"] = {"rule": str(rule), "value": resolve_rule(rule, run, info, done)}
            info.pop("clean", None)
            # before any manifest: one killed while it re-flags them leaves this threshold in
            # run.json, which the next `clean` applies to them all (the rows' own thresholds that the
            # collapse pass set, which it replaces, clean cannot set again)
            run.write_run(info)
        value = (info.get("threshold") or {}).get("value")
        if value is None and done:  # a run with no finished shard has nothing to split at any
            raise UsageError(
                f"{run_dir} has no threshold yet: its `sanitizer score` did not finish (run it again to "
                "finish it), or found no ok score for a data rule; or give --threshold"
            )
        # The manifests are flagged at run.json's threshold before any split (a new one, or the one a
        # `clean --threshold` killed while it re-flagged them wrote there), or at each row's own where
        # the collapse pass set them from the neighbours' scores: either mends a stats marker.
        neighbours = neighbours_threshold(info)  # set: each ok row has its own
        if apply_threshold(run, done, value if neighbours is None else None) or threshold is not None:
            # run.json follows the manifests at once: should a split below fail, the run stays
            # consistent, flagged at this threshold and not yet cleaned at it.
            info.setdefault("totals", {}).update(flagged_totals(run, done))
            info.pop("clean", None)
            run.write_run(info)
        finished = set(done)  # up to MAX_SHARDS of them: a list would make these lookups quadratic
        markers, split = split_all(run, [s for s in shards if s.stem in finished])
        sizes = {stem: marker["kept"] for stem, marker in markers.items()}
        for path, content in run.sizes(sizes).items():
            write_json_atomic(path, content)
        kept, quarantined = (sum(marker[k] for marker in markers.values()) for k in COUNTS)
        info["clean"] = {"kept": kept, "quarantined": quarantined, "shards": len(sizes)}
        run.write_run(info)
    skipped = [s.stem for s in shards if s.stem not in finished]
    return CleanSummary(len(sizes), kept, quarantined, value, skipped, split, neighbours)


def split_all(run: RunDir, shards: list[ShardRef]) -> tuple[dict[str, dict], int]:
    """Each finished shard's marker, split now unless its tars already hold that split; and how many
    were split. Splits are marked within MARK_EVERY_S of their end, and as it stops, on an error too,
    so a clean stopped half-way keeps what it split (killed, the last second's splits are redone).
    Inputs are stamped before any is read, so an input changed while read differs next time."""
    markers, split, marks = {}, 0, Marking(MARK_EVERY_S)
    sources = file_stamps([s.url for s in shards])  # a request each for remote inputs: in parallel
    with marks.block():
        for shard, source in zip(shards, sources, strict=True):
            rows = split_rows(run, shard.stem)
            key = marker_key(rows, source)
            marker = still_split(run, shard, key)
            if marker is None:
                marker, split = split_and_mark(run, shard, rows, key, marks), split + 1
            markers[shard.stem] = marker
            marks.tick()
    return markers, split
