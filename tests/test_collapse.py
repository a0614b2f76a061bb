"""The collapse pass: sketches, the neighbour statistic, and the pass over a scored run."""

import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from sanitizer.collapse import (
    SKETCH_DIM,
    effective_dim,
    embedding_sketch,
    group_by_seed,
    neighbour_similarity,
    reference_rows,
)
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.errors import UsageError
from sanitizer.manifest import COLUMNS, read_manifest, write_manifest
from sanitizer.pipeline.job import ScoreJob, run_score_job
from sanitizer.report import write_report
from sanitizer.verify import verify_run

from .test_pipeline import manifests, tree_digest


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_sketch_keeps_cosines_and_is_the_same_everywhere():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 512)).astype(np.float32)
    near = base + 0.05 * rng.normal(size=base.shape).astype(np.float32)  # cosine ~0.9988
    a, b = (embedding_sketch(torch.from_numpy(x)).numpy() for x in (base, near))
    assert a.shape == (200, SKETCH_DIM) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert (a * b).sum(1).min() > 0.99  # near-copies stay near-copies
    assert np.abs((a[:100] * a[100:]).sum(1)).max() < 0.5  # unrelated ones stay apart
    # The projection comes from a fixed seed: a sketch made on another machine or by another
    # version compares with this one. These figures pin it.
    pinned = embedding_sketch(torch.ones(1, 8))[0, :3].numpy()
    assert np.allclose(pinned, [0.0831, 0.1138, -0.1447], atol=1e-4), pinned


def test_neighbour_similarity_leaves_out_the_same_file():
    rng = np.random.default_rng(1)
    cluster = unit(np.ones((6, 16)) + 0.01 * rng.normal(size=(6, 16)))
    spread = unit(rng.normal(size=(30, 16)))
    reference = np.concatenate([cluster, spread])
    ids = np.arange(len(reference))
    sim = neighbour_similarity(reference, reference, ids, ids, k=5)
    assert sim[:6].min() > 0.99 and sim[6:].max() < 0.9
    # Without the ids each row is its own nearest neighbour.
    assert neighbour_similarity(reference[6:], reference, k=1).min() == pytest.approx(1.0, abs=1e-6)
    # Fewer other files than k: the mean of those there are; none at all: NaN.
    assert neighbour_similarity(cluster[:1], cluster[:3], np.array([0]), np.arange(3), k=5)[0] > 0.99
    assert np.isnan(neighbour_similarity(cluster[:1], cluster[:1], np.array([0]), np.array([0]))[0])


def test_an_embedding_on_one_feature_has_no_sketch_and_no_neighbour():
    """A CNN whose ReLU features die maps such images to one axis: the same direction, not the same
    image. They get no sketch, are no one's neighbour and have no collapse value of their own."""
    rng = np.random.default_rng(3)
    spread = np.abs(rng.normal(size=(3, 32))).astype(np.float32)
    axis = np.zeros((3, 32), np.float32)
    axis[:, 7] = [0.1, 2.0, 30.0]  # one feature, three norms: cosine 1 between all of them
    embeddings = torch.from_numpy(np.concatenate([spread, axis, np.zeros((1, 32), np.float32)]))
    assert effective_dim(torch.eye(4)[:1] + torch.eye(4)[1:2]).item() == pytest.approx(2.0)
    assert effective_dim(embeddings)[3:].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    sketch = embedding_sketch(embeddings).numpy()
    assert np.isfinite(sketch[:3]).all() and np.isnan(sketch[3:]).all()
    sim = neighbour_similarity(sketch, sketch, np.arange(7), np.arange(7), k=2)
    assert np.isnan(sim[3:]).all() and np.isfinite(sim[:3]).all()
    # The rows without a sketch are left out of the reference, not counted as neighbours.
    assert sim[:3] == pytest.approx(
        neighbour_similarity(sketch[:3], sketch[:3], np.arange(3), np.arange(3), k=2)
    )


def test_group_by_seed_groups_around_the_first_ungrouped_row():
    rng = np.random.default_rng(2)
    a = unit(np.ones((5, 16)) + 0.01 * rng.normal(size=(5, 16)))
    b = unit(-np.ones((3, 16)) + 0.01 * rng.normal(size=(3, 16)))
    spread = unit(rng.normal(size=(4, 16)))
    rows = np.concatenate([a[:1], b[:1], a[1:], spread, b[1:]])
    assert group_by_seed(rows, 0.99, limit=2).tolist() == [0, 1, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1]
    # A link no cosine reaches leaves each seed a group of its own, up to the limit.
    assert group_by_seed(rows, 1.5, limit=3).tolist() == [0, 1, 2] + [-1] * 9


