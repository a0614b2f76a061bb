import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sanitizer.manifest import MANIFEST_SCHEMA, SCHEMA_VERSION, read_manifest, to_table, write_manifest

SCHEMA_FILE = Path(__file__).parents[1] / "schemas" / f"{SCHEMA_VERSION}.json"
TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float": pa.float32(),
    "bool": pa.bool_(),
}


def test_schema_file_describes_the_code_schema():
    described = json.loads(SCHEMA_FILE.read_text())
    assert described["name"] == SCHEMA_VERSION
    columns = [(c["name"], TYPES[c["type"]], c["nullable"]) for c in described["columns"]]
    assert columns == [(f.name, f.type, f.nullable) for f in MANIFEST_SCHEMA]
    assert all(c["description"] for c in described["columns"])


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
        embedding_norm=1.0,
        caption=None,
        width=32,
        height=32,
        sha256="ab",
        label=None,
    )
    return {k: [v] for k, v in {**base, **over}.items()}


def test_writer_enforces_the_schema_and_round_trips(tmp_path):
    table = to_table(row())
    write_manifest(tmp_path / "m.parquet", table)
    assert read_manifest(tmp_path / "m.parquet").equals(table)
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
