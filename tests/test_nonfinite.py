"""Samples whose score is not a finite number: NaN is above no threshold, so as `ok` rows they would
pass as clean. They are `nonfinite_score` rows, held out of clean/ as samples that could not be
decoded are, and every step (clean, its data rules, verify) agrees."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sanitizer.checkpoint import read_meta
from sanitizer.cli import main
from sanitizer.data.synth import encode_image, synthetic_images
from sanitizer.data.tario import iter_samples, write_shards
from sanitizer.decoder_meta import ScoreSettings
from sanitizer.encoders import load_encoder
from sanitizer.scoring import key_seeds, nonfinite_reason
from sanitizer.train import TrainSettings, split_holdout, train_decoder

from .conftest import TINY_ARGS, TINY_MODEL, TINY_SIZE

NAN_EMBEDDING = "score is nan: the encoder's embedding of this image is not finite (norm nan)"
FLAT = ("black", "white", "one_pixel", "alpha_only")


class PerImageStandardised(torch.nn.Module):
    """An encoder that standardises each channel of an image by its own spread, as some pipelines do:
    a flat image (one colour, 1x1 px, a fully transparent one made black) has none, its embedding is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)
        return self.conv(x).mean(dim=(2, 3))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def flat_samples(keys: tuple[str, ...] = FLAT) -> list[dict]:
    """Samples that PerImageStandardised embeds as NaN, under `keys` (black, white, 1x1 px, fully
    transparent, in that order)."""
    images = [
        png(Image.new("RGB", (32, 32), (0, 0, 0))),
        encode_image(np.full((32, 32, 3), 255, np.uint8), "jpg"),
        png(Image.new("RGB", (1, 1), (10, 200, 30))),
        png(Image.new("LA", (32, 32), (0, 0))),
    ]
    exts = ("png", "jpg", "png", "png")
    return [{"__key__": k, ext: image} for k, ext, image in zip(keys, exts, images, strict=False)]


@pytest.fixture(scope="module")
def standardising_encoder(tmp_path_factory) -> str:
    """The spec of a TorchScript PerImageStandardised."""
    path = tmp_path_factory.mktemp("nonfinite") / "encoder.ts"
    torch.manual_seed(0)
    torch.jit.script(PerImageStandardised()).save(str(path))
    return f"torchscript:{path}"


@pytest.fixture(scope="module")
def standardising_decoder(tmp_path_factory, tiny_shards, standardising_encoder) -> Path:
    """A tiny decoder trained on the fixture's images (none flat) through PerImageStandardised."""
    out = tmp_path_factory.mktemp("nonfinite") / "decoder"
    encoder = load_encoder(standardising_encoder, image_size=TINY_SIZE)
    settings = TrainSettings(epochs=1, batch_size=32)
    scoring = ScoreSettings(num_masks=2)
    train_decoder(encoder, str(tiny_shards), out, settings, scoring, TINY_MODEL, progress=False)
    return out


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_a_sample_whose_score_is_not_finite_is_nonfinite_score_in_neither_tar(
    tmp_path, standardising_decoder, capsys
):
    data, run = tmp_path / "data", tmp_path / "run"
    images = synthetic_images(3, TINY_SIZE, seed=4)
    samples = flat_samples() + [{"__key__": f"photo{i}", "png": encode_image(images[i])} for i in range(3)]
    write_shards(samples, data, prefix="mixed")
    argv = ["score", "--decoder", str(standardising_decoder), "--data", str(data), "--out", str(run)]
    assert main([*argv, "--workers", "0", "--device", "cpu"]) == 0
    assert "samples: 7  ok: 3  failures: nonfinite_score=4" in capsys.readouterr().out
    table = pq.read_table(run / "manifest/mixed-000000.parquet").to_pydict()
    assert table["status"] == ["nonfinite_score"] * 4 + ["ok"] * 3
    assert table["error"] == [NAN_EMBEDDING] * 4 + [None] * 3
    for column in ("score", "score_std", "embedding_norm", "sketch", "thumbnail", "collapse"):
        assert table[column][:4] == [None] * 4 and None not in table[column][4:], column
    assert table["axis"] == [None] * 7  # a NaN embedding has no axis; the others have a sketch
    assert table["flagged"][:4] == [False] * 4 and all(table["sha256"])  # their bytes were read
    assert json.loads((run / "run.json").read_text())["totals"]["status_counts"] == {
        "nonfinite_score": 4,
        "ok": 3,
    }

    # neither clean nor quarantine holds them, at the run's threshold or a data rule's (which the NaN
    # made NaN, so that nothing at all was flagged)
    for threshold in ([], ["--threshold", "mad:0"]):
        assert main(["clean", str(run), *threshold]) == 0
        assert "(1 shards, threshold nan)" not in capsys.readouterr().out
        split = tar_names(run / "clean/mixed-000000.tar") + tar_names(run / "quarantine/mixed-000000.tar")
        assert sorted(split) == ["photo0.png", "photo1.png", "photo2.png"]
    assert len(tar_names(run / "quarantine/mixed-000000.tar")) == 1  # mad:0 flags those above the median
    assert main(["verify", str(run)]) == 0
    assert capsys.readouterr().out.endswith(f"verify: 0 violations in {run}\n")


