"""bench/faults.py's own checks, which CI does not run (the bench takes minutes): what it compares
must follow what the package writes. Its full-disk fakes are sanitizer.faultkit's, which
tests/test_faults.py runs."""

from bench import faults


def test_a_scored_only_run_is_compared_without_the_split_markers_of_clean():
    """The reference run is also cleaned, and clean's markers sit in stats/ beside score's: a run
    that was only scored was reported as differing by every one of them."""
    assert faults.is_scored("manifest/a.parquet") and faults.is_scored("stats/a_stats.json")
    assert not faults.is_scored("stats/a_clean.json") and not faults.is_scored("clean/a.tar")
