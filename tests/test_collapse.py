"""The collapse pass: sketches, the neighbour statistic, and the pass over a scored run."""

import hashlib
import io
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from sanitizer.checkpoint import HOLDOUT, load_holdout, read_meta, reference_key, save_holdout, save_tensors
from sanitizer.clean import clean_run
from sanitizer.cli import build_parser, collapse_rule
from sanitizer.collapse import (
    NO_AXIS,
    ON_AXIS,
    SKETCH_DIM,
    THUMBNAIL_SIDE,
    UNKNOWN_AXIS,
    HeldOut,
    Sketched,
    Weighed,
    evidence,
    group_by_seed,
    reference_rank,
    tail_p,
    value_needed,
    within_lowest,
)
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.decoder_meta import ScoreSettings
from sanitizer.errors import UsageError
from sanitizer.manifest import COLUMNS, read_manifest, write_manifest
from sanitizer.neighbours import (
    CANDIDATES,
    NEAR_DUPLICATE_RMS,
    NEIGHBOURS,
    Neighbours,
    Reference,
    effective_dim,
    embedding_axis,
    embedding_sketch,
    near_duplicates,
    neighbour_similarity,
    thumbnail,
)
from sanitizer.pipeline import collapse_pass
from sanitizer.pipeline.job import ScoreJob, run_score_job
from sanitizer.report import write_report
from sanitizer.stats import SHIFT_LIMIT
from sanitizer.thresholds import DEFAULT_COLLAPSE_RULE, parse_rule
from sanitizer.train import TrainSettings, train_decoder
from sanitizer.verify import verify_run

from .conftest import TINY_MODEL
from .test_pipeline import forget_flag_inputs, manifests, tree_digest

# Evidence below ln(61): with the 60 held-out images of `decoder_dir`, a collapse above all of theirs
# (p = 1/61) flags a sample whatever its score.
RULE = "value:4"


def unweighed(collapse: np.ndarray) -> Weighed:
    """Collapses with no neighbours' evidence (the score's test as without the pass)."""
    return Weighed(collapse, np.full(len(collapse), np.nan, np.float32))


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


def test_neighbour_similarity_leaves_out_near_duplicates():
    rng = np.random.default_rng(1)
    cluster = unit(np.ones((6, 16)) + 0.01 * rng.normal(size=(6, 16)))
    spread = unit(rng.normal(size=(30, 16)))
    reference = np.concatenate([cluster, spread])
    apart = rng.integers(0, 256, (len(reference), THUMBNAIL_SIDE**2), dtype=np.uint8)  # different images
    sim = neighbour_similarity(reference, reference, apart, apart, k=5)
    assert sim[:6].min() > 0.99 and sim[6:].max() < 0.9
    # Without thumbnails each row is its own nearest neighbour.
    assert neighbour_similarity(reference[6:], reference, k=1).min() == pytest.approx(1.0, abs=1e-6)
    # The cluster's images as copies of one picture (each off by up to 4 grey levels): not neighbours.
    copies = apart.copy()
    copies[:6] = np.clip(apart[:1].astype(int) + rng.integers(-4, 5, (6, THUMBNAIL_SIDE**2)), 0, 255)
    sim = neighbour_similarity(reference, reference, copies, copies, k=5)
    assert sim[:6].max() < 0.9
    # Fewer other images than k: the mean of those there are; none at all: NaN.
    assert neighbour_similarity(cluster[:1], cluster[:3], apart[:1], apart[:3], k=5)[0] > 0.99
    assert np.isnan(neighbour_similarity(cluster[:1], cluster[:1], apart[:1], apart[:1])[0])


def test_near_duplicates_are_left_out_however_many_copies():
    """Near-duplicates are looked for among each query's CANDIDATES nearest rows first, in the whole
    reference only where those hold fewer than k others (a picture with many copies): the result is
    the brute-force one either way."""
    rng = np.random.default_rng(4)
    pictures = rng.integers(0, 256, (80, THUMBNAIL_SIDE**2))
    copies = np.clip(pictures[:1] + rng.integers(-3, 4, (3 * CANDIDATES, THUMBNAIL_SIDE**2)), 0, 255)
    thumbnails = np.concatenate([copies, pictures[1:]]).astype(np.uint8)
    sketches = unit(np.concatenate([np.ones((len(copies), 16)) + 0.01 * rng.normal(size=(len(copies), 16)),
                                    rng.normal(size=(79, 16)) + 0.3]))  # fmt: skip
    got = neighbour_similarity(sketches, sketches, thumbnails, thumbnails, k=5, block=7)
    distance = np.sqrt(((thumbnails[:, None].astype(float) - thumbnails[None]) ** 2).mean(-1))
    similarity = np.where(distance > NEAR_DUPLICATE_RMS, sketches @ sketches.T, -np.inf)
    expected = np.sort(similarity, 1)[:, -5:].mean(1)
    assert np.allclose(got, expected, atol=1e-6)
    assert got[: len(copies)].max() < 0.9  # the copies' neighbours are the other pictures


