"""`sanitizer report RUN_DIR`: one HTML page that shows a person what was removed and why.

RUN_DIR/report/index.html plus PNG files beside it, nothing fetched from elsewhere: the score
histogram against the threshold and the decoder's calibration, the flag rate per shard, the most
flagged samples next to typical clean ones (what the decoder saw, what it rebuilt, the original), where
in the image the reconstruction fails (a patch trigger shows up as a bright square), the embeddings in
two dimensions, the ROC curve when the shards carry ground truth, an encoder-level verdict, and,
after the collapse pass, the groups of samples that pass flagged, side by side.

Memory and time stay bounded whatever the run's size: manifests are read one shard and a few columns
at a time, and only a bounded sample of images is read again and run through the encoder and decoder
(the typical ones from at most MAX_SHARDS_READ shards, the most flagged and the collapse groups' from
the shards they are in).
"""

from __future__ import annotations

import heapq
import html
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sanitizer.atomic import atomic_path, remove_stale_temps
from sanitizer.checkpoint import read_meta
from sanitizer.collapse import SKETCH_DIM, group_by_seed, unlike_holdout
from sanitizer.data.shards import ShardRef
from sanitizer.errors import SanitizerError, UsageError
from sanitizer.manifest import read_manifest
from sanitizer.pipeline.collect import flag_counts, ok_scores
from sanitizer.rundir import RunDir, open_run
from sanitizer.scoring import ScoreSettings, calibration_for
from sanitizer.stats import SHIFT_LIMIT, above_median, beta_binomial_sf, binomial_sf, roc_auc, roc_curve
from sanitizer.thresholds import parse_rule

ALPHA = 1e-3  # significance level of the encoder verdict: a false alarm about an encoder is costly
GRID_ROWS = 8  # most-flagged and typical clean samples shown as images
SAMPLE_PER_GROUP = 256  # flagged and clean samples behind the heat map and the projection
MAX_SHARDS_READ = 8  # input shards read again for that sample (plus those of the grid's samples)
CLUSTER_POOL = 4096  # collapse-flagged rows, highest collapse first, that the page groups
CLUSTERS = 4  # groups shown, one row of images each
CLUSTER_TILES = 8
JOINT_POINTS = 20_000  # rows drawn in the score-collapse plane: a seeded sample spread over the shards
BINS = 60
SEED = 0
FIGURES = (
    "scores.png", "joint.png", "shards.png", "samples.png", "clusters.png", "localisation.png",
    "embeddings.png", "roc.png",
)  # fmt: skip
FLAG_COLOUR, CLEAN_COLOUR, CALIBRATION_COLOUR = "#d62728", "#4c78a8", "#444444"


# -- the encoder-level verdict -----------------------------------------------------------------------
def expected_flag_rate(rule_text: str, threshold: float, calibration: np.ndarray | None) -> float | None:
    """The false-positive rate the threshold was set for, on data like the decoder's calibration.

    With the calibration scores (m of them, j above the threshold) it is (j + 1) / (m + 1): the mean of
    the Beta(j + 1, m - j) law of the rate on clean data exchangeable with them, which never claims
    exactly zero. Without them, quantile:Q means 1 - Q by construction; other rules give no rate.
    """
    counts = _calibration_counts(threshold, calibration)
    if counts is not None:
        above, m = counts
        return (above + 1) / (m + 1)
    rule = parse_rule(rule_text)
    return 1.0 - rule.param if rule.kind == "quantile" else None


def _calibration_counts(threshold: float, calibration: np.ndarray | None) -> tuple[int, int] | None:
    """(calibration scores above the threshold, calibration scores), if there are any."""
    if calibration is None or not len(calibration):
        return None
    return int((calibration > np.float32(threshold)).sum()), len(calibration)


def flag_count_p_value(
    flagged: int, ok: int, p0: float, threshold: float, calibration: np.ndarray | None
) -> tuple[float, str]:
    """(P(at least `flagged` of `ok` clean samples are flagged), the name of the test).

    The rate a threshold set on m calibration scores allows is itself uncertain (its standard error is
    ~sqrt(p0 / m)): a binomial test at p0 alone would call a clean encoder backdoored on any large run
    whose rate is a little above p0 by chance of the calibration. So with the calibration scores the
    count is beta-binomial (the rate Beta(j + 1, m - j), as in conformal prediction: exact for clean
    data exchangeable with the calibration, conservative for an interpolated threshold); without them it
    is Binomial(ok, p0).
    """
    counts = _calibration_counts(threshold, calibration)
    if counts is None:
        return binomial_sf(flagged, ok, p0), "binomial"
    above, m = counts
    return beta_binomial_sf(flagged, ok, above + 1, m - above), "beta-binomial"


def _calibration(info: dict) -> tuple[np.ndarray | None, dict | None]:
    """The decoder's calibration scores, if the decoder is still where the run found it."""
    try:
        meta = read_meta(Path(info["config"]["decoder_dir"]))
    except (SanitizerError, KeyError, OSError):
        return None, None
    try:
        return calibration_for(meta, ScoreSettings.from_dict(info["identity"]["scoring"])), meta
    except (KeyError, TypeError):  # a run.json or decoder.json without these: no usable calibration
        return None, meta


def _done_totals(run: RunDir, shards: list[ShardRef]) -> tuple[int, int]:
    ok = flagged = 0
    for shard in shards:
        if run.is_done(shard.stem):
            stats = run.read_stats(shard.stem)
            ok, flagged = ok + stats["ok"], flagged + stats["flagged_by"]["score"]
    return ok, flagged


