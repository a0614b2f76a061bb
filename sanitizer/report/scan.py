"""Reading a run for the page: each manifest read once, a shard at a time, with the columns the page
needs (never the thumbnails; the sketches only after the collapse pass), and handed to every part of
the page that takes something from it.

What is kept is small whatever the run's size: counts per shard, the most flagged rows, the manifests
of at most MAX_SHARDS_READ shards for the seeded samples of flagged and clean rows, the CLUSTER_POOL
rows the collapse pass flagged with the highest collapse, and a sample of the score-collapse plane;
but for the ok rows' scores and flags, which the histogram bins once their range is known.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sanitizer.collapse import ON_AXIS, SKETCH_DIM, group_by_seed
from sanitizer.manifest import COLUMNS, flag_counts, read_manifest
from sanitizer.rundir import RunDir

GRID_ROWS = 8  # most-flagged and typical clean samples shown as images
SAMPLE_PER_GROUP = 256  # flagged and clean samples behind the heat map and the projection
MAX_SHARDS_READ = 8  # input shards read again for that sample (plus those of the grid's samples)
CLUSTER_POOL = 4096  # collapse-flagged rows, highest collapse first, that the page groups
CLUSTERS = 4  # groups shown, one row of images each
CLUSTER_TILES = 8
JOINT_POINTS = 20_000  # rows drawn in the score-collapse plane: a seeded sample spread over the shards
BINS = 60
SEED = 0


@dataclass(frozen=True, order=True)
class Pick:
    """A manifest row chosen to be shown: where it is, and what the manifest says about it."""

    score: float
    stem: str
    index: int
    key: str = field(compare=False)
    caption: str | None = field(compare=False)
    flagged: bool = field(compare=False)
    label: bool | None = field(compare=False)


@dataclass
class ShardLine:
    stem: str
    count: int
    ok: int
    flagged: int
    by_score: int  # flagged by the score test, which the expected rate is the rate of
    by_collapse: int  # flagged by the collapse pass


class Reader(Protocol):
    """A part of the page that reads the manifests: the columns it needs, and what it takes of each."""

    @property
    def columns(self) -> tuple[str, ...]: ...

    def add(self, stem: str, table: pa.Table) -> None: ...


def read_manifests(run: RunDir, stems: list[str], readers: list[Reader]) -> None:
    """Read each manifest once, with the columns any reader needs, and hand it to every reader in turn:
    a run of thousands of small shards is read once, not once per section of the page."""
    wanted = {c for reader in readers for c in reader.columns}
    columns = [c for c in COLUMNS if c in wanted]
    for stem in stems:
        table = read_manifest(run.manifest(stem), columns)
        for reader in readers:
            reader.add(stem, table)


# What a Pick is made of, and what the scan itself reads; the collapse pass's columns come on top
_PICK_COLUMNS = ("index", "status", "score", "flagged", "label", "key", "caption")
_SCAN_COLUMNS = (*_PICK_COLUMNS, "flag_reason")
_JOINT_COLUMNS = ["score", "collapse", "collapse_threshold", "flag_reason", "label"]


def _picks(stem: str, rows: np.ndarray, table: pa.Table) -> list[Pick]:
    """Turn row positions of one manifest's table into Picks."""
    if not len(rows):
        return []
    chosen = table.select(list(_PICK_COLUMNS)).take(rows)
    column = chosen.column
    return [
        Pick(score, stem, index, key, caption, flagged, label)
        for score, index, key, caption, flagged, label in zip(
            *(column(c).to_pylist() for c in ("score", "index", "key", "caption", "flagged", "label")),
            strict=True,
        )
    ]


def _picks_at(tables: dict[str, pa.Table], rows: list[tuple[str, int]]) -> list[Pick]:
    """Picks of (stem, row position) pairs, in the order given."""
    by_stem: dict[str, list[int]] = {}
    for stem, row in rows:
        by_stem.setdefault(stem, []).append(row)
    found = {}
    for stem, positions in by_stem.items():
        ordered = np.sort(np.asarray(positions))
        for row, pick in zip(ordered.tolist(), _picks(stem, ordered, tables[stem]), strict=True):
            found[(stem, row)] = pick
    return [found[r] for r in rows]