def test_the_error_says_whether_the_embedding_was_finite():
    assert nonfinite_reason(np.float32("nan"), np.float32("nan")) == NAN_EMBEDDING
    assert nonfinite_reason(np.float32("inf"), np.float32(12.5)) == (
        "score is inf, though the encoder's embedding is finite (norm 12.5)"
    )


def train_argv(encoder: str, data: Path, out: Path) -> list[str]:
    return ["train", "--encoder", encoder, "--image-size", "32", "--data", str(data), "--out", str(out)] + [
        "--epochs", "2", "--device", "cpu", *TINY_ARGS,
    ]  # fmt: skip


def test_train_leaves_out_images_whose_embedding_is_not_finite(
    tmp_path, tiny_shards, standardising_encoder, capsys
):
    """One flat image among 126 made every weight NaN (`the training loss is nan in epoch 2: lower
    --lr`, exit 2), or, held out, every calibration score NaN. It is left out, counted and named."""
    data = shutil.copytree(tiny_shards, tmp_path / "data")
    # two flat images among the trained ones, and one the holdout holds (the smallest key hashes)
    held = min((f"flat{i}" for i in range(100)), key=lambda k: key_seeds([k])[0])
    photos = synthetic_images(3, TINY_SIZE, seed=4)
    samples = [{"__key__": f"photo{i}", "png": encode_image(photos[i])} for i in range(3)]
    write_shards(flat_samples(("black", "white", held)) + samples, data, prefix="zz")
    keys = [s.key for p in sorted(data.iterdir()) for s in iter_samples(str(p))]
    train, holdout = ([keys[i] for i in part] for part in split_holdout(keys, 0.05))
    assert len(keys) == 126 and held in holdout and {"black", "white"} <= set(train)
    assert main(train_argv(standardising_encoder, data, tmp_path / "dec")) == 0
    out = capsys.readouterr().out
    assert (
        f"left out 3 images whose embedding by the encoder is not finite: 'black', 'white', '{held}'\n" in out
    )
    meta = read_meta(tmp_path / "dec")  # refused calibration scores that are not finite
    training = meta["training"]
    assert training["nonfinite_embeddings"] == {"n": 3, "keys": ["black", "white", held]}
    assert training["decode_statuses"] == {"ok": 126}
    assert meta["calibration"]["n"] == 6 and training["n_train"] + training["left_out"] == 117


def test_train_is_refused_when_too_few_images_have_a_finite_embedding(
    tmp_path, standardising_encoder, capsys
):
    data = tmp_path / "data"
    photos = synthetic_images(19, TINY_SIZE, seed=4)
    samples = [{"__key__": f"photo{i:02d}", "png": encode_image(photos[i])} for i in range(19)]
    write_shards(flat_samples() + samples, data, prefix="few")
    assert main(train_argv(standardising_encoder, data, tmp_path / "dec")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sanitizer: error: the encoder's embedding of 4 of the 23 decodable images is not finite ('black', "
        "'white', 'one_pixel', ...): 19 are left, and training needs 20"
    )
    assert not (tmp_path / "dec").exists()