def encoder_verdict(run_dir: Path) -> dict:
    """Is the flagged share of a run significantly above the false-positive rate the threshold allows?

    On clean data like the decoder's calibration, each ok sample is flagged with a probability p0 that
    is known only as well as the calibration pins it down; the one-sided p-value is P(X >= flagged)
    under that null (flag_count_p_value). A small p-value says the encoder rebuilds a part of this data
    far worse than it should: it behaves as backdoored here. It also fires when the data is very unlike
    the calibration data, which the text says.
    """
    run, info, shards = open_run(run_dir)
    ok, flagged = _done_totals(run, shards)
    threshold = (info.get("threshold") or {}).get("value")
    rule = (info.get("threshold") or {}).get("rule")
    calibration, _ = _calibration(info)
    p0 = expected_flag_rate(rule, threshold, calibration) if rule and threshold is not None else None
    result = {
        "ok": ok,
        "flagged": flagged,
        "flag_rate": flagged / ok if ok else 0.0,
        "expected_rate": p0,
        "calibration_n": None if calibration is None else int(len(calibration)),
        "p_value": None,
        "test": None,
        "alpha": ALPHA,
        "backdoored": None,
        "above_calibration_median": share_above_median(run, shards, calibration),
    }
    if p0 is None or not ok:
        result["text"] = "no verdict: the run has no threshold, no ok samples or no usable calibration"
        return result
    p, result["test"] = flag_count_p_value(flagged, ok, p0, threshold, calibration)
    result["p_value"] = p
    result["backdoored"] = bool(p < ALPHA)
    shown = f"p={_p_text(p)}"
    shift = result["above_calibration_median"]
    if shift is not None and shift > SHIFT_LIMIT:
        result["backdoored"] = None
        result["text"] = (
            f"no verdict: {shift:.0%} of the scores are above the median of the decoder's calibration "
            f"scores (about 50% on clean data like the calibration data; {SHIFT_LIMIT:.0%} only if "
            f"{2 * SHIFT_LIMIT - 1:.0%} of this data were triggered): this data is unlike the decoder's "
            f"training data, so {flagged} of {ok} flagged by score ({p0:.2%} expected, {shown}) says more "
            "about the data than the encoder; train a decoder on a sample of this data"
        )
        return result
    counted = f"{flagged} of {ok} samples flagged by score, {p0:.2%} expected"
    result["text"] = (
        f"this encoder behaves as backdoored on this data ({shown}): {counted}"
        if result["backdoored"]
        else f"no evidence of a backdoor ({shown}): {counted}"
    )
    return result


def share_above_median(run: RunDir, shards: list[ShardRef], calibration: np.ndarray | None) -> float | None:
    """Share of the finished shards' ok scores above the calibration's median (None without both)."""
    stems = run.done(shards)
    if calibration is None or not len(calibration) or not all(run.manifest(s).is_file() for s in stems):
        return None
    above = total = 0
    for stem in stems:  # a shard at a time: a run's scores need not fit in memory
        scores = ok_scores(run, [stem])
        above, total = above + above_median(scores, calibration), total + len(scores)
    return above / total if total else None


def _p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-300 else "<1e-300"


# -- reading the run, one shard and a few columns at a time ----------------------------------------
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
        by_score = flag_counts(table)["flagged_by"]["score"]
        scan.shards.append(ShardLine(stem, table.num_rows, int(ok.sum()), int(flagged.sum()), by_score))
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
    picked: dict[bool, list[Pick]] = {True: [], False: []}
    for want, entries in candidates.items():
        by_stem: dict[str, list[int]] = {}
        for _, stem, row in heapq.nsmallest(SAMPLE_PER_GROUP, entries):
            by_stem.setdefault(stem, []).append(row)
        for stem, rows in by_stem.items():
            table = _read(run, stem, _SCAN_COLUMNS)
            picked[want] += _picks(run, stem, np.sort(np.asarray(rows)), table)
    return picked[True], picked[False]


@dataclass
class Cluster:
    """Collapse-flagged samples whose sketch's cosine to the group's first is at least the lowest
    collapse among the pooled rows (a mean over 5 neighbours, used here for one pair: a display
    heuristic)."""

    size: int  # members among the pooled rows
    poisoned: int | None  # members labelled poisoned; None when none carries a label
    picks: list[Pick]  # the first CLUSTER_TILES members, highest collapse first


def collapse_clusters(run: RunDir, stems: list[str]) -> tuple[list[Cluster], int]:
    """Up to CLUSTERS groups, seeded in order of collapse, among the CLUSTER_POOL rows of highest
    collapse that the collapse pass flagged, and how many rows it flagged in all. A trigger's images
    look different but share a patch or a tint; copies of one photo are not each other's neighbours
    (sanitizer.collapse), so they do not make a group by themselves."""
    pool: list[tuple[float, str, int]] = []  # (-collapse, stem, row): sorts highest collapse first
    extra: dict[tuple[str, int], tuple[np.ndarray, bool | None]] = {}  # sketch, label
    total = 0
    for stem in stems:
        table = _read(run, stem, ["flag_reason", "collapse", "sketch", "label"])
        by_collapse = pc.fill_null(pc.match_substring(table.column("flag_reason"), "collapse"), False)
        rows = np.flatnonzero(by_collapse.to_numpy(zero_copy_only=False))
        total += len(rows)
        values = table.column("collapse").to_numpy(zero_copy_only=False)[rows]
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
        return [], total
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
    return clusters, total


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


# -- images: read the few samples again, rebuild them with the run's encoder and decoder -------------
@dataclass
class Views:
    """Pixels of a list of Picks, in the same order; picks whose image could not be read are dropped."""

    picks: list[Pick]
    original: np.ndarray  # (N, H, W, 3) uint8
    masked: np.ndarray  # what the decoder saw: hidden patches grey
    rebuilt: np.ndarray  # visible patches copied, hidden ones from the decoder
    residual: np.ndarray  # (N, H, W) float32: mean absolute error over channels, 0..255
    embeddings: np.ndarray  # (N, D) float32 raw victim embeddings
    hidden: np.ndarray  # (N, H, W) bool: pixels the decoder did not see