def _by_collapse(table: pa.Table) -> np.ndarray:
    """Which rows the collapse pass flagged (flag_reason `collapse` or `score+collapse`)."""
    flagged = pc.fill_null(pc.match_substring(table.column("flag_reason"), "collapse"), False)
    return flagged.to_numpy(zero_copy_only=False)


@dataclass
class ClusterPool:
    """The CLUSTER_POOL rows of highest collapse that the collapse pass flagged, each with its sketch
    and its Pick; how many rows it flagged in all, and how many of those have no sketch (collapse
    ON_AXIS or more: nothing to group them by, so the page counts them apart)."""

    pool: list[tuple[float, str, int]] = field(default_factory=list)  # (-collapse, stem, row): highest first
    members: dict[tuple[str, int], tuple[np.ndarray, Pick]] = field(default_factory=dict)
    total: int = 0
    unsketched: int = 0
    columns: ClassVar[tuple[str, ...]] = (*_PICK_COLUMNS, "flag_reason", "collapse", "sketch")

    def add(self, stem: str, table: pa.Table) -> None:
        rows = np.flatnonzero(_by_collapse(table))
        self.total += len(rows)
        values = table.column("collapse").to_numpy(zero_copy_only=False)[rows]
        self.unsketched += int((values >= ON_AXIS).sum())
        cosine = values < ON_AXIS  # NaN: not ok
        rows, values = rows[cosine], values[cosine]
        order = np.argsort(-values, kind="stable")[:CLUSTER_POOL]
        entries = [(-float(v), stem, r) for v, r in zip(values[order], rows[order].tolist(), strict=True)]
        self.pool = heapq.nsmallest(CLUSTER_POOL, self.pool + entries)
        kept = np.array(sorted(e[2] for e in entries if e <= self.pool[-1]), np.int64)  # those still pooled
        chosen = table.take(kept)
        sketches = chosen.column("sketch").combine_chunks().values.to_numpy(zero_copy_only=False)
        for row, sketch, pick in zip(
            kept.tolist(), sketches.reshape(-1, SKETCH_DIM), _picks(stem, kept, table), strict=True
        ):
            self.members[(stem, row)] = (sketch.astype(np.float32), pick)
        self.members = {(s, r): self.members[(s, r)] for _, s, r in self.pool}


@dataclass
class JointSample:
    """Up to JOINT_POINTS rows with a cosine collapse, an equal seeded share from each of `shards`
    shards, and the rows without a sketch counted apart."""

    shards: int
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(SEED))
    parts: list[pa.Table] = field(default_factory=list)
    unsketched: int = 0
    unsketched_flagged: int = 0
    columns: ClassVar[tuple[str, ...]] = tuple(_JOINT_COLUMNS)

    def add(self, stem: str, table: pa.Table) -> None:
        share = -(-JOINT_POINTS // max(self.shards, 1))
        collapse = table.column("collapse").to_numpy(zero_copy_only=False)  # null reads as NaN
        none = collapse >= ON_AXIS
        self.unsketched += int(none.sum())
        self.unsketched_flagged += int((none & _by_collapse(table)).sum())
        rows = np.flatnonzero(collapse < ON_AXIS)  # the pass writes null, never NaN: a NaN is damage
        sample = np.sort(self.rng.choice(rows, min(share, len(rows)), replace=False))
        self.parts.append(table.select(_JOINT_COLUMNS).take(sample))


@dataclass
class RunScan:
    """Everything the page needs from the manifests, small whatever the run's size but for the ok
    rows' scores and flags, which the histogram bins once their range is known (5 bytes a row)."""

    shards: list[ShardLine] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    lo: float = math.inf
    hi: float = -math.inf
    top: list[Pick] = field(default_factory=list)  # the most flagged rows, highest score first
    labelled_scores: list[np.ndarray] = field(default_factory=list)
    labelled_truth: list[np.ndarray] = field(default_factory=list)
    ok_scores: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # score, flagged
    # the image sample's shards: the MAX_SHARDS_READ with an ok row and the most flags, input order
    # breaking ties, as (-flagged, position, stem, the manifest's Pick columns)
    busiest: list[tuple[int, int, str, pa.Table]] = field(default_factory=list)
    clusters: ClusterPool | None = None  # after the collapse pass
    joint: JointSample | None = None  # after the collapse pass

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.shards)

    @property
    def flagged(self) -> int:
        return sum(s.flagged for s in self.shards)

    @property
    def columns(self) -> tuple[str, ...]:
        return _SCAN_COLUMNS + tuple(c for part in self.parts for c in part.columns)

    @property
    def parts(self) -> list[Reader]:
        """What the collapse pass adds to the page, when it ran."""
        return [part for part in (self.clusters, self.joint) if part is not None]

    def add(self, stem: str, table: pa.Table) -> None:
        """Counts, score range, top flagged, ground truth, and the parts' shares of one manifest."""
        status = table.column("status").to_numpy(zero_copy_only=False)
        ok = status == "ok"
        raw = table.column("score").to_numpy(zero_copy_only=False)
        score = raw.astype(np.float32)
        flagged = table.column("flagged").to_numpy(zero_copy_only=False).astype(bool)
        for item in pc.value_counts(table.column("status")).to_pylist():
            self.statuses[item["values"]] += item["counts"]
        by = flag_counts(table)["flagged_by"]
        line = ShardLine(stem, table.num_rows, int(ok.sum()), int(flagged.sum()), by["score"], by["collapse"])
        if line.ok:
            self.lo, self.hi = min(self.lo, float(score[ok].min())), max(self.hi, float(score[ok].max()))
            entry = (-line.flagged, len(self.shards), stem, table.select(list(_PICK_COLUMNS)))
            self.busiest = heapq.nsmallest(MAX_SHARDS_READ, [*self.busiest, entry], key=lambda e: e[:2])
        self.shards.append(line)
        self.ok_scores.append((raw[ok], flagged[ok]))
        candidates = np.flatnonzero(flagged)
        if len(candidates) > GRID_ROWS:
            candidates = candidates[np.argpartition(-score[candidates], GRID_ROWS - 1)[:GRID_ROWS]]
        self.top = heapq.nlargest(GRID_ROWS, self.top + _picks(stem, candidates, table))
        label = table.column("label")
        has_label = ok & ~label.is_null().to_numpy(zero_copy_only=False)
        if has_label.any():
            self.labelled_scores.append(score[has_label])
            self.labelled_truth.append(label.to_numpy(zero_copy_only=False)[has_label].astype(bool))
        for part in self.parts:
            part.add(stem, table)


