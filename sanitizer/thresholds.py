"""Threshold rules: a sample is flagged when its score is above the threshold. The collapse pass
reads the same rules (but `paper`) on its evidence, with the held-out images' own as the calibration.

- `quantile:Q`: the Q-quantile of the calibration scores (held-out training data, scored at the test
  settings when the decoder was trained). Sets the false-positive rate on data like the training
  data to about 1-Q, whatever the poison rate of the scored set. The default, `quantile:0.97`.
- `mad:K`: median + K * 1.4826 * MAD of the scored set: adapts to the scored data (robust z-score).
- `value:X`: a fixed number, e.g. read off the report's histogram.
- `paper`: the median of the scored set, which is what DeDe's reference code does (the paper's text
  says "average training loss"). It presumes half the data is poisoned; kept for comparison only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sanitizer.errors import UsageError

DEFAULT_RULE = "quantile:0.97"
# The collapse pass's, on its evidence (sanitizer.collapse): the evidence that 2% of the held-out
# images exceed. Beside the score's own test (3% by default) it flagged 3.9-4.3% of them in the
# detection benchmark's runs, within the 5% the benchmark allows.
DEFAULT_COLLAPSE_RULE = "quantile:0.98"
MAD_TO_SIGMA = 1.4826  # makes the MAD estimate a standard deviation for normal data


@dataclass(frozen=True)
class ThresholdRule:
    kind: str  # quantile | mad | value | paper
    param: float | None = None

    @property
    def needs_scores(self) -> bool:
        """Rules that look at the whole scored set can be applied only once every shard is scored."""
        return self.kind in ("mad", "paper")

    def __str__(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"


def parse_rule(text: str) -> ThresholdRule:
    """'quantile:0.97', 'mad:3', 'value:0.12', 'paper', or a bare number (same as value:X)."""
    kind, _, arg = text.strip().partition(":")
    try:
        if kind == "paper" and not arg:
            return ThresholdRule("paper")
        if kind in ("quantile", "mad", "value") and arg:
            rule = ThresholdRule(kind, float(arg))
        else:
            rule = ThresholdRule("value", float(text))
    except ValueError:
        raise UsageError(f"threshold {text!r} is not quantile:Q, mad:K, value:X, paper or a number") from None
    if rule.param is not None and not math.isfinite(rule.param):  # nan would flag nothing, silently
        raise UsageError(f"threshold {text!r} needs a finite number")
    if rule.kind == "quantile" and not 0 < rule.param < 1:
        raise UsageError(f"quantile must be in (0, 1), not {rule.param}")
    return rule


def resolve_threshold(
    rule: ThresholdRule, calibration: np.ndarray | None, scored: np.ndarray | None = None
) -> float:
    """The threshold value; float32-representable so that manifests compare exactly."""
    if rule.kind == "value":
        value = rule.param
    elif rule.kind == "quantile":
        if calibration is None or not len(calibration):
            raise UsageError("quantile rules need the decoder's calibration scores; use mad:K or value:X")
        value = float(np.quantile(calibration, rule.param))
    else:
        if scored is None or not len(scored):
            raise UsageError(f"rule {rule} needs scored samples, and there are none")
        median = float(np.median(scored))
        value = (
            median
            if rule.kind == "paper"
            else median + rule.param * MAD_TO_SIGMA * float(np.median(np.abs(scored - median)))
        )
    if abs(value) > float(np.finfo(np.float32).max):  # manifests hold float32: 1e40 would be inf there
        raise UsageError(f"threshold {rule} resolves to {value:g}, beyond what a float32 manifest holds")
    return float(np.float32(value))
