"""The manifest: one Parquet row per input sample, failures included, under an explicit schema.

schemas/manifest-v1.json describes the same columns for people and other tools; a test keeps the
two in step. Writers go through `write_manifest`, which refuses a table that does not match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sanitizer.atomic import atomic_path

SCHEMA_VERSION = "manifest-v1"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("score_std", pa.float32()),
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("threshold", pa.float32()),
        pa.field("embedding_norm", pa.float32()),
        pa.field("caption", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("label", pa.bool_()),
    ],
    metadata={"schema": SCHEMA_VERSION},
)
COLUMNS = tuple(MANIFEST_SCHEMA.names)


def to_table(columns: dict) -> pa.Table:
    """Build a table in schema order from column arrays; a missing or extra column is an error."""
    if set(columns) != set(COLUMNS):
        missing, extra = set(COLUMNS) - set(columns), set(columns) - set(COLUMNS)
        raise ValueError(f"manifest columns differ: missing {missing}, extra {extra}")
    return pa.Table.from_arrays(
        [pa.array(columns[c], f.type) for c, f in zip(COLUMNS, MANIFEST_SCHEMA, strict=True)],
        schema=MANIFEST_SCHEMA,
    )


def set_flags(table: pa.Table, flagged: np.ndarray, threshold: float | None) -> pa.Table:
    """Replace the flagged and threshold columns (threshold null until it is known)."""
    n = table.num_rows
    thresholds = (
        pa.nulls(n, pa.float32()) if threshold is None else pa.array(np.full(n, threshold, np.float32))
    )
    for name, values in (("flagged", pa.array(flagged, pa.bool_())), ("threshold", thresholds)):
        table = table.set_column(COLUMNS.index(name), MANIFEST_SCHEMA.field(name), values)
    return table


def write_manifest(path: Path, table: pa.Table) -> None:
    """Atomic, deterministic Parquet (no wall-clock metadata), exactly in the schema."""
    if not table.schema.equals(MANIFEST_SCHEMA, check_metadata=False):
        raise ValueError(f"manifest table does not match {SCHEMA_VERSION}: {table.schema}")
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(MANIFEST_SCHEMA.metadata), tmp, compression="zstd")


def read_manifest(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The manifest (or only `columns` of it, which Parquet reads alone), in the schema's types."""
    return pq.read_table(path, columns=columns, schema=MANIFEST_SCHEMA)