def scan_run(
    run: RunDir, stems: list[str], collapsed: bool = False, also: tuple[Reader, ...] = ()
) -> RunScan:
    """One pass over the finished shards' manifests, each read once, for the page and for `also`;
    `collapsed`: the collapse pass ran, so its clusters and its plane are gathered too."""
    scan = RunScan(
        clusters=ClusterPool() if collapsed else None, joint=JointSample(len(stems)) if collapsed else None
    )
    read_manifests(run, stems, [scan, *also])
    return scan


@dataclass
class Histograms:
    edges: np.ndarray
    clean: np.ndarray  # ok rows not flagged
    flagged: np.ndarray
    calibration: np.ndarray | None
    log_x: bool


def score_edges(lo: float, hi: float, extra: list[float]) -> tuple[np.ndarray, bool]:
    """Bin edges over every score shown; logarithmic when the scores span more than 50x."""
    values = [v for v in [lo, hi, *extra] if math.isfinite(v)]
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo > 50:
        return np.geomspace(lo, hi, BINS + 1), True
    if hi <= lo:
        hi = lo + max(abs(lo) * 0.01, 1e-6)
    return np.linspace(lo, hi, BINS + 1), False


def histograms(scan: RunScan, calibration, threshold) -> Histograms:
    """Counts per bin of the ok rows' scores, flagged and not, and of the calibration's."""
    extra = (
        []
        if calibration is None or not len(calibration)
        else [float(calibration.min()), float(calibration.max())]
    )
    if threshold is not None:
        extra.append(float(threshold))
    edges, log_x = score_edges(scan.lo, scan.hi, extra)
    clean, flagged = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    for scores, is_flagged in scan.ok_scores:
        score = np.clip(scores, edges[0], edges[-1])
        clean += np.histogram(score[~is_flagged], edges)[0]
        flagged += np.histogram(score[is_flagged], edges)[0]
    calib = None
    if calibration is not None and len(calibration):
        calib = np.histogram(np.clip(calibration, edges[0], edges[-1]), edges)[0]
    return Histograms(edges, clean, flagged, calib, log_x)