def test_thumbnails_tell_copies_from_other_images():
    """Copies of one image in other formats and sizes are near-duplicates; different images, the
    same trigger on them included, are not."""
    pixels = synthetic_images(40, 32, seed=9)
    own = thumbnail(pixels)
    assert own.shape == (40, THUMBNAIL_SIDE**2) and own.dtype == np.uint8
    block_mean = pixels.astype(np.float64).mean(-1).reshape(40, 8, 4, 8, 4).mean((2, 4))
    assert np.abs(own.reshape(40, 8, 8) - block_mean).max() <= 0.5 + 1e-4

    def reencoded(image: np.ndarray, fmt: str, side: int) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).resize((side, side), Image.BICUBIC).save(buffer, fmt, quality=50)
        return np.asarray(Image.open(buffer).convert("RGB").resize((32, 32), Image.BICUBIC))

    copies = np.stack(
        [reencoded(p, fmt, side) for p in pixels[:10] for fmt, side in (("JPEG", 32), ("PNG", 64))]
    )
    assert near_duplicates(thumbnail(copies), own[:10])[np.arange(20), np.arange(20) // 2].all()
    patched = pixels.copy()
    patched[:, 20:30, 20:30] = 255  # one white square on each
    others = near_duplicates(thumbnail(patched), thumbnail(patched))
    assert (others == np.eye(40, dtype=bool)).all()


def test_an_embedding_on_one_feature_has_no_sketch_and_no_neighbour():
    """A CNN whose ReLU features die maps such images to one axis: the same direction, not the same
    image. They get no sketch but their axis, and are no one's neighbour."""
    rng = np.random.default_rng(3)
    spread = np.abs(rng.normal(size=(3, 32))).astype(np.float32)
    axis = np.zeros((3, 32), np.float32)
    axis[:, 7] = [0.1, 2.0, 30.0]  # one feature, three norms: cosine 1 between all of them
    embeddings = torch.from_numpy(np.concatenate([spread, axis, np.zeros((1, 32), np.float32)]))
    assert effective_dim(torch.eye(4)[:1] + torch.eye(4)[1:2]).item() == pytest.approx(2.0)
    assert effective_dim(embeddings)[3:].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    sketch = embedding_sketch(embeddings).numpy()
    assert np.isfinite(sketch[:3]).all() and np.isnan(sketch[3:]).all()
    assert embedding_axis(embeddings).tolist() == [NO_AXIS] * 3 + [7, 7, 7, 0]  # all zeros: feature 0
    assert embedding_axis(-embeddings)[3:6].tolist() == [7, 7, 7]  # by magnitude, whatever the sign
    apart = np.arange(7 * THUMBNAIL_SIDE**2).reshape(7, -1).astype(np.uint8)  # 7 different images
    sim = neighbour_similarity(sketch, sketch, apart, apart, k=2)
    assert np.isnan(sim[3:]).all() and np.isfinite(sim[:3]).all()
    # The rows without a sketch are left out of the reference, not counted as neighbours.
    assert sim[:3] == pytest.approx(neighbour_similarity(sketch[:3], sketch[:3], apart[:3], apart[:3], k=2))


def test_group_by_seed_groups_around_the_first_ungrouped_row():
    rng = np.random.default_rng(2)
    a = unit(np.ones((5, 16)) + 0.01 * rng.normal(size=(5, 16)))
    b = unit(-np.ones((3, 16)) + 0.01 * rng.normal(size=(3, 16)))
    spread = unit(rng.normal(size=(4, 16)))
    rows = np.concatenate([a[:1], b[:1], a[1:], spread, b[1:]])
    assert group_by_seed(rows, 0.99, limit=2).tolist() == [0, 1, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1]
    # A link no cosine reaches leaves each seed a group of its own, up to the limit.
    assert group_by_seed(rows, 1.5, limit=3).tolist() == [0, 1, 2] + [-1] * 9


def test_the_reference_is_drawn_by_keyed_content():
    digests = [hashlib.sha256(bytes([i, j])).hexdigest() for i in range(4) for j in range(250)]
    rank = reference_rank(digests, b"k" * 32)
    assert rank.dtype == np.uint64 and len(set(rank.tolist())) == 1000
    assert (rank == reference_rank(digests, b"k" * 32)).all()
    drawn = within_lowest(rank, 50)
    assert drawn.sum() == 50 and rank[drawn].max() < rank[~drawn].min()
    # The draw is the same in any order, and another key draws another sample (2.5 shared expected).
    order = np.random.default_rng(0).permutation(1000)
    assert (within_lowest(rank[order], 50) == drawn[order]).all()
    assert (drawn & within_lowest(reference_rank(digests, b"j" * 32), 50)).sum() < 15
    # Copies of one file share a rank: drawn together, even past the size.
    last = digests[int(np.argsort(rank)[49])]
    copies = within_lowest(reference_rank([*digests, last], b"k" * 32), 50)
    assert copies.sum() == 51 and copies[-1]
    assert within_lowest(rank[:10], 50).all()


def test_the_reference_key_is_the_decoders_and_recorded_nowhere(decoder_dir, tmp_path):
    key = reference_key(decoder_dir)
    assert len(key) == 32 and key == reference_key(decoder_dir)
    assert key.hex() not in (decoder_dir / "decoder.json").read_text()
    assert key.hex() != json.loads((decoder_dir / "decoder.json").read_text())["decoder_sha256"]


@pytest.fixture(scope="module")
def cluster_shards(tmp_path_factory):
    """70 unrelated images; 12 circular shifts of one more (12 different pictures that the tiny
    encoder, a global-average-pooled CNN, embeds at nearly one point, as a trigger makes them); 12
    near-copies of another (one pixel differs: different files, one picture) and 4 byte-identical
    copies of a third."""
    pixels = synthetic_images(73, 32, seed=5)
    shifts = [(dy, dx) for dy in (0, 8, 16, 24) for dx in (0, 8, 16)]
    shifted = np.stack([np.roll(pixels[71], shift, (0, 1)) for shift in shifts])
    near = np.repeat(pixels[70:71], 12, axis=0)
    for i in range(12):
        near[i, i, 0, 0] ^= 0xFF
    copies = np.repeat(pixels[72:73], 4, axis=0)
    out = tmp_path_factory.mktemp("cluster")
    write_image_shards(out, np.concatenate([pixels[:70], shifted, near, copies]), per_shard=43)
    return out


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, tiny_shards, tiny_encoder):
    """The tiny decoder with half its 120 images held out: the pass's p-values need a holdout of some
    size (the session's tiny decoder holds out 6)."""
    out = tmp_path_factory.mktemp("decoder")
    settings = TrainSettings(epochs=2, batch_size=32, holdout=0.5)
    train_decoder(
        tiny_encoder, str(tiny_shards), out, settings, ScoreSettings(num_masks=2), TINY_MODEL, progress=False
    )
    return out