def read_images(
    urls: dict[str, str], picks: list[Pick], image_size: int
) -> tuple[dict[tuple[str, int], tuple[np.ndarray, str]], list[str]]:
    """(stem, index) -> (pixels, the raw key that seeds the masks), reading each shard once, and notes.

    A sample whose key no longer matches the manifest is left out: the shard changed since scoring.
    """
    from sanitizer.data.decode import decode_image
    from sanitizer.data.tario import ShardError, iter_samples, printable

    wanted: dict[str, dict[int, str]] = {}
    for p in picks:
        wanted.setdefault(p.stem, {})[p.index] = p.key
    found, notes = {}, []
    for stem, rows in wanted.items():
        last = max(rows)
        try:
            for sample in iter_samples(urls[stem]):
                if sample.index in rows:
                    if printable(sample.key) != rows[sample.index]:
                        notes.append(
                            f"{stem}: sample {sample.index} is not the one scored; the shard changed"
                        )
                        continue
                    decoded = decode_image(sample, image_size)
                    if decoded.pixels is not None:
                        found[(stem, sample.index)] = (decoded.pixels, sample.key)
                if sample.index >= last:
                    break
        except ShardError as e:
            notes.append(f"cannot read {urls[stem]} again: {e.message}")
    return found, notes


def _hidden_pixels(mask: np.ndarray, image_size: int) -> np.ndarray:
    """(N, L) patch mask (1 = hidden) -> (N, H, W) bool."""
    grid = int(round(math.sqrt(mask.shape[1])))
    patch = image_size // grid
    return np.repeat(np.repeat(mask.reshape(-1, grid, grid), patch, 1), patch, 2).astype(bool)


def render_views(scorer, picks: list[Pick], images: dict, image_size: int, chunk: int = 64) -> Views:
    """Masked input, reconstruction (first key-seeded mask, as scored), residual and embeddings."""
    from sanitizer.encoders import embed_pixels
    from sanitizer.scoring import key_seeds

    kept = [p for p in picks if (p.stem, p.index) in images]
    if not kept:
        empty = np.zeros((0, image_size, image_size, 3), np.uint8)
        flat = np.zeros((0, image_size, image_size), np.float32)
        return Views([], empty, empty, empty, flat, np.zeros((0, 0), np.float32), flat.astype(bool))
    original = np.stack([images[(p.stem, p.index)][0] for p in kept])
    seeds = key_seeds([images[(p.stem, p.index)][1] for p in kept])
    parts = [
        scorer.reconstruct(original[i : i + chunk], seeds[i : i + chunk]) for i in range(0, len(kept), chunk)
    ]
    recon = np.concatenate([r for r, _ in parts])
    hidden = _hidden_pixels(np.concatenate([m for _, m in parts]), image_size)
    rebuilt = np.where(hidden[..., None], recon, original)
    masked = np.where(hidden[..., None], np.uint8(128), original).astype(np.uint8)
    residual = np.abs(rebuilt.astype(np.float32) - original.astype(np.float32)).mean(-1)
    embeddings = embed_pixels(scorer.encoder, original)
    return Views(kept, original, masked, rebuilt, residual, embeddings, hidden)


def typical(views: Views, count: int) -> Views:
    """The clean samples whose scores are closest to the clean sample's median."""
    if not views.picks:
        return views
    scores = np.array([p.score for p in views.picks])
    order = np.argsort(np.abs(scores - np.median(scores)), kind="stable")[:count]
    order = order[np.argsort(-scores[order], kind="stable")]
    return _subset(views, order)


def _subset(views: Views, rows: np.ndarray) -> Views:
    return Views(
        [views.picks[i] for i in rows],
        views.original[rows],
        views.masked[rows],
        views.rebuilt[rows],
        views.residual[rows],
        views.embeddings[rows],
        views.hidden[rows],
    )


# -- figures ---------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, Agg canvas

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor="white")


def _legend_above(ax) -> None:
    """One row of legend entries above the axes: never on top of the data, and no slow 'best' search."""
    ax.legend(frameon=False, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.01), ncols=4, borderaxespad=0)


def plot_scores(path: Path, h: Histograms, threshold: float | None, rule: str) -> None:
    """Log-count histogram: kept and flagged samples, the calibration (scaled to the run), threshold."""
    fig = _figure(8.5, 3.8)
    ax = fig.add_subplot()
    widths = np.diff(h.edges)
    ax.bar(h.edges[:-1], h.clean, widths, align="edge", color=CLEAN_COLOUR, label="kept", linewidth=0)
    ax.bar(
        h.edges[:-1],
        h.flagged,
        widths,
        bottom=h.clean,
        align="edge",
        color=FLAG_COLOUR,
        label="flagged",
        linewidth=0,
    )
    total = int(h.clean.sum() + h.flagged.sum())
    if h.calibration is not None and h.calibration.sum():
        scaled = h.calibration * total / h.calibration.sum()
        ax.stairs(
            scaled,
            h.edges,
            color=CALIBRATION_COLOUR,
            linewidth=1.6,
            label="calibration (held-out clean, scaled)",
        )
    if threshold is not None:
        ax.axvline(
            threshold,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"threshold {threshold:.4g} ({rule})",
        )
    ax.set_yscale("log")
    if h.log_x:
        ax.set_xscale("log")
    ax.set_ylim(bottom=0.7)
    ax.set_xlabel("reconstruction error (score)")
    ax.set_ylabel("samples (log scale)")
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


@dataclass
class JointPoints:
    """A sample of the rows that have a collapse: where the collapse pass puts them."""

    score: np.ndarray
    collapse: np.ndarray
    needed: np.ndarray  # collapse_threshold: the collapse each row needs, given its score
    reason: np.ndarray  # flag_reason, "" for kept rows
    truth: np.ndarray | None  # label, where every sampled row has one


