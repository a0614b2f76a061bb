"""The collapse pass over a scored run: after every shard is scored, each ok sample's sketch is
compared with a reference sample of the whole run, and its score and collapse are weighed together
against the decoder's held-out images (see sanitizer.collapse for why and how)."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sanitizer.checkpoint import load_holdout, reference_key
from sanitizer.collapse import (
    NO_AXIS,
    REFERENCE_SIZE,
    SKETCH_DIM,
    THUMBNAIL_SIDE,
    UNKNOWN_AXIS,
    HeldOut,
    Sketched,
    reference_rank,
    score_evidence,
    unlike_holdout,
    within_lowest,
)
from sanitizer.decoder_meta import ScoreSettings, required_calibration
from sanitizer.errors import UsageError
from sanitizer.manifest import read_manifest, set_flags, with_collapse
from sanitizer.neighbours import Reference
from sanitizer.rundir import RunDir, rewrite
from sanitizer.stats import above_median
from sanitizer.thresholds import ThresholdRule, resolve_threshold
from sanitizer.wording import counted

log = logging.getLogger(__name__)


@dataclass
class OkRows:
    """One shard's ok rows as the pass reads them."""

    stem: str
    count: int  # rows in the shard's manifest, ok or not
    positions: np.ndarray  # row positions in the shard's manifest
    images: Sketched
    scores: np.ndarray  # float32, as the manifest keeps them
    sha256: list[str]  # of each row's file


COLUMNS = ["status", "sketch", "thumbnail", "axis", "score", "sha256"]


def ok_rows(run: RunDir, stems: list[str]) -> Iterator[OkRows]:
    """Each shard's ok rows, shard by shard: only the columns the pass needs are read."""
    for stem in stems:
        table = read_manifest(run.manifest(stem), COLUMNS)
        ok = np.flatnonzero(pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False))
        rows = table.take(pa.array(ok))
        sketch = rows.column("sketch").combine_chunks().values.to_numpy(zero_copy_only=False)
        thumbnails = b"".join(rows.column("thumbnail").to_pylist())  # an ok row always has one
        images = Sketched(
            sketch.reshape(-1, SKETCH_DIM).astype(np.float32),
            np.frombuffer(thumbnails, np.uint8).reshape(len(ok), THUMBNAIL_SIDE**2),
            pc.fill_null(rows.column("axis"), NO_AXIS).to_numpy().astype(np.int32),
        )
        yield OkRows(
            stem,
            table.num_rows,
            ok,
            images,
            rows.column("score").to_numpy(zero_copy_only=False).astype(np.float32),
            rows.column("sha256").to_pylist(),  # an ok row always has one
        )


def draw_reference(run: RunDir, stems: list[str], key: bytes) -> tuple[Sketched, np.ndarray]:
    """The reference sample and its scores: the run's ok rows of lowest reference_rank, in rank order,
    so that it is the same whatever the order of the shards. Drawn shard by shard: at most
    REFERENCE_SIZE rows and one shard's are held."""
    rank, drawn, scores = np.zeros(0, np.uint64), Sketched.none(), np.zeros(0, np.float32)
    for rows in ok_rows(run, stems):
        rank, drawn = np.r_[rank, reference_rank(rows.sha256, key)], drawn.join(rows.images)
        scores = np.r_[scores, rows.scores]
        kept = np.flatnonzero(within_lowest(rank, REFERENCE_SIZE))
        kept = kept[np.argsort(rank[kept], kind="stable")]
        rank, drawn, scores = rank[kept], drawn.take(kept), scores[kept]
    return drawn, scores


@dataclass
class HoldoutImages:
    """The decoder's held-out images as the pass weighs a run against them: their scores (the
    calibration, made at the run's scoring settings) and what the pass keeps of them, in one order;
    and the decoder's key for drawing the run's reference (checkpoint.reference_key)."""

    scores: np.ndarray
    images: Sketched
    reference_key: bytes

    def digest(self) -> bytes:
        """What the pass weighs of the held-out images, hashed (the key follows from the decoder's
        weights): a re-run weighs a run against them again only when they changed."""
        found = hashlib.sha256()
        for array in (self.scores, self.images.sketches, self.images.thumbnails, self.images.axes):
            found.update(f"{array.dtype}{array.shape}".encode())
            found.update(np.ascontiguousarray(array).tobytes())
        return found.digest()


