"""Threshold rules as users type them: what each parses to, and one clear error for the rest."""

from __future__ import annotations

import numpy as np
import pytest

from sanitizer.errors import UsageError
from sanitizer.thresholds import ThresholdRule, parse_rule, resolve_threshold


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("quantile:0.97", ThresholdRule("quantile", 0.97)),
        (" mad:3 ", ThresholdRule("mad", 3.0)),
        ("value:-0.5", ThresholdRule("value", -0.5)),
        ("0.12", ThresholdRule("value", 0.12)),
        ("paper", ThresholdRule("paper")),
    ],
)
def test_each_form_parses_and_prints_back(text: str, rule: ThresholdRule):
    assert parse_rule(text) == rule
    assert parse_rule(str(rule)) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("quantile:1", "quantile must be in (0, 1), not 1.0"),
        ("median", "threshold 'median' is not quantile:Q, mad:K, value:X, paper or a number"),
        ("paper:2", "threshold 'paper:2' is not quantile:Q, mad:K, value:X, paper or a number"),
        ("nan", "threshold 'nan' needs a finite number"),
        ("mad:nan", "threshold 'mad:nan' needs a finite number"),
        ("value:-inf", "threshold 'value:-inf' needs a finite number"),
        ("quantile:nan", "threshold 'quantile:nan' needs a finite number"),
    ],
)
def test_anything_else_is_one_usage_error(text: str, message: str):
    with pytest.raises(UsageError) as caught:
        parse_rule(text)
    assert str(caught.value) == message


@pytest.mark.filterwarnings("error")
def test_a_threshold_beyond_float32_is_refused_rather_than_written_as_infinity():
    """Refused with its message alone: comparing 1e40 with a float32 bound made numpy cast it to
    float32 first, and warn of the overflow on the user's stderr."""
    with pytest.raises(
        UsageError, match="threshold value:1e\\+40 resolves to 1e\\+40, beyond what a float32"
    ):
        resolve_threshold(parse_rule("1e40"), None)
    assert resolve_threshold(parse_rule("value:3e38"), None) == float(np.float32(3e38))