def joint_points(run: RunDir, stems: list[str]) -> JointPoints | None:
    """Up to JOINT_POINTS rows with a collapse, an equal seeded share from each shard."""
    rng, share = np.random.default_rng(SEED), -(-JOINT_POINTS // max(len(stems), 1))
    parts = []
    for stem in stems:
        table = _read(run, stem, ["score", "collapse", "collapse_threshold", "flag_reason", "label"])
        rows = np.flatnonzero(pc.is_valid(table.column("collapse")).to_numpy(zero_copy_only=False))
        parts.append(table.take(np.sort(rng.choice(rows, min(share, len(rows)), replace=False))))
    table = pa.concat_tables(parts) if parts else None
    if table is None or not table.num_rows:
        return None
    column = lambda name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    label = table.column("label")
    return JointPoints(
        column("score"),
        column("collapse"),
        column("collapse_threshold"),
        np.array([r or "" for r in table.column("flag_reason").to_pylist()], object),
        None if label.null_count else label.to_numpy(zero_copy_only=False).astype(bool),
    )


def plot_joint(path: Path, points: JointPoints, threshold: float | None) -> None:
    """Score against collapse, each row coloured by what flagged it, the pass's boundary (the collapse
    a row needs at each score) and the score's threshold. The collapse is drawn as 1 - cosine on a log
    scale, upside down, so that the crowd just below 1 spreads out and nearer is higher."""
    fig = _figure(8.5, 4.4)
    ax = fig.add_subplot()
    distance = 1 - points.collapse
    floor = max(float(distance[distance > 0].min()) / 2 if (distance > 0).any() else 1e-6, 1e-7)
    top = max(float(distance.max()) * 1.5, floor * 10)
    distance = np.clip(distance, floor, top)
    colours = {"": CLEAN_COLOUR, "score": "#ff7f0e", "collapse": FLAG_COLOUR, "score+collapse": "#7b1fa2"}
    for reason, colour in colours.items():
        chosen = points.reason == reason
        if chosen.any():
            name = f"by {reason}" if reason else "kept"
            ax.scatter(
                points.score[chosen], distance[chosen], s=5, color=colour, alpha=0.5, linewidths=0,
                label=f"{name} ({int(chosen.sum()):,})",
            )  # fmt: skip
    if points.truth is not None and points.truth.any():
        t = points.truth
        ax.scatter(
            points.score[t], distance[t], s=16, facecolors="none", edgecolors="black", linewidths=0.4,
            label="poisoned (truth)",
        )  # fmt: skip
    order = np.argsort(points.score, kind="stable")
    boundary = np.clip(1 - points.needed[order], floor, top)  # +inf needed: off the top of the plot
    ax.plot(points.score[order], boundary, color="black", linewidth=1.2, label="collapse needed")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="score threshold")
    if (points.score > 0).all() and points.score.max() > 100 * points.score.min():
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top, floor)
    ax.set_xlabel("reconstruction error (score)")
    ax.set_ylabel("1 - collapse (up: nearer its 5 nearest)")
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


def plot_shards(path: Path, shards: list[ShardLine], expected: float | None) -> None:
    """The score test's flag rate per shard, against the rate it has on clean data: bars with names
    for a few shards, dots in input order for many."""
    fig = _figure(8.5, 3.2)
    ax = fig.add_subplot()
    rates = np.array([s.by_score / s.ok if s.ok else 0.0 for s in shards]) * 100
    x = np.arange(len(shards))
    if len(shards) <= 40:
        ax.bar(x, rates, color=[FLAG_COLOUR if r > 0 else CLEAN_COLOUR for r in rates], width=0.7)
        ax.set_xticks(x, [s.stem for s in shards], rotation=60, ha="right", fontsize=7)
    else:
        ax.scatter(x, rates, s=6, color=FLAG_COLOUR)
        ax.set_xlabel("shard (input order)")
    if expected is not None:
        ax.axhline(
            expected * 100, color="black", linestyle="--", linewidth=1, label=f"expected {expected:.1%}"
        )
        _legend_above(ax)
    ax.set_ylabel("flagged by score (% of ok)")
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


def plot_samples(path: Path, flagged: Views, clean: Views) -> None:
    """Two blocks of rows: masked input | reconstruction | original, most flagged left, clean right."""
    rows = max(len(flagged.picks), len(clean.picks), 1)
    fig = _figure(8.5, 1.15 * rows + 0.6)
    grid = fig.add_gridspec(rows, 7, width_ratios=[1, 1, 1, 0.25, 1, 1, 1])
    nothing_seen = all(v.hidden.all() for v in (flagged, clean))
    titles = ("seen: embedding only" if nothing_seen else "seen by decoder", "rebuilt", "original")
    for block, (views, start, name) in enumerate(((flagged, 0, "flagged"), (clean, 4, "clean"))):
        for r in range(rows):
            for c, images in enumerate((views.masked, views.rebuilt, views.original)):
                ax = fig.add_subplot(grid[r, start + c])
                ax.set_xticks([])
                ax.set_yticks([])
                if r >= len(views.picks):
                    ax.set_axis_off()
                    continue
                ax.imshow(images[r], interpolation="nearest")
                if r == 0:
                    ax.set_title(titles[c], fontsize=8)
                if c == 0:
                    tag = "F" if block == 0 else "C"
                    ax.set_ylabel(f"{tag}{r + 1}  {views.picks[r].score:.3g}", fontsize=8, parse_math=False)
                for spine in ax.spines.values():
                    spine.set_color(FLAG_COLOUR if name == "flagged" else CLEAN_COLOUR)
                    spine.set_linewidth(1.5)
    save_png(fig, path)


