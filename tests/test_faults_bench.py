"""bench/faults.py's own checks, which CI does not run (the bench takes minutes): what it compares
and how it fakes a full disk must follow what the package writes."""

import io

import pyarrow as pa
import pyarrow.parquet as pq

from bench import faults


def test_a_scored_only_run_is_compared_without_the_split_markers_of_clean():
    """The reference run is also cleaned, and clean's markers sit in stats/ beside score's: a run
    that was only scored was reported as differing by every one of them."""
    assert faults.is_scored("manifest/a.parquet") and faults.is_scored("stats/a_stats.json")
    assert not faults.is_scored("stats/a_clean.json") and not faults.is_scored("clean/a.tar")


def test_a_full_disk_leaves_half_a_manifest_in_the_open_file_it_was_written_to(tmp_path):
    """Manifests are written to a pa.OSFile; the fake took it for a path and raised a TypeError."""
    table = pa.table({"a": list(range(1000))})
    whole = io.BytesIO()
    pq.write_table(table, whole)
    path = tmp_path / "m.parquet"
    with pa.OSFile(str(path), "wb") as sink:
        faults._half_parquet(pq.write_table)(table, sink)
    assert path.read_bytes() == whole.getvalue()[: len(whole.getvalue()) // 2]
