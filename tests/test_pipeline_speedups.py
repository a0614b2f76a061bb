"""The throughput paths give the same results as the plain ones: threads, rebatching, staging buffers."""

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sanitizer.checkpoint import load_decoder
from sanitizer.data.decode import decode_image
from sanitizer.data.shards import expand_shards
from sanitizer.data.tario import iter_samples
from sanitizer.decoder_meta import ScoreSettings
from sanitizer.pipeline.job import ScoreJob, run_score_job
from sanitizer.pipeline.run_stage import decoded_tables
from sanitizer.pipeline.stages import ReadScoreStage, ScoreStage, read_shard, rebatch
from sanitizer.scoring import Scorer, key_seeds
from sanitizer.train import Rows, TrainSettings, on_device, train_epoch


def manifest_tables(run):
    return {p.stem: pq.read_table(p) for p in sorted((run / "manifest").glob("*.parquet"))}


def test_threaded_decode_gives_identical_manifests(tmp_path, tiny_decoder_dir, tiny_shards):
    one = run_score_job(
        ScoreJob(tiny_decoder_dir, str(tiny_shards), tmp_path / "one", workers=0, read_threads=1),
        progress=False,
    )
    three = run_score_job(
        ScoreJob(
            tiny_decoder_dir, str(tiny_shards), tmp_path / "three", workers=0, read_threads=3, batch_size=50
        ),
        progress=False,
    )
    assert (one.samples, three.samples) == (120, 120)
    a, b = manifest_tables(tmp_path / "one"), manifest_tables(tmp_path / "three")
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)


def test_decoded_tables_from_threads_hold_every_row_once(tiny_shards):
    shards = expand_shards(str(tiny_shards))
    tables = list(decoded_tables(shards, 32, readers=3))
    keys = pa.concat_tables(tables).column("key").to_pylist()
    expected = [s.key for shard in shards for s in iter_samples(shard.url)] + [""] * len(shards)
    assert sorted(keys) == sorted(expected)


def test_decoded_tables_stop_their_threads_when_abandoned(tiny_shards):
    before = threading.active_count()
    tables = decoded_tables(expand_shards(str(tiny_shards)), 32, readers=2)
    next(tables)
    tables.close()
    assert threading.active_count() == before


def test_rebatch_cuts_exact_sizes_and_keeps_rows_in_order():
    tables = [pa.table({"i": list(range(a, b))}) for a, b in [(0, 3), (3, 10), (10, 11), (11, 25)]]
    out = list(rebatch(tables, 4))
    assert [t.num_rows for t in out] == [4, 4, 4, 4, 4, 4, 1]
    assert pa.concat_tables(out).column("i").to_pylist() == list(range(25))
    assert list(rebatch([], 4)) == []


def test_read_score_stage_equals_read_then_score(tiny_decoder_dir, tiny_shards):
    shard = expand_shards(str(tiny_shards))[0]
    settings = ScoreSettings(num_masks=2).to_dict()
    plain = ScoreStage(str(tiny_decoder_dir), settings, "cpu", micro_batch=16)
    expected = pa.concat_tables([plain(t) for t in read_shard(shard.url, shard.stem, 32)])
    fused = ReadScoreStage(str(tiny_decoder_dir), settings, "cpu", micro_batch=16, batch_size=7)
    got = pa.concat_tables(list(fused(pa.table({"url": [shard.url], "stem": [shard.stem]}))))
    assert got.equals(expected)


def test_scorer_reuses_its_staging_buffer_without_leaking_rows(tiny_encoder, tiny_decoder_dir):
    decoder, _ = load_decoder(tiny_decoder_dir)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    seeds = key_seeds([f"k{i}" for i in range(40)])
    one_way = ScoreSettings(num_masks=2, axis_aggregate="q25", axis_error="ssim")
    reused = Scorer(tiny_encoder, decoder, one_way, micro_batch=16)
    reused.score(big, seeds)  # fills the buffer: the next call's padding rows must be zeros again
    read_only = small.copy()
    read_only.flags.writeable = False  # as the Arrow buffer arrives in the actor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = reused.score(read_only, seeds[:5])
    fresh = Scorer(tiny_encoder, decoder, one_way, micro_batch=16).score(small, seeds[:5])
    for name in ("score", "score_std", "embedding_norm"):
        assert getattr(got, name).tobytes() == getattr(fresh, name).tobytes()


