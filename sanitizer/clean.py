"""`sanitizer clean`: split each scored shard into clean/ and quarantine/ tars, byte for byte.

Samples are copied with every member (image, caption, json, anything, opaque bytes) under the same
name, in input order, with fixed tar metadata, so re-running gives identical files. A new threshold
re-flags the manifest first, without re-scoring. The input shard is read again and checked against
the manifest (keys, image hashes), so a shard changed since scoring is refused, not mis-split.

It is incremental: run.json's `split` record keeps, for each shard split, what its tars were written
from and what they are (SplitRecord). A scheduled job over a growing input then splits the new and
re-flagged shards only, not the whole dataset at every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from sanitizer import __version__
from sanitizer.atomic import write_json_atomic
from sanitizer.checkpoint import read_run_meta
from sanitizer.data.decode import image_differs
from sanitizer.data.shards import ShardRef, file_stamp, path_stamp
from sanitizer.data.tario import STATUS_OK, ShardError, ShardReadError, TarWriter, iter_samples, printable
from sanitizer.errors import ReadFailed, UsageError
from sanitizer.manifest import read_manifest
from sanitizer.rundir import SPLIT_RECORD, RunDir, apply_threshold, flagged_totals, locked_run, ok_scores
from sanitizer.scoring import ScoreSettings, required_calibration
from sanitizer.thresholds import ThresholdRule, parse_rule, resolve_threshold


@dataclass
class CleanSummary:
    shards: int
    kept: int
    quarantined: int
    threshold: float | None  # None: no shard was scored, and a data rule found no scores
    skipped_shards: list[str]
    split: int  # of `shards`, those split by this run; the others were already clean at this threshold

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


def split_shard(run: RunDir, shard: ShardRef) -> tuple[int, int]:
    """Write clean/<stem>.tar and quarantine/<stem>.tar from the input; returns (kept, quarantined)."""
    table = read_manifest(run.manifest(shard.stem))
    keys = table.column("key").to_pylist()
    status = table.column("status").to_pylist()
    flagged = table.column("flagged").to_pylist()
    digests = table.column("sha256").to_pylist()
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


# How often a clean that splits many shards saves its record of them: a job SIGKILLed loses at most
# this much of its work; one stopped by SIGTERM, Ctrl-C or an error saves the record as it stops.
SAVE_EVERY_S = 60.0
COUNTS = ("kept", "quarantined")


@dataclass
class SplitRecord:
    """run.json's `split`: for each shard split, the sha256 of the manifest it was split from, the file
    stamps (size, mtime) of its input and of both tars as written, and their counts, under the version
    and threshold they were split by. A shard whose entry still matches all of them holds in its tars
    what a split would write again, so it is skipped. A remote input has no stamp: it is always split
    again, as only reading it shows that it still matches its manifest."""

    key: dict  # the version and threshold (rule and value) that every entry was split by
    shards: dict[str, dict]
    saved: float

    @classmethod
    def resume(cls, info: dict) -> SplitRecord:
        """The last clean's record; an empty one where that split by another version or threshold,
        or where run.json holds none (a clean of an earlier version) or a damaged one."""
        key = {"sanitizer": __version__, "threshold": info.get("threshold")}
        record = info.get(SPLIT_RECORD)
        same = isinstance(record, dict) and all(record.get(k) == v for k, v in key.items())
        shards = record.get("shards") if same else None
        return cls(key, dict(shards) if isinstance(shards, dict) else {}, time.monotonic())

    def still_split(self, run: RunDir, shard: ShardRef, digest: str) -> dict | None:
        """The shard's entry if its tars still hold what splitting its manifest would write; else None."""
        entry = self.shards.get(shard.stem)
        now = {"manifest": digest, **split_stamps(run, shard)}
        if not isinstance(entry, dict) or None in now.values():
            return None
        counted = all(type(entry.get(k)) is int for k in COUNTS)
        return entry if counted and all(entry.get(k) == v for k, v in now.items()) else None

    def split(self, run: RunDir, shard: ShardRef, digest: str) -> dict:
        """Split the shard and record it; its old entry goes first, as its tars are being replaced."""
        self.shards.pop(shard.stem, None)
        source = file_stamp(shard.url)  # before the read: an input changed while read differs next time
        counts = dict(zip(COUNTS, split_shard(run, shard), strict=True))
        entry = {"manifest": digest, **split_stamps(run, shard), "input": source, **counts}
        self.shards[shard.stem] = entry
        return entry

    def save(self, run: RunDir, info: dict, stems: list[str] | None = None) -> None:
        """Into run.json; `stems`: the entries to keep (the finished shards), at the end of a clean."""
        if stems is not None:
            self.shards = {stem: self.shards[stem] for stem in stems}
        info[SPLIT_RECORD] = {**self.key, "shards": self.shards}
        run.write_run(info)
        self.saved = time.monotonic()


