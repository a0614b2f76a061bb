"""Reading a run for the page: its manifests one shard and a few columns at a time.

Everything returned is small whatever the run's size: counts per shard, a histogram of the scores, the
most flagged rows, seeded samples of flagged and clean rows (from at most MAX_SHARDS_READ shards), the
groups of samples the collapse pass flagged, and a sample of the score-collapse plane.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sanitizer.collapse import ON_AXIS, SKETCH_DIM, group_by_seed
from sanitizer.manifest import flag_counts, read_manifest
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


@dataclass
class RunScan:
    """Everything the page needs from the manifests, small whatever the run's size."""

    shards: list[ShardLine] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    lo: float = math.inf
    hi: float = -math.inf
    top: list[Pick] = field(default_factory=list)  # the most flagged rows, highest score first
    labelled_scores: list[np.ndarray] = field(default_factory=list)
    labelled_truth: list[np.ndarray] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.shards)

    @property
    def flagged(self) -> int:
        return sum(s.flagged for s in self.shards)


_SCAN_COLUMNS = ["index", "status", "score", "flagged", "flag_reason", "label"]


def _read(run: RunDir, stem: str, columns: list[str]):
    return read_manifest(run.manifest(stem), columns)


def _picks(run: RunDir, stem: str, rows: np.ndarray, table) -> list[Pick]:
    """Turn row positions of one manifest into Picks (reads key and caption for those rows only)."""
    if not len(rows):
        return []
    extra = _read(run, stem, ["key", "caption"]).take(rows)
    keys, captions = extra.column("key").to_pylist(), extra.column("caption").to_pylist()
    scores = table.column("score").to_numpy(zero_copy_only=False)[rows]
    index = table.column("index").to_numpy()[rows]
    flagged = table.column("flagged").to_numpy(zero_copy_only=False)[rows]
    labels = table.column("label").take(rows).to_pylist()
    return [
        Pick(float(scores[i]), stem, int(index[i]), keys[i], captions[i], bool(flagged[i]), labels[i])
        for i in range(len(rows))
    ]


def _picks_at(run: RunDir, rows: list[tuple[str, int]]) -> list[Pick]:
    """Picks of (stem, row position) pairs, in the order given, reading each manifest once."""
    by_stem: dict[str, list[int]] = {}
    for stem, row in rows:
        by_stem.setdefault(stem, []).append(row)
    found = {}
    for stem, positions in by_stem.items():
        ordered = np.sort(np.asarray(positions))
        for row, pick in zip(
            ordered.tolist(), _picks(run, stem, ordered, _read(run, stem, _SCAN_COLUMNS)), strict=True
        ):
            found[(stem, row)] = pick
    return [found[r] for r in rows]


def scan_run(run: RunDir, stems: list[str]) -> RunScan:
    """One pass over the finished shards' manifests: counts, score range, top flagged, ground truth."""
    scan = RunScan()
    for stem in stems:
        table = _read(run, stem, _SCAN_COLUMNS)
        status = table.column("status").to_numpy(zero_copy_only=False)
        ok = status == "ok"
        score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
        flagged = table.column("flagged").to_numpy(zero_copy_only=False).astype(bool)
        for item in pc.value_counts(table.column("status")).to_pylist():
            scan.statuses[item["values"]] += item["counts"]
        by = flag_counts(table)["flagged_by"]
        line = ShardLine(stem, table.num_rows, int(ok.sum()), int(flagged.sum()), by["score"], by["collapse"])
        scan.shards.append(line)
        if ok.any():
            scan.lo, scan.hi = min(scan.lo, float(score[ok].min())), max(scan.hi, float(score[ok].max()))
        candidates = np.flatnonzero(flagged)
        if len(candidates) > GRID_ROWS:
            candidates = candidates[np.argpartition(-score[candidates], GRID_ROWS - 1)[:GRID_ROWS]]
        scan.top = heapq.nlargest(GRID_ROWS, scan.top + _picks(run, stem, candidates, table))
        label = table.column("label")
        has_label = ok & ~label.is_null().to_numpy(zero_copy_only=False)
        if has_label.any():
            scan.labelled_scores.append(score[has_label])
            scan.labelled_truth.append(label.to_numpy(zero_copy_only=False)[has_label].astype(bool))
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


