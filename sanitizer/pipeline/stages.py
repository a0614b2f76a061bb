"""The two stages of a scoring job, usable with or without Ray.

`read_shard` (CPU): one input shard -> Arrow tables of decoded samples, then one end row that says
how many rows the shard gave (or why it failed). `ScoreStage` (GPU or CPU): tables -> the same rows
with scores, pixels dropped. A Ray job on CPUs runs both in each actor (`ReadScoreStage`, a shard a
call). Tables carry an explicit schema, so batches from different shards concatenate without type
inference, and pixels travel as one contiguous fixed-size-binary buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sanitizer.checkpoint import (
    META,
    WEIGHTS,
    encoder_weights_file,
    load_decoder,
    load_trained_encoder,
    read_meta,
)
from sanitizer.collapse import NO_AXIS, SKETCH_DIM
from sanitizer.data.decode import decode_image, decode_label, decode_text
from sanitizer.data.tario import ShardError, describe, iter_samples, printable
from sanitizer.decoder_meta import ScoreSettings, axis_scale_for
from sanitizer.device import memory_guard, resolve_device
from sanitizer.encoders import FILE_KINDS, parse_spec
from sanitizer.manifest import INPUT_FIELDS, MANIFEST_SCHEMA, SKETCH_TYPE, STATUS_NONFINITE_SCORE, UNFLAGGED
from sanitizer.neighbours import thumbnail
from sanitizer.scoring import Scorer, key_seeds, nonfinite_reason

log = logging.getLogger(__name__)

END = -1  # index of the row that closes a shard
SHARD_DONE, SHARD_FAILED = "end", "failed"  # status of that row

_META_FIELDS = [
    pa.field("shard", pa.string()),
    pa.field("index", pa.int64()),
    pa.field("shard_rows", pa.int64()),  # on the END row: how many sample rows the shard gave
    pa.field("key", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    *INPUT_FIELDS,
    pa.field("seed", pa.int64()),
]
# What the score stage adds to the read stage's rows: the manifest's columns that neither the read
# stage gives nor the flagging sets, as the manifest declares them
SCORE_FIELDS = [f for f in MANIFEST_SCHEMA if f.name not in {*(m.name for m in _META_FIELDS), *UNFLAGGED}]
RESULT_SCHEMA = pa.schema(_META_FIELDS + SCORE_FIELDS)


def read_schema(image_size: int) -> pa.Schema:
    return pa.schema([*_META_FIELDS, pa.field("pixels", pa.binary(image_size * image_size * 3))])


def _table(rows: list[dict], image_size: int) -> pa.Table:
    schema = read_schema(image_size)
    return pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)


def read_shard(url: str, stem: str, image_size: int, chunk_rows: int = 256) -> Iterator[pa.Table]:
    """Decode every sample of one shard; never raises: a shard that cannot be read ends FAILED."""
    blank = bytes(image_size * image_size * 3)
    rows: list[dict] = []
    count = 0
    end = {"status": SHARD_DONE, "error": None}
    try:
        for sample in iter_samples(url):
            decoded = decode_image(sample, image_size)
            key = printable(sample.key)
            thumb = None if decoded.pixels is None else thumbnail(decoded.pixels[None]).tobytes()
            rows.append(
                {
                    "shard": stem,
                    "index": sample.index,
                    "shard_rows": 0,
                    "key": key,
                    "status": decoded.status,
                    "error": decoded.error,
                    "caption": printable(decode_text(sample) or "") or None,
                    "width": decoded.width,
                    "height": decoded.height,
                    "sha256": decoded.sha256,
                    "thumbnail": thumb,
                    "label": decode_label(sample),
                    "seed": int(key_seeds([sample.key])[0]),
                    "pixels": decoded.pixels.tobytes() if decoded.pixels is not None else blank,
                }
            )
            count += 1
            if len(rows) >= chunk_rows:
                yield _table(rows, image_size)
                rows = []
    except ShardError as e:
        end = {"status": SHARD_FAILED, "error": e.message}
    except Exception as e:  # noqa: BLE001 - an I/O fault on one shard must not end the job
        end = {"status": SHARD_FAILED, "error": describe(e)}
    if end["status"] == SHARD_FAILED:
        log.warning("shard %s failed: %s", url, end["error"])
    rows.append(
        {
            **dict.fromkeys(f.name for f in _META_FIELDS),
            "shard": stem,
            "index": END,
            "shard_rows": count,
            "key": "",
            **end,
            "seed": 0,
            "pixels": blank,
        }
    )
    yield _table(rows, image_size)


def pixels_of(table: pa.Table, image_size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 view of the fixed-size-binary column, without a per-row copy."""
    column = table.column("pixels").combine_chunks()
    width = image_size * image_size * 3
    data = np.frombuffer(column.buffers()[1], np.uint8, count=(column.offset + len(column)) * width)
    return data[column.offset * width :].reshape(len(column), image_size, image_size, 3)