def test_training_data_on_device_gives_the_same_epoch(tiny_encoder):
    """The CUDA path keeps pixels and embeddings as device tensors; here as CPU tensors, same losses."""
    from tqdm import tqdm

    from sanitizer.decoder_meta import DedeConfig
    from sanitizer.model import DedeDecoder

    host = Rows(np.zeros((3, 2)), np.arange(3))
    assert on_device(host, torch.device("cpu")) is host  # the CPU keeps arrays
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    embeddings = rng.standard_normal((48, tiny_encoder.embed_dim)).astype(np.float32)
    idx = np.array([1, 5, 7])
    assert torch.equal(
        Rows(torch.from_numpy(pixels), np.arange(48)).take(idx, torch.device("cpu")),
        torch.from_numpy(pixels[idx]),
    )
    settings = TrainSettings(batch_size=16)
    losses = []
    for px, emb in ((pixels, embeddings), (torch.from_numpy(pixels), torch.from_numpy(embeddings))):
        torch.manual_seed(0)
        config = DedeConfig.default_for(32, tiny_encoder.embed_dim, patch_size=8, width=32, depth=1, heads=2)
        decoder = DedeDecoder(config)
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
        bar = tqdm(disable=True)
        px, emb = Rows(px, np.arange(48)), Rows(emb, np.arange(48))
        losses.append(train_epoch(decoder, optimizer, tiny_encoder, px, emb, settings, 0, 3, bar))
    assert losses[0] == losses[1]


def test_decode_from_threads_matches_sequential_and_leaves_warnings_alone(tiny_shards):
    samples = [s for shard in expand_shards(str(tiny_shards)) for s in iter_samples(shard.url)]
    before = list(warnings.filters)
    sequential = [decode_image(s, 24) for s in samples]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda s: decode_image(s, 24), samples))
    assert list(warnings.filters) == before
    for a, b in zip(sequential, threaded, strict=True):
        assert (a.status, a.sha256, a.width) == (b.status, b.sha256, b.width)
        assert np.array_equal(a.pixels, b.pixels)


def test_encoder_weights_keep_their_layout_off_cuda():
    from sanitizer.encoders import load_encoder

    encoder = load_encoder("timm:test_resnet", image_size=32, device="cpu")
    convs = [p for p in encoder.module.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous() for p in convs)  # channels_last is for CUDA only


def test_an_error_while_scoring_names_the_shards_of_the_batch(tiny_decoder_dir, tiny_shards):
    """On a Ray actor the traceback is all that comes back: it named no shard to look at."""
    shard = expand_shards(str(tiny_shards))[0]
    stage = ReadScoreStage(str(tiny_decoder_dir), ScoreSettings(num_masks=2).to_dict(), "cpu", micro_batch=16)

    def broken(*_):
        raise RuntimeError("the encoder failed")

    stage.scorer.score = broken
    with pytest.raises(RuntimeError, match="the encoder failed") as caught:
        list(stage(pa.table({"url": [shard.url], "stem": [shard.stem]})))
    assert caught.value.__notes__ == [f"while scoring shard {shard.stem}"]


def test_a_job_that_fails_stops_its_decode_threads(tmp_path, tiny_decoder_dir, monkeypatch):
    """A write that fails (a full disk) ends the job: its readers went on polling their full queue,
    holding their shards open, for as long as the exception was kept (a caller's log, a test)."""
    import sanitizer.pipeline.collect
    from sanitizer.data.synth import synthetic_images, write_image_shards

    write_image_shards(
        tmp_path / "data", synthetic_images(60, 32, seed=3), per_shard=2
    )  # more than the queue

    def full(path, _):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(sanitizer.pipeline.collect, "write_manifest", full)
    before = threading.active_count()
    job = ScoreJob(
        tiny_decoder_dir, str(tmp_path / "data"), tmp_path / "r", workers=0, read_threads=2, batch_size=2
    )
    with pytest.raises(OSError, match="No space left") as caught:
        run_score_job(job, progress=False)
    assert caught.value is not None and threading.active_count() == before