def test_reference_is_a_seeded_sample():
    assert reference_rows(10, size=20).tolist() == list(range(10))
    chosen = reference_rows(1000, size=50)
    assert len(set(chosen.tolist())) == 50 and (np.diff(chosen) > 0).all()
    assert (chosen == reference_rows(1000, size=50)).all()


@pytest.fixture(scope="module")
def cluster_shards(tmp_path_factory):
    """70 unrelated images, 12 near-copies of one more (one pixel differs: 12 different files with
    nearly one embedding, as a trigger makes them) and 4 byte-identical copies of another."""
    pixels = synthetic_images(72, 32, seed=5)
    near = np.repeat(pixels[70:71], 12, axis=0)
    for i in range(12):
        near[i, i, 0, 0] ^= 0xFF
    copies = np.repeat(pixels[71:72], 4, axis=0)
    out = tmp_path_factory.mktemp("cluster")
    write_image_shards(out, np.concatenate([pixels[:70], near, copies]), per_shard=43)
    return out


def run(decoder_dir, data, out, **kw):
    return run_score_job(ScoreJob(decoder_dir=decoder_dir, data=str(data), out=out, workers=0, **kw), False)


def concat(out) -> pa.Table:
    """Every manifest row of a run, in input order."""
    return pa.concat_tables(manifests(out).values())


def test_collapse_pass_flags_the_cluster_not_the_copies(tiny_decoder_dir, cluster_shards, tmp_path):
    out = tmp_path / "run"
    summary = run(tiny_decoder_dir, cluster_shards, out, collapse="quantile:0.975")
    table = concat(out)
    reasons = table.column("flag_reason").to_pylist()
    by_collapse = ["collapse" in (r or "") for r in reasons]
    assert all(by_collapse[70:82])  # every near-copy
    assert not any(by_collapse[82:])  # identical files are not each other's neighbours
    assert sum(by_collapse[:70]) <= 10  # the tiny decoder holds out 6 images: a rough threshold
    assert summary.flagged_by["collapse"] == sum(by_collapse)
    assert summary.flagged == sum(r is not None for r in reasons)
    assert set(table.column("collapse_threshold").to_pylist()) == {np.float32(summary.collapse_threshold)}
    assert verify_run(out) == []
    html = write_report(out).read_text()
    by = f"flagged by score {summary.flagged_by['score']:,}, by collapse {summary.flagged_by['collapse']:,}"
    assert (
        f"<td>collapse threshold</td><td>{summary.collapse_threshold:.6g} (quantile:0.975); {by}</td>" in html
    )
    # The report shows what the pass flagged, grouped: the 12 near-copies are the first group.
    assert '<section id="clusters"><h2>Collapse clusters</h2>' in html
    assert f"The collapse pass flagged {summary.flagged_by['collapse']:,} samples." in html
    first = re.search(
        r"<tr><td class=num>1</td><td class=num>(\d+)</td><td class=num></td><td>([^<]*)</td>", html
    )
    assert 12 <= int(first[1]) <= 12 + sum(by_collapse[:70])  # the random tiny encoder's own near pairs
    assert {int(key.removeprefix("shard")) for key in first[2].split(", ")} <= set(range(70, 82))
    assert (out / "report" / "clusters.png").is_file()

    # A finished run re-run changes nothing; without --collapse the pass is undone.
    before = tree_digest(out / "manifest")
    run(tiny_decoder_dir, cluster_shards, out, collapse="quantile:0.975")
    assert tree_digest(out / "manifest") == before
    again = run(tiny_decoder_dir, cluster_shards, out)
    undone = concat(out)
    assert undone.column("collapse").null_count == undone.num_rows
    assert set(undone.column("flag_reason").to_pylist()) <= {None, "score"}
    assert again.flagged == again.flagged_by["score"] and again.collapse_rule is None
    assert 'id="clusters"' not in write_report(out).read_text()
    assert not (out / "report" / "clusters.png").exists()  # an older report's figure does not linger


