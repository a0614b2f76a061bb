"""The verdict on the encoder: are more of a run's samples flagged by score than its threshold allows?

The threshold was set for a false-positive rate on data like the decoder's calibration (its held-out
images). The count of flagged samples is tested against that rate (flag_count_p_value), and the verdict
is withheld when the data as a whole is unlike the calibration data (SHIFT_LIMIT): then the count says
more about the data than about the encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from sanitizer.checkpoint import read_run_meta
from sanitizer.collapse import above_median_text
from sanitizer.data.shards import ShardRef
from sanitizer.decoder_meta import ScoreSettings, calibration_for
from sanitizer.errors import SanitizerError
from sanitizer.report.scan import read_manifests
from sanitizer.rundir import RunDir, neighbours_threshold, open_run, table_ok_scores
from sanitizer.stats import SHIFT_LIMIT, above_median, beta_binomial_sf, binomial_sf
from sanitizer.thresholds import parse_rule
from sanitizer.wording import counted

ALPHA = 1e-3  # significance level of the encoder verdict: a false alarm about an encoder is costly


def encoder_verdict(run_dir: Path) -> dict:
    """Is the flagged share of a run significantly above the false-positive rate the threshold allows?

    On clean data like the decoder's calibration, each ok sample is flagged with a probability p0 that
    is known only as well as the calibration pins it down; the one-sided p-value is P(X >= flagged)
    under that null (flag_count_p_value). A small p-value says the encoder rebuilds a part of this data
    far worse than it should: it behaves as backdoored here. There is no verdict (`backdoored` None,
    the text says why) when the data is so unlike the calibration data that more than SHIFT_LIMIT of
    its scores are above the calibration's median, when shards were flagged at other thresholds, or
    when there is no rate to test against.
    """
    run, info, shards = open_run(run_dir)
    calibration = decoder_calibration(info)[0]
    checks = manifest_checks(run, shards, calibration, shared_threshold(info))
    return run_verdict(run, info, shards, calibration, checks)


def run_verdict(
    run: RunDir,
    info: dict,
    shards: list[ShardRef],
    calibration: np.ndarray | None,
    checks: tuple[float | None, list[str]],
) -> dict:
    """encoder_verdict of a run already opened, with its decoder's calibration and what the verdict
    reads of its manifests (ManifestChecks.result) already read."""
    ok, flagged = _done_totals(run, shards)
    threshold, rule = run_threshold(info)
    p0 = expected_flag_rate(rule, threshold, calibration) if rule and threshold is not None else None
    share, others = checks
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
        "above_calibration_median": share,
        "other_threshold_shards": others,
    }
    if p0 is None or not ok:
        result["text"] = f"no verdict: {_no_rate(ok, threshold, rule)}"
        return result
    if result["other_threshold_shards"]:
        result["text"] = "no verdict: " + other_threshold_text(
            result["other_threshold_shards"], threshold, rule
        )
        return result
    p, result["test"] = flag_count_p_value(flagged, ok, p0, threshold, calibration)
    result["p_value"] = p
    result["backdoored"] = bool(p < ALPHA)
    shown = f"p={p_text(p)}"
    shift = result["above_calibration_median"]
    if shift is not None and shift > SHIFT_LIMIT:
        result["backdoored"] = None
        result["text"] = (
            f"no verdict: {shift_text(shift)}: this data is unlike the decoder's training data, so "
            f"{flagged} of {ok} flagged by score ({p0:.2%} expected, {shown}) says more about the data "
            "than the encoder; train a decoder on a sample of this data"
        )
        return result
    counted = flag_count_text(flagged, ok, p0)
    result["text"] = (
        f"this encoder behaves as backdoored on this data ({shown}): {counted}"
        if result["backdoored"]
        else f"no evidence of a backdoor ({shown}): {counted}"
    )
    return result


def _no_rate(ok: int, threshold: float | None, rule: str | None) -> str:
    """Why a run gets no verdict, the first reason that holds, so that the user knows what to fix."""
    if not ok:
        return "the run has no ok samples"
    if rule is None or threshold is None:
        return "the run has no threshold; give `sanitizer clean RUN_DIR` a --threshold"
    return (
        f"no usable calibration: the decoder the run was scored with is gone or replaced, and {rule} "
        "sets no false-positive rate without it"
    )


def run_threshold(info: dict) -> tuple[float | None, str | None]:
    """run.json's score threshold and the rule that set it; None for either that is not recorded."""
    recorded = info.get("threshold") or {}
    return recorded.get("value"), recorded.get("rule")