def run(decoder_dir, data, out, **kw):
    return run_score_job(ScoreJob(decoder_dir=decoder_dir, data=str(data), out=out, workers=0, **kw), False)


def concat(out) -> pa.Table:
    """Every manifest row of a run, in input order."""
    return pa.concat_tables(manifests(out).values())


def test_collapse_pass_flags_the_cluster_not_the_copies(decoder_dir, cluster_shards, tmp_path):
    out = tmp_path / "run"
    summary = run(decoder_dir, cluster_shards, out, collapse=RULE)
    table = concat(out)
    reasons = table.column("flag_reason").to_pylist()
    by_collapse = ["collapse" in (r or "") for r in reasons]
    assert all(by_collapse[70:82])  # every shifted picture
    assert not any(by_collapse[82:])  # near-copies and identical files are not each other's neighbours
    assert sum(by_collapse[:70]) <= 10  # a rough rule: about 2% of unrelated pairs of p-values pass it
    assert summary.flagged_by["collapse"] == sum(by_collapse)
    assert summary.flagged == sum(r is not None for r in reasons)
    assert summary.collapse_threshold == 4.0
    assert json.loads((out / "run.json").read_text())["collapse"]["above_holdout_median"] <= SHIFT_LIMIT
    # Each row's collapse threshold is what its score leaves to the collapse: lower for higher scores.
    scores, needed = (
        np.array(table.column(c).to_pylist(), np.float64) for c in ("score", "collapse_threshold")
    )
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(needed[order]) <= 0)
    assert needed.min() < needed.max()
    assert verify_run(out) == []
    html = write_report(out).read_text()
    by = f"flagged by score {summary.flagged_by['score']:,}, by collapse {summary.flagged_by['collapse']:,}"
    assert f"<td>collapse evidence threshold</td><td>4 ({RULE}); {by}</td>" in html
    # The report shows what the pass flagged, grouped: the 12 shifted pictures are the first group.
    assert '<section id="clusters"><h2>Collapse clusters</h2>' in html
    assert f"The collapse pass flagged {summary.flagged_by['collapse']:,} samples." in html
    first = re.search(
        r"<tr><td class=num>1</td><td class=num>(\d+)</td><td class=num></td><td>([^<]*)</td>", html
    )
    assert 12 <= int(first[1]) <= 12 + sum(by_collapse[:70])  # the random tiny encoder's own near pairs
    assert {int(key.removeprefix("shard")) for key in first[2].split(", ")} <= set(range(70, 82))
    assert (out / "report" / "clusters.png").is_file()
    # ... and where the pass puts every sample: 98 rows with a collapse, all drawn.
    assert '<section id="joint"><h2>Score and collapse</h2>' in html
    assert "<p>98 samples with a cosine collapse" in html
    assert (out / "report" / "joint.png").is_file()

    # A finished run re-run changes nothing, also where it runs the pass again; with --no-collapse the
    # pass is undone.
    before = tree_digest(out / "manifest")
    forget_flag_inputs(out)
    run(decoder_dir, cluster_shards, out, collapse=RULE)
    assert tree_digest(out / "manifest") == before
    again = run(decoder_dir, cluster_shards, out, collapse=None)
    undone = concat(out)
    assert undone.column("collapse").null_count == undone.num_rows
    assert set(undone.column("flag_reason").to_pylist()) <= {None, "score"}
    assert again.flagged == again.flagged_by["score"] and again.collapse_rule is None
    assert 'id="clusters"' not in write_report(out).read_text()
    assert not (out / "report" / "clusters.png").exists()  # an older report's figure does not linger
    assert not (out / "report" / "joint.png").exists()


def test_the_pass_prepares_its_reference_once_whatever_the_shard_count(
    decoder_dir, cluster_shards, tmp_path, monkeypatch
):
    """The reference is asked once per shard and once for the held-out images; it is prepared
    (its rows with a sketch, its thumbnails as floats) once: per call, a run of thousands of small
    shards spent most of the pass doing it again."""
    prepared, asked = [], []
    of, weigh = Neighbours.of.__func__, Reference.weigh

    def counting_of(cls, *args, **kwargs):
        prepared.append(len(args[0]))
        return of(cls, *args, **kwargs)

    def counting_weigh(self, queries):
        asked.append(len(queries.axes))
        return weigh(self, queries)

    monkeypatch.setattr(Neighbours, "of", classmethod(counting_of))
    monkeypatch.setattr(Reference, "weigh", counting_weigh)
    run(decoder_dir, cluster_shards, tmp_path / "run", collapse=RULE)
    assert len(asked) == 3 + 1 and prepared == [98]


def test_the_pass_is_the_same_whatever_the_shard_order(decoder_dir, cluster_shards, tmp_path, monkeypatch):
    """With a reference smaller than the run, the same shards listed in reverse give every sample the
    same collapse and the same flags: the reference is drawn by content, not by position."""
    shards = sorted(str(path) for path in cluster_shards.glob("*.tar"))
    assert len(shards) == 3

    def collapse_by_key(listed: list[str], reference_size: int, name: str) -> dict[str, np.ndarray]:
        monkeypatch.setattr(collapse_pass, "REFERENCE_SIZE", reference_size)
        run(decoder_dir, ",".join(listed), tmp_path / name, collapse=RULE)
        table = concat(tmp_path / name)
        order = np.argsort(table.column("key").to_pylist())
        return {c: np.array(table.column(c).to_pylist())[order] for c in ("key", "collapse", "flag_reason")}

    forward, reverse = collapse_by_key(shards, 40, "forward"), collapse_by_key(shards[::-1], 40, "reverse")
    assert (forward["key"] == reverse["key"]).all() and len(forward["key"]) == 98
    np.testing.assert_allclose(
        forward["collapse"].astype(float), reverse["collapse"].astype(float), atol=1e-6
    )
    assert (forward["flag_reason"] == reverse["flag_reason"]).all()
    whole = collapse_by_key(shards, 98, "whole")  # the whole run as the reference: other neighbours
    assert np.abs(forward["collapse"].astype(float) - whole["collapse"].astype(float)).max() > 0.01


