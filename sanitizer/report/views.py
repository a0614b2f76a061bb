"""The few samples the page shows as images: read again from the input shards and rebuilt with the
run's own encoder and decoder, as scoring saw them (masked input, reconstruction, residual, embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sanitizer.report.scan import Pick

RECONSTRUCT_CHUNK = 64  # images the decoder rebuilds at a time


@dataclass
class Views:
    """Pixels of a list of Picks, in the same order; picks whose image could not be read are dropped."""

    picks: list[Pick]
    original: np.ndarray  # (N, H, W, 3) uint8
    masked: np.ndarray  # what the decoder saw: hidden patches grey
    rebuilt: np.ndarray  # visible patches copied, hidden ones from the decoder
    residual: np.ndarray  # (N, H, W) float32: mean absolute error over channels, 0..255
    embeddings: np.ndarray  # (N, D) float32 raw victim embeddings
    hidden: np.ndarray  # (N, H, W) bool: pixels the decoder did not see


def load_scorer(info: dict):
    """The run's encoder and decoder, exactly as scoring used them (ScoreStage checks the encoder hash)."""
    from sanitizer.checkpoint import read_run_meta
    from sanitizer.pipeline.stages import ScoreStage

    config = info["config"]
    read_run_meta(Path(config["decoder_dir"]), info["identity"]["decoder_sha256"])
    stage = ScoreStage(
        config["decoder_dir"],
        info["identity"]["scoring"],
        device="auto",
        micro_batch=64,
        encoder_weights=config.get("encoder_weights"),  # absent in runs from before it was recorded
    )
    return stage.scorer, stage.image_size


def read_images(
    urls: dict[str, str], picks: list[Pick], image_size: int
) -> tuple[dict[tuple[str, int], tuple[np.ndarray, str]], list[str]]:
    """(stem, index) -> (pixels, the raw key that seeds the masks), reading each shard once, and notes.

    A sample whose key no longer matches the manifest is left out: the shard changed since scoring.
    """
    from sanitizer.data.decode import decode_image
    from sanitizer.data.tario import ShardError, iter_samples, printable

    wanted: dict[str, dict[int, str]] = {}
    for p in picks:
        wanted.setdefault(p.stem, {})[p.index] = p.key
    found, notes = {}, []
    for stem, rows in wanted.items():
        last = max(rows)
        try:
            for sample in iter_samples(urls[stem]):
                if sample.index in rows:
                    if printable(sample.key) != rows[sample.index]:
                        notes.append(
                            f"{stem}: sample {sample.index} is not the one scored; the shard changed"
                        )
                        continue
                    decoded = decode_image(sample, image_size)
                    if decoded.pixels is not None:
                        found[(stem, sample.index)] = (decoded.pixels, sample.key)
                if sample.index >= last:
                    break
        except ShardError as e:
            notes.append(f"cannot read {urls[stem]} again: {e.message}")
    return found, notes


def _hidden_pixels(mask: np.ndarray, image_size: int) -> np.ndarray:
    """(N, L) patch mask (1 = hidden) -> (N, H, W) bool."""
    grid = int(round(math.sqrt(mask.shape[1])))
    patch = image_size // grid
    return np.repeat(np.repeat(mask.reshape(-1, grid, grid), patch, 1), patch, 2).astype(bool)


def render_views(scorer, picks: list[Pick], images: dict, image_size: int) -> Views:
    """Masked input, reconstruction (first key-seeded mask, as scored), residual and embeddings."""
    from sanitizer.encoders import embed_pixels
    from sanitizer.scoring import key_seeds

    kept = [p for p in picks if (p.stem, p.index) in images]
    if not kept:
        empty = np.zeros((0, image_size, image_size, 3), np.uint8)
        flat = np.zeros((0, image_size, image_size), np.float32)
        return Views([], empty, empty, empty, flat, np.zeros((0, 0), np.float32), flat.astype(bool))
    original = np.stack([images[(p.stem, p.index)][0] for p in kept])
    seeds = key_seeds([images[(p.stem, p.index)][1] for p in kept])
    step = RECONSTRUCT_CHUNK
    parts = [
        scorer.reconstruct(original[i : i + step], seeds[i : i + step]) for i in range(0, len(kept), step)
    ]
    recon = np.concatenate([r for r, _ in parts])
    hidden = _hidden_pixels(np.concatenate([m for _, m in parts]), image_size)
    rebuilt = np.where(hidden[..., None], recon, original)
    masked = np.where(hidden[..., None], np.uint8(128), original).astype(np.uint8)
    residual = np.abs(rebuilt.astype(np.float32) - original.astype(np.float32)).mean(-1)
    embeddings = embed_pixels(scorer.encoder, original)
    return Views(kept, original, masked, rebuilt, residual, embeddings, hidden)


def typical(views: Views, count: int) -> Views:
    """The clean samples whose scores are closest to the clean sample's median."""
    if not views.picks:
        return views
    scores = np.array([p.score for p in views.picks])
    order = np.argsort(np.abs(scores - np.median(scores)), kind="stable")[:count]
    order = order[np.argsort(-scores[order], kind="stable")]
    return _subset(views, order)


def _subset(views: Views, rows: np.ndarray) -> Views:
    return Views(
        [views.picks[i] for i in rows],
        views.original[rows],
        views.masked[rows],
        views.rebuilt[rows],
        views.residual[rows],
        views.embeddings[rows],
        views.hidden[rows],
    )
