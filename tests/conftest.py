"""Shared fixtures: tiny generated shards and a tiny trained decoder, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.encoders import load_encoder
from sanitizer.scoring import ScoreSettings
from sanitizer.train import TrainSettings, train_decoder

torch.set_num_threads(2)

# A timm test model: 0.4 M parameters, fast on the CPU; 32 px keeps every test quick.
TINY_ENCODER = "timm:test_resnet"
TINY_SIZE = 32
TINY_MODEL = {"patch_size": 8, "width": 32, "depth": 1, "decoder_depth": 1, "heads": 2}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """3 shards x 40 image-text samples at 32 px."""
    out = tmp_path_factory.mktemp("tiny_shards")
    pixels = synthetic_images(120, TINY_SIZE, seed=1)
    write_image_shards(out, pixels, captions=[f"a photo number {i}" for i in range(120)], per_shard=40)
    return out


@pytest.fixture(scope="session")
def tiny_encoder():
    return load_encoder(TINY_ENCODER, image_size=TINY_SIZE)


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory, tiny_shards, tiny_encoder) -> Path:
    out = tmp_path_factory.mktemp("tiny_decoder")
    train_decoder(
        tiny_encoder,
        str(tiny_shards),
        out,
        TrainSettings(epochs=2, batch_size=32),
        ScoreSettings(num_masks=2),
        TINY_MODEL,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting it costs seconds and ~1 GB)."""
    import ray

    from sanitizer.pipeline.job import ensure_ray

    ensure_ray(None, num_cpus=2)
    yield
    ray.shutdown()