def blank_sketches(out, keys: list[str], axis: int = 5) -> None:
    """Give these samples of a finished run NaN sketches on one axis, as the scorer does for embeddings
    on that feature alone."""
    for path in sorted((out / "manifest").glob("*.parquet")):
        table = read_manifest(path)
        chosen = np.isin(table.column("key").to_pylist(), keys)
        sketch = table.column("sketch").combine_chunks()
        values = sketch.values.to_numpy(zero_copy_only=False).reshape(-1, SKETCH_DIM).copy()
        values[chosen] = np.nan
        blanked = pa.FixedSizeListArray.from_arrays(
            pa.array(values.ravel()), type=sketch.type, mask=sketch.is_null()
        )
        axes = pa.array(np.full(len(chosen), axis, np.int32), mask=~chosen)
        table = table.set_column(COLUMNS.index("sketch"), "sketch", blanked)
        write_manifest(path, table.set_column(COLUMNS.index("axis"), "axis", axes))


def without_sketches(images: Sketched, rows: slice, axis: int = 5) -> Sketched:
    """These held-out images' sketches made NaN, on one axis."""
    sketches, axes = images.sketches.copy(), images.axes.copy()
    sketches[rows], axes[rows] = np.nan, axis
    return Sketched(sketches, images.thumbnails, axes)


def test_rows_without_a_sketch_are_no_ones_neighbour_and_as_suspect_as_they_are_rare(
    decoder_dir, cluster_shards, tmp_path
):
    """The scorer writes a NaN sketch for an embedding on fewer than 2 features; the pass does not count
    such a row as anyone's neighbour, and weighs it by how crowded its axis is against the held-out
    images'. A backdoor could send its triggered images to one axis; here the shifted pictures, the trigger's
    cluster, lose their sketches, and as no held-out image of this decoder lacks one (p = 1/61 <
    e^-4), the pass still flags them all. Before session 30, it exempted them, judged by the score
    alone."""
    out = tmp_path / "run"
    run(decoder_dir, cluster_shards, out, collapse=RULE)
    sketched = concat(out).column("collapse").to_pylist()
    shifted = [f"shard{i:08d}" for i in range(70, 82)]
    blank_sketches(out, shifted)
    summary = run(decoder_dir, cluster_shards, out, collapse=RULE)
    table = concat(out)
    rows = [i for i, key in enumerate(table.column("key").to_pylist()) if key in shifted]
    assert len(rows) == 12
    # 12 images on one axis of the 98 the reference holds; no held-out image lacks a sketch
    assert all(table.column("collapse")[i].as_py() == pytest.approx(ON_AXIS + 12 / 98) for i in rows)
    assert all(table.column("collapse_threshold")[i].as_py() == -np.inf for i in rows)
    assert all("collapse" in table.column("flag_reason")[i].as_py() for i in rows)
    others = [c for i, c in enumerate(table.column("collapse").to_pylist()) if i not in rows]
    assert np.isfinite(others).all()  # a row without a sketch is no one's neighbour, not everyone's
    assert all(c < sketched[i] + 1e-6 for i, c in enumerate(table.column("collapse").to_pylist()) if i < 70)
    assert summary.flagged_by["collapse"] >= 12
    assert verify_run(out) == []
    assert 'id="clusters"' in write_report(out).read_text()  # the sketched flagged rows are grouped


NO_SKETCH_HTML = "have no sketch (their embedding sits on fewer than 2 features: collapse 2 or more)"


def test_the_report_counts_the_rows_without_a_sketch_it_cannot_draw_or_group(
    decoder_dir, cluster_shards, tmp_path
):
    """A row without a sketch has no cosine to plot or group by; the report left the 12 flagged ones
    out silently: the plot said 86 samples had a collapse value, and the clusters 'Of the 14 with the
    highest collapse' where it grouped 2."""
    out = tmp_path / "run"
    run(decoder_dir, cluster_shards, out, collapse=RULE)
    blank_sketches(out, [f"shard{i:08d}" for i in range(70, 82)])
    flagged = run(decoder_dir, cluster_shards, out, collapse=RULE).flagged_by["collapse"]
    text = re.sub(r"\s+", " ", write_report(out).read_text())
    assert "86 samples with a cosine collapse (a seeded sample)" in text
    assert (
        f"<p>12 samples {NO_SKETCH_HTML}, 12 of them flagged by the collapse pass: they are not drawn.</p>"
        in text
    )
    assert (
        f"The collapse pass flagged {flagged} samples. 12 of them {NO_SKETCH_HTML} and are not grouped. "
        f"Of the {flagged - 12} with the highest collapse"
    ) in text


def test_the_report_says_what_the_pass_flagged_when_no_row_of_it_has_a_sketch(tmp_path):
    """Flagged rows that all lack a sketch make no cluster: the page said the pass flagged no sample."""
    from sanitizer.report.page import clusters_section, joint_section
    from sanitizer.report.scan import JointPoints

    html = clusters_section(tmp_path, [], 12, 12, {}).body
    said = f"the collapse pass flagged 12 samples. 12 of them {NO_SKETCH_HTML} and are not grouped."
    assert html == f'<p class="note">{said}</p>'
    assert "flagged no sample" in clusters_section(tmp_path, [], 0, 0, {}).body
    empty = np.zeros(0)
    points = JointPoints(empty, empty, empty, empty.astype(object), None, unsketched=5, unsketched_flagged=2)
    html = joint_section(tmp_path, points, 0.5, None).body
    assert html == (
        f'<p class="note">5 samples {NO_SKETCH_HTML}, 2 of them flagged by the collapse pass; no sample has '
        "a cosine collapse: nothing to plot</p>"
    )
    assert not (tmp_path / "joint.png").exists()