def stage_files(decoder_dir: str, encoder_weights: str | None = None) -> list[str]:
    """The files a ScoreStage made with these arguments reads, as it names them (a relative path
    resolves where the worker runs): decoder.json, the decoder's weights, the encoder weights, and a
    torchscript or exported encoder's own file. On a cluster every node must hold them."""
    meta = read_meta(Path(decoder_dir))
    files = [str(Path(decoder_dir) / META), str(Path(decoder_dir) / WEIGHTS)]
    if weights := encoder_weights_file(meta, encoder_weights):
        files.append(weights)
    kind, name = parse_spec(meta["encoder"]["spec"])
    return files + [name] if kind in FILE_KINDS else files


class ScoreStage:
    """Loads encoder and decoder once (per Ray actor), then scores tables of decoded samples."""

    def __init__(
        self,
        decoder_dir: str,
        settings: dict,
        device: str = "auto",
        micro_batch: int = 256,
        encoder_weights: str | None = None,
        threads: int | None = None,
        compile: bool = False,
    ) -> None:
        if threads:  # torch's CPU threads in this process (a Ray actor starts with one)
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        decoder, meta = load_decoder(Path(decoder_dir), self.device)
        weights = encoder_weights_file(meta, encoder_weights)
        encoder = load_trained_encoder(meta, weights, self.device)
        self.image_size = encoder.preprocess.image_size
        scoring = ScoreSettings.from_dict(settings)
        self.scorer = Scorer(encoder, decoder, scoring, axis_scale_for(meta, scoring), micro_batch, compile)

    def __call__(self, table: pa.Table) -> pa.Table:
        micro = self.scorer.micro_batch
        doing = f"scoring {table.num_rows} rows in model batches of {micro}"
        try:
            with memory_guard(self.device, doing, memory_advice(table.num_rows, micro)):
                return self._score(table)
        except Exception as e:  # a Ray actor's traceback is all the driver sees: name what it scored
            stems = pc.unique(table.column("shard")).to_pylist()
            e.add_note(f"while scoring shard{'s' if len(stems) > 1 else ''} {', '.join(stems)}")
            raise

    def _score(self, table: pa.Table) -> pa.Table:
        """The rows with their scores and sketches; the pixels dropped. An ok row whose score is not
        finite becomes a `nonfinite_score` row, without scores, as a row that could not be decoded."""
        is_ok = pc.and_(pc.equal(table.column("status"), "ok"), pc.not_equal(table.column("index"), END))
        ok = np.flatnonzero(pc.fill_null(is_ok, False).to_numpy())
        n = table.num_rows
        score, score_std, norm = (np.full(n, np.nan, np.float32) for _ in range(3))
        sketch = np.zeros((n, SKETCH_DIM), np.float16)
        axis = np.full(n, NO_AXIS, np.int32)
        if len(ok):
            pixels = pixels_of(table, self.image_size)
            seeds = table.column("seed").to_numpy()
            if len(ok) < n:  # else the Arrow buffer is used as is: the scorer copies it once
                pixels, seeds = pixels[ok], seeds[ok]
            result = self.scorer.score(pixels, seeds)
            score[ok], score_std[ok], norm[ok] = result.score, result.score_std, result.embedding_norm
            sketch[ok], axis[ok] = result.sketch, result.axis
        out = table.drop_columns(["pixels"])
        failed = np.zeros(n, bool)
        failed[ok] = ~np.isfinite(score[ok])
        if failed.any():
            out = as_nonfinite(out, failed, score, norm)
        not_ok = ~np.isfinite(score)  # rows that are not ok hold NaN here
        for name, values in (("score", score), ("score_std", score_std), ("embedding_norm", norm)):
            out = out.append_column(name, pa.array(values, pa.float32(), mask=not_ok))
        sketches = pa.FixedSizeListArray.from_arrays(
            pa.array(sketch.ravel()), type=SKETCH_TYPE, mask=pa.array(not_ok)
        )
        out = out.append_column("sketch", sketches)
        return out.append_column("axis", pa.array(axis, pa.int32(), mask=not_ok | (axis == NO_AXIS)))