def split_stamps(run: RunDir, shard: ShardRef) -> dict[str, dict[str, int] | None]:
    """The file stamps a split shard's entry holds: its input's and both tars' (None: no such file)."""
    return {
        "input": file_stamp(shard.url),
        "clean": path_stamp(run.clean(shard.stem)),
        "quarantine": path_stamp(run.quarantine(shard.stem)),
    }


def manifest_digest(run: RunDir, stem: str) -> str:
    """The manifest's sha256: scoring a shard again, or re-flagging it, changes it."""
    with open(run.manifest(stem), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def clean_run(run_dir: Path, threshold: str | None = None) -> CleanSummary:
    with locked_run(run_dir) as (run, info, shards):
        run.remove_stale_temps()
        done = run.done(shards)
        if threshold is not None:
            rule = parse_rule(threshold)
            info["threshold"] = {"rule": str(rule), "value": resolve_rule(rule, run, info, done)}
        value = (info.get("threshold") or {}).get("value")
        if value is None and done:  # a run with no finished shard has nothing to split at any
            raise UsageError(f"{run_dir} has no threshold yet; give --threshold")
        # The manifests are flagged at run.json's threshold before any split: a new one, or the one
        # run.json kept when a `clean --threshold` was killed while it re-flagged them.
        if apply_threshold(run, done, value) or threshold is not None:
            # run.json follows the manifests at once: should a split below fail, the run stays
            # consistent, flagged at this threshold and not yet cleaned at it.
            info.setdefault("totals", {}).update(flagged_totals(run, done))
            info.pop("clean", None)
            run.write_run(info)
        finished = set(done)  # up to MAX_SHARDS of them: a list would make these lookups quadratic
        record = SplitRecord.resume(info)
        entries, split = split_all(run, info, [s for s in shards if s.stem in finished], record)
        sizes = {stem: entry["kept"] for stem, entry in entries.items()}
        for path, content in run.sizes(sizes).items():
            write_json_atomic(path, content)
        kept, quarantined = (sum(entry[k] for entry in entries.values()) for k in COUNTS)
        info["clean"] = {"kept": kept, "quarantined": quarantined, "shards": len(sizes)}
        record.save(run, info, list(entries))
    skipped = [s.stem for s in shards if s.stem not in finished]
    return CleanSummary(len(sizes), kept, quarantined, value, skipped, split)


def split_all(
    run: RunDir, info: dict, shards: list[ShardRef], record: SplitRecord
) -> tuple[dict[str, dict], int]:
    """Each finished shard's entry, split now unless its tars already hold that split; and how many
    were split. The record is saved now and then, and when a split stops, so that work done stays done."""
    entries, split = {}, 0
    try:
        for shard in shards:
            digest = manifest_digest(run, shard.stem)
            entry = record.still_split(run, shard, digest)
            if entry is None:
                entry, split = record.split(run, shard, digest), split + 1
                if time.monotonic() - record.saved > SAVE_EVERY_S:
                    record.save(run, info)
            entries[shard.stem] = entry
    except BaseException:
        if split:
            with contextlib.suppress(OSError):  # the error that stopped it is the one to report
                record.save(run, info)
        raise
    return entries, split