def histograms(run: RunDir, stems: list[str], scan: RunScan, calibration, threshold) -> Histograms:
    """Second pass over the score column: counts per bin, flagged and not, and the calibration's."""
    extra = (
        []
        if calibration is None or not len(calibration)
        else [float(calibration.min()), float(calibration.max())]
    )
    if threshold is not None:
        extra.append(float(threshold))
    edges, log_x = score_edges(scan.lo, scan.hi, extra)
    clean, flagged = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    for stem in stems:
        table = _read(run, stem, ["status", "score", "flagged"])
        ok = table.column("status").to_numpy(zero_copy_only=False) == "ok"
        score = np.clip(table.column("score").to_numpy(zero_copy_only=False)[ok], edges[0], edges[-1])
        is_flagged = table.column("flagged").to_numpy(zero_copy_only=False)[ok].astype(bool)
        clean += np.histogram(score[~is_flagged], edges)[0]
        flagged += np.histogram(score[is_flagged], edges)[0]
    calib = None
    if calibration is not None and len(calibration):
        calib = np.histogram(np.clip(calibration, edges[0], edges[-1]), edges)[0]
    return Histograms(edges, clean, flagged, calib, log_x)


def sample_rows(run: RunDir, scan: RunScan) -> tuple[list[Pick], list[Pick]]:
    """A seeded random sample of flagged and of clean rows, from the shards with the most flags.

    Limiting the sample to MAX_SHARDS_READ shards bounds how many input tars are read again; keeping
    only each shard's SAMPLE_PER_GROUP smallest random priorities bounds memory (a bottom-k sample).
    """
    order = sorted(range(len(scan.shards)), key=lambda i: (-scan.shards[i].flagged, i))
    stems = [scan.shards[i].stem for i in order if scan.shards[i].ok][:MAX_SHARDS_READ]
    rng = np.random.default_rng(SEED)
    candidates: dict[bool, list[tuple[float, str, int]]] = {True: [], False: []}
    for stem in stems:
        table = _read(run, stem, ["status", "flagged"])
        ok = table.column("status").to_numpy(zero_copy_only=False) == "ok"
        flagged = table.column("flagged").to_numpy(zero_copy_only=False).astype(bool)
        priority = rng.random(table.num_rows)
        for want in (True, False):
            rows = np.flatnonzero(ok & (flagged == want))
            if len(rows) > SAMPLE_PER_GROUP:
                rows = rows[np.argpartition(priority[rows], SAMPLE_PER_GROUP - 1)[:SAMPLE_PER_GROUP]]
            candidates[want] += [(float(priority[r]), stem, int(r)) for r in rows]
    picked: dict[bool, list[Pick]] = {}
    for want, entries in candidates.items():
        chosen = [(stem, row) for _, stem, row in heapq.nsmallest(SAMPLE_PER_GROUP, entries)]
        first = {stem: i for i, stem in enumerate(dict.fromkeys(stem for stem, _ in chosen))}
        # shard by shard, in the order the draw first met them, rows in manifest order
        picked[want] = _picks_at(run, sorted(chosen, key=lambda where: (first[where[0]], where[1])))
    return picked[True], picked[False]


@dataclass
class Cluster:
    """Collapse-flagged samples whose sketch's cosine to the group's first is at least the lowest
    collapse among the pooled rows (a mean over 5 neighbours, used here for one pair: a display
    heuristic)."""

    size: int  # members among the pooled rows
    poisoned: int | None  # members labelled poisoned; None when none carries a label
    picks: list[Pick]  # the first CLUSTER_TILES members, highest collapse first


def _by_collapse(table: pa.Table) -> np.ndarray:
    """Which rows the collapse pass flagged (flag_reason `collapse` or `score+collapse`)."""
    flagged = pc.fill_null(pc.match_substring(table.column("flag_reason"), "collapse"), False)
    return flagged.to_numpy(zero_copy_only=False)


