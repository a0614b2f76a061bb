"""The manifest: one Parquet row per input sample, failures included, under an explicit schema.

schemas/manifest-v4.json describes the same columns for people and other tools; a test keeps the
two in step. Writers go through `write_manifest`, which refuses a table that does not match.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sanitizer.atomic import atomic_path
from sanitizer.collapse import SKETCH_DIM, THUMBNAIL_SIDE
from sanitizer.errors import UsageError

# The status of a decoded image whose score is not a finite number (an encoder that divides by an
# image's own spread makes NaN of a flat one): it could not be scored, so, as an image that could not
# be decoded, it is held out of clean/ (NaN is above no threshold: as `ok` it would pass as clean).
STATUS_NONFINITE_SCORE = "nonfinite_score"

SCHEMA_VERSION = "manifest-v4"
# Parquet's compliant name for a list's items, so that a file read back has exactly this schema
SKETCH_TYPE = pa.list_(pa.field("element", pa.float16()), SKETCH_DIM)
THUMBNAIL_TYPE = pa.binary(THUMBNAIL_SIDE * THUMBNAIL_SIDE)
# What the read stage takes from each sample's input besides its key and status, carried into the
# manifest as it is: one list, so that the two schemas cannot drift apart
INPUT_FIELDS = (
    pa.field("caption", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("sha256", pa.string()),
    pa.field("thumbnail", THUMBNAIL_TYPE),
    pa.field("label", pa.bool_()),
)

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
        pa.field("flag_reason", pa.string()),
        pa.field("collapse", pa.float32()),
        pa.field("collapse_threshold", pa.float32()),
        pa.field("embedding_norm", pa.float32()),
        pa.field("sketch", SKETCH_TYPE),
        pa.field("axis", pa.int32()),
        *INPUT_FIELDS,
    ],
    metadata={"schema": SCHEMA_VERSION},
)
COLUMNS = tuple(MANIFEST_SCHEMA.names)
# The columns the flagging sets after scoring (set_flags, with_collapse), as a shard's manifest starts
# them. The score stage computes the others, but for those the read stage gives: stages.SCORE_FIELDS
# takes them from MANIFEST_SCHEMA, so that a new score column is declared there only.
UNFLAGGED = {
    "flagged": False,
    "threshold": None,
    "flag_reason": None,
    "collapse": None,
    "collapse_threshold": None,
}


def to_table(columns: dict) -> pa.Table:
    """Build a table in schema order from column arrays; a missing or extra column is an error."""
    if set(columns) != set(COLUMNS):
        missing, extra = set(COLUMNS) - set(columns), set(columns) - set(COLUMNS)
        raise ValueError(f"manifest columns differ: missing {missing}, extra {extra}")
    return pa.Table.from_arrays(
        [pa.array(columns[c], f.type) for c, f in zip(COLUMNS, MANIFEST_SCHEMA, strict=True)],
        schema=MANIFEST_SCHEMA,
    )


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A float column with nulls as NaN, which is above no threshold and no threshold is below."""
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float32)


