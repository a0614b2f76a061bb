"""Samples whose score is not a finite number: NaN is above no threshold, so as `ok` rows they would
pass as clean. They are `nonfinite_score` rows, held out of clean/ as samples that could not be
decoded are, and every step (clean, its data rules, verify) agrees."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sanitizer.cli import main
from sanitizer.data.synth import encode_image, synthetic_images
from sanitizer.data.tario import write_shards
from sanitizer.encoders import load_encoder
from sanitizer.scoring import ScoreSettings, nonfinite_reason
from sanitizer.train import TrainSettings, train_decoder

from .conftest import TINY_MODEL, TINY_SIZE

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


@pytest.fixture(scope="module")
def standardising_decoder(tmp_path_factory, tiny_shards) -> Path:
    """A tiny decoder trained on the fixture's images (none flat) through PerImageStandardised."""
    root = tmp_path_factory.mktemp("nonfinite")
    torch.manual_seed(0)
    torch.jit.script(PerImageStandardised()).save(str(root / "encoder.ts"))
    encoder = load_encoder(f"torchscript:{root / 'encoder.ts'}", image_size=TINY_SIZE)
    settings = TrainSettings(epochs=1, batch_size=32)
    scoring = ScoreSettings(num_masks=2)
    train_decoder(encoder, str(tiny_shards), root / "decoder", settings, scoring, TINY_MODEL, progress=False)
    return root / "decoder"


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_a_sample_whose_score_is_not_finite_is_nonfinite_score_in_neither_tar(
    tmp_path, standardising_decoder, capsys
):
    data, run = tmp_path / "data", tmp_path / "run"
    images = synthetic_images(3, TINY_SIZE, seed=4)
    samples = [
        {"__key__": "black", "png": png(Image.new("RGB", (32, 32), (0, 0, 0)))},
        {"__key__": "white", "jpg": encode_image(np.full((32, 32, 3), 255, np.uint8), "jpg")},
        {"__key__": "one_pixel", "png": png(Image.new("RGB", (1, 1), (10, 200, 30)))},
        {"__key__": "alpha_only", "png": png(Image.new("LA", (32, 32), (0, 0)))},
    ] + [{"__key__": f"photo{i}", "png": encode_image(images[i])} for i in range(3)]
    write_shards(samples, data, prefix="mixed")
    argv = ["score", "--decoder", str(standardising_decoder), "--data", str(data), "--out", str(run)]
    assert main([*argv, "--workers", "0", "--device", "cpu"]) == 0
    assert "samples: 7  ok: 3  failures: nonfinite_score=4" in capsys.readouterr().out
    table = pq.read_table(run / "manifest/mixed-000000.parquet").to_pydict()
    assert table["status"] == ["nonfinite_score"] * 4 + ["ok"] * 3
    assert table["error"] == [NAN_EMBEDDING] * 4 + [None] * 3
    for column in ("score", "score_std", "embedding_norm", "sketch", "thumbnail", "collapse"):
        assert table[column][:4] == [None] * 4 and None not in table[column][4:], column
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
    assert capsys.readouterr().out.endswith(f"verify: 0 violation(s) in {run}\n")


def test_the_error_says_whether_the_embedding_was_finite():
    assert nonfinite_reason(np.float32("nan"), np.float32("nan")) == NAN_EMBEDDING
    assert nonfinite_reason(np.float32("inf"), np.float32(12.5)) == (
        "score is inf, though the encoder's embedding is finite (norm 12.5)"
    )