def sample_rows(scan: RunScan) -> tuple[list[Pick], list[Pick]]:
    """A seeded random sample of flagged and of clean rows, from the shards with the most flags.

    Limiting the sample to MAX_SHARDS_READ shards bounds how many input tars are read again; keeping
    only each shard's SAMPLE_PER_GROUP smallest random priorities bounds memory (a bottom-k sample).
    """
    rng = np.random.default_rng(SEED)
    candidates: dict[bool, list[tuple[float, str, int]]] = {True: [], False: []}
    for _, _, stem, table in scan.busiest:
        ok = table.column("status").to_numpy(zero_copy_only=False) == "ok"
        flagged = table.column("flagged").to_numpy(zero_copy_only=False).astype(bool)
        priority = rng.random(table.num_rows)
        for want in (True, False):
            rows = np.flatnonzero(ok & (flagged == want))
            if len(rows) > SAMPLE_PER_GROUP:
                rows = rows[np.argpartition(priority[rows], SAMPLE_PER_GROUP - 1)[:SAMPLE_PER_GROUP]]
            candidates[want] += [(float(priority[r]), stem, int(r)) for r in rows]
    tables = {stem: table for _, _, stem, table in scan.busiest}
    picked: dict[bool, list[Pick]] = {}
    for want, entries in candidates.items():
        chosen = [(stem, row) for _, stem, row in heapq.nsmallest(SAMPLE_PER_GROUP, entries)]
        first = {stem: i for i, stem in enumerate(dict.fromkeys(stem for stem, _ in chosen))}
        # shard by shard, in the order the draw first met them, rows in manifest order
        picked[want] = _picks_at(tables, sorted(chosen, key=lambda where: (first[where[0]], where[1])))
    return picked[True], picked[False]


@dataclass
class Cluster:
    """Collapse-flagged samples whose sketch's cosine to the group's first is at least the lowest
    collapse among the pooled rows (a mean over 5 neighbours, used here for one pair: a display
    heuristic)."""

    size: int  # members among the pooled rows
    poisoned: int | None  # members labelled poisoned; None when none carries a label
    picks: list[Pick]  # the first CLUSTER_TILES members, highest collapse first


def collapse_clusters(pool: ClusterPool) -> list[Cluster]:
    """Up to CLUSTERS groups of the pooled rows, seeded in order of collapse. A trigger's images look
    different but share a patch or a tint; copies of one photo are not each other's neighbours
    (sanitizer.collapse), so they do not make a group by themselves."""
    if not pool.pool:
        return []
    where = [(stem, row) for _, stem, row in pool.pool]
    link = -max(value for value, _, _ in pool.pool)  # the lowest pooled collapse
    groups = group_by_seed(np.stack([pool.members[w][0] for w in where]), link, CLUSTERS)
    clusters = []
    for g in range(int(groups.max()) + 1):
        picks = [pool.members[where[i]][1] for i in np.flatnonzero(groups == g)]
        labels = [p.label for p in picks if p.label is not None]
        clusters.append(Cluster(len(picks), sum(labels) if labels else None, picks[:CLUSTER_TILES]))
    return clusters


@dataclass
class JointPoints:
    """A sample of the rows that have a cosine collapse: where the collapse pass puts them; and the
    rows without a sketch (collapse ON_AXIS or more), which have no place on a cosine's axis, counted
    apart."""

    score: np.ndarray
    collapse: np.ndarray
    needed: np.ndarray  # collapse_threshold: the collapse each row needs, given its score
    reason: np.ndarray  # flag_reason, "" for kept rows
    truth: np.ndarray | None  # label, where every sampled row has one
    unsketched: int = 0  # rows of the run without a sketch
    unsketched_flagged: int = 0  # of those, the ones the collapse pass flagged


def joint_points(sample: JointSample) -> JointPoints | None:
    """The sampled rows with a cosine collapse; None when no row has a collapse."""
    table = pa.concat_tables(sample.parts) if sample.parts else None
    if table is None or not (table.num_rows or sample.unsketched):
        return None
    column = lambda name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    label = table.column("label")
    return JointPoints(
        column("score"),
        column("collapse"),
        column("collapse_threshold"),
        np.array([r or "" for r in table.column("flag_reason").to_pylist()], object),
        None if label.null_count else label.to_numpy(zero_copy_only=False).astype(bool),
        sample.unsketched,
        sample.unsketched_flagged,
    )