def holdout_for(rule: ThresholdRule, decoder_dir: Path, meta: dict, settings: ScoreSettings) -> HoldoutImages:
    """The held-out images every collapse rule weighs samples against. Called before scoring, so
    that a pass that cannot work is refused before hours of scoring, not after."""
    if rule.kind == "paper":
        raise UsageError("the paper rule is for scores; give the collapse pass quantile:Q, mad:K or value:X")
    if rule.kind == "value" and rule.param <= 1:
        # exp(-x) (1 + x) of exchangeable samples pass -ln(p_s p_c) > x: 74% at 1
        raise UsageError(
            f"--collapse {rule} would flag most samples: its value is an evidence, "
            "-ln p_score - ln p_collapse (the default rule's is about 5), not a cosine"
        )
    held_out = load_holdout(decoder_dir)
    if held_out is None:
        raise UsageError(
            f"{decoder_dir} was trained before the collapse pass kept its held-out images' sketches and "
            "thumbnails; retrain it, or score with --no-collapse"
        )
    if (held_out.axes == UNKNOWN_AXIS).any():
        log.warning(
            "%s was trained before the held-out images' axes were kept: a sample whose embedding sits on "
            "one feature is weighed by the share of held-out images on one feature, not by how crowded "
            "its own is; retrain it to weigh that",
            decoder_dir,
        )
    otherwise = "a decoder calibrated for them, or --no-collapse"
    calibration = required_calibration(meta, settings, "the collapse pass", otherwise)
    scores = calibration.astype(np.float64)
    return HoldoutImages(scores, held_out, reference_key(decoder_dir))


def warn_if_small(held_out: int, limit: float, what: str, statistic: str, beside: str) -> None:
    """The rarest value of a `statistic` that n held-out images attest is p = 1/(n+1): below
    exp(limit) of them, none flags a sample unless the other part of its evidence (`beside`) is
    unusual too. Say so, with the holdout that would (`what`: "TEST has n held-out images ...")."""
    if math.log(held_out + 1) <= limit:
        needed = f"{math.floor(math.exp(limit))}" if limit < 50 else f"e^{limit:.4g}"  # e^1000: no float
        log.warning(
            "%s: a %s flags a sample only beside %s; %s or more (a larger train --holdout) would let %s "
            "alone flag one",
            what % held_out,
            statistic,
            beside,
            needed,
            statistic,
        )


@dataclass
class CollapsePass:
    """What the pass found: its evidence threshold, the share of the run's evidence above the held-out
    images' median (about 0.5 on data like them; above SHIFT_LIMIT they are unlike it), and the
    score's threshold on its score evidence plus its neighbours' (a quantile rule's; None for the
    others, whose threshold is one score for every row)."""

    value: float | None = None
    above_holdout_median: float | None = None
    score_value: float | None = None


def reference_and_holdout(
    run: RunDir, stems: list[str], holdout: HoldoutImages
) -> tuple[Reference, HeldOut] | None:
    """The run's reference and the held-out images' statistics against it; None when there is nothing
    to weigh (no ok row, no reference row with a sketch, no held-out image with a collapse): after
    hours of scoring, a pass that cannot run must not fail the run, so the last two are warnings."""
    drawn, scores = draw_reference(run, stems, holdout.reference_key)
    reference = Reference(drawn, score_evidence(scores, holdout.scores))
    if not len(reference):
        return None
    if not np.isfinite(reference.images.sketches).all(1).any():  # no neighbour for anyone
        log.warning(
            "no sample of the run's reference (%d drawn from its ok samples) has a sketch: each embedding "
            "sits on fewer than 2 features, so the collapse pass cannot run",
            len(reference),
        )
        return None
    held = HeldOut.of(holdout.scores, reference.weigh(holdout.images))
    cosines = len(held.cosines)
    if cosines < 2:  # each is weighed against the others: one alone would set a limit of 0
        log.warning(
            "%s a collapse (one needs a sketch, and a scored sample one too); the "
            "collapse pass needs 2 or more (a larger train --holdout), so it cannot run",
            counted(cosines, "held-out image has", "held-out images have"),
        )
        return None
    return reference, held


