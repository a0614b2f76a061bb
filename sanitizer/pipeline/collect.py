"""Driver side of a scoring job: rows arrive in any order; each shard is written once it is complete.

A shard is complete when its end row has arrived and as many sample rows as the end row announces.
Then its manifest part is written, then its stats file (the done marker). Only the small score
columns are held, and only for shards in flight, so memory does not grow with the dataset.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sanitizer.atomic import write_json_atomic
from sanitizer.manifest import COLUMNS, read_manifest, set_flags, to_table, write_manifest
from sanitizer.pipeline.stages import END, RESULT_SCHEMA, SHARD_FAILED
from sanitizer.rundir import RunDir


def flags(table: pa.Table, threshold: float | None) -> np.ndarray:
    """score > threshold for ok rows; never for failed rows, nor before a threshold is known."""
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    ok = table.column("status").to_numpy(zero_copy_only=False) == "ok"
    if threshold is None:
        return np.zeros(len(score), bool)
    return ok & (np.nan_to_num(score, nan=-np.inf) > np.float32(threshold))


def manifest_table(rows: pa.Table, threshold: float | None) -> pa.Table:
    rows = rows.sort_by("index")
    columns = {c: rows.column(c).combine_chunks() for c in COLUMNS if c in rows.column_names}
    columns["flagged"] = np.zeros(rows.num_rows, bool)
    columns["threshold"] = np.zeros(rows.num_rows, np.float32)
    return set_flags(to_table(columns), flags(rows, threshold), threshold)


def shard_stats(stem: str, url: str, table: pa.Table, seconds: float) -> dict:
    status = Counter(table.column("status").to_pylist())
    errors = [
        e
        for s, e in zip(table.column("status").to_pylist(), table.column("error").to_pylist(), strict=True)
        if s == "truncated_shard"
    ]
    return {
        "shard": stem,
        "url": url,
        "count": table.num_rows,
        "ok": status.get("ok", 0),
        "flagged": int(pc.sum(table.column("flagged")).as_py() or 0),
        "status_counts": dict(sorted(status.items())),
        "shard_error": errors[0] if errors else None,
        "seconds": round(seconds, 3),
    }


@dataclass
class ShardCollector:
    run: RunDir
    urls: dict[str, str]  # stem -> input url
    threshold: float | None
    parts: dict[str, list[pa.Table]] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    received: Counter = field(default_factory=Counter)
    started: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)
    samples: int = 0

    def add(self, table: pa.Table) -> None:
        table = table.select(RESULT_SCHEMA.names)
        for stem in pc.unique(table.column("shard")).to_pylist():
            rows = table.filter(pc.equal(table.column("shard"), stem))
            self.started.setdefault(stem, time.time())
            is_end = pc.equal(rows.column("index"), END)
            for end in rows.filter(is_end).to_pylist():
                self.expected[stem] = end["shard_rows"]
                if end["status"] == SHARD_FAILED:
                    self.failed[stem] = end["error"]
            samples = rows.filter(pc.invert(is_end))
            if samples.num_rows:
                self.parts.setdefault(stem, []).append(samples)
                self.received[stem] += samples.num_rows
            if stem in self.expected and self.received[stem] == self.expected[stem]:
                self._finish(stem)

    def _finish(self, stem: str) -> None:
        parts = self.parts.pop(stem, [])
        if stem in self.failed:  # rows read before the failure are dropped: the shard is retried
            return
        rows = pa.concat_tables(parts) if parts else RESULT_SCHEMA.empty_table()
        table = manifest_table(rows, self.threshold)
        write_manifest(self.run.manifest(stem), table)
        stats = shard_stats(stem, self.urls[stem], table, time.time() - self.started[stem])
        write_json_atomic(self.run.stats(stem), stats)
        self.done.append(stem)
        self.samples += table.num_rows


def apply_threshold(run: RunDir, stems: list[str], threshold: float) -> int:
    """Re-flag finished shards whose manifest holds another threshold; returns how many changed."""
    changed = 0
    for stem in stems:
        table = read_manifest(run.manifest(stem))
        current = table.column("threshold")
        if table.num_rows == 0 or (
            current.null_count == 0 and pc.all(pc.equal(current, np.float32(threshold))).as_py()
        ):
            continue
        flagged = flags(table, threshold)
        table = set_flags(table, flagged, threshold)
        write_manifest(run.manifest(stem), table)
        stats = run.read_stats(stem)
        write_json_atomic(run.stats(stem), {**stats, "flagged": int(flagged.sum())})
        changed += 1
    return changed


def ok_scores(run: RunDir, stems: list[str]) -> np.ndarray:
    """Scores of every ok row of the finished shards: what data-dependent rules look at."""
    parts = []
    for stem in stems:
        table = read_manifest(run.manifest(stem), ["status", "score"])
        ok = pc.equal(table.column("status"), "ok")
        parts.append(table.filter(ok).column("score").to_numpy().astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