def test_verify_holds_the_flags_to_the_collapse_threshold(decoder_dir, cluster_shards, tmp_path):
    out = tmp_path / "run"
    run(decoder_dir, cluster_shards, out, collapse=RULE)
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


def test_under_a_quantile_rule_the_pass_sets_each_rows_score_threshold(
    decoder_dir, cluster_shards, tmp_path, caplog
):
    """With the pass, a quantile score rule reads the score evidence plus the neighbours': each ok row
    gets its own score threshold, run.json and the summary the limit, and the flags, verify, the
    report and clean follow the rows' thresholds. Other score rules, --no-collapse and a `clean
    --threshold` give every row the run's one threshold."""
    out = tmp_path / "run"
    summary = run(decoder_dir, cluster_shards, out, collapse=RULE)
    info = json.loads((out / "run.json").read_text())
    assert info["threshold"]["neighbours"] == summary.neighbours_threshold > 0
    table = concat(out)
    score, threshold, collapse, needed = (
        np.array(table.column(c).to_pylist(), np.float32)
        for c in ("score", "threshold", "collapse", "collapse_threshold")
    )
    assert len(np.unique(threshold)) > 2  # each row its own ...
    # ... and, from 60 held-out images (p = 1/61 at best), none for a row whose neighbours lend little
    assert np.isposinf(threshold).any()
    assert (
        "the score's test has 60 held-out images: a score flags a sample only beside neighbours with "
        "unusual scores" in caplog.text
    )
    flagged = np.array(table.column("flagged").to_pylist())
    np.testing.assert_array_equal(flagged, (score > threshold) | (collapse > needed))
    assert summary.flagged_by["score"] == int((score > threshold).sum())
    assert verify_run(out) == []
    html = write_report(out).read_text()
    assert "<td>score evidence threshold, with the neighbours&#x27;</td>" in html
    assert "moved each sample's own threshold from this one by its neighbours' scores" in html
    assert "so no one line marks it" in html and "other threshold" not in html
    before = tree_digest(out / "manifest")
    clean = clean_run(out)
    assert tree_digest(out / "manifest") == before  # clean keeps the rows' own thresholds
    assert clean.quarantined == int(flagged.sum())
    limit = f"(score evidence threshold {summary.neighbours_threshold:.6g})"
    assert f"each ok row's own from its neighbours' scores {limit}" in clean.threshold_text()
    # ... until a `clean --threshold` sets one for every row
    clean_run(out, "quantile:0.97")
    assert set(concat(out).column("threshold").to_pylist()) == {info["threshold"]["value"]}
    assert "neighbours" not in json.loads((out / "run.json").read_text())["threshold"]
    assert verify_run(out) == []
    for name, kw in (("value", {"threshold": "value:0.5"}), ("off", {"collapse": None})):
        plain = run(decoder_dir, cluster_shards, tmp_path / name, **({"collapse": RULE} | kw))
        assert plain.neighbours_threshold is None
        assert len(set(concat(tmp_path / name).column("threshold").to_pylist())) == 1


def test_verify_names_an_ok_row_without_its_own_threshold(decoder_dir, cluster_shards, tmp_path):
    out = tmp_path / "run"
    run(decoder_dir, cluster_shards, out, collapse=RULE)
    path = out / "manifest" / "shard-000000.parquet"
    table = read_manifest(path)
    write_manifest(
        path,
        table.set_column(COLUMNS.index("threshold"), "threshold", pa.nulls(table.num_rows, pa.float32())),
    )
    key = table.column("key")[0].as_py()
    assert (
        f"shard shard-000000: row 0 key {key!r}: no threshold, but run.json says the collapse pass set "
        "each ok row's" in verify_run(out)
    )


def test_a_mad_rule_reads_the_runs_own_evidence(decoder_dir, cluster_shards, tmp_path):
    """mad:K puts the evidence threshold K robust deviations above the run's median evidence: a larger
    K flags a subset, and the flags hold up under verify."""
    low = run(decoder_dir, cluster_shards, tmp_path / "low", collapse="mad:1")
    high = run(decoder_dir, cluster_shards, tmp_path / "high", collapse="mad:4")
    assert 0 < low.collapse_threshold < high.collapse_threshold
    flagged = {name: concat(tmp_path / name).column("flag_reason").to_pylist() for name in ("low", "high")}
    by_collapse = {
        name: {i for i, r in enumerate(f) if "collapse" in (r or "")} for name, f in flagged.items()
    }
    assert by_collapse["high"] < by_collapse["low"]
    assert verify_run(tmp_path / "low") == [] and verify_run(tmp_path / "high") == []


def test_data_unlike_the_holdout_is_reported(decoder_dir, tmp_path, caplog):
    """Uniform noise is nothing like the decoder's held-out images: most of its evidence lies above
    their median, and the run, the log and the report say so."""
    noise = np.random.default_rng(3).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    write_image_shards(tmp_path / "noise", noise, per_shard=20)
    run(decoder_dir, tmp_path / "noise", tmp_path / "run", collapse=RULE)
    share = json.loads((tmp_path / "run" / "run.json").read_text())["collapse"]["above_holdout_median"]
    assert share > SHIFT_LIMIT
    assert "held-out images are unlike this data" in caplog.text
    html = write_report(tmp_path / "run").read_text()
    assert "are unlike this data, so the collapse pass flags far more than its rule says" in html