def memory_advice(rows: int, micro_batch: int) -> str:
    """What a user whose scoring ran out of memory can do: fewer rows per call, where the call held
    more than one model batch; else a smaller model batch, which only --micro-batch sets (it is fixed
    within a job, as scores must not depend on which rows arrive together)."""
    kept = "finished shards are kept, so the re-run resumes"
    if rows > micro_batch:
        return f"give a lower --batch-size ({micro_batch} or less); {kept}"
    smaller = f"give a lower --micro-batch ({micro_batch // 2}, say), " if micro_batch > 1 else ""
    return (
        f"--batch-size cannot lower the model's batch of {micro_batch}: {smaller}free that memory of "
        f"other processes, or use a device with more; {kept}"
    )


def as_nonfinite(table: pa.Table, rows: np.ndarray, score: np.ndarray, norm: np.ndarray) -> pa.Table:
    """`table` with `rows` (ok rows whose score is not finite) marked `nonfinite_score`: their status,
    their error, and no thumbnail, as a row that is not ok has none. Rare, so done row by row."""
    status, error, thumb = (table.column(c).to_pylist() for c in ("status", "error", "thumbnail"))
    for i in np.flatnonzero(rows):
        status[i], error[i], thumb[i] = STATUS_NONFINITE_SCORE, nonfinite_reason(score[i], norm[i]), None
    for name, values in (("status", status), ("error", error), ("thumbnail", thumb)):
        field = table.schema.field(name)
        table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))
    return table


class ReadScoreStage(ScoreStage):
    """A CPU actor that reads its own shards, then scores them: one call, one shard.

    On the CPU decoding costs ~2% of scoring, so reading in the actor saves an extra process and an
    object-store hop per batch; and one shard per call lets every actor take shards as it frees up.
    """

    def __init__(self, *args, batch_size: int = 512, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size

    def __call__(self, shards: pa.Table) -> Iterator[pa.Table]:
        for table in rebatch(read_shards(shards, self.image_size), self.batch_size):
            yield super().__call__(table)


def read_shards(shards: pa.Table, image_size: int) -> Iterator[pa.Table]:
    """read_shard's tables for each shard a table of shard descriptors (url, stem) names, in order:
    what a Ray read task or a ReadScoreStage call gets."""
    urls, stems = shards.column("url").to_pylist(), shards.column("stem").to_pylist()
    for url, stem in zip(urls, stems, strict=True):
        yield from read_shard(url, stem, image_size)


def rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `rows` rows (the last may be shorter), across table and shard boundaries."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        held.append(table)
        count += table.num_rows
        while count >= rows:
            merged = pa.concat_tables(held)
            yield merged.slice(0, rows)
            rest = merged.slice(rows)
            held, count = [rest], rest.num_rows
    if count:
        yield pa.concat_tables(held)
