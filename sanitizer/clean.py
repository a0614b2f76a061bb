"""`sanitizer clean`: split each scored shard into clean/ and quarantine/ tars, byte for byte.

Samples are copied with every member (image, caption, json, anything, opaque bytes) under the same
name, in input order, with fixed tar metadata, so re-running gives identical files. A new threshold
re-flags the manifest first, without re-scoring. The input shard is read again and checked against
the manifest (keys, image hashes), so a shard changed since scoring is refused, not mis-split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sanitizer.atomic import write_json_atomic
from sanitizer.checkpoint import read_run_meta
from sanitizer.data.decode import image_differs
from sanitizer.data.shards import ShardRef
from sanitizer.data.tario import STATUS_OK, ShardError, ShardReadError, TarWriter, iter_samples, printable
from sanitizer.errors import ReadFailed, UsageError
from sanitizer.manifest import read_manifest
from sanitizer.rundir import RunDir, apply_threshold, flagged_totals, locked_run, ok_scores
from sanitizer.scoring import ScoreSettings, required_calibration
from sanitizer.thresholds import ThresholdRule, parse_rule, resolve_threshold


@dataclass
class CleanSummary:
    shards: int
    kept: int
    quarantined: int
    threshold: float | None  # None: no shard was scored, and a data rule found no scores
    skipped_shards: list[str]

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
        sizes, kept, quarantined = {}, 0, 0
        for shard in (s for s in shards if s.stem in finished):
            n_clean, n_quarantine = split_shard(run, shard)
            sizes[shard.stem] = n_clean
            kept, quarantined = kept + n_clean, quarantined + n_quarantine
        for path, content in run.sizes(sizes).items():
            write_json_atomic(path, content)
        info["clean"] = {"kept": kept, "quarantined": quarantined, "shards": len(sizes)}
        run.write_run(info)
    skipped = [s.stem for s in shards if s.stem not in finished]
    return CleanSummary(len(sizes), kept, quarantined, value, skipped)