def test_rows_without_a_sketch_take_no_part(tiny_decoder_dir, cluster_shards, tmp_path):
    """The scorer writes a NaN sketch for an embedding on fewer than 2 features; the pass then gives
    the row no collapse value and does not count it as anyone's neighbour. Here the near-copies lose
    their sketches, so the cluster they made is no longer flagged."""
    out = tmp_path / "run"
    run(tiny_decoder_dir, cluster_shards, out, collapse="value:0.999")
    for path in sorted((out / "manifest").glob("*.parquet")):
        table = read_manifest(path)
        near = np.isin(table.column("key").to_pylist(), [f"shard{i:08d}" for i in range(70, 82)])
        sketch = table.column("sketch").combine_chunks()
        values = sketch.values.to_numpy(zero_copy_only=False).reshape(-1, SKETCH_DIM).copy()
        values[near] = np.nan
        blanked = pa.FixedSizeListArray.from_arrays(
            pa.array(values.ravel()), type=sketch.type, mask=sketch.is_null()
        )
        write_manifest(path, table.set_column(COLUMNS.index("sketch"), "sketch", blanked))
    summary = run(tiny_decoder_dir, cluster_shards, out, collapse="value:0.999")
    table = concat(out)
    near = [f"shard{i:08d}" for i in range(70, 82)]
    rows = [i for i, key in enumerate(table.column("key").to_pylist()) if key in near]
    assert len(rows) == 12
    assert all(table.column("collapse")[i].as_py() is None for i in rows)
    others = [c for i, c in enumerate(table.column("collapse").to_pylist()) if i not in rows]
    assert None not in others  # a row without a sketch is no one's neighbour, not everyone's
    assert not any("collapse" in (table.column("flag_reason")[i].as_py() or "") for i in rows)
    assert summary.flagged_by["collapse"] == 0  # nothing else in the set is that close
    assert verify_run(out) == []


def test_verify_holds_the_flags_to_the_collapse_threshold(tiny_decoder_dir, cluster_shards, tmp_path):
    out = tmp_path / "run"
    run(tiny_decoder_dir, cluster_shards, out, collapse="quantile:0.975")
    path = out / "manifest" / "shard-000001.parquet"
    table = read_manifest(path)
    reasons = table.column("flag_reason").to_pylist()
    index = next(i for i, reason in enumerate(reasons) if "collapse" in (reason or ""))
    raised = pa.array([2.0] * table.num_rows, pa.float32())  # no cosine similarity is above it
    write_manifest(path, table.set_column(COLUMNS.index("collapse_threshold"), "collapse_threshold", raised))
    violations = verify_run(out)
    key = table.column("key")[index].as_py()
    assert any(
        v.startswith(f"shard shard-000001: row {index} key {key!r}: flagged=True ({reasons[index]})")
        for v in violations
    )


def test_collapse_quantile_needs_a_decoder_that_kept_its_holdout(tiny_decoder_dir, cluster_shards, tmp_path):
    old = tmp_path / "old-decoder"
    shutil.copytree(tiny_decoder_dir, old)
    (old / "holdout.safetensors").unlink()
    with pytest.raises(UsageError, match="trained before the collapse pass"):
        run(old, cluster_shards, tmp_path / "a", collapse="quantile:0.975")
    assert not (tmp_path / "a").exists()  # refused before any scoring
    summary = run(old, cluster_shards, tmp_path / "b", collapse="value:0.999")
    assert summary.flagged_by["collapse"] >= 12
    with pytest.raises(UsageError, match="paper rule is for scores"):
        run(old, cluster_shards, tmp_path / "c", collapse="paper")


def test_the_collapse_pass_benchmark_times_a_generated_run():
    from bench import collapse_pass

    result = collapse_pass.main(["--samples", "300", "--per-shard", "100"])
    assert (result["samples"], result["shards"], result["reference"]) == (300, 3, 300)
    assert result["samples_per_second"] > 0


def test_the_knn_distance_baseline_is_the_same_neighbour_search():
    from sanitizer.redteam.metrics import knn_distance

    rng = np.random.default_rng(2)
    queries, reference = rng.normal(size=(50, 16)), rng.normal(size=(200, 16))
    brute = np.sort(1 - unit(queries) @ unit(reference).T, axis=1)[:, :10].mean(1)
    assert np.allclose(knn_distance(queries, reference), brute, atol=1e-6)