def _replace(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(COLUMNS.index(name), MANIFEST_SCHEMA.field(name), values)


def _constant(n: int, value: float | None) -> pa.Array:
    return pa.nulls(n, pa.float32()) if value is None else pa.array(np.full(n, value, np.float32))


def with_collapse(table: pa.Table, collapse: np.ndarray | None, needed: np.ndarray | None) -> pa.Table:
    """Replace the collapse columns: each row's collapse and the collapse it needs to be flagged
    (null where the collapse pass did not run or a row is not ok)."""

    def column(values: np.ndarray | None) -> pa.Array:
        n = table.num_rows
        return (
            pa.nulls(n, pa.float32()) if values is None else pa.array(values, pa.float32(), from_pandas=True)
        )

    return _replace(_replace(table, "collapse", column(collapse)), "collapse_threshold", column(needed))


def set_flags(table: pa.Table, threshold: float | np.ndarray | None) -> pa.Table:
    """Set the score threshold, one for every row or each row's own (null until it is known), then
    flagged and flag_reason from the row's columns: an ok row is flagged when its score or its
    collapse is above its threshold, and the reason names which ("score", "collapse" or
    "score+collapse"); rows that are not ok never are."""
    n = table.num_rows
    each = (
        _constant(n, threshold)
        if threshold is None or np.isscalar(threshold)
        else pa.array(np.asarray(threshold, np.float32), from_pandas=True)  # NaN: null
    )
    table = _replace(table, "threshold", each)
    ok = table.column("status").to_numpy(zero_copy_only=False) == "ok"
    by_score = ok & (_floats(table, "score") > _floats(table, "threshold"))
    by_collapse = ok & (_floats(table, "collapse") > _floats(table, "collapse_threshold"))
    reason = np.full(n, None, object)
    reason[by_score], reason[by_collapse] = "score", "collapse"
    reason[by_score & by_collapse] = "score+collapse"
    table = _replace(table, "flagged", pa.array(by_score | by_collapse, pa.bool_()))
    return _replace(table, "flag_reason", pa.array(reason, pa.string()))


def own_thresholds(table: pa.Table) -> np.ndarray:
    """Each row's score threshold as the table holds it (NaN where null): to re-flag it at them."""
    return _floats(table, "threshold")


# Each float type of the manifest, and the integer type of its bits (a sketch as a list of them)
_BITS = {
    pa.float32(): pa.uint32(),
    SKETCH_TYPE: pa.list_(pa.field("element", pa.uint16()), SKETCH_DIM),
}


def same_values(a: pa.Table, b: pa.Table) -> bool:
    """Whether two manifest tables hold the same values, floats compared bit for bit: Arrow's equality
    never holds a NaN equal to itself, and the sketch of an embedding on fewer than 2 features is NaN,
    so by Table.equals a manifest holding one would differ from itself."""
    if not a.schema.equals(b.schema) or a.num_rows != b.num_rows:
        return False
    return all(_bits(a.column(i)).equals(_bits(b.column(i))) for i in range(a.num_columns))


def _bits(column: pa.ChunkedArray) -> pa.ChunkedArray:
    bits = _BITS.get(column.type)
    if bits is None:
        return column
    return pa.chunked_array([chunk.view(bits) for chunk in column.chunks], bits)


def write_manifest(path: Path, table: pa.Table) -> None:
    """Atomic, deterministic Parquet (no wall-clock metadata), exactly in the schema."""
    if not table.schema.equals(MANIFEST_SCHEMA, check_metadata=False):
        raise ValueError(f"manifest table does not match {SCHEMA_VERSION}: {table.schema}")
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:  # a file, not a path pyarrow parses
        pq.write_table(table.replace_schema_metadata(MANIFEST_SCHEMA.metadata), sink, compression="zstd")


def read_manifest(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The manifest (or only `columns` of it, which Parquet reads alone), in the schema's types. One
    that cannot be read was damaged after its shard finished: its stats marker says it is done. One
    of another schema is refused too: read in this one's, a column it lacks would read as nulls."""
    try:
        with pa.OSFile(str(path)) as source:  # pyarrow would expand a `~` in a path, or read it as a URI
            if (why := schema_difference(pq.read_schema(source))) is not None:
                raise pa.ArrowInvalid(f"not {SCHEMA_VERSION}: {why}")
            return pq.read_table(source, columns=columns, schema=MANIFEST_SCHEMA)
    except (pa.ArrowException, OSError) as e:
        raise UsageError(
            f"cannot read manifest {path} ({str(e).splitlines()[0] or type(e).__name__}); restore it, or "
            f"delete its shard's stats/<stem>_stats.json and re-run score to score that shard again"
        ) from None


def schema_difference(schema: pa.Schema) -> str | None:
    """How a manifest file's schema differs from this version's, so that a refusal says what to look
    at; None where it is this version's."""
    version = (schema.metadata or {}).get(b"schema", b"").decode("utf-8", "replace")
    if version == SCHEMA_VERSION and schema.equals(MANIFEST_SCHEMA, check_metadata=False):
        return None
    want, got = {f.name: f.type for f in MANIFEST_SCHEMA}, {f.name: f.type for f in schema}
    parts = [] if version == SCHEMA_VERSION else [f"its metadata says schema {version[:80]!r}"]
    missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
    parts += [f"no column {', '.join(missing)}"] if missing else []
    parts += [f"extra column {', '.join(extra)}"] if extra else []
    parts += [f"column {n} is {got[n]}, not {t}" for n, t in want.items() if n in got and got[n] != t]
    return "; ".join(parts) or "its columns are in another order or nullability"


def flag_counts(table: pa.Table) -> dict:
    """flagged: rows flagged; flagged_by: how many of them each test flagged (a row can count twice)."""
    reasons = Counter(table.column("flag_reason").drop_null().to_pylist())
    by_score = reasons["score"] + reasons["score+collapse"]
    by_collapse = reasons["collapse"] + reasons["score+collapse"]
    return {"flagged": sum(reasons.values()), "flagged_by": {"score": by_score, "collapse": by_collapse}}
