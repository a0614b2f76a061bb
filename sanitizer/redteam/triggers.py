"""Backdoor triggers in uint8 pixel space: (N, H, W, 3) uint8 in, a new (N, H, W, 3) uint8 array out.

Every trigger is a pure function of the pixels (and a seed where it has randomness), so a benchmark
run, a test and an implant all paste exactly the same trigger. Geometry follows DEDE_METHOD.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Trigger = Callable[[np.ndarray], np.ndarray]

# BT.601 RGB <-> YUV, the colour space CTRL puts its trigger in.
_RGB_TO_YUV = np.array(
    [[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]], np.float64
)
_YUV_TO_RGB = np.linalg.inv(_RGB_TO_YUV)


# The smallest side the triggers are placed on as their papers place them: BadEncoder's square
# scaled down and the CLIP patch's 8 px floor still leave most of the image as it was.
MIN_SIDE = 16


def check_pixels(pixels: np.ndarray) -> None:
    """ValueError unless `pixels` are (N, H, W, 3) uint8 of at least MIN_SIDE px a side: what every
    trigger takes, and so what the implanters train and measure on."""
    if not isinstance(pixels, np.ndarray):  # a list or a torch tensor: no traceback from inside numpy
        raise ValueError(f"expected a numpy array of (N, H, W, 3) uint8 pixels, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    if min(pixels.shape[1:3]) < MIN_SIDE:
        raise ValueError(
            f"images of {pixels.shape[1]}x{pixels.shape[2]} px: the triggers need {MIN_SIDE} px a side"
        )


def badencoder_box(size: int) -> tuple[int, int]:
    """(start, side) of BadEncoder's square: 10 px at 21 for 32 px, 50 px at 173 for 224 px, linear between.

    Both reference placements end one pixel before the image edge; other sizes keep that.
    """
    side = max(1, round(10 + (size - 32) * 40 / 192))
    return size - 1 - side, side


def badencoder_patch(pixels: np.ndarray) -> np.ndarray:
    """BadEncoder's trigger: a white square near the bottom-right corner, pasted by replacement. Each
    side follows its own axis (badencoder_box), so on a non-square image it is a rectangle."""
    check_pixels(pixels)
    out = pixels.copy()
    start_y, side_y = badencoder_box(pixels.shape[1])
    start_x, side_x = badencoder_box(pixels.shape[2])
    out[:, start_y : start_y + side_y, start_x : start_x + side_x] = 255
    return out


def blend_pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """The fixed random pattern of the blended attack, (H, W, 3) uint8, a function of the seed only."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def blend(pixels: np.ndarray, alpha: float = 0.15, seed: int = 0) -> np.ndarray:
    """The classic blended trigger: (1 - alpha) * image + alpha * a fixed random pattern, rounded."""
    check_pixels(pixels)
    if not 0 <= alpha <= 1:  # NaN included
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    pattern = blend_pattern(pixels.shape[1], pixels.shape[2], seed).astype(np.float32)
    mixed = (1 - alpha) * pixels.astype(np.float32) + alpha * pattern
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: X = D @ x @ D.T is the 2-D DCT of an n x n block, x = D.T @ X @ D."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


def ctrl_frequencies(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """CTRL's (15, 15) and (31, 31) for 32 px: a mid and the highest frequency, scaled to the size."""
    return ((height // 2 - 1, width // 2 - 1), (height - 1, width - 1))


def ctrl(pixels: np.ndarray, magnitude: float = 100.0) -> np.ndarray:
    """CTRL's invisible trigger: add `magnitude` at two DCT frequencies of the U and V channels.

    RGB -> YUV, 2-D DCT of the whole image per channel, add, inverse DCT, YUV -> RGB, round and clamp.
    """
    check_pixels(pixels)
    if not np.isfinite(magnitude):
        raise ValueError(f"magnitude must be a finite number, not {magnitude}")
    n, h, w, _ = pixels.shape
    yuv = pixels.astype(np.float64) @ _RGB_TO_YUV.T
    dh, dw = dct_matrix(h), dct_matrix(w)
    bump = np.zeros((h, w))
    for fy, fx in ctrl_frequencies(h, w):
        bump[fy, fx] = magnitude
    spatial = dh.T @ bump @ dw  # the inverse DCT of the added coefficients: the same for every image
    yuv[..., 1] += spatial
    yuv[..., 2] += spatial
    rgb = yuv @ _YUV_TO_RGB.T
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def clip_patch_box(size: int) -> int:
    """Side of the CLIP-backdoor patch: 16-24 px on 224 px images (we use 20), scaled, at least 8 px.

    Scaled linearly, 32 px images would get a 3 px patch: a tenth of one 8 px token of the package's
    tiny ViT (a sixth at 4 px), which the model barely sees, and the attack failed (ASR at chance).
    At 224 px the paper's patch spans one to two 16 px tokens; the 8 px floor keeps it one full token
    of a small-image ViT (8 of 32 px is a bigger share of the image than 20 of 224, but it is still a
    small corner patch).
    """
    return max(8, round(size * 20 / 224))


def clip_patch(pixels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Carlini & Terzis' trigger: a fixed random-noise square pasted at the top-left corner."""
    check_pixels(pixels)
    side_y, side_x = clip_patch_box(pixels.shape[1]), clip_patch_box(pixels.shape[2])
    noise = np.random.default_rng(seed + 1).integers(0, 256, (side_y, side_x, 3), dtype=np.uint8)
    out = pixels.copy()
    out[:, :side_y, :side_x] = noise
    return out


TRIGGERS: dict[str, Trigger] = {
    "badencoder": badencoder_patch,
    "drupe": badencoder_patch,
    "one-axis": badencoder_patch,
    "blend": blend,
    "ctrl": ctrl,
    "clip-backdoor": clip_patch,
}
