"""bench/faults.py in CI: its own checks, and the whole script at a tiny size without its Ray faults
(the default run takes minutes). What it compares must follow what the package writes. Its
full-disk fakes are sanitizer.faultkit's, which tests/test_faults.py runs."""

from bench import faults


def test_a_scored_only_run_is_compared_without_the_split_markers_of_clean():
    """The reference run is also cleaned, and clean's markers sit in stats/ beside score's: a run
    that was only scored was reported as differing by every one of them."""
    assert faults.is_scored("manifest/a.parquet") and faults.is_scored("stats/a_stats.json")
    assert not faults.is_scored("stats/a_clean.json") and not faults.is_scored("clean/a.tar")


def test_the_faults_benchmark_runs_end_to_end_at_a_tiny_size_without_ray():
    """The whole script, so that a fault's phase that falls behind the package fails here (its
    full-disk fake and its comparison of a scored-only run each broke unseen for sessions). A count
    of 0 leaves a fault out: the Ray faults need their own Ray jobs, minutes, and are left to the bench."""
    counts = {"kills": 1, "ray-kills": 0, "clean-kills": 1, "actor-kills": 0, "enospc": 1, "races": 1}
    sizes = {"shards": 1, "per-shard": 20}
    rows = faults.main([f"--{k}={v}" for k, v in {**counts, **sizes}.items()])
    assert not [r for r in rows if r[2].startswith("FAILED")]
    assert [r[0] for r in rows] == [
        "hostile corpus (every bad input of issue 3 and 7)",
        "verify on a run with a deleted manifest row",
        "verify on a run with a changed byte in a clean member",
        "verify on a run with a missing shard (stats + manifest)",
        "verify on a run with a sizes.json off by one",
        "RUN_DIR under a regular file",
        "RUN_DIR in a read-only directory",
        "ENOSPC at a random manifest write",
        "ENOSPC at a random tar member of `clean`",
        "two `score` jobs started at once on one RUN_DIR",
        "SIGKILL of `score` (no Ray)",
        "SIGKILL of `clean` at a random time",
        "pickle payloads over all runs above",
    ]
    assert rows[-3][1].startswith("2 kills in 1 runs") and rows[-2][1].startswith("1 kills")