def plot_localisation(path: Path, flagged: Views, clean: Views) -> None:
    """Mean residual of flagged samples, of clean ones, and their difference: where rebuilding fails."""
    fig = _figure(8.5, 3.0)
    axes = fig.subplots(1, 3)
    f_mean, c_mean = flagged.residual.mean(0), clean.residual.mean(0)
    top = float(max(f_mean.max(), c_mean.max(), 1e-6))
    for ax, img, title in ((axes[0], f_mean, "flagged"), (axes[1], c_mean, "clean")):
        im = ax.imshow(img, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(
            f"mean |residual|, {title} (n={len(flagged.picks if title == 'flagged' else clean.picks)})",
            fontsize=8,
        )
        fig.colorbar(im, ax=ax, shrink=0.8)
    diff = f_mean - c_mean
    lim = float(max(np.abs(diff).max(), 1e-6))
    im = axes[2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[2].set_title("flagged minus clean", fontsize=8)
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    save_png(fig, path)


def pca_2d(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) coordinates on the two main axes, and the share of variance each explains."""
    centred = embeddings.astype(np.float64) - embeddings.mean(0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    variance = singular**2
    share = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    if coords.shape[1] < 2:  # one sample or a 1-d embedding
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        share = np.pad(share, (0, 2 - len(share)))
    return coords, share


def plot_embeddings(path: Path, flagged: Views, clean: Views) -> None:
    """PCA of the victim's embeddings: triggered samples of a backdoor sit together, away from the rest."""
    fig = _figure(6.0, 4.6)
    ax = fig.add_subplot()
    both = np.concatenate([v.embeddings for v in (clean, flagged) if v.picks])  # either may be empty
    coords, share = pca_2d(both)
    n_clean = len(clean.picks)
    truth = np.array([p.label is True for p in clean.picks + flagged.picks])
    for rows, colour, name in (
        (slice(0, n_clean), CLEAN_COLOUR, "kept"),
        (slice(n_clean, None), FLAG_COLOUR, "flagged"),
    ):
        ax.scatter(coords[rows, 0], coords[rows, 1], s=14, color=colour, alpha=0.7, label=name, linewidths=0)
    if truth.any():
        ax.scatter(
            coords[truth, 0], coords[truth, 1], s=40, facecolors="none", edgecolors="black",
            linewidths=0.8, label="poisoned (ground truth)",
        )  # fmt: skip
    ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)")
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


def plot_roc(path: Path, scores: np.ndarray, truth: np.ndarray, auc: float, threshold: float | None) -> None:
    fig = _figure(4.8, 4.4)
    ax = fig.add_subplot()
    fpr, tpr, _ = roc_curve(scores, truth)
    if len(fpr) > 4000:  # a curve of millions of points draws slowly and looks the same thinned
        keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, 4000).astype(int), len(fpr) - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    ax.plot(fpr, tpr, color=FLAG_COLOUR, linewidth=2, label=f"DeDe score (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="chance")
    if threshold is not None:
        flagged = scores > threshold
        point = (flagged[~truth].mean() if (~truth).any() else 0.0, flagged[truth].mean())
        ax.scatter(
            *point, color="black", zorder=3, s=30, label=f"threshold: TPR {point[1]:.0%}, FPR {point[0]:.1%}"
        )
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


# -- the page --------------------------------------------------------------------------------------
@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML, every value from the data already escaped

    @property
    def nav(self) -> str:
        return NAV.get(self.id, self.title)


NAV = {
    "summary": "Totals",
    "verdict": "Verdict",
    "scores": "Scores",
    "joint": "Score and collapse",
    "shards": "Shards",
    "samples": "Flagged samples",
    "clusters": "Clusters",
    "localisation": "Trigger location",
    "embeddings": "Embeddings",
    "roc": "ROC",
}


def esc(value: object) -> str:
    """Keys, captions and shard names come from scraped data: never let them become markup."""
    return html.escape(str(value), quote=True)


def _img(name: str, alt: str) -> str:
    return f'<img src="{esc(name)}" alt="{esc(alt)}" loading="lazy">'


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _table(header: list[str], rows: list[list[object]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{esc(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tile(value: str, label: str, tone: str = "") -> str:
    return (
        f'<div class="tile {tone}"><div class="value">{esc(value)}</div>'
        f'<div class="label">{esc(label)}</div></div>'
    )


def _threshold_text(threshold: dict) -> str:
    value = threshold.get("value")
    shown = "not set" if value is None else f"{value:.6g}"
    return f"{shown} ({threshold.get('rule', 'no rule')})"


def summary_section(info: dict, scan: RunScan, meta: dict | None) -> Section:
    ok, flagged = scan.ok, scan.flagged
    failures = sum(v for k, v in scan.statuses.items() if k != "ok")
    threshold = info.get("threshold") or {}
    clean = info.get("clean") or {}
    total_shards = len(info["identity"]["shards"])
    tiles = [
        _tile(f"{sum(scan.statuses.values()):,}", "samples"),
        _tile(f"{ok:,}", "scored (ok)"),
        _tile(
            f"{flagged:,}",
            f"flagged ({flagged / ok:.2%} of ok)" if ok else "flagged",
            "bad" if flagged else "",
        ),
        _tile(f"{failures:,}", "could not be scored", "warn" if failures else ""),
        _tile(
            f"{len(scan.shards)}/{total_shards}",
            "shards done",
            "" if len(scan.shards) == total_shards else "warn",
        ),
    ]
    if clean:
        tiles.append(_tile(f"{clean.get('kept', 0):,}", "kept in clean/"))
        tiles.append(_tile(f"{clean.get('quarantined', 0):,}", "in quarantine/"))
    rows = [
        ["threshold", _threshold_text(threshold)],
        ["decoder", info["config"].get("decoder_dir", "?")],
        ["input", info["config"].get("data", "?")],
        ["scoring", ", ".join(f"{k}={v}" for k, v in info["identity"]["scoring"].items())],
        ["state", info.get("state", "?")],
    ]
    collapse = info.get("collapse") or {}
    if collapse.get("rule"):  # the collapse pass ran: the second test, and what each flagged
        by = (info.get("totals") or {}).get("flagged_by", {})
        counts = f"; flagged by score {by.get('score', 0):,}, by collapse {by.get('collapse', 0):,}"
        rows.insert(1, ["collapse evidence threshold", _threshold_text(collapse) + counts])
    if meta is not None:
        rows.insert(
            1, ["encoder", meta["encoder"]["spec"] + f" (weights {meta['encoder']['weights_sha256'][:12]})"]
        )
    statuses = sorted(((k, v) for k, v in scan.statuses.items() if k != "ok"), key=lambda kv: -kv[1])
    body = f'<div class="tiles">{"".join(tiles)}</div>' + _table(["", ""], rows)
    if statuses:
        body += "<h3>Samples that could not be scored</h3>" + _table(["status", "samples"], statuses, {1})
    if info.get("failed_shards"):
        body += "<h3>Shards that failed</h3>" + _table(
            ["shard", "error"], [[f["stem"], f["error"]] for f in info["failed_shards"]]
        )
    return Section("summary", "Totals", body)


def _shift_note(share: float | None) -> str:
    if share is None:
        return ""
    return (
        f" {share:.0%} of the scores are above the calibration's median: about 50% on clean data like "
        f"it, at most {SHIFT_LIMIT:.0%} unless the data is unlike it (or over {2 * SHIFT_LIMIT - 1:.0%} "
        "of it is triggered)."
    )


def verdict_section(verdict: dict) -> Section:
    tone = {True: "bad", False: "good", None: "unknown"}[verdict["backdoored"]]
    headline = {
        True: "This encoder behaves as backdoored on this data",
        False: "No evidence of a backdoor",
        None: "No verdict",
    }[verdict["backdoored"]]
    detail = verdict["text"]
    if verdict["backdoored"] is not None:
        detail = (
            f"p-value {_p_text(verdict['p_value'])} · {verdict['flagged']:,} of {verdict['ok']:,} samples "
            f"flagged, {verdict['expected_rate']:.2%} expected"
        )
    body = f'<div class="verdict {tone}"><strong>{esc(headline)}</strong><span>{esc(detail)}</span></div>'

    if verdict["p_value"] is not None:
        calib = verdict["calibration_n"]
        body += (
            f"<p>{verdict['test'].capitalize()} test: with the threshold set for a false-positive rate of "
            f"<b>{verdict['expected_rate']:.2%}</b>, clean data like the decoder's calibration would have "
            "about "
            f"{verdict['expected_rate'] * verdict['ok']:.0f} of these {verdict['ok']:,} samples flagged; "
            f"<b>{verdict['flagged']:,}</b> were. One-sided p-value {_p_text(verdict['p_value'])}, "
            f"significance level {verdict['alpha']:g}.</p>"
            "<p class=note>The test assumes that clean samples of this data are rebuilt as well as the "
            f"calibration images ({calib if calib is not None else 'unknown number of'} held-out images)"
            + (
                ", and allows for how well that many images pin the rate down"
                if verdict["test"] == "beta-binomial"
                else "; without them it cannot allow for how well they pin the rate down"
            )
            + ". "
            "Data very unlike the decoder's training data also raises the flag rate: look at the flagged "
            "samples and the heat map before concluding."
            + _shift_note(verdict["above_calibration_median"])
            + "</p>"
        )
    return Section("verdict", "Verdict on the encoder", body)


def scores_section(out: Path, hist: Histograms | None, threshold: float | None, rule: str) -> Section:
    if hist is None:
        return Section("scores", "Score distribution", _note("no sample could be scored: nothing to plot"))
    plot_scores(out / "scores.png", hist, threshold, rule)
    text = (
        "<p>Each sample's score is how badly the decoder rebuilds it from the encoder's embedding when "
        "almost every patch is hidden. Samples to the right of the threshold are flagged. The grey outline "
        "is the decoder's calibration (held-out clean images), scaled to this run's size: a bump far right "
        "of it is what a backdoor looks like.</p>"
    )
    return Section("scores", "Score distribution", text + _img("scores.png", "score histogram"))


def joint_section(
    out: Path, points: JointPoints | None, threshold: float | None, shift: float | None
) -> Section:
    """`shift`: the share of the run's evidence above the held-out images' median (run.json)."""
    title = "Score and collapse"
    if points is None:
        return Section("joint", title, _note("no sample has a collapse value: nothing to plot"))
    plot_joint(out / "joint.png", points, threshold)
    unlike = unlike_holdout(shift)
    unlike = "" if unlike is None else _note(unlike[0].upper() + unlike[1:] + ".")
    text = (
        f"<p>{len(points.score):,} samples with a collapse value (a seeded sample): how badly each is "
        "rebuilt, against how nearly its embedding coincides with its 5 nearest in the run. The collapse "
        "pass weighs the two together, each as a p-value against the decoder's held-out images, so a "
        "sample is flagged above the black line, which is lower the rarer its score; samples right of "
        "the dashed line are flagged by their score alone. A trigger's images sit top left when the "
        "decoder rebuilds them well, top right when it does not.</p>"
    )
    return Section("joint", title, unlike + text + _img("joint.png", "score against collapse"))


def shards_section(out: Path, scan: RunScan, expected: float | None) -> Section:
    plot_shards(out / "shards.png", scan.shards, expected)
    worst = sorted(scan.shards, key=lambda s: (-s.flagged, s.stem))[:15]
    rows = [
        [s.stem, s.count, s.ok, s.flagged, s.by_score, f"{s.by_score / s.ok:.2%}" if s.ok else "-"]
        for s in worst
    ]
    table = _table(["shard", "samples", "ok", "flagged", "by score", "score rate"], rows, {1, 2, 3, 4, 5})
    return Section(
        "shards",
        "Flag rate per shard",
        "<p>Poison often arrives together (one crawl, one source): a shard far above the dashed line is "
        "worth a look. The line is the score test's rate on clean data, so the plot counts that test's "
        "flags; the collapse pass's come on top.</p>"
        + _img("shards.png", "flag rate per shard")
        + "<h3>Shards with the most flags</h3>"
        + table,
    )


def _sample_rows(tag: str, views: Views) -> list[list[object]]:
    rows = []
    for i, p in enumerate(views.picks):
        label = "" if p.label is None else ("poisoned" if p.label else "clean")
        rows.append(
            [f"{tag}{i + 1}", p.key, p.stem, p.index, f"{p.score:.4g}", label, (p.caption or "")[:120]]
        )
    return rows


def samples_section(out: Path, top: Views, typical_clean: Views) -> Section:
    if not top.picks and not typical_clean.picks:
        return Section("samples", "Most flagged samples", _note("no sample could be read again to show it"))
    plot_samples(out / "samples.png", top, typical_clean)
    rows = _sample_rows("F", top) + _sample_rows("C", typical_clean)
    table = _table(["", "key", "shard", "index", "score", "truth", "caption"], rows, {3, 4})
    text = (
        "<p>Left (red): the most flagged samples; right (blue): typical kept ones. For each, what the "
        "decoder was given (hidden patches grey; often nothing but the embedding), what it rebuilt, and the "
        "original. "
        "A backdoored encoder embeds triggered images like its target, so they are rebuilt as something else."
        "</p>"
    )
    return Section("samples", "Most flagged samples", text + _img("samples.png", "sample grid") + table)


def plot_clusters(path: Path, clusters: list[Cluster], images: dict) -> None:
    """One row of originals per cluster, highest collapse first."""
    fig = _figure(8.5, 1.15 * len(clusters) + 0.3)
    axes = fig.subplots(len(clusters), CLUSTER_TILES, squeeze=False)
    for r, cluster in enumerate(clusters):
        shown = [p for p in cluster.picks if (p.stem, p.index) in images]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(shown):
                ax.set_axis_off()
                continue
            ax.imshow(images[(shown[c].stem, shown[c].index)][0], interpolation="nearest")
            if c == 0:
                ax.set_ylabel(f"{r + 1}: {cluster.size:,}", fontsize=8)
    save_png(fig, path)


def clusters_section(out: Path, clusters: list[Cluster], total: int, images: dict) -> Section:
    title = "Collapse clusters"
    if not clusters:
        return Section("clusters", title, _note("the collapse pass flagged no sample"))
    plot_clusters(out / "clusters.png", clusters, images)
    rows = [
        [i + 1, c.size, "" if c.poisoned is None else c.poisoned, ", ".join(p.key for p in c.picks[:3])]
        for i, c in enumerate(clusters)
    ]
    table = _table(["cluster", "samples", "poisoned (truth)", "first keys"], rows, {0, 1, 2})
    pooled = min(total, CLUSTER_POOL)
    text = (
        f"<p>The collapse pass flagged {total:,} samples. Of the {pooled:,} with the highest collapse, each "
        "row groups those whose embedding is as near the row's first as the least collapsed of them is to "
        "its neighbours (the row's "
        "label is the group's size). Different images that share one embedding are what a backdoor's "
        "trigger makes: look for what they have in common (a patch, a tint, a caption). Copies of one "
        "photo, re-encoded or resized, are not counted as each other's neighbours.</p>"
    )
    return Section("clusters", title, text + _img("clusters.png", "collapse clusters") + table)


def localisation_section(out: Path, flagged: Views, clean: Views) -> Section:
    if not flagged.picks or not clean.picks:
        return Section(
            "localisation",
            "Where the trigger sits",
            _note("needs flagged and kept samples; this run has not both"),
        )
    plot_localisation(out / "localisation.png", flagged, clean)
    text = (
        f"<p>Mean absolute reconstruction error per pixel (0-255 scale) over {len(flagged.picks)} flagged "
        f"and {len(clean.picks)} kept samples, and their difference. A patch trigger shows up as a hot "
        "square; an invisible or blended trigger as a diffuse difference.</p>"
    )
    return Section(
        "localisation", "Where the trigger sits", text + _img("localisation.png", "residual heat map")
    )


def embeddings_section(out: Path, flagged: Views, clean: Views) -> Section:
    if len(flagged.picks) + len(clean.picks) < 3:
        return Section("embeddings", "Embeddings", _note("too few samples could be read to project"))
    plot_embeddings(out / "embeddings.png", flagged, clean)
    text = (
        "<p>The victim encoder's embeddings of the same samples, projected on their two principal axes. "
        "Samples that carry a trigger tend to gather near the attacker's target, away from the rest.</p>"
    )
    return Section("embeddings", "Embeddings", text + _img("embeddings.png", "embedding projection"))


def roc_section(out: Path, scan: RunScan, threshold: float | None) -> tuple[Section, float | None]:
    if not scan.labelled_scores:
        return Section(
            "roc",
            "Detection against ground truth",
            _note('the shards carry no ground truth (json "poisoned")'),
        ), None
    scores = np.concatenate(scan.labelled_scores).astype(np.float64)
    truth = np.concatenate(scan.labelled_truth)
    if truth.all() or not truth.any():
        note = f"all {len(truth)} labelled samples are {'poisoned' if truth.all() else 'clean'}: no ROC curve"
        return Section("roc", "Detection against ground truth", _note(note)), None
    auc = roc_auc(scores, truth)
    plot_roc(out / "roc.png", scores, truth, auc, threshold)
    text = (
        f'<p class="big">AUC <b>{auc:.3f}</b> over {len(truth):,} labelled samples ({int(truth.sum()):,} '
        "poisoned).</p>"
    )
    return Section("roc", "Detection against ground truth", text + _img("roc.png", "ROC curve")), auc


CSS = """
:root { --bad:#d62728; --good:#2e7d32; --ink:#1d2329; --muted:#5f6b76; --line:#e3e7eb; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--ink);
  background:#f4f6f8; }
header { background:#1d2329; color:#fff; padding:22px 0 18px; }
header .wrap, main, nav .wrap { max-width:1040px; margin:0 auto; padding:0 20px; }
header h1 { margin:0; font-size:24px; font-weight:650; letter-spacing:.2px; }
header p { margin:4px 0 0; color:#b9c2ca; font-size:13px; word-break:break-all; }
nav { background:#fff; border-bottom:1px solid var(--line); position:sticky; top:0; z-index:1; }
nav a { display:inline-block; padding:10px 12px 9px 0; margin-right:10px; color:var(--muted);
  text-decoration:none; font-size:13px; }
nav a:hover { color:var(--ink); }
main { padding-top:18px; padding-bottom:40px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px;
  margin:0 0 18px; }
h2 { margin:0 0 10px; font-size:18px; }
h3 { margin:18px 0 6px; font-size:14px; color:var(--muted); }
img { max-width:100%; height:auto; display:block; margin:8px auto; }
table { border-collapse:collapse; width:100%; font-size:13px; margin-top:8px; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top;
  word-break:break-word; }
th { color:var(--muted); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafbfc; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit,minmax(120px,1fr)); gap:10px;
  margin-bottom:10px; }
.tile { border:1px solid var(--line); border-radius:8px; padding:10px 12px; }
.tile .value { font-size:22px; font-weight:650; font-variant-numeric:tabular-nums; }
.tile .label { font-size:12px; color:var(--muted); }
.tile.bad .value { color:var(--bad); } .tile.warn .value { color:#b26a00; }
.verdict { border-radius:8px; padding:14px 16px; border-left:6px solid; display:flex;
  flex-direction:column; gap:4px; }
.verdict strong { font-size:17px; }
.verdict.bad { background:#fdecea; border-color:var(--bad); } .verdict.bad strong { color:var(--bad); }
.verdict.good { background:#e8f5e9; border-color:var(--good); }
.verdict.good strong { color:var(--good); }
.verdict.unknown { background:#f0f2f4; border-color:#8a959f; }
.note { color:var(--muted); font-size:13px; }
.big { font-size:17px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:0 0 30px; }
"""


def render_page(run_dir: Path, sections: list[Section], versions: dict) -> str:
    nav = "".join(f'<a href="#{s.id}">{esc(s.nav)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    made_with = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Sanitizer audit: {esc(run_dir.name)}</title><style>{CSS}</style></head><body>"
        '<header><div class="wrap"><h1>Backdoor audit report</h1>'
        f"<p>{esc(run_dir.resolve())}</p></div></header>"
        f'<nav><div class="wrap">{nav}</div></nav><main>{body}</main>'
        f"<footer>written by sanitizer report · scored with {esc(made_with)}</footer></body></html>\n"
    )


# -- putting it together ---------------------------------------------------------------------------
def load_scorer(info: dict):
    """The run's encoder and decoder, exactly as scoring used them (ScoreStage checks the encoder hash)."""
    from sanitizer.pipeline.stages import ScoreStage

    config = info["config"]
    stage = ScoreStage(
        config["decoder_dir"],
        info["identity"]["scoring"],
        device="auto",
        micro_batch=64,
        encoder_weights=config.get("encoder_weights"),  # absent in runs from before it was recorded
    )
    return stage.scorer, stage.image_size


def image_sections(
    out: Path, run: RunDir, info: dict, shards: list[ShardRef], scan: RunScan, collapsed: bool
) -> list[Section]:
    """Grid, clusters (`collapsed`: after the collapse pass), heat map and projection: the only part
    that reads images and runs the models."""
    ids = [
        ("samples", "Most flagged samples"),
        *([("clusters", "Collapse clusters")] if collapsed else []),
        ("localisation", "Where the trigger sits"),
        ("embeddings", "Embeddings"),
    ]
    try:
        scorer, size = load_scorer(info)
    except SanitizerError as e:
        note = _note(f"the run's encoder or decoder cannot be loaded ({e}); images are not shown")
        return [Section(i, t, note) for i, t in ids]
    flagged_sample, clean_sample = sample_rows(run, scan)
    clusters, by_collapse = collapse_clusters(run, [s.stem for s in scan.shards]) if collapsed else ([], 0)
    urls = {s.stem: s.url for s in shards}
    in_clusters = [p for c in clusters for p in c.picks]
    images, notes = read_images(urls, scan.top + flagged_sample + clean_sample + in_clusters, size)
    top = render_views(scorer, scan.top, images, size)
    flagged = render_views(scorer, flagged_sample, images, size)
    clean = render_views(scorer, clean_sample, images, size)
    sections = [
        samples_section(out, top, typical(clean, GRID_ROWS)),
        *([clusters_section(out, clusters, by_collapse, images)] if collapsed else []),
        localisation_section(out, flagged, clean),
        embeddings_section(out, flagged, clean),
    ]
    if notes:
        sections[0].body += "".join(_note(n) for n in notes[:10])
    return sections


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report/index.html and its PNGs; the page is written last, atomically."""
    run, info, shards = open_run(run_dir)
    out = run.root / "report"
    with run.lock():
        done = run.done(shards)
        if not done:
            raise UsageError(f"{run_dir} has no finished shard to report on; run `sanitizer score` first")
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        for name in FIGURES:  # a figure this run does not produce must not linger from an older report
            (out / name).unlink(missing_ok=True)
        threshold_info = info.get("threshold") or {}
        threshold, rule = threshold_info.get("value"), threshold_info.get("rule", "none")
        calibration, meta = _calibration(info)
        scan = scan_run(run, done)
        verdict = encoder_verdict(run.root)
        hist = histograms(run, done, scan, calibration, threshold) if scan.ok else None
        roc, _ = roc_section(out, scan, threshold)
        collapse = info.get("collapse") or {}
        collapsed, shift = collapse.get("value") is not None, collapse.get("above_holdout_median")
        sections = [
            summary_section(info, scan, meta),
            verdict_section(verdict),
            scores_section(out, hist, threshold, rule),
            *([joint_section(out, joint_points(run, done), threshold, shift)] if collapsed else []),
            shards_section(out, scan, verdict["expected_rate"]),
            *image_sections(out, run, info, shards, scan, collapsed),
            roc,
        ]
        page = out / "index.html"
        with atomic_path(page) as tmp:
            tmp.write_text(render_page(run.root, sections, info.get("versions", {})), encoding="utf-8")
    return page
