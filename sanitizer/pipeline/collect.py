"""Driver side of a scoring job: rows arrive in any order; each shard is written once it is complete.

A shard is complete when its end row has arrived and as many sample rows as the end row announces.
Then its manifest part is written, and its stats file (the done marker) at the next marking, up to
MARK_EVERY_S later, after the manifests' directory is synced once for all the shards it marks. Rows
are held without their pixels (the scoring stage drops them), and only for shards in flight, so
memory does not grow with the dataset.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from sanitizer.atomic import Marking
from sanitizer.data.shards import file_stamps
from sanitizer.manifest import COLUMNS, UNFLAGGED, flag_counts, set_flags, to_table, write_manifest
from sanitizer.pipeline.stages import END, RESULT_SCHEMA, SHARD_FAILED
from sanitizer.rundir import RunDir

# Finished shards are marked done together, at most this long after the last marking (at once where
# it was longer ago): two fsyncs of directories for all of them, not two a shard. A job killed in
# between scores those shards again.
MARK_EVERY_S = 1.0


def manifest_table(rows: pa.Table, threshold: float | None) -> pa.Table:
    """A shard's scored rows as its manifest: in shard order, flagged by score (the collapse pass,
    which needs every shard, comes later)."""
    rows = rows.sort_by("index")
    columns = {c: rows.column(c).combine_chunks() for c in COLUMNS if c in rows.column_names}
    columns.update({c: [value] * rows.num_rows for c, value in UNFLAGGED.items()})
    return set_flags(to_table(columns), threshold)


def shard_stats(
    stem: str, url: str, stamp: dict | None, table: pa.Table, seconds: float, micro_batch: int
) -> dict:
    """A shard's stats marker: its counts, its input's `file_stamp` as it was before the read, by
    which a re-run tells that the file changed since, and the model batch its rows were scored in,
    which a re-run at another --micro-batch keeps."""
    status = Counter(table.column("status").to_pylist())
    errors = [
        e
        for s, e in zip(table.column("status").to_pylist(), table.column("error").to_pylist(), strict=True)
        if s == "truncated_shard"
    ]
    return {
        "shard": stem,
        "url": url,
        "input": stamp,
        "count": table.num_rows,
        "ok": status.get("ok", 0),
        **flag_counts(table),
        "status_counts": dict(sorted(status.items())),
        "shard_error": errors[0] if errors else None,
        "seconds": round(seconds, 3),
        "micro_batch": micro_batch,
    }


@dataclass
class ShardCollector:
    run: RunDir
    urls: dict[str, str]  # stem -> input url, of the shards this job scores
    threshold: float | None
    micro_batch: int  # the model's batch, recorded in each stats marker
    parts: dict[str, list[pa.Table]] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    received: Counter = field(default_factory=Counter)
    started: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)
    marks: Marking = field(init=False)  # done shards' stats markers, written at the next marking
    samples: int = 0
    stamps: dict[str, dict | None] = field(init=False)

    def __post_init__(self) -> None:
        # before any shard is read: a file that grows while it is read is stamped as it was
        self.stamps = dict(zip(self.urls, file_stamps(list(self.urls.values())), strict=True))
        self.marks = Marking(MARK_EVERY_S)

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
        self.marks.tick()

    def marking(self) -> contextlib.AbstractContextManager[None]:
        """The block that collects shards: the directories its files are renamed into are synced once
        a marking, not once a file, and each stats marker is written once its manifest's rename is
        durable. Leaving it marks every finished shard, on an error too, so that a re-run keeps them."""
        return self.marks.block()

    def _finish(self, stem: str) -> None:
        # what is held of a shard in flight goes: only its stem is kept, in done or failed
        parts, started, stamp = self.parts.pop(stem, []), self.started.pop(stem), self.stamps.pop(stem)
        del self.expected[stem]
        self.received.pop(stem, None)  # a shard that gave no rows has no count
        if stem in self.failed:  # rows read before the failure are dropped: the shard is retried
            self.run.unmark(stem)  # and a manifest a killed job wrote before its marker goes with them
            return
        rows = pa.concat_tables(parts) if parts else RESULT_SCHEMA.empty_table()
        table = manifest_table(rows, self.threshold)
        write_manifest(self.run.manifest(stem), table)
        stats = shard_stats(stem, self.urls[stem], stamp, table, time.time() - started, self.micro_batch)
        self.marks.add(self.run.stats(stem), stats)
        self.done.append(stem)
        self.samples += table.num_rows
