"""bench/memory.py end to end at a tiny size: the README's memory table comes from it."""

import tempfile

from bench import memory


def test_the_memory_bench_scores_1x_and_10x_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    """Its data, decoder and runs went to a mkdtemp folder that nothing removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = memory.main(["--shards", "1", "--per-shard", "20", "--workers", "0"])
    assert [(r["shards"], r["samples"]) for r in result["rows"]] == [(1, 20), (10, 200)]
    assert all(r["peak_rss_mb"] > 0 for r in result["rows"]) and result["growth"] > 0
    assert list(tmp_path.iterdir()) == []
