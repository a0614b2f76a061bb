import functools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tracemalloc
from collections import Counter
from dataclasses import replace
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sanitizer.checkpoint as checkpoint_module
import sanitizer.train as train_module
from sanitizer.checkpoint import check_encoder, load_decoder, load_holdout, read_meta
from sanitizer.cli import main
from sanitizer.collapse import NO_AXIS, SKETCH_DIM, THUMBNAIL_SIDE
from sanitizer.data.decode import decode_image
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.data.tario import iter_samples
from sanitizer.decoder_meta import DedeConfig, ScoreSettings, axis_scale_for
from sanitizer.device import precision
from sanitizer.encoders import embed_pixels, load_encoder, weights_sha256
from sanitizer.errors import CheckpointError, EncoderError, TrainingError, UsageError
from sanitizer.joblock import job_lock
from sanitizer.model import DedeDecoder
from sanitizer.neighbours import thumbnail
from sanitizer.scoring import Scorer, key_seeds
from sanitizer.train import (
    FIRST_PASS,
    TRIM_AFTER,
    ImageSet,
    TrainSettings,
    fit_decoder,
    split_holdout,
    train_decoder,
    worst_rebuilt,
)

from .conftest import RESET, TINY_ARGS, TINY_ENCODER, TINY_MODEL


def test_decoder_dir_holds_safetensors_and_json_only(tiny_decoder_dir, tiny_encoder, tiny_shards):
    names = sorted(p.name for p in tiny_decoder_dir.iterdir())
    assert names == [".lock", "decoder.json", "decoder.safetensors", "holdout.safetensors"]
    meta = read_meta(tiny_decoder_dir)
    # The held-out images, for the collapse pass: their sketches, thumbnails and axes (none has one:
    # the tiny encoder's embeddings are spread).
    held_out = load_holdout(tiny_decoder_dir)
    sketches, thumbnails = held_out.sketches, held_out.thumbnails
    assert (held_out.axes == NO_AXIS).all()
    assert sketches.shape == (meta["calibration"]["n"], SKETCH_DIM)
    assert np.allclose(np.linalg.norm(sketches, axis=1), 1, atol=2e-3)
    shards = sorted(tiny_shards.glob("*.tar"))
    decoded = [decode_image(s, 32).pixels for p in shards for s in iter_samples(str(p))]
    images = {bytes(t) for t in thumbnail(np.stack(decoded))}
    assert thumbnails.shape == (len(sketches), THUMBNAIL_SIDE**2) and {bytes(t) for t in thumbnails} <= images
    assert meta["encoder"]["spec"] == TINY_ENCODER
    assert meta["encoder"]["weights_sha256"] == tiny_encoder.weights_sha256
    assert meta["encoder"]["preprocess"]["image_size"] == 32
    assert meta["model"]["patch_size"] == 8 and meta["model"]["embed_dim"] == 96
    assert meta["training"]["epochs"] == 2 and meta["training"]["decode_statuses"] == {"ok": 120}
    assert meta["training"]["precision"] == precision(torch.device("cpu"))
    training = meta["training"]
    assert training["left_out"] == round(0.1 * (120 - meta["calibration"]["n"]))  # the default --refit
    assert training["n_train"] + training["left_out"] + meta["calibration"]["n"] == 120
    assert meta["scoring"] == {
        "test_mask_ratio": 0.99, "num_masks": 2, "aggregate": "q25", "axis_aggregate": "mean",
        "axis_error": "mse", "error_pool": 2, "error": "ssim", "relax_steps": 3, "relax_radius": 0.03,
    }  # fmt: skip