@dataclass
class Flags:
    """Per shard, what the pass sets in its manifest: each row's collapse, the collapse it needs to be
    flagged and, under a quantile score rule, the score it needs; NaN for rows that are not ok (and
    for the collapses of rows with no reference row left: those are judged by the score alone)."""

    collapse: dict[str, np.ndarray]
    collapse_needed: dict[str, np.ndarray]
    score_needed: dict[str, np.ndarray]


def collapse_columns(
    run: RunDir,
    stems: list[str],
    rule: ThresholdRule,
    score_rule: ThresholdRule,
    reference: Reference,
    held: HeldOut,
) -> tuple[Flags, CollapsePass]:
    """Each shard's Flags, and what the pass found."""
    values: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    neighbours: dict[str, np.ndarray] = {}
    for rows in ok_rows(run, stems):
        weighed = reference.weigh(rows.images)
        each = ((values, weighed.collapse), (scores, rows.scores), (neighbours, weighed.neighbours))
        for column, of_ok_rows in each:
            column[rows.stem] = np.full(rows.count, np.nan, np.float32)  # 12 bytes a row in all
            column[rows.stem][rows.positions] = of_ok_rows
    own = held.own_evidence()
    scored = np.concatenate([held.evidence(scores[stem], values[stem]) for stem in values])
    scored = scored[~np.isnan(scored)]
    if not len(scored):  # no collapse to weigh, and mad:K has no evidence
        # The reference has a sketch (reference_and_holdout), so each sample's only reference rows are
        # itself and its near-duplicates, which `nearest` leaves out.
        log.warning(
            "no scored sample has a neighbour in the run's reference but itself and its near-duplicates "
            "(the run holds one image, or copies of one): the collapse pass flags nothing"
        )
        return Flags({}, {}, {}), CollapsePass()
    limit = resolve_threshold(rule, own, scored)
    found = CollapsePass(limit, above_median(scored, own) / len(scored))
    # those without a sketch do not count: they are weighed apart, by their axis
    has = "the collapse pass has %d held-out images with a sketch"
    warn_if_small(len(held.cosines), limit, has, "collapse", "an unusual score")
    if (unlike := unlike_holdout(found.above_holdout_median)) is not None:
        log.warning(unlike)
    needed = {stem: held.needed(scores[stem], values[stem], limit) for stem in values}
    score_needed = {}
    if score_rule.kind == "quantile":
        found.score_value = resolve_threshold(score_rule, held.own_score_statistic())
        has = "the score's test has %d held-out images"
        warn_if_small(len(held.scores), found.score_value, has, "score", "neighbours with unusual scores")
        for stem, score in scores.items():
            score_needed[stem] = np.where(
                np.isnan(score), np.nan, held.score_needed(neighbours[stem], found.score_value)
            )
    return Flags(values, needed, score_needed), found


def row_thresholds(score_needed: np.ndarray | None, threshold: float | None) -> np.ndarray | float | None:
    """Each row's score threshold: the one it needs given its neighbours, or the run's (rows that are
    not ok, and every row of a run the pass did not set them in)."""
    return threshold if score_needed is None else np.where(np.isnan(score_needed), threshold, score_needed)


def apply_flags(
    run: RunDir,
    stems: list[str],
    threshold: float | None,
    score_rule: ThresholdRule,
    collapse: tuple[ThresholdRule, HoldoutImages] | None,
) -> tuple[CollapsePass, int]:
    """Flag every finished shard by the score threshold and, given a collapse rule and what
    holdout_for gave for it, by the collapse pass, which under a quantile `score_rule` also sets each
    row's score threshold from its neighbours' scores. Without them the collapse columns are cleared
    and every row's threshold is `threshold`, so that a run's flags always say what its last
    invocation asked for. Returns what the pass found and how many manifests changed."""
    flags, found = Flags({}, {}, {}), CollapsePass()
    if collapse is not None:
        rule, holdout = collapse
        if (weighed := reference_and_holdout(run, stems, holdout)) is not None:
            flags, found = collapse_columns(run, stems, rule, score_rule, *weighed)

    def update(stem: str, table: pa.Table) -> pa.Table:
        table = with_collapse(table, flags.collapse.get(stem), flags.collapse_needed.get(stem))
        return set_flags(table, row_thresholds(flags.score_needed.get(stem), threshold))

    return found, rewrite(run, stems, update)