def test_a_holdout_without_sketches_skips_the_pass(decoder_dir, cluster_shards, tmp_path, caplog):
    """Held-out images whose embeddings all sit on one feature give the pass nothing to weigh against:
    the run still finishes, flagged by score alone, and says why; so does a run without sketches."""
    blank = tmp_path / "decoder"
    shutil.copytree(decoder_dir, blank)
    held_out = load_holdout(blank)
    save_holdout(blank, without_sketches(held_out, slice(None)))
    summary = run(blank, cluster_shards, tmp_path / "run", collapse=RULE)
    assert "0 held-out images have a collapse" in caplog.text
    assert summary.collapse_threshold is None and summary.flagged == summary.flagged_by["score"]
    assert concat(tmp_path / "run").column("collapse").null_count == 98
    assert verify_run(tmp_path / "run") == []
    # Nor can it when no scored sample has a sketch, whatever the rule.
    out = tmp_path / "blank-run"
    run(decoder_dir, cluster_shards, out)
    blank_sketches(out, concat(out).column("key").to_pylist())
    caplog.clear()
    summary = run(decoder_dir, cluster_shards, out, collapse="mad:3")
    # It said '0 held-out images have a collapse ... (a larger train --holdout)': no holdout helps.
    assert "no sample of the run's reference (98 drawn from its ok samples) has a sketch" in caplog.text
    assert "--holdout" not in caplog.text
    assert summary.collapse_threshold is None and verify_run(out) == []
    # Nor with one held-out image: weighed against no other, it would put the limit at 0.
    lone = tmp_path / "lone"
    shutil.copytree(decoder_dir, lone)
    save_holdout(lone, without_sketches(held_out, slice(1, None)))
    caplog.clear()
    summary = run(lone, cluster_shards, tmp_path / "lone-run", collapse=RULE)
    assert "1 held-out image has a collapse" in caplog.text
    assert summary.collapse_threshold is None and summary.flagged == summary.flagged_by["score"]


def test_a_run_of_one_image_says_why_the_pass_flags_nothing(decoder_dir, tmp_path, caplog):
    """One sample, with a sketch: the held-out images have it as their neighbour, but it has none (it
    is its own near-duplicate), and the log says that, not that it lacks a sketch."""
    write_image_shards(tmp_path / "one", synthetic_images(1, 32, seed=6), per_shard=1)
    summary = run(decoder_dir, tmp_path / "one", tmp_path / "run", collapse=RULE)
    assert summary.collapse_threshold is None and summary.ok == 1
    assert not np.isnan(concat(tmp_path / "run").column("sketch")[0].values.to_numpy()).any()
    assert "no scored sample has a neighbour in the run's reference but itself" in caplog.text
    assert "has a sketch" not in caplog.text


def test_a_small_holdout_is_reported(decoder_dir, cluster_shards, tmp_path, caplog):
    """60 held-out images attest p = 1/61 at best: a rule that needs rarer says so, with the size."""
    run(decoder_dir, cluster_shards, tmp_path / "a", collapse=RULE)  # evidence 4 < ln 61: enough
    assert "the collapse pass has" not in caplog.text
    run(decoder_dir, cluster_shards, tmp_path / "b", collapse="value:5")
    assert "the collapse pass has 60 held-out images" in caplog.text
    assert "148 or more (a larger train --holdout)" in caplog.text  # e^5 = 148.4
    caplog.clear()
    run(decoder_dir, cluster_shards, tmp_path / "c", collapse="value:1000")  # e^1000: no float holds it
    assert "e^1000 or more" in caplog.text


def test_the_small_holdout_warning_counts_held_out_images_with_a_sketch(
    decoder_dir, cluster_shards, tmp_path, caplog
):
    """The rarest cosine the held-out images attest is 1/(n+1) with n those that have a sketch (those
    without one are weighed apart, by their axis): 40 of 60 without one leave 20, and ln 21 < 4, so
    value:4 flags no sample by its collapse alone and the pass says so. It counted all 60."""
    some = tmp_path / "decoder"
    shutil.copytree(decoder_dir, some)
    save_holdout(some, without_sketches(load_holdout(some), slice(20, None)))
    run(some, cluster_shards, tmp_path / "run", collapse=RULE)
    assert "the collapse pass has 20 held-out images with a sketch" in caplog.text
    assert "54 or more (a larger train --holdout)" in caplog.text  # e^4 = 54.6


def test_the_pass_runs_by_default():
    def collapse(*extra: str) -> str | None:
        argv = ["score", "--decoder", "d", "--data", "x", "--out", "o", *extra]
        return collapse_rule(build_parser().parse_args(argv))

    assert collapse() == collapse("--collapse") == DEFAULT_COLLAPSE_RULE == ScoreJob("d", "x", "o").collapse
    assert collapse("--collapse", "mad:3") == "mad:3"
    assert collapse("--no-collapse") is None


def test_the_collapse_pass_needs_the_holdout_and_its_calibration(decoder_dir, cluster_shards, tmp_path):
    old = tmp_path / "old-decoder"
    shutil.copytree(decoder_dir, old)
    (old / "holdout.safetensors").unlink()
    with pytest.raises(UsageError, match="trained before the collapse pass"):
        run(old, cluster_shards, tmp_path / "a", collapse=RULE)
    assert not (tmp_path / "a").exists()  # refused before any scoring
    with pytest.raises(UsageError, match="the collapse pass reads the calibration, which was made with"):
        run(decoder_dir, cluster_shards, tmp_path / "b", collapse=RULE, threshold="mad:3", num_masks=1)
    with pytest.raises(UsageError, match="paper rule is for scores"):
        run(decoder_dir, cluster_shards, tmp_path / "c", collapse="paper")
    with pytest.raises(UsageError, match="its value is an evidence"):
        run(decoder_dir, cluster_shards, tmp_path / "d", collapse="value:0.99")  # a cosine, once