def test_checkpoint_round_trip_scores_like_the_calibration(tiny_decoder_dir, tiny_encoder, tiny_shards):
    decoder, meta = load_decoder(tiny_decoder_dir)
    saved = load_file(str(tiny_decoder_dir / "decoder.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in decoder.state_dict().items())
    images = train_module.load_images(str(tiny_shards), 32, 10_000)
    _, holdout = split_holdout(images.keys, 0.05)
    keys = [images.keys[i] for i in holdout]
    settings = ScoreSettings.from_dict(meta["scoring"])
    scores = Scorer(tiny_encoder, decoder, settings, axis_scale_for(meta, settings)).score(
        images.pixels[holdout], key_seeds(keys)
    )
    assert np.array_equal(scores.score, np.float32(meta["calibration"]["scores"]))


def test_holdout_does_not_depend_on_order():
    keys = [f"k{i}" for i in range(100)]
    _, a = split_holdout(keys, 0.05)
    _, b = split_holdout(keys[::-1], 0.05)
    assert sorted(keys[i] for i in a) == sorted(keys[::-1][i] for i in b) and len(a) == 5


@pytest.mark.parametrize(
    "dies_at, rerun",
    [
        (1, [1, 0, 1, 2]),  # in pass 1's last epoch (of 2): that epoch again, then pass 2
        (2, [0, 1, 2]),  # in pass 2's first epoch, pass 1 finished: not trained again
        (4, [2]),  # in pass 2's last epoch: only that one, on the images pass 1 chose
    ],
)
def test_resume_after_interruption_equals_uninterrupted(
    tmp_path, tiny_shards, tiny_encoder, monkeypatch, dies_at, rerun
):
    settings = TrainSettings(epochs=3, batch_size=32, refit=0.1)
    common = dict(score_settings=ScoreSettings(num_masks=1), model_overrides=TINY_MODEL, progress=False)
    train_decoder(tiny_encoder, str(tiny_shards), tmp_path / "full", settings, **common)

    real_epoch, calls = train_module.train_epoch, []

    def dies_once(*args, **kwargs):
        calls.append(args[6])
        if len(calls) == dies_at + 1:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", dies_once)
    with pytest.raises(KeyboardInterrupt):
        train_decoder(tiny_encoder, str(tiny_shards), tmp_path / "resumed", settings, **common)
    assert not (tmp_path / "resumed" / "decoder.json").exists()
    # as a checkpoint write killed half-way leaves it: it must not keep the finished run from tidying up
    (tmp_path / "resumed/.checkpoint/.state.safetensors.tmp-1-0123abcd").write_bytes(b"partial")
    train_decoder(tiny_encoder, str(tiny_shards), tmp_path / "resumed", settings, **common)
    assert round(FIRST_PASS * 3) == 2 and calls[: dies_at + 1] == [0, 1, 0, 1, 2][: dies_at + 1]
    assert calls[dies_at + 1 :] == rerun  # the rerun trained only what was missing
    full = load_file(str(tmp_path / "full/decoder.safetensors"))
    resumed = load_file(str(tmp_path / "resumed/decoder.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert read_meta(tmp_path / "resumed")["training"] == {
        **read_meta(tmp_path / "full")["training"], "seconds": ANY, "data": ANY
    }  # fmt: skip
    assert not (tmp_path / "resumed/.checkpoint").exists()


def test_a_kill_during_a_checkpoint_write_resumes_from_an_epoch_that_matches_its_weights(
    tmp_path, tiny_shards, tiny_encoder, monkeypatch
):
    """Killed right after the first file of epoch 2's checkpoint lands: whatever the checkpoint says it
    holds must be what it holds, or the rerun trains an epoch twice and ends on other weights."""
    settings = TrainSettings(epochs=3, batch_size=32, refit=0)
    common = dict(score_settings=ScoreSettings(num_masks=1), model_overrides=TINY_MODEL, progress=False)
    train_decoder(tiny_encoder, str(tiny_shards), tmp_path / "full", settings, **common)

    real_epoch, real_replace, epochs = train_module.train_epoch, os.replace, []

    def counting_epoch(*args, **kwargs):
        epochs.append(args[6])
        return real_epoch(*args, **kwargs)

    def dies_after_epoch_2s_first_write(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if epochs == [0, 1] and ".checkpoint" in str(dst):
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_epoch", counting_epoch)
    monkeypatch.setattr(os, "replace", dies_after_epoch_2s_first_write)
    with pytest.raises(KeyboardInterrupt):
        train_decoder(tiny_encoder, str(tiny_shards), tmp_path / "resumed", settings, **common)
    monkeypatch.setattr(os, "replace", real_replace)
    train_decoder(tiny_encoder, str(tiny_shards), tmp_path / "resumed", settings, **common)
    assert epochs == [0, 1, 2]  # epoch 2 was checkpointed whole: only epoch 3 is trained again
    full = load_file(str(tmp_path / "full/decoder.safetensors"))
    resumed = load_file(str(tmp_path / "resumed/decoder.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    losses = [read_meta(tmp_path / d)["training"]["epoch_losses"] for d in ("full", "resumed")]
    assert losses[0] == losses[1]


def killed_in_second_epoch(monkeypatch, train) -> None:
    """Call train() with the job killed as its second epoch starts: its checkpoint holds the first."""
    real_epoch = train_module.train_epoch

    def dies_in_second_epoch(*args, **kwargs):
        if args[6] == 1:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(train_module, "train_epoch", real_epoch)


def test_score_with_a_decoder_dir_whose_train_was_stopped_says_to_finish_it(
    tmp_path, tiny_shards, tiny_encoder, monkeypatch, capsys
):
    """It said the directory was no decoder directory and to run `sanitizer train`: a new train there
    is what it needs least (the checkpoint resumes only with the same settings)."""
    out = tmp_path / "dec"
    settings = TrainSettings(epochs=2, batch_size=32, refit=0)
    common = dict(score_settings=ScoreSettings(num_masks=1), model_overrides=TINY_MODEL, progress=False)
    killed_in_second_epoch(
        monkeypatch, lambda: train_decoder(tiny_encoder, str(tiny_shards), out, settings, **common)
    )
    argv = ["score", "--decoder", str(out), "--data", str(tiny_shards), "--out", str(tmp_path / "run")]
    code, _, err = run_cli(capsys, *argv, "--workers", "0", "--device", "cpu")
    assert (code, err) == (
        2,
        f"sanitizer: error: {out} holds an unfinished training run (no decoder.json yet); run the "
        "`sanitizer train` that was stopped there again to finish it\n",
    )


@pytest.mark.parametrize("change", ["weights", "data"])
def test_an_unfinished_run_is_not_resumed_with_other_weights_or_other_data(
    tmp_path, tiny_shards, tiny_encoder, monkeypatch, change
):
    """Same settings and the same number of images, so only the inputs tell the runs apart."""
    settings = TrainSettings(epochs=2, batch_size=32, refit=0)
    common = dict(score_settings=ScoreSettings(num_masks=1), model_overrides=TINY_MODEL, progress=False)
    killed_in_second_epoch(
        monkeypatch, lambda: train_decoder(tiny_encoder, str(tiny_shards), tmp_path / "d", settings, **common)
    )
    encoder, data = tiny_encoder, tiny_shards
    if change == "weights":
        encoder = load_encoder(TINY_ENCODER, image_size=32)
        with torch.no_grad():
            next(encoder.module.parameters()).add_(0.01)
        encoder = replace(encoder, weights_sha256=weights_sha256(encoder.module))
        assert encoder.weights_sha256 != tiny_encoder.weights_sha256
    else:
        data = tmp_path / "other"
        write_image_shards(data, synthetic_images(120, 32, seed=9), per_shard=40)
    with pytest.raises(
        UsageError, match="unfinished training run with other settings, encoder weights or data"
    ):
        train_decoder(encoder, str(data), tmp_path / "d", settings, **common)
    assert checkpoint_module.read_training_progress(tmp_path / "d")["epoch"] == 1  # left as it was
    train_decoder(
        tiny_encoder, str(tiny_shards), tmp_path / "d", settings, **common
    )  # the same inputs resume
    assert len(read_meta(tmp_path / "d")["training"]["epoch_losses"]) == 2


def test_a_second_pass_is_not_resumed_with_other_scoring_settings(
    tmp_path, tiny_shards, tiny_encoder, monkeypatch
):
    """The first pass's scores, at the scoring settings, chose the images the second pass leaves out:
    resumed with others, the decoder recorded settings that had not chosen them (and differed from an
    uninterrupted run with those settings)."""
    settings = TrainSettings(epochs=2, batch_size=32)  # the first pass: one epoch

    def train(error: str) -> dict:
        scoring = ScoreSettings(num_masks=1, error=error)
        return train_decoder(
            tiny_encoder, str(tiny_shards), tmp_path / "d", settings, scoring, TINY_MODEL, progress=False
        )

    killed_in_second_epoch(monkeypatch, lambda: train("ssim"))  # in the second pass
    assert checkpoint_module.read_training_progress(tmp_path / "d")["plan"]["pass"] == 2
    with pytest.raises(
        UsageError, match="unfinished training run with other settings, encoder weights or data"
    ):
        train("mse")
    assert checkpoint_module.read_training_progress(tmp_path / "d")["epoch"] == 1  # left as it was
    assert train("ssim")["scoring"]["error"] == "ssim"  # the same settings resume


def test_worst_rebuilt_takes_the_highest_scores_ties_by_position():
    assert worst_rebuilt(np.array([0.1, 0.5, 0.5, 0.2, 0.9], np.float32), 0.4) == [1, 4]
    assert worst_rebuilt(np.array([0.3, 0.1]), 0.1) == []


def test_second_pass_leaves_out_the_images_the_first_rebuilds_worst(tiny_encoder, monkeypatch):
    pixels = synthetic_images(110, 32, seed=3)
    keys = [f"s{i:03d}" for i in range(110)]
    real_epoch, passes = train_module.train_epoch, []  # (decoder, training images) of each pass

    def recording(decoder, optimizer, encoder, images, *rest):
        if rest[2] == 0:
            passes.append((decoder, images.array()))  # the rows it trains on
        return real_epoch(decoder, optimizer, encoder, images, *rest)

    monkeypatch.setattr(train_module, "train_epoch", recording)
    scoring = ScoreSettings(num_masks=1)
    settings = TrainSettings(epochs=2, batch_size=32, refit=0.2)
    fit = fit_decoder(
        tiny_encoder, ImageSet(pixels, keys, Counter()), settings, scoring, TINY_MODEL, progress=False
    )

    (first, every), (second, kept) = passes
    train_idx, _ = split_holdout(keys, settings.holdout)
    assert np.array_equal(every, pixels[train_idx]) and second is not first
    scores = Scorer(tiny_encoder, first, scoring.alone("q25", "ssim")).score(
        pixels[train_idx], key_seeds(keys[i] for i in train_idx)
    )
    worst = np.argsort(-scores.score, kind="stable")[: round(0.2 * len(train_idx))]
    assert np.array_equal(kept, np.delete(pixels[train_idx], worst, axis=0))
    assert (fit.left_out, fit.n_train) == (len(worst), len(train_idx) - len(worst))


def test_a_fit_embeds_each_image_once_and_returns_the_embeddings(tiny_encoder, monkeypatch):
    """The embeddings serve training and calibration (and the caller's next scoring), in image order;
    the calibration is what scoring the held-out images gives."""
    pixels, keys = synthetic_images(60, 32, seed=4), [f"e{i:02d}" for i in range(60)]
    real_embed, embedded = train_module.embed_pixels, []

    def counting(encoder, images, *rest):
        embedded.append(len(images))
        return real_embed(encoder, images, *rest)

    monkeypatch.setattr(train_module, "embed_pixels", counting)
    scoring, settings = ScoreSettings(num_masks=1), TrainSettings(epochs=1, batch_size=16, holdout=0.2)
    fit = fit_decoder(
        tiny_encoder, ImageSet(pixels, keys, Counter()), settings, scoring, TINY_MODEL, progress=False
    )
    assert embedded == [60]
    assert np.array_equal(fit.embeddings, embed_pixels(tiny_encoder, pixels))
    holdout = split_holdout(keys, settings.holdout)[1]
    expected = Scorer(tiny_encoder, fit.decoder, scoring, fit.axis_scale).score(
        pixels[holdout], key_seeds(keys[i] for i in holdout)
    )
    np.testing.assert_allclose(fit.calibration, expected.score, rtol=1e-5)


def test_a_fit_calibrates_the_scale_of_its_axis_aggregate(tiny_encoder, tmp_path):
    """`train` (--axis-aggregate mean --axis-error mse by default): the held-out images are scored
    each way alone (q25 of 1 - SSIM, the mean of squared errors), the scale between the two is saved
    in decoder.json, and the calibration is what scoring the held-out images with that scale gives."""
    pixels, keys = synthetic_images(60, 32, seed=5), [f"a{i:02d}" for i in range(60)]
    write_image_shards(tmp_path / "data", pixels, keys=keys, per_shard=60)
    scoring = ScoreSettings(num_masks=1)
    out = tmp_path / "decoder"
    argv = ["train", "--encoder", TINY_ENCODER, "--data", str(tmp_path / "data"), "--out", str(out)]
    argv += [*TINY_ARGS, "--image-size", "32", "--epochs", "1", "--holdout", "0.2"]
    argv += ["--num-masks", "1"]
    assert main(argv) == 0
    decoder, meta = load_decoder(out)
    scale = axis_scale_for(meta, scoring)
    holdout = split_holdout(keys, 0.2)[1]
    held, seeds = pixels[holdout], key_seeds(keys[i] for i in holdout)
    alone = {
        a: Scorer(tiny_encoder, decoder, scoring.alone(a, e)).score(held, seeds).score
        for a, e in (("q25", "ssim"), ("mean", "mse"))
    }
    assert np.array_equal(scale.source, np.sort(alone["mean"])) and np.array_equal(
        scale.target, np.sort(alone["q25"])
    )
    expected = Scorer(tiny_encoder, decoder, scoring, scale).score(held, seeds).score
    assert np.array_equal(np.float32(meta["calibration"]["scores"]), expected)


def test_loss_is_trimmed_after_the_first_fifth_of_the_steps(tmp_path, tiny_shards, tiny_encoder, monkeypatch):
    real_loss, trims = DedeDecoder.forward_loss, []

    def recording(self, imgs, pred, mask, trim=0.0):
        trims.append(trim)
        return real_loss(self, imgs, pred, mask, trim)

    monkeypatch.setattr(DedeDecoder, "forward_loss", recording)
    settings = TrainSettings(epochs=5, batch_size=16, trim=0.25, refit=0)
    common = dict(score_settings=ScoreSettings(num_masks=1), model_overrides=TINY_MODEL, progress=False)
    meta = train_decoder(tiny_encoder, str(tiny_shards), tmp_path / "d", settings, **common)
    steps = len(trims)
    assert steps == 5 * -(-meta["training"]["n_train"] // 16)
    first = round(TRIM_AFTER * steps)  # the untrimmed steps: a fifth of them
    assert TRIM_AFTER == 0.2 and first > 0
    assert trims == [0.0] * first + [0.25] * (steps - first)
    assert meta["training"]["trim"] == 0.25


def test_decoder_for_another_encoder_is_refused(tiny_decoder_dir):
    _, meta = load_decoder(tiny_decoder_dir)
    other = load_encoder("timm:test_efficientnet", image_size=32)
    with pytest.raises(CheckpointError) as caught:
        check_encoder(meta, other, None)
    assert str(caught.value) == (
        f"the decoder was trained for encoder timm:test_resnet with weights "
        f"{meta['encoder']['weights_sha256'][:12]}..., but no weights file (seeded random weights) gives "
        f"{other.weights_sha256[:12]}...; give --encoder-weights the file it was trained with, or train a "
        "decoder for these weights"
    )


def test_tampered_decoder_weights_are_refused(tmp_path, tiny_decoder_dir):
    for name in ("decoder.json", "decoder.safetensors"):
        (tmp_path / name).write_bytes((tiny_decoder_dir / name).read_bytes())
    data = bytearray((tmp_path / "decoder.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "decoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_decoder(tmp_path)


BASE = ["train", "--encoder", TINY_ENCODER, "--image-size", "32", "--epochs", "1"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_train_writes_a_decoder(tmp_path, tiny_shards, capsys):
    code, out, _ = run_cli(
        capsys,
        "train",
        "--encoder",
        TINY_ENCODER,
        "--image-size",
        "32",
        "--data",
        str(tiny_shards),
        "--out",
        str(tmp_path / "dec"),
        "--epochs",
        "1",
        "--patch-size",
        "8",
        "--width",
        "32",
        "--depth",
        "1",
        "--decoder-depth",
        "1",
        "--heads",
        "2",
        "--device",
        "cpu",
    )
    assert code == 0, out
    assert f"decoder: {tmp_path / 'dec'}" in out
    assert read_meta(tmp_path / "dec")["training"]["epochs"] == 1


def test_cli_train_prints_no_library_log_lines_unless_verbose(tmp_path, tiny_shards, capsys):
    """open_clip's INFO notes on building a model ('Parsing model identifier. ...', seven of them) were
    printed as the command's own `sanitizer:` lines, and its warning that the model was 'initialized
    randomly', false where --encoder-weights load next. Other warnings still are; -v shows the notes."""
    argv = ["--encoder", "open_clip:sanitizer-tiny-vit", "--epochs", "1", "--data", str(tiny_shards)]
    code, _, err = run_cli(
        capsys, "train", *argv, "--out", str(tmp_path / "a"), "--device", "cpu", *TINY_ARGS
    )
    assert code == 0, err
    assert [line for line in err.splitlines() if not line.startswith("train")] == [
        "sanitizer: open_clip:sanitizer-tiny-vit has no --encoder-weights: using seeded random weights",
        "sanitizer: calibrating on 6 held-out images: a quantile threshold read from so few is rough; give "
        "more data or a larger --holdout (100 or more held out)",
    ]
    code, _, err = run_cli(
        capsys, "-v", "train", *argv, "--out", str(tmp_path / "b"), "--device", "cpu", *TINY_ARGS
    )
    assert (
        code == 0
        and "sanitizer: Parsing model identifier. Schema: None, Identifier: sanitizer-tiny-vit" in err
    )


def test_cli_train_leaving_out_a_shard_that_is_not_a_tar_finishes_incomplete(tmp_path, tiny_shards, capsys):
    """Trained on the rest, as score goes on without such a shard, and exit 1 as score's: not 0."""
    data = shutil.copytree(tiny_shards, tmp_path / "data")
    (data / "shard-000009.tar").write_bytes(b"not a tar" * 100)
    argv = [*BASE, "--data", str(data), "--out", str(tmp_path / "dec"), "--device", "cpu", *TINY_ARGS]
    code, out, err = run_cli(capsys, *argv)
    left_out = f"left out {data / 'shard-000009.tar'}: not a readable tar file"
    assert code == 1 and left_out in out
    assert "skipping" in err and "shard-000009.tar" in err
    training = read_meta(tmp_path / "dec")["training"]
    assert training["decode_statuses"]["unreadable_shard"] == 1
    assert training["failed_shards"] == [{"url": str(data / "shard-000009.tar"), "error": ANY}]
    assert training["failed_shards"][0]["error"].startswith("not a readable tar file")


def test_a_second_train_in_a_decoder_dir_in_use_is_refused_and_touches_nothing(tmp_path, tiny_shards, capsys):
    """Two jobs in one DECODER_DIR overwrote each other's checkpoints and decoder files, and both
    exited 0, each naming the directory as its decoder. A job holds DECODER_DIR/.lock, as score RUN_DIR's."""
    out = tmp_path / "dec"
    argv = [*BASE, "--data", str(tiny_shards), "--out", str(out), "--device", "cpu", *TINY_ARGS]
    with job_lock(out, "--out"):  # as a running train holds it
        code, out_text, err = run_cli(capsys, *argv)
        assert [p.name for p in out.iterdir()] == [".lock"]
    assert code == 75 and out_text == ""  # busy (EX_TEMPFAIL), not 2: nothing is wrong with the job
    holder = f"{os.getpid()} on {socket.gethostname()}"  # a pid alone does not say which, on shared storage
    assert err.splitlines()[-1] == f"sanitizer: error: another sanitizer job (pid {holder}) is using {out}"
    code, _, err = run_cli(capsys, *argv)  # the lock released, as the kernel releases a dead job's
    assert code == 0, err


@pytest.fixture
def no_encoder_load(monkeypatch) -> None:
    """Makes loading an encoder fail the test: for a job that must be refused before it does."""
    import sanitizer.encoders

    def loaded(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(sanitizer.encoders, "load_encoder", loaded)


def test_a_busy_decoder_dir_is_refused_before_the_encoder_loads(
    tmp_path, tiny_shards, capsys, no_encoder_load
):
    """The refusal came after the encoder loaded: 44 s beside a running train on 2 CPUs, and on a GPU
    memory the running train uses, for a job that could only be refused."""
    out = tmp_path / "dec"
    with job_lock(out, "--out"):
        code, _, err = run_cli(capsys, *BASE, "--data", str(tiny_shards), "--out", str(out), *TINY_ARGS)
    holder = f"{os.getpid()} on {socket.gethostname()}"
    assert (code, err) == (75, f"sanitizer: error: another sanitizer job (pid {holder}) is using {out}\n")


def test_a_rerun_on_a_finished_decoder_removes_the_checkpoint_a_job_killed_as_it_finished_left(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys
):
    """Killed between writing decoder.json and removing .checkpoint/, a job left the checkpoint for
    good: every rerun is refused (the decoder is finished), and nothing else removes it."""
    out = shutil.copytree(tiny_decoder_dir, tmp_path / "dec")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    (out / ".checkpoint").mkdir()
    (out / ".checkpoint/state.safetensors").write_bytes(b"the last epoch's state")
    (out / ".checkpoint/.state.safetensors.tmp-1-0123abcd").write_bytes(b"partial")
    argv = [*BASE, "--data", str(tiny_shards), "--out", str(out), "--device", "cpu", *TINY_ARGS]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert (
        err.splitlines()[-1]
        == f"sanitizer: error: {out} already holds a trained decoder; choose another --out"
    )
    assert not (out / ".checkpoint").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before  # as it was


def test_an_image_size_the_encoder_cannot_be_probed_at_is_one_line(tmp_path, tiny_shards, capsys):
    """A mistyped --image-size (a zero too many) ran out of memory embedding load_encoder's probe
    image, outside the training's memory guard: a traceback."""
    out = tmp_path / "dec"
    argv = ["train", "--encoder", TINY_ENCODER, "--image-size", "1000000", "--data", str(tiny_shards)]
    code, _, err = run_cli(capsys, *argv, "--out", str(out), "--device", "cpu")
    assert (code, err.splitlines()[-1]) == (
        1,
        "sanitizer: error: ran out of host memory loading the encoder at --image-size 1000000; give the "
        "--image-size the encoder was trained at, or a device with more memory",
    )
    assert not out.exists()


def test_a_finished_decoder_dir_is_refused_before_the_encoder_loads(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys, no_encoder_load
):
    """Refused after the encoder had loaded (a minute and GPU memory for a large one): the directory
    alone says the job can only be refused."""
    out = shutil.copytree(tiny_decoder_dir, tmp_path / "dec")
    code, _, err = run_cli(capsys, *BASE, "--data", str(tiny_shards), "--out", str(out), *TINY_ARGS)
    assert (code, err) == (
        2,
        f"sanitizer: error: {out} already holds a trained decoder; choose another --out\n",
    )


def test_an_out_holding_other_files_is_refused_before_the_encoder_loads(
    tmp_path, tiny_shards, capsys, no_encoder_load
):
    (tmp_path / "notes.txt").write_text("the user's")
    code, _, err = run_cli(capsys, *BASE, "--data", str(tiny_shards), "--out", str(tmp_path), *TINY_ARGS)
    assert (code, err) == (
        2,
        f"sanitizer: error: --out {tmp_path} holds other files ('notes.txt') and no decoder.json; "
        "train into a new or empty directory\n",
    )


def test_an_out_holding_other_files_is_refused_untouched(tmp_path, tiny_shards, capsys):
    """--out naming the shards' own folder (or a home directory): the decoder files were written among
    them. It is refused as score refuses such a RUN_DIR, before anything is written there."""
    folder = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    (folder / "notes.txt").write_text("the user's")
    before = sorted(p.name for p in folder.iterdir())
    argv = [*BASE, "--data", str(folder), "--out", str(folder), "--device", "cpu", *TINY_ARGS]
    code, out_text, err = run_cli(capsys, *argv)
    assert code == 2 and out_text == ""
    assert err.splitlines()[-1] == (
        f"sanitizer: error: --out {folder} holds other files ('notes.txt', 'shard-000000.tar', "
        "'shard-000001.tar', ...) and no decoder.json; train into a new or empty directory"
    )
    assert sorted(p.name for p in folder.iterdir()) == before


def test_an_out_left_by_a_killed_train_is_resumed_not_refused(tmp_path, tiny_shards, capsys):
    """What a train killed before decoder.json may leave is its own, not another's files."""
    out = tmp_path / "dec"
    (out / ".checkpoint").mkdir(parents=True)
    for name in (".lock", "holdout.safetensors", ".decoder.json.tmp-1-ab", ".holdout.safetensors.tmp-1-cd"):
        (out / name).write_bytes(b"")
    argv = [*BASE, "--data", str(tiny_shards), "--out", str(out), "--device", "cpu", *TINY_ARGS]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert read_meta(out)["training"]["epochs"] == 1


def test_a_refused_train_leaves_no_out_it_made(tmp_path, html_shards, capsys):
    """Refused inside its lock (no decodable image), a train left --out behind, empty but for the
    lock file: the next train into it, with other data, found a directory it had not asked for."""
    out = tmp_path / "a" / "b" / "dec"
    argv = [*BASE, "--data", str(html_shards), "--out", str(out), "--device", "cpu", *TINY_ARGS]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "has 0 decodable images (not_an_image=30)" in err.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # one the user made is theirs: it stays (with the lock file)
    argv = [*BASE, "--data", str(html_shards), "--out", str(tmp_path / "mine"), "--device", "cpu", *TINY_ARGS]
    assert run_cli(capsys, *argv)[0] == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [".lock"]


@pytest.fixture(scope="module")
def html_shards(tmp_path_factory):
    from sanitizer.data.tario import write_shards

    out = tmp_path_factory.mktemp("html")
    write_shards(({"__key__": f"p{i}", "jpg": b"<html><body>404</body></html>"} for i in range(30)), out)
    return out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--encoder-weights", "/nonexistent.safetensors"],
            "weights file not found: /nonexistent.safetensors",
        ),
        (["--encoder", "timm:nope_net"], "timm has no model 'nope_net'"),
        (["--encoder", "resnet18"], "encoder spec 'resnet18' is not one of"),
        (["--patch-size", "5"], "image size 32 is not divisible by patch size 5"),
        (["--data", "/nonexistent/shard-{000..009}.tar"], "/nonexistent/shard-"),
        (["--data", "HTML"], "has 0 decodable images (not_an_image=30)"),
        (["--holdout", "1.5"], "--holdout must be in (0, 1), not 1.5"),
        (["--error-pool", "3"], "--error-pool 3 does not divide the decoder's 8 px patches"),
        (["--trim", "0.5"], "--trim must be in [0, 0.5), not 0.5"),
        (["--refit", "-0.1"], "--refit must be in [0, 0.5), not -0.1"),
        (["--relax-radius", "0"], "--relax-radius must be above 0, not 0.0"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_shards, html_shards, capsys, extra, message):
    argv = BASE + ["--data", str(tiny_shards), "--out", str(tmp_path / "d")] + extra
    argv = [str(html_shards) if a == "HTML" else a for a in argv]
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("sanitizer: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sanitizer.cli",
            "train",
            "--encoder",
            "timm:nope_net",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "sanitizer: error: timm has no model 'nope_net'"
    assert "Traceback" not in proc.stderr


def test_training_on_generated_data_is_deterministic(tmp_path):
    pixels = synthetic_images(30, 32, seed=5)
    write_image_shards(tmp_path / "data", pixels)
    enc = load_encoder(TINY_ENCODER, image_size=32)
    common = dict(settings=TrainSettings(epochs=1, batch_size=16), model_overrides=TINY_MODEL, progress=False)
    a = train_decoder(enc, str(tmp_path / "data"), tmp_path / "a", **common)
    b = train_decoder(enc, str(tmp_path / "data"), tmp_path / "b", **common)
    assert a["decoder_sha256"] == b["decoder_sha256"]


def test_cli_train_records_absolute_encoder_paths(tmp_path, tiny_shards, tiny_encoder, monkeypatch, capsys):
    from safetensors.torch import save_file

    save_file(tiny_encoder.module.state_dict(), str(tmp_path / "w.safetensors"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        capsys,
        *BASE,
        "--data",
        str(tiny_shards),
        "--out",
        "dec",
        "--encoder-weights",
        "w.safetensors",
        "--patch-size",
        "8",
        "--width",
        "32",
        "--depth",
        "1",
        "--decoder-depth",
        "1",
        "--heads",
        "2",
    )
    assert code == 0, err
    assert read_meta(tmp_path / "dec")["encoder"]["weights_file"] == str(tmp_path / "w.safetensors")


def train_tiny(encoder, data: Path, out: Path, settings: TrainSettings) -> dict:
    """train_decoder on the tiny decoder, quietly, as the tests of its refusals call it."""
    return train_decoder(encoder, str(data), out, settings, model_overrides=TINY_MODEL, progress=False)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(batch_size=0), "--batch-size must be at least 1, not 0"),
        (dict(max_samples=10), "--max-samples must be at least 20 (training needs 20 images), not 10"),
        (dict(epochs=0), "--epochs must be at least 1, not 0"),
        (dict(lr=float("nan")), "--lr must be a number above 0, not nan"),
        (dict(lr=0.0), "--lr must be a number above 0, not 0.0"),
        (dict(mask_ratio=1.0), "--mask-ratio must be in (0, 1), not 1.0"),
        (dict(mask_ratio=0.0), "--mask-ratio must be in (0, 1), not 0.0"),
    ],
)
def test_training_settings_out_of_range_are_one_usage_error(settings, message):
    with pytest.raises(UsageError) as caught:
        TrainSettings(**settings)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (dict(patch_size=0), "--patch-size must be at least 1, not 0"),
        (dict(heads=-2), "--heads must be at least 1, not -2"),
        (dict(width=0), "--width must be at least 1, not 0"),
        (dict(decoder_depth=0), "--decoder-depth must be at least 1, not 0"),
        (dict(depth=-1), "--depth must be at least 0, not -1"),
    ],
)
def test_decoder_sizes_out_of_range_are_one_usage_error(sizes, message):
    with pytest.raises(UsageError, match=message):
        DedeConfig.default_for(32, 16, **sizes)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(std=(0.0, 0.0, 0.0)), "--std above 0"),
        (dict(mean=(float("inf"), 0.0, 0.0)), "--mean and --std must be finite"),
        (dict(image_size=-32), "--image-size must be at least 1, not -32"),
        (dict(image_size=0), "--image-size must be at least 1, not 0"),
    ],
)
def test_preprocessing_that_would_feed_the_encoder_nonsense_is_refused(options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        load_encoder(TINY_ENCODER, **{"image_size": 32, **options})


def test_a_loss_that_is_not_a_number_stops_training_before_it_is_checkpointed(
    tmp_path, tiny_shards, tiny_encoder
):
    settings = TrainSettings(epochs=3, batch_size=32, lr=1e30, refit=0)
    with pytest.raises(TrainingError, match=r"the training loss is (nan|inf) in epoch \d: lower --lr"):
        train_tiny(tiny_encoder, tiny_shards, tmp_path / "d", settings)
    assert not (tmp_path / "d" / "decoder.json").exists()
    progress = checkpoint_module.read_training_progress(tmp_path / "d")
    assert progress is None or all(math.isfinite(x) for x in progress["losses"])


def test_a_decoder_whose_last_step_diverged_is_refused_not_saved(tmp_path, tiny_shards, tiny_encoder):
    """One step at lr 1e30: its loss, measured before the step, is finite, the decoder it leaves is
    not. It was saved with NaN calibration scores (exit 0), and every later step refused decoder.json."""
    out = tmp_path / "a" / "d"
    settings = TrainSettings(epochs=1, batch_size=128, lr=1e30, refit=0)
    with pytest.raises(TrainingError) as caught:
        train_tiny(tiny_encoder, tiny_shards, out, settings)
    assert str(caught.value) == (
        "the trained decoder's scores of 6 of the 6 held-out images are not finite, though their "
        "embeddings are: training diverged; lower --lr"
    )
    assert not out.exists()  # nor a checkpoint that a rerun would resume into the same decoder


def test_an_out_that_cannot_be_a_directory_is_refused_before_training(tmp_path, tiny_shards, tiny_encoder):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(UsageError, match="cannot use .*f/d as --out: Not a directory"):
        train_decoder(
            tiny_encoder, str(tiny_shards), tmp_path / "f" / "d", TrainSettings(epochs=1), progress=False
        )
    # --out naming the file itself: mkdir's "File exists" read as if a directory were there
    with pytest.raises(UsageError) as caught, job_lock(tmp_path / "f", "--out"):
        pass
    assert str(caught.value) == f"cannot use {tmp_path / 'f'} as --out: it is a file, not a directory"


@pytest.mark.parametrize(
    "progress",
    [None, "garbage", "[1]", "{}", '{"plan": {}, "epoch": "1", "losses": [], "param_groups": []}',
     '{"plan": {}, "epoch": 1, "losses": []}'],
)  # fmt: skip
def test_a_damaged_training_checkpoint_is_one_error_naming_it(tmp_path, tiny_shards, tiny_encoder, progress):
    state = tmp_path / "d" / ".checkpoint" / "state.safetensors"
    state.parent.mkdir(parents=True)
    metadata = None if progress is None else {"progress": progress}
    checkpoint_module.save_tensors({"model.x": torch.zeros(1)}, state, metadata)
    settings = TrainSettings(epochs=1, batch_size=32, refit=0)
    with pytest.raises(
        CheckpointError, match=r"state.safetensors is damaged: .*; delete .*\.checkpoint to start"
    ):
        train_tiny(tiny_encoder, tiny_shards, tmp_path / "d", settings)
    state.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"state.safetensors is damaged: .*; delete"):
        train_tiny(tiny_encoder, tiny_shards, tmp_path / "d", settings)


@pytest.mark.parametrize("files", [("state.json",), ("state.json", "state.safetensors")])
def test_a_checkpoint_of_an_earlier_version_is_one_error_saying_so(
    tmp_path, tiny_shards, tiny_encoder, files
):
    """Its progress sat in state.json beside the tensors: not damage, and not resumable either (with
    state.json alone, training used to finish and then fail to remove the directory)."""
    for name in files:
        (tmp_path / "d" / ".checkpoint").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / ".checkpoint" / name).write_text('{"plan": {}, "epoch": 1, "losses": [0.5]}')
    with pytest.raises(CheckpointError, match=r"holds an unfinished training run of an earlier version"):
        train_tiny(tiny_encoder, tiny_shards, tmp_path / "d", TrainSettings(epochs=1, batch_size=32))
    assert not (tmp_path / "d" / "decoder.json").exists()


def test_a_checkpoint_whose_tensors_do_not_fit_the_decoder_is_one_error_naming_it(
    tmp_path, tiny_shards, tiny_encoder, monkeypatch
):
    """Progress that matches the run, tensors that do not fit it (a file put together by hand)."""
    settings = TrainSettings(epochs=2, batch_size=32, refit=0)
    killed_in_second_epoch(
        monkeypatch, lambda: train_tiny(tiny_encoder, tiny_shards, tmp_path / "d", settings)
    )
    progress = checkpoint_module.read_training_progress(tmp_path / "d")
    state = tmp_path / "d" / ".checkpoint" / "state.safetensors"
    checkpoint_module.save_tensors({"model.x": torch.zeros(1)}, state, {"progress": json.dumps(progress)})
    with pytest.raises(CheckpointError, match=r"state.safetensors does not fit this decoder: .*; delete"):
        train_tiny(tiny_encoder, tiny_shards, tmp_path / "d", settings)


def test_a_holdout_that_leaves_nothing_to_train_on_is_refused(tmp_path, tiny_shards, tiny_encoder, caplog):
    with pytest.raises(
        UsageError, match="--holdout 0.999 holds out all 120 images; none is left to train on"
    ):
        train_decoder(
            tiny_encoder, str(tiny_shards), tmp_path / "d", TrainSettings(holdout=0.999), progress=False
        )
    settings = TrainSettings(epochs=1, batch_size=32, refit=0)
    with caplog.at_level("WARNING", logger="sanitizer.train"):
        train_tiny(tiny_encoder, tiny_shards, tmp_path / "e", settings)
    assert "calibrating on 6 held-out images: a quantile threshold read from so few is rough" in caplog.text


@pytest.mark.parametrize("name", ["a/b", "hf-hub:org/repo", "local-dir:/tmp"])
def test_a_timm_name_that_would_read_a_hub_or_a_path_is_refused(name):
    with pytest.raises(EncoderError, match="is not a timm model name"):
        load_encoder(f"timm:{name}", image_size=32)


def test_decoder_files_are_as_readable_as_the_umask_makes_any_file(tiny_decoder_dir):
    """Workers on a shared filesystem, often another user, read what train wrote (safetensors alone
    would make the weights 0600)."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in tiny_decoder_dir.iterdir() if p.is_file()}
    assert {"decoder.safetensors", "holdout.safetensors", "decoder.json"} <= set(modes)
    assert len(set(modes.values())) == 1, modes


def test_cli_a_decoder_trained_on_one_of_two_encoders_in_a_file_scores_with_it(
    tmp_path, tiny_shards, tiny_encoder, capsys
):
    """--encoder-weights-prefix picks MoCo's key encoder; decoder.json records it, so score loads
    the same tensors (their hash is checked). A decoder trained without it records none and scores
    as before: the prefix is then found by the tensors' names."""
    from safetensors.torch import save_file

    own = tiny_encoder.module.state_dict()
    moco = {f"encoder_q.{k}": v.clone() for k, v in own.items()}
    moco |= {f"encoder_k.{k}": v * 0.5 if v.is_floating_point() else v.clone() for k, v in own.items()}
    save_file(moco, str(tmp_path / "moco.safetensors"))
    save_file({f"backbone.{k}": v for k, v in own.items()}, str(tmp_path / "one.safetensors"))
    train = [*BASE, *TINY_ARGS, "--data", str(tiny_shards), "--device", "cpu", "--refit", "0"]
    weights = ["--encoder-weights", str(tmp_path / "moco.safetensors")]
    code, _, err = run_cli(capsys, *train, "--out", str(tmp_path / "none"), *weights)
    assert code == 2 and err.endswith("(e.g. --encoder-weights-prefix encoder_q.)\n")
    prefixed = [*train, "--out", str(tmp_path / "k"), *weights, "--encoder-weights-prefix", "encoder_k"]
    assert run_cli(capsys, *prefixed)[0] == 0
    plain = ["--out", str(tmp_path / "plain"), "--encoder-weights", str(tmp_path / "one.safetensors")]
    assert run_cli(capsys, *train, *plain)[0] == 0
    k, plain_meta = read_meta(tmp_path / "k")["encoder"], read_meta(tmp_path / "plain")["encoder"]
    assert k["weights_prefix"] == "encoder_k." and "weights_prefix" not in plain_meta
    assert k["weights_sha256"] != plain_meta["weights_sha256"] == tiny_encoder.weights_sha256
    for decoder in ("k", "plain"):
        score = ["score", "--decoder", str(tmp_path / decoder), "--data", str(tiny_shards), "--workers", "0"]
        code, out, err = run_cli(capsys, *score, "--out", str(tmp_path / f"run-{decoder}"), "--device", "cpu")
        assert code == 0, err
        assert "samples: 120  ok: 120" in out


def test_a_shard_whose_read_fails_is_left_out_whole(flaky, tiny_shards):
    """A connection reset mid-shard used to end it as `truncated_shard` and keep the images before
    the break: the shard is now left out (and listed), all of it, wherever the read broke."""
    urls = [f"flaky://{tiny_shards}/shard-{i:06d}.tar" for i in range(3)]
    whole = train_module.load_images(",".join(urls), 32, 10_000)
    flaky.broken = {"shard-000001.tar": 20_000}
    images = train_module.load_images(",".join(urls), 32, 10_000)
    assert images.keys == whole.keys[:40] + whole.keys[80:]
    assert images.statuses == {"ok": 80, "unreadable_shard": 1}
    assert images.failed_shards == [{"url": urls[1], "error": f"read failed after 20000 bytes: {RESET}"}]


@pytest.fixture
def four_hundred_shards(tmp_path) -> Path:
    write_image_shards(tmp_path / "data", synthetic_images(400, 32, seed=2), per_shard=100)
    return tmp_path / "data"


def traced_peak(run) -> int:
    """Peak bytes numpy and Python allocated while run() ran, above what was allocated before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_load_images_fills_one_array_in_place(four_hundred_shards, monkeypatch):
    """A list of images stacked at the end held the pixels twice (2.2 times them, traced)."""
    monkeypatch.setattr(train_module, "CHUNK_BYTES", 16 * 32 * 32 * 3, raising=False)
    train_module.load_images(str(four_hundred_shards), 32, 40)  # imports what decoding needs, once
    images = []
    peak = traced_peak(lambda: images.append(train_module.load_images(str(four_hundred_shards), 32, 10_000)))
    (pixels,) = [i.pixels for i in images]
    assert pixels.shape == (400, 32, 32, 3) and pixels.flags.owndata and pixels.flags.c_contiguous
    assert peak < 1.5 * pixels.nbytes  # the pixels, the unfilled quarter of the last growth, the keys


def test_fit_decoder_copies_no_set_of_images(tmp_path, monkeypatch):
    """Training, holdout and kept images are index vectors into the loaded array, read a batch or a
    chunk at a time (here 16 images): copies of each set took 2.5 times the pixels (traced) more. The
    peak is measured against a fit of the first 40 images, which has the same fixed costs (a decoder
    built on the meta device traces 30 kB of Python objects), so that only what grows with the
    images counts: a copy of the held-out tenth would be 10% of the pixels added."""
    write_image_shards(tmp_path / "big", synthetic_images(200, 64, seed=2), per_shard=100)
    monkeypatch.setattr(train_module, "CHUNK_BYTES", 16 * 64 * 64 * 3, raising=False)
    monkeypatch.setattr(train_module, "Scorer", functools.partial(Scorer, micro_batch=16))
    images = train_module.load_images(str(tmp_path / "big"), 64, 10_000)
    settings = TrainSettings(epochs=1, batch_size=16, holdout=0.1)
    fit = functools.partial(
        fit_decoder,
        load_encoder(TINY_ENCODER, image_size=64),
        settings=settings,
        model_overrides=TINY_MODEL,
        progress=False,
    )
    small = replace(images, pixels=images.pixels[:40], keys=images.keys[:40])
    fit(small)  # imports everything once
    growth = traced_peak(lambda: fit(images)) - traced_peak(lambda: fit(small))
    added = images.pixels.nbytes - small.pixels.nbytes
    assert growth < 0.05 * added


@pytest.mark.parametrize(("omp_num_threads", "size", "threads"), [(None, 32, 1), ("2", 32, 2), (None, 96, 2)])
def test_cli_train_on_the_cpu_uses_one_torch_thread_unless_omp_num_threads_is_set(
    tmp_path, tiny_shards, capsys, monkeypatch, omp_num_threads, size, threads
):
    """Two threads stalled at every op's barrier on a busy 2-core machine (71-91 img/s against
    1072-1577 on one thread); the count is restored afterwards. A decoder above 64 px, which is not
    the small one, keeps torch's count."""
    if omp_num_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_num_threads)
    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    real = train_module.train_decoder
    monkeypatch.setattr(train_module, "train_decoder", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = [
            *BASE,
            *TINY_ARGS,
            "--image-size",
            str(size),
            "--data",
            str(tiny_shards),
            "--out",
            str(tmp_path / "d"),
            "--device",
            "cpu",
        ]
        code, out, _ = run_cli(capsys, *argv)
        assert (code, seen, torch.get_num_threads()) == (0, [threads], 2), out
    finally:
        torch.set_num_threads(before)
