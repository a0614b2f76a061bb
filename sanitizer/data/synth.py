"""Generated image datasets and shards: for the demo, the tests and the benchmarks (no downloads).

The images are smooth colour fields with a few random ellipses and bars: structured enough for a
decoder to learn, cheap to make, and the same bytes for the same seed.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sanitizer.data.tario import write_shards


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 images, deterministic in seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a, b = rng.random(3), rng.random(3)
        angle = rng.random() * np.pi
        t = np.cos(angle) * x + np.sin(angle) * y
        img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
        for _ in range(rng.integers(1, 4)):
            cx, cy, rx, ry = rng.random(4) * [1, 1, 0.4, 0.4] + [0, 0, 0.08, 0.08]
            inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
            img[inside] = rng.random(3)
        out[i] = (img * 255).round().astype(np.uint8)
    return out


def encode_image(pixels: np.ndarray, fmt: str = "png") -> bytes:
    """Deterministic PNG or JPEG (quality 95) bytes of an (H, W, 3) uint8 image."""
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt.lower() in ("jpeg", "jpg") else {"optimize": False}
    Image.fromarray(pixels).save(buf, format="JPEG" if fmt.lower() in ("jpeg", "jpg") else "PNG", **kwargs)
    return buf.getvalue()


def write_image_shards(
    out_dir: Path,
    pixels: np.ndarray,
    keys: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    labels: Sequence[bool] | None = None,
    per_shard: int = 100,
    fmt: str = "png",
    prefix: str = "shard",
) -> list[Path]:
    """WebDataset shards of images, with optional captions (.txt) and ground truth (.json "poisoned")."""
    keys = keys or [f"{prefix}{i:08d}" for i in range(len(pixels))]
    ext = "jpg" if fmt.lower() in ("jpeg", "jpg") else "png"

    def records():
        for i, key in enumerate(keys):
            record = {"__key__": key, ext: encode_image(pixels[i], fmt)}
            if captions is not None:
                record["txt"] = captions[i].encode()
            if labels is not None:
                record["json"] = json.dumps({"poisoned": bool(labels[i])}).encode()
            yield record

    return write_shards(records(), Path(out_dir), prefix=prefix, per_shard=per_shard)