def test_tail_p_and_evidence():
    calibration = np.array([0.1, 0.2, 0.2, 0.3])
    p = tail_p(np.array([0.35, 0.3, 0.2, 0.0, np.nan]), calibration)
    np.testing.assert_allclose(p, [1 / 5, 2 / 5, 4 / 5, 5 / 5, np.nan])
    np.testing.assert_allclose(tail_p(calibration, calibration, own=True), [4 / 4, 3 / 4, 3 / 4, 1 / 4])
    np.testing.assert_allclose(evidence(np.array([0.1]), np.array([0.01])), [np.log(1000)])


def test_value_needed_flags_what_the_evidence_flags():
    """Per-row thresholds on the collapse give exactly the flags of one threshold on the evidence,
    and a quantile of the held-out images' own evidence flags about that share of new samples."""
    rng = np.random.default_rng(0)
    held_scores, held_collapse = rng.random(400), rng.random(400).astype(np.float32)
    scores, collapse = rng.random(50_000), rng.random(50_000).astype(np.float32)
    own = evidence(tail_p(held_scores, held_scores, own=True), tail_p(held_collapse, held_collapse, own=True))
    limit = float(np.quantile(own, 0.98))
    score_p = tail_p(scores, held_scores)
    flagged = evidence(score_p, tail_p(collapse, held_collapse)) > limit
    needed = value_needed(score_p, held_collapse, limit)
    np.testing.assert_array_equal(collapse > needed, flagged)
    assert 0.01 < flagged.mean() < 0.03
    # 20 held-out images cannot attest a collapse rare enough to flag an ordinary score alone
    assert np.isposinf(value_needed(np.array([1.0]), held_collapse[:20], limit)).all()
    assert np.isneginf(value_needed(np.array([1e-6]), held_collapse, limit)).all()  # the score suffices
    assert np.isnan(value_needed(np.array([np.nan]), held_collapse, limit)).all()  # no score


def test_each_rows_score_threshold_flags_what_its_score_evidence_with_its_neighbours_flags():
    """A row's score threshold, given its neighbours' evidence, flags exactly the rows whose score
    evidence plus their neighbours' is above the limit; a quantile of the held-out images' own flags
    about that share of rows like them. A row with no neighbour is lent nothing; neighbours that lend
    enough flag any score, and no score passes a limit above the rarest it can attest."""
    rng = np.random.default_rng(3)
    held_scores = rng.random(400).astype(np.float32).astype(np.float64)  # float32, as a manifest's
    held = HeldOut(
        held_scores, rng.random(400).astype(np.float32), rng.exponential(1.0, 400).astype(np.float32)
    )
    limit = float(np.quantile(held.own_score_statistic(), 0.97))
    scores = rng.random(50_000).astype(np.float32)
    neighbours = rng.exponential(1.0, 50_000).astype(np.float32)
    neighbours[:100] = np.nan
    flagged = held.score_statistic(scores, neighbours) > limit
    needed = held.score_needed(neighbours, limit)
    np.testing.assert_array_equal(scores > needed, flagged)
    assert 0.02 < flagged.mean() < 0.04
    np.testing.assert_array_equal(needed[:100], held.score_needed(np.zeros(100, np.float32), limit))
    lent = needed[np.argsort(neighbours[100:])[::-1] + 100]  # more evidence lent, a lower score needed
    assert np.all(lent[1:] >= lent[:-1]) and np.isneginf(lent[0]) and np.isfinite(lent[-1])
    assert np.isneginf(held.score_needed(np.array([limit + 0.1], np.float32), limit)).all()
    assert np.isposinf(held.score_needed(np.array([0.0], np.float32), np.log(401) + 0.1)).all()


def test_the_neighbours_evidence_is_the_mean_of_the_nearest_rows_or_of_the_axis_mates():
    """A row with a sketch is lent the mean evidence of its NEIGHBOURS most similar reference rows
    (itself left out, as a near-duplicate); a row without one the mean of the other images on its axis
    (its copies left out too), none on an axis of its own; the collapse comes from the same search."""
    rng = np.random.default_rng(5)
    sketches = unit(rng.normal(size=(30, SKETCH_DIM))).astype(np.float32)
    thumbs = rng.integers(0, 256, (30, THUMBNAIL_SIDE**2), dtype=np.uint8)
    axes = np.full(30, NO_AXIS, np.int32)
    sketches[24:], axes[24:] = np.nan, [7, 7, 7, 7, 8, 8]
    thumbs[25] = thumbs[24]  # a copy, on the same axis
    evidence = rng.exponential(1.0, 30)
    images = Sketched(sketches, thumbs, axes)
    weighed = Reference(images, evidence).weigh(images)
    sim = sketches[:24] @ sketches[:24].T
    np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, 1)[:, :NEIGHBOURS]
    np.testing.assert_allclose(weighed.neighbours[:24], evidence[top].mean(1), rtol=1e-5)
    np.testing.assert_allclose(weighed.collapse[:24], np.take_along_axis(sim, top, 1).mean(1), rtol=1e-5)
    mates = [[26, 27], [26, 27], [24, 25, 27], [24, 25, 26], [29], [28]]
    np.testing.assert_allclose(weighed.neighbours[24:], [evidence[m].mean() for m in mates], rtol=1e-6)
    alone = Sketched(sketches[24:25], thumbs[:1], np.array([9], np.int32))
    assert np.isnan(Reference(images, evidence).weigh(alone).neighbours).all()


