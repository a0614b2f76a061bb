"""bench/collapse_pass.py end to end at a tiny size: the pass's timings in docs/benchmarks.md come from it."""

import json

from bench import collapse_pass


def test_the_collapse_pass_bench_times_a_pass_that_flags_about_the_rules_budget(capsys):
    """The run's rows are drawn as the held-out images are, so the default rules (3% by the score's
    test, 2% by the collapse evidence, overlapping) flag about 4% of them: none would mean that the
    timed pass did no work, most that it weighed the run against something else."""
    result = collapse_pass.main(["--samples", "4000", "--per-shard", "500"])
    assert (result["samples"], result["shards"], result["reference"]) == (4000, 8, 4000)
    assert 0.03 <= result["flagged_share"] <= 0.055
    assert json.loads(capsys.readouterr().out) == result
