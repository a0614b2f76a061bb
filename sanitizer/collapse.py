"""The collapse pass: flag images whose embedding nearly coincides with those of many others.

A backdoor such as BadEncoder's sends every triggered image to about one point of the embedding
space (median cosine 0.996-0.999 to their mean, where clean images of one class sit at 0.87-0.91).
The decoder then rebuilds the same image for all of them, and a triggered image that happens to look
like that rebuild scores as clean: no per-image score can see it. Within the scored set, though,
those images are each other's near-duplicates. This pass measures that, after scoring:

- every ok sample's embedding is kept as a `sketch`, a seeded random projection to SKETCH_DIM
  dimensions (cosines survive it; 128 bytes a sample in the manifest), or NaN where the embedding is
  concentrated on fewer than MIN_EFFECTIVE_DIM features: a CNN whose ReLU features die for some
  inputs maps them all to one axis (3-10% of clean images on the detection benchmark's fine-tuned
  victims), a direction they share without being alike, so such rows are no one's neighbour. Nor
  are they exempt: a backdoor could send its triggered images to one axis to escape the pass. Such a
  row keeps its `axis` (the feature it sits on), and its collapse is ON_AXIS plus the share of the
  reference's images on that same feature: a trigger's axis is crowded, a dying feature's is not;
- the reference is the REFERENCE_SIZE ok rows of the scored set whose files rank lowest by a hash
  keyed with a secret of the decoder's (reference_rank): drawn by content, it is the same whatever
  the order of the shards, and an attacker without the decoder cannot grind files into it or out of
  it;
- a sample's `collapse` is its mean cosine similarity to its NEIGHBOURS nearest reference rows, its
  near-duplicates left out: rows whose `thumbnail` (the decoded image, grey, averaged down to 8 x 8)
  is within NEAR_DUPLICATE_RMS grey levels of its own, itself and identical files included. A photo
  re-encoded or resized many times embeds as one point too, but is one image, not a trigger on many;
  a trigger shared by different images leaves their thumbnails far apart;
- a sample is flagged when its score and its collapse are together rarer than the rule allows among
  the decoder's held-out images, measured against the same reference (so that a bigger or denser set,
  whose nearest neighbours are nearer, moves the threshold with it). Each statistic becomes a tail
  p-value against the held-out images' own, and the two combine as in Fisher's method, into an
  `evidence` of -ln p_score - ln p_collapse. One threshold on that keeps the false-positive budget
  whole: two tests flagging on their own would add their rates, and would miss a sample moderately
  unusual on both, as DRUPE's triggered images are (it spreads their embeddings on purpose, and the
  decoder rebuilds many of them fairly well). Each row's `collapse_threshold` is the collapse it
  needs, given its score, to be flagged. The rarest cosine a holdout of n images with a sketch can
  attest is 1 / (n + 1), so collapse alone flags a sample only when n + 1 > exp(threshold): a few
  hundred held-out images at the default rule.

The same search serves the score's own test. A sample's `neighbours` evidence is the mean score
evidence, -ln p_score, of its NEIGHBOURS nearest reference rows (for a row without a sketch, of the
reference's other images on its axis), and under a quantile rule the score's test reads -ln p_score
plus that, against the held-out images' same statistic: a trigger's images lift each other, so one
that the decoder happens to rebuild well is still flagged. On the detection benchmark's victims that
raised the 1% rate's TPR at the defaults from 0.73 to 0.97 on the CLIP victim's hardest seed, at the
same false-positive rate (bench/NOTES.md, sessions 37 and 39). Each row's `threshold` is then the score it
needs (HeldOut.score_needed), so that a flag is still `score > threshold`.

A trigger is seen when at least NEIGHBOURS of its images land in the reference, i.e. from a poison
rate of about NEIGHBOURS / REFERENCE_SIZE. A trigger stamped on copies of one image is not: those
copies are each other's near-duplicates, and only the score can flag them.

This module holds what clean, verify and report read without torch: the constants, the records, the
reference draw and the statistics. The tensors (sketches, thumbnails, near-duplicates, the neighbour
search, Reference) are computed with torch in sanitizer.neighbours.
"""

from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass

import numpy as np

from sanitizer.stats import SHIFT_LIMIT

SKETCH_DIM = 64
REFERENCE_SIZE = 20_000
THUMBNAIL_SIDE = 8  # see NEAR_DUPLICATE_RMS in sanitizer.neighbours
# A row without a sketch has the collapse ON_AXIS + the share of the reference's images on its axis:
# above every cosine, and weighed only against the held-out images without a sketch (HeldOut).
ON_AXIS = 2.0
NO_AXIS = -1  # the axis of an embedding with a sketch
# The axis of a held-out image without a sketch whose decoder was saved before axes were kept: counted
# as on the most crowded axis, so that such a decoder weighs a row without a sketch as before, by the
# share of its held-out images without one
UNKNOWN_AXIS = -2


