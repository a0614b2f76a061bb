"""Time of the collapse pass (part of `sanitizer score`) over a scored run, without the scoring.

    .venv/bin/python bench/collapse_pass.py --samples 200000 --per-shard 10000

Writes a run directory of manifests whose sketches are random unit vectors and thumbnails and file
digests random bytes (the pass's cost does not depend on their values), then times `apply_flags` with
the default rules against 2000 random held-out images (the most a decoder keeps): reading every
shard's sketches twice (drawing the reference sample by keyed hashes of the digests, then the
statistic), the neighbour search against up to
REFERENCE_SIZE reference rows with near-duplicates left out, the p-values, each row's score threshold
from its neighbours' scores, and rewriting the
manifests. Prints one JSON line, with the share of the rows flagged.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from sanitizer.atomic import write_json_atomic
from sanitizer.collapse import (
    NO_AXIS,
    REFERENCE_SIZE,
    SKETCH_DIM,
    THUMBNAIL_SIDE,
    Sketched,
)
from sanitizer.manifest import flag_counts, to_table, write_manifest
from sanitizer.pipeline.collapse_pass import HoldoutImages, apply_flags
from sanitizer.rundir import RunDir
from sanitizer.thresholds import DEFAULT_COLLAPSE_RULE, DEFAULT_RULE, parse_rule

HOLDOUT = 2000


def unit_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    sketch = rng.normal(size=(n, SKETCH_DIM)).astype(np.float32)
    return sketch / np.linalg.norm(sketch, axis=1, keepdims=True)


def thumbnails(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (n, THUMBNAIL_SIDE**2), dtype=np.uint8)


def write_run(root: Path, samples: int, per_shard: int, rng: np.random.Generator) -> list[str]:
    """Manifests and stats of a scored run (every row ok, scored, not yet flagged)."""
    run, stems = RunDir(root), []
    for start in range(0, samples, per_shard):
        n, stem = min(per_shard, samples - start), f"shard-{start // per_shard:06d}"
        sketch = unit_rows(n, rng)
        unset = ("error", "threshold", "flag_reason", "collapse", "collapse_threshold", "caption", "axis")
        columns = {c: [None] * n for c in (*unset, "width", "height", "label")}
        columns |= {
            "key": [f"{stem}-{i}" for i in range(n)], "shard": [stem] * n, "index": np.arange(n),
            "status": ["ok"] * n, "score": rng.random(n, np.float32), "score_std": np.zeros(n, np.float32),
            "flagged": np.zeros(n, bool), "embedding_norm": np.ones(n, np.float32),
            "sketch": list(sketch.astype(np.float16)), "thumbnail": list(map(bytes, thumbnails(n, rng))),
            "sha256": [bytes(row).hex() for row in rng.integers(0, 256, (n, 32), dtype=np.uint8)],
        }  # fmt: skip
        table = to_table(columns)
        run.manifest(stem).parent.mkdir(parents=True, exist_ok=True)
        write_manifest(run.manifest(stem), table)
        stats = {"shard": stem, "count": n, "ok": n, "status_counts": {"ok": n}, **flag_counts(table)}
        write_json_atomic(run.stats(stem), stats)
        stems.append(stem)
    return stems


def flagged_share(run: RunDir, stems: list[str]) -> float:
    """The share of the run the pass flagged. The run's rows are drawn as the held-out images are, so
    the default rules should flag about their budget: a check that the timed pass did its work."""
    flagged = [pq.read_table(run.manifest(stem), columns=["flagged"])["flagged"] for stem in stems]
    return float(np.mean(np.concatenate([column.to_numpy() for column in flagged])))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--per-shard", type=int, default=10_000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        stems = write_run(Path(tmp), args.samples, args.per_shard, rng)
        scores, sketches = rng.random(HOLDOUT), unit_rows(HOLDOUT, rng)
        images = Sketched(sketches, thumbnails(HOLDOUT, rng), np.full(HOLDOUT, NO_AXIS, np.int32))
        holdout = HoldoutImages(scores, images, reference_key=rng.bytes(32))
        started = time.perf_counter()
        apply_flags(
            RunDir(Path(tmp)),
            stems,
            0.5,
            parse_rule(DEFAULT_RULE),
            (parse_rule(DEFAULT_COLLAPSE_RULE), holdout),
        )
        seconds = time.perf_counter() - started
        flagged = flagged_share(RunDir(Path(tmp)), stems)
    result = {
        "samples": args.samples, "shards": len(stems), "reference": min(args.samples, REFERENCE_SIZE),
        "seconds": round(seconds, 2), "samples_per_second": round(args.samples / seconds),
        "flagged_share": round(flagged, 4), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
