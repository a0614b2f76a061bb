import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sanitizer.manifest import (
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    SKETCH_TYPE,
    THUMBNAIL_TYPE,
    read_manifest,
    set_flags,
    to_table,
    with_collapse,
    write_manifest,
)
from sanitizer.pipeline.job import ScoreJob, run_score_job

SCHEMA_FILE = Path(__file__).parents[1] / "schemas" / f"{SCHEMA_VERSION}.json"
STATS_SCHEMA_FILE = SCHEMA_FILE.parent / "stats-v1.json"
TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float": pa.float32(),
    "bool": pa.bool_(),
    "fixed_size_list<element: halffloat>[64]": SKETCH_TYPE,
    "fixed_size_binary[64]": THUMBNAIL_TYPE,
}


def test_schema_file_describes_the_code_schema():
    described = json.loads(SCHEMA_FILE.read_text())
    assert described["name"] == SCHEMA_VERSION
    columns = [(c["name"], TYPES[c["type"]], c["nullable"]) for c in described["columns"]]
    assert columns == [(f.name, f.type, f.nullable) for f in MANIFEST_SCHEMA]
    assert all(c["description"] for c in described["columns"])


def test_stats_schema_lists_what_a_stats_file_holds(tmp_path, tiny_decoder_dir, tiny_shards):
    """Every field a stats marker holds is described, and nothing else (flagged_by was missing)."""
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(tiny_shards), out=tmp_path / "run", workers=0)
    run_score_job(job, progress=False)
    described = json.loads(STATS_SCHEMA_FILE.read_text())["fields"]
    assert all(described.values())
    for path in sorted((tmp_path / "run" / "stats").glob("*_stats.json")):
        assert sorted(json.loads(path.read_text())) == sorted(described)


def row(**over):
    base = dict(
        key="k",
        shard="s",
        index=0,
        status="ok",
        error=None,
        score=0.5,
        score_std=0.0,
        flagged=False,
        threshold=0.7,
        flag_reason=None,
        collapse=None,
        collapse_threshold=None,
        embedding_norm=1.0,
        sketch=[0.125] * 64,
        axis=None,
        caption=None,
        width=32,
        height=32,
        sha256="ab",
        thumbnail=bytes(64),
        label=None,
    )
    return {k: [v] for k, v in {**base, **over}.items()}


def test_writer_enforces_the_schema_and_round_trips(tmp_path):
    table = to_table(row())
    write_manifest(tmp_path / "m.parquet", table)
    assert read_manifest(tmp_path / "m.parquet").equals(table)
    # as other tools read it, without our schema: the same types, the list's items included
    assert pq.read_table(tmp_path / "m.parquet").schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    with pytest.raises(ValueError, match="missing"):
        to_table({k: v for k, v in row().items() if k != "score"})
    with pytest.raises(ValueError, match="does not match"):
        write_manifest(
            tmp_path / "bad.parquet", table.cast(table.schema.set(5, pa.field("score", pa.float64())))
        )
    assert not (tmp_path / "bad.parquet").exists()


def test_manifest_bytes_are_deterministic(tmp_path):
    table = to_table(row(score=np.float32(0.25)))
    write_manifest(tmp_path / "a.parquet", table)
    write_manifest(tmp_path / "b.parquet", table)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_flags_and_reasons_follow_both_tests():
    """A row is flagged by its score, its collapse, or both, and says which; a failed row never is,
    and without a collapse threshold the collapse column flags nothing."""
    rows = {k: v * 5 for k, v in row().items()}
    rows["status"] = ["ok", "ok", "ok", "ok", "decode_error"]
    rows["score"] = [0.9, 0.1, 0.9, 0.1, None]
    table = set_flags(to_table(rows), 0.5)
    assert table.column("flag_reason").to_pylist() == ["score", None, "score", None, None]
    needed = np.array([0.95, 0.95, 0.95, 0.95, np.nan])  # per row; none for a failed row
    table = set_flags(with_collapse(table, np.array([0.2, 0.99, 0.99, 0.2, np.nan]), needed), 0.5)
    assert table.column("flagged").to_pylist() == [True, True, True, False, False]
    assert table.column("flag_reason").to_pylist() == ["score", "collapse", "score+collapse", None, None]
    assert table.column("collapse").null_count == 1
    assert table.column("collapse_threshold").to_pylist() == [np.float32(0.95)] * 4 + [None]
    assert set_flags(table, None).column("flag_reason").to_pylist() == [
        None,
        "collapse",
        "collapse",
        None,
        None,
    ]
    cleared = set_flags(with_collapse(table, None, None), 0.5)
    assert cleared.column("flag_reason").to_pylist() == ["score", None, "score", None, None]


README = Path(__file__).parents[1] / "README.md"
README_TYPES = {**TYPES, "float32": pa.float32(), "fixed_size_list<float16>[64]": SKETCH_TYPE}


def readme_schema_rows() -> list[tuple[str, pa.DataType, bool]]:
    """README's manifest table as (column, type, nullable) rows; its `width, height` row is two."""
    table = README.read_text().split("### Manifest schema", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        names, kind, null, _ = (cell.strip() for cell in line.strip("|").split(" | ", 3))
        rows += [(name, README_TYPES[kind], null != "never") for name in names.split(", ")]
    return rows


def test_the_readme_schema_table_is_the_code_schema():
    """Every column in order, with its type and whether it can be null (the table had no nulls
    column: an auditor could not tell which columns pandas would read as float64 or object)."""
    assert readme_schema_rows() == [(f.name, f.type, f.nullable) for f in MANIFEST_SCHEMA]


def test_the_readme_audit_runs_on_a_run_with_failures_as_it_says(tmp_path, tiny_decoder_dir, monkeypatch):
    """README's pandas lines, verbatim, on a RUN_DIR of hostile shards: one table of every sample,
    statuses the schema lists, and the dtypes its note says pandas gives columns with nulls."""
    from sanitizer.data.hostile import write_hostile_corpus

    write_hostile_corpus(tmp_path / "data")
    run = tmp_path / "runs" / "today"
    run_score_job(ScoreJob(decoder_dir=tiny_decoder_dir, data=str(tmp_path / "data"), out=run, workers=0))
    audit = README.read_text().split("Audit the manifest with pandas:\n\n```python\n", 1)[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(audit, "README.md", "exec"), names)  # noqa: S102 - the README's own example
    m = names["m"]
    assert len(m) == json.loads((run / "run.json").read_text())["totals"]["samples"]
    statuses = json.loads(SCHEMA_FILE.read_text())["columns"][3]["description"]
    assert {"ok", "not_an_image", "truncated_shard"} <= set(m.status)
    assert all(s in statuses for s in set(m.status))
    assert (m.width.dtype, m.label.dtype, m.score.dtype) == (np.float64, object, np.float32)
    assert set(m.shard) <= set(names["shards"].stem) and len(names["run"]["failed_shards"]) == 2
    nullable = pd.read_parquet(run / "manifest", dtype_backend="numpy_nullable")
    assert [str(nullable[c].dtype) for c in ("width", "label", "score")] == ["Int32", "boolean", "Float32"]