def reference_rank(sha256: list[str], key: bytes) -> np.ndarray:
    """(N,) uint64: each file's place in the reference draw, its sha256 hashed with `key`. Copies of
    one file share a rank, so they are drawn together."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(bytes.fromhex(h), digest_size=8, key=key).digest()) for h in sha256],
        np.uint64,
    )


def within_lowest(rank: np.ndarray, size: int = REFERENCE_SIZE) -> np.ndarray:
    """(N,) bool: the rows among the `size` lowest ranks, with every row tied with the last of them, so
    that which rows are drawn does not depend on their order."""
    if len(rank) <= size:
        return np.ones(len(rank), bool)
    return rank <= np.partition(rank, size - 1)[size - 1]


@dataclass
class Sketched:
    """What the pass keeps of each image: its embedding's sketch (NaN without one), its thumbnail, and
    the axis its embedding sits on (NO_AXIS where it has a sketch)."""

    sketches: np.ndarray  # (N, SKETCH_DIM) float32
    thumbnails: np.ndarray  # (N, THUMBNAIL_SIDE**2) uint8
    axes: np.ndarray  # (N,) int32

    @classmethod
    def none(cls) -> Sketched:
        return cls(
            np.zeros((0, SKETCH_DIM), np.float32),
            np.zeros((0, THUMBNAIL_SIDE**2), np.uint8),
            np.zeros(0, np.int32),
        )

    def take(self, rows: np.ndarray) -> Sketched:
        return Sketched(self.sketches[rows], self.thumbnails[rows], self.axes[rows])

    def join(self, other: Sketched) -> Sketched:
        return Sketched(*(np.concatenate(pair) for pair in zip(astuple(self), astuple(other), strict=True)))


def group_by_seed(sketches: np.ndarray, link: float, limit: int) -> np.ndarray:
    """Group label of each row (unit sketches, given in the order to seed groups from), -1 for rows in
    none of the first `limit` groups. The first ungrouped row seeds a group of every ungrouped row whose
    cosine to it is at least `link`: `limit` passes, deterministic, enough to show a person which
    flagged samples share one embedding (the report's collapse clusters)."""
    labels = np.full(len(sketches), -1, np.int64)
    for group in range(limit):
        free = np.flatnonzero(labels < 0)
        if not len(free):
            break
        labels[free[sketches[free] @ sketches[free[0]] >= link]] = group
        labels[free[0]] = group  # a link above 1 (value:X) still leaves the seed its own group
    return labels


def tail_p(values: np.ndarray, calibration: np.ndarray, own: bool = False) -> np.ndarray:
    """How rare each value is among the calibration's, from above: (1 + #{c >= v}) / (n + 1), the
    p-value of a value exchangeable with the calibration. With `own`, the values are the calibration
    itself, each weighed against the others. NaN stays NaN."""
    ordered = np.sort(calibration)
    at_least = len(ordered) - np.searchsorted(ordered, values, side="left")
    p = at_least / len(ordered) if own else (1 + at_least) / (len(ordered) + 1)
    return np.where(np.isnan(values), np.nan, p)


def score_evidence(scores: np.ndarray, calibration: np.ndarray, own: bool = False) -> np.ndarray:
    """-ln p_score: each score's tail_p among the decoder's held-out images' scores, as evidence (what
    a reference row lends its neighbours). NaN stays NaN."""
    return -np.log(tail_p(scores, calibration, own))


def evidence(score_p: np.ndarray, collapse_p: np.ndarray) -> np.ndarray:
    """Fisher's combination of the two tests' p-values, -ln p_score - ln p_collapse: large when a
    sample is rare on either, or fairly rare on both."""
    return -np.log(score_p) - np.log(collapse_p)


def value_needed(other_p: np.ndarray, calibration: np.ndarray, limit: float) -> np.ndarray:
    """Per row, the value of a statistic tested from above against `calibration` (tail_p) past which
    the row's evidence, -ln other_p - ln p_value, is above `limit`, given the p-value of its other
    statistic: a calibration value, +inf where no value would do, -inf where any would, NaN where
    other_p is NaN. Flags by it and by the evidence agree (but for exact ties)."""
    ordered = np.sort(calibration)[::-1].astype(np.float32)
    n = len(ordered)
    # evidence > limit <=> p_value < exp(-limit) / other_p <=> #{calibration >= v} < bound
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bound = np.exp(-limit) / other_p * (n + 1) - 1
    most = np.ceil(bound) - 1  # the most calibration values that may be at least v
    picked = ordered[np.clip(np.nan_to_num(most), 0, max(n - 1, 0)).astype(np.int64)] if n else most
    needed = np.where(most < 0, np.inf, np.where(most >= n, -np.inf, picked))
    return np.where(np.isnan(other_p), np.nan, needed).astype(np.float32)


@dataclass
class Weighed:
    """Each query's collapse and its neighbours' evidence, as Reference.weigh finds them: the mean
    score evidence (-ln p_score) of its NEIGHBOURS nearest reference rows, or for a query without a
    sketch of the reference's other images on its axis; NaN where it has none."""

    collapse: np.ndarray
    neighbours: np.ndarray


def lent(neighbours: np.ndarray) -> np.ndarray:
    """The evidence a sample's neighbours lend it: none where it has no neighbour."""
    return np.nan_to_num(neighbours, nan=0.0)


@dataclass
class HeldOut:
    """The decoder's held-out images as the pass weighs samples against them: their scores, and their
    collapse (ON_AXIS and above for those without a sketch) and neighbours' evidence against the run's
    reference; those without a collapse (no reference row left) left out."""

    scores: np.ndarray
    collapse: np.ndarray
    neighbours: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray, weighed: Weighed) -> HeldOut:
        usable = ~np.isnan(weighed.collapse)
        return cls(
            np.asarray(scores, np.float64)[usable], weighed.collapse[usable], weighed.neighbours[usable]
        )

    @property
    def cosines(self) -> np.ndarray:
        """The collapse of those with a sketch: the rarest a cosine can be is 1/(len + 1)."""
        return self.collapse[self.collapse < ON_AXIS]

    def collapse_p(self, collapse: np.ndarray, own: bool = False) -> np.ndarray:
        """Each collapse's tail p-value among the held-out images': a cosine against their cosines, and
        a row without a sketch against them all, where only those on an axis as crowded count: a
        trigger sending its images to one axis is as suspect as a held-out image on so crowded an axis
        is rare, and a victim whose clean images often end on one axis is not flagged for it. NaN
        stays NaN."""
        with np.errstate(divide="ignore", invalid="ignore"):  # no held-out cosine: only axes asked
            by_cosine = tail_p(collapse, self.cosines, own)
        return np.where(collapse >= ON_AXIS, tail_p(collapse, self.collapse, own), by_cosine)

    def own_evidence(self) -> np.ndarray:
        """Each held-out image's evidence against the others: what a quantile rule reads."""
        return evidence(tail_p(self.scores, self.scores, own=True), self.collapse_p(self.collapse, own=True))

    def evidence(self, scores: np.ndarray, collapse: np.ndarray) -> np.ndarray:
        """NaN where either is NaN (a row that is not ok, or has no reference row left)."""
        return evidence(tail_p(scores, self.scores), self.collapse_p(collapse))

    def needed(self, scores: np.ndarray, collapse: np.ndarray, limit: float) -> np.ndarray:
        """Each row's collapse needed (value_needed); for a row without a sketch -inf when it is
        flagged (its collapse is above it), +inf when not; NaN where the row has no collapse."""
        needed = value_needed(tail_p(scores, self.scores), self.cosines, limit)
        on_axis = collapse >= ON_AXIS
        needed[on_axis] = np.where(self.evidence(scores[on_axis], collapse[on_axis]) > limit, -np.inf, np.inf)
        needed[np.isnan(collapse)] = np.nan
        return needed

    def own_score_statistic(self) -> np.ndarray:
        """Each held-out image's score evidence against the others plus its neighbours': what the
        score's quantile rule reads when the pass runs."""
        return score_evidence(self.scores, self.scores, own=True) + lent(self.neighbours)

    def score_statistic(self, scores: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        return score_evidence(scores, self.scores) + lent(neighbours)

    def score_needed(self, neighbours: np.ndarray, limit: float) -> np.ndarray:
        """Each row's score threshold given its neighbours' evidence: the score past which its
        score_statistic is above `limit`; lower the more its neighbours lend, -inf where they lend
        enough alone."""
        return value_needed(np.exp(-lent(neighbours)), self.scores, limit)


def above_median_text(share: float, what: str, median: str) -> str:
    """The share of `what` above `median`, with what it is on clean data and how far a backdoor can
    take it: a triggered share t moves at most t of it (0.5 + t/2), so past SHIFT_LIMIT the data is
    unlike the decoder's. The collapse pass says it of the evidence, the report's verdict of the scores."""
    return (
        f"{share:.0%} of {what} above {median} (about 50% on clean data like the decoder's held-out "
        f"images; {SHIFT_LIMIT:.0%} only if {2 * SHIFT_LIMIT - 1:.0%} of this data were triggered)"
    )


def unlike_holdout(share: float | None) -> str | None:
    """What to tell the user when a share of the run's evidence above the held-out images' median is
    more than a backdoor explains (SHIFT_LIMIT). None when it is not."""
    if share is None or share <= SHIFT_LIMIT:
        return None
    return (
        above_median_text(share, "the run's evidence is", "the held-out images' median")
        + ": the decoder's held-out images are unlike this data, so the collapse pass flags far more than "
        "its rule says; score with a decoder trained on data like it"
    )