def collapse_clusters(run: RunDir, stems: list[str]) -> tuple[list[Cluster], int, int]:
    """Up to CLUSTERS groups, seeded in order of collapse, among the CLUSTER_POOL rows of highest
    collapse that the collapse pass flagged; how many rows it flagged in all, and how many of those
    have no sketch (collapse ON_AXIS or more: nothing to group them by, so the page counts them
    apart). A trigger's images look different but share a patch or a tint; copies of one photo are
    not each other's neighbours (sanitizer.collapse), so they do not make a group by themselves."""
    pool: list[tuple[float, str, int]] = []  # (-collapse, stem, row): sorts highest collapse first
    extra: dict[tuple[str, int], tuple[np.ndarray, bool | None]] = {}  # sketch, label
    total = unsketched = 0
    for stem in stems:
        table = _read(run, stem, ["flag_reason", "collapse", "sketch", "label"])
        rows = np.flatnonzero(_by_collapse(table))
        total += len(rows)
        values = table.column("collapse").to_numpy(zero_copy_only=False)[rows]
        unsketched += int((values >= ON_AXIS).sum())
        cosine = values < ON_AXIS  # NaN: not ok
        rows, values = rows[cosine], values[cosine]
        order = np.argsort(-values, kind="stable")[:CLUSTER_POOL]
        rows, values = rows[order], values[order]
        chosen = table.take(rows)
        sketches = chosen.column("sketch").combine_chunks().values.to_numpy(zero_copy_only=False)
        for row, sketch, label in zip(
            rows.tolist(), sketches.reshape(-1, SKETCH_DIM), chosen.column("label").to_pylist(), strict=True
        ):
            extra[(stem, row)] = (sketch.astype(np.float32), label)
        pool = heapq.nsmallest(
            CLUSTER_POOL, pool + [(-float(v), stem, r) for v, r in zip(values, rows.tolist(), strict=True)]
        )
        extra = {(stem, row): extra[(stem, row)] for _, stem, row in pool}
    if not pool:
        return [], total, unsketched
    where = [(stem, row) for _, stem, row in pool]
    link = -max(value for value, _, _ in pool)  # the lowest pooled collapse
    groups = group_by_seed(np.stack([extra[w][0] for w in where]), link, CLUSTERS)
    clusters = []
    for g in range(int(groups.max()) + 1):
        members = [where[i] for i in np.flatnonzero(groups == g)]
        labels = [extra[w][1] for w in members if extra[w][1] is not None]
        clusters.append(
            Cluster(len(members), sum(labels) if labels else None, _picks_at(run, members[:CLUSTER_TILES]))
        )
    return clusters, total, unsketched


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


def joint_points(run: RunDir, stems: list[str]) -> JointPoints | None:
    """Up to JOINT_POINTS rows with a cosine collapse, an equal seeded share from each shard; None
    when no row has a collapse."""
    rng, share = np.random.default_rng(SEED), -(-JOINT_POINTS // max(len(stems), 1))
    parts, unsketched, unsketched_flagged = [], 0, 0
    for stem in stems:
        table = _read(run, stem, ["score", "collapse", "collapse_threshold", "flag_reason", "label"])
        collapse = table.column("collapse").to_numpy(zero_copy_only=False)  # null reads as NaN
        none = collapse >= ON_AXIS
        unsketched += int(none.sum())
        unsketched_flagged += int((none & _by_collapse(table)).sum())
        rows = np.flatnonzero(collapse < ON_AXIS)  # the pass writes null, never NaN: a NaN is damage
        parts.append(table.take(np.sort(rng.choice(rows, min(share, len(rows)), replace=False))))
    table = pa.concat_tables(parts) if parts else None
    if table is None or not (table.num_rows or unsketched):
        return None
    column = lambda name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    label = table.column("label")
    return JointPoints(
        column("score"),
        column("collapse"),
        column("collapse_threshold"),
        np.array([r or "" for r in table.column("flag_reason").to_pylist()], object),
        None if label.null_count else label.to_numpy(zero_copy_only=False).astype(bool),
        unsketched,
        unsketched_flagged,
    )