def test_a_row_without_a_sketch_is_as_suspect_as_its_axis_is_crowded_among_the_held_out_images():
    """A row without a sketch is weighed against all held-out images, of which only those without a
    sketch on an axis at least as crowded count; the cosines keep their own p-values (the held-out
    rows without a sketch do not crowd the top of them), and per-row thresholds still give the
    evidence's flags, rows without a sketch included."""
    rng = np.random.default_rng(1)
    cosines = rng.random(360).astype(np.float32)
    on_axis = (ON_AXIS + rng.choice([0.01, 0.02, 0.05], 40)).astype(np.float32)  # their axes' shares
    held = HeldOut.of(rng.random(400), unweighed(np.r_[cosines, on_axis]))
    probe = np.array([ON_AXIS + 0.05, ON_AXIS + 0.03, ON_AXIS + 0.5, ON_AXIS, np.nan], np.float32)
    crowded = [(on_axis >= p).sum() for p in probe[:4]]
    np.testing.assert_allclose(held.collapse_p(probe), [(1 + c) / 401 for c in crowded] + [np.nan])
    assert held.collapse_p(probe)[2] == pytest.approx(1 / 401)  # more crowded than any held-out axis
    assert held.collapse_p(probe)[3] == pytest.approx(41 / 401)  # on an axis of its own: as before
    cosine = np.array([0.5, 0.99], np.float32)
    np.testing.assert_allclose(held.collapse_p(cosine), tail_p(cosine, cosines))
    own = held.collapse_p(held.collapse, own=True)
    np.testing.assert_allclose(own[360:], tail_p(on_axis, on_axis, own=True) * 40 / 400)
    np.testing.assert_allclose(own[:360], tail_p(cosines, cosines, own=True))
    # New rows exchangeable with the held-out ones, a tenth without a sketch as among them: the
    # quantile of the held-out images' own evidence flags about the share it names.
    scores = rng.random(50_000)
    none = rng.random(50_000) < 0.1
    shares = ON_AXIS + rng.choice([0.01, 0.02, 0.05], 50_000)
    collapse = np.where(none, shares, rng.random(50_000)).astype(np.float32)
    limit = float(np.quantile(held.own_evidence(), 0.98))
    flagged = held.evidence(scores, collapse) > limit
    np.testing.assert_array_equal(collapse > held.needed(scores, collapse, limit), flagged)
    assert 0.01 < flagged.mean() < 0.03
    assert 0 < flagged[none].mean() < 0.1  # those with high scores
    # Where no held-out image lacks a sketch, every row without one is as rare as can be attested.
    never = HeldOut.of(rng.random(360), unweighed(cosines))
    assert never.collapse_p(np.array([ON_AXIS], np.float32)) == pytest.approx(1 / 361)


def test_the_share_on_an_axis_counts_images_not_copies():
    """A row without a sketch has the collapse ON_AXIS + the share of the reference's images on its
    axis: copies of one image (near-duplicate thumbnails) count once, as they are one image; an axis
    no reference row sits on gives ON_AXIS, and a held-out image of a decoder that kept no axes is
    put on the most crowded axis there can be, so that such a decoder weighs as before."""
    rng = np.random.default_rng(4)
    thumbs = rng.integers(0, 256, (10, THUMBNAIL_SIDE**2), dtype=np.uint8)
    thumbs[1:4] = np.clip(thumbs[0].astype(int) + [[1], [-2], [3]], 0, 255)  # three copies of the first
    sketches = np.full((10, SKETCH_DIM), np.nan, np.float32)
    sketches[8:] = unit(rng.normal(size=(2, SKETCH_DIM)))
    axes = np.array([3, 3, 3, 3, 3, 3, 9, 9, NO_AXIS, NO_AXIS], np.int32)
    reference = Reference(Sketched(sketches, thumbs, axes), np.zeros(10))
    assert reference.images_on == {3: 3, 9: 2}  # axis 3: rows 0-3 one image, 4 and 5 two more
    asked = np.array([3, 9, 4, UNKNOWN_AXIS], np.int32)
    np.testing.assert_allclose(reference.axis_share(asked), [0.3, 0.2, 0.0, 1.0])
    queries = Sketched(np.full((4, SKETCH_DIM), np.nan, np.float32), thumbs[:4], asked)
    np.testing.assert_allclose(reference.weigh(queries).collapse, ON_AXIS + np.array([0.3, 0.2, 0.0, 1.0]))


def test_a_decoder_saved_before_axes_were_kept_weighs_rows_without_a_sketch_as_before(
    decoder_dir, tmp_path, caplog
):
    """Its holdout.safetensors has no axis: its held-out images without a sketch get UNKNOWN_AXIS,
    which makes a scored row's p-value the share of held-out images without a sketch, as then."""
    old = tmp_path / "decoder"
    shutil.copytree(decoder_dir, old)
    images = without_sketches(load_holdout(old), slice(0, 6))
    save_tensors(
        {
            "sketch": torch.from_numpy(images.sketches.astype(np.float16)),
            "thumbnail": torch.from_numpy(images.thumbnails),
        },
        old / HOLDOUT,
    )
    loaded = load_holdout(old)
    assert loaded.axes.tolist() == [UNKNOWN_AXIS] * 6 + [NO_AXIS] * (len(loaded.axes) - 6)
    with caplog.at_level("WARNING"):
        collapse_pass.holdout_for(
            parse_rule(RULE), old, read_meta(old), ScoreSettings.from_dict(read_meta(old)["scoring"])
        )
    assert f"{old} was trained before the held-out images' axes were kept" in caplog.text
    reference = Reference(
        Sketched(loaded.sketches[6:], loaded.thumbnails[6:], loaded.axes[6:]), np.zeros(len(loaded.axes) - 6)
    )
    held = HeldOut.of(np.zeros(len(loaded.axes)), reference.weigh(loaded))
    p = held.collapse_p(np.array([ON_AXIS + 0.5], np.float32))
    assert p == pytest.approx((1 + 6) / (len(held.collapse) + 1))


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
    # A non-finite embedding has no distance (it once got -inf, below every other).
    queries[3] = np.nan
    distance = knn_distance(queries, reference)
    assert np.isnan(distance[3]) and np.isfinite(np.delete(distance, 3)).all()