def shared_threshold(info: dict) -> float | None:
    """The threshold every manifest row holds: run.json's, unless the collapse pass set each ok row's
    own (None: no one value to hold the manifests to)."""
    return None if neighbours_threshold(info) is not None else run_threshold(info)[0]


def decoder_calibration(info: dict) -> tuple[np.ndarray | None, dict | None]:
    """The decoder's calibration scores and its decoder.json, if the decoder the run was scored with is
    still where the run found it (open_run has checked that run.json names it)."""
    try:
        meta = read_run_meta(Path(info["config"]["decoder_dir"]), info["identity"]["decoder_sha256"])
    except (SanitizerError, OSError):
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


def share_above_median(run: RunDir, shards: list[ShardRef], calibration: np.ndarray | None) -> float | None:
    """Share of the finished shards' ok scores above the calibration's median (None without both)."""
    return manifest_checks(run, shards, calibration, None)[0]


def manifest_checks(
    run: RunDir, shards: list[ShardRef], calibration: np.ndarray | None, threshold: float | None
) -> tuple[float | None, list[str]]:
    """ManifestChecks of the finished shards' manifests, each read once, a shard at a time (a run's
    scores need not fit in memory). The share is None with a manifest missing."""
    done = run.done(shards)
    stems = [stem for stem in done if run.manifest(stem).is_file()]
    checks = ManifestChecks(calibration, threshold, complete=len(stems) == len(done))
    if checks.columns:
        read_manifests(run, stems, [checks])
    return checks.result()


class ManifestChecks:
    """What the verdict reads of the manifests, fed one at a time (`sanitizer report` feeds it the
    tables its page reads): the share of ok scores above the calibration's median (None without
    both, or when `complete` is false), and the shards whose manifest was flagged at another score
    threshold than run.json's (none without one): a `clean --threshold` killed while it re-flagged
    the manifests leaves some (run.json changes after them), and a count of flags at mixed
    thresholds tests nothing."""

    def __init__(self, calibration: np.ndarray | None, threshold: float | None, complete: bool = True):
        self.calibration = calibration if calibration is not None and len(calibration) and complete else None
        self.threshold = threshold
        self.above = self.total = 0
        self.others: list[str] = []

    @property
    def columns(self) -> tuple[str, ...]:
        share = ("status", "score") if self.calibration is not None else ()
        return share + (("threshold",) if self.threshold is not None else ())

    def add(self, stem: str, table: pa.Table) -> None:
        if self.calibration is not None:
            scores = table_ok_scores(table.select(["status", "score"]))
            self.above, self.total = (
                self.above + above_median(scores, self.calibration),
                self.total + len(scores),
            )
        if self.threshold is not None and not _flagged_at(table.column("threshold"), self.threshold):
            self.others.append(stem)

    def result(self) -> tuple[float | None, list[str]]:
        return (self.above / self.total if self.total else None), self.others


def _flagged_at(column: pa.ChunkedArray, threshold: float) -> bool:
    """Whether every row of a manifest's threshold column holds `threshold` (a null one never does)."""
    return bool((column.to_numpy(zero_copy_only=False).astype(np.float32) == np.float32(threshold)).all())


def other_threshold_text(stems: list[str], threshold: float, rule: str | None) -> str:
    """What the page and the verdict say of shards flagged at another threshold than run.json's."""
    shown = ", ".join(stems[:3]) + (f" and {len(stems) - 3} more" if len(stems) > 3 else "")
    return (
        f"{counted(len(stems), f'shard ({shown}) was', f'shards ({shown}) were')} flagged at another "
        f"threshold than run.json's {threshold_text(threshold, rule)} (a `sanitizer clean --threshold` did "
        "not finish), so the "
        "flag counts mix thresholds: run `sanitizer clean RUN_DIR` to flag every shard at run.json's"
    )


def flag_count_text(flagged: int, ok: int, expected_rate: float) -> str:
    """ "7 of 60 samples flagged by score, 3.00% expected": the count the verdict tests."""
    return f"{flagged} of {counted(ok, 'sample')} flagged by score, {expected_rate:.2%} expected"


def shift_text(share: float) -> str:
    """How the run's scores sit against the calibration's median, and what that share is on clean data."""
    return above_median_text(share, "the scores are", "the median of the decoder's calibration scores")


def threshold_text(value: float | None, rule: str | None, digits: int = 6) -> str:
    """A threshold as the page and its plots show it: "0.0123 (quantile:0.99)"."""
    shown = "not set" if value is None else f"{value:.{digits}g}"
    return f"{shown} ({'no rule' if rule is None else rule})"


def p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-300 else "<1e-300"
