"""Decode sample bytes defensively: every failure becomes a status string, never an exception.

Status strings are part of the manifest contract (users filter on them):
``ok``, ``no_image``, ``several_images``, ``empty_image``, ``not_an_image``, ``decompression_bomb``,
``truncated_image``, ``decode_error``, plus the reading statuses ``member_too_large``,
``special_member``, ``truncated_shard`` and ``duplicate_key`` passed through from ``tario``.
"""

from __future__ import annotations

import codecs
import io
import json
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sanitizer.data.tario import STATUS_OK, Member, Sample, describe, one_line, sha256_hex, split_key
from sanitizer.errors import shortlist

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
TEXT_EXTS = ("txt", "caption", "text")
MAX_CAPTION_CHARS = 10_000
# A json member is parsed for a caption and a label only up to this size: img2dataset's are a few KB,
# and parsing a 190 MB one took 15 s and 1.9 GB, per sample
MAX_JSON_BYTES = 1 << 20

STATUS_NO_IMAGE = "no_image"
STATUS_SEVERAL_IMAGES = "several_images"
STATUS_EMPTY_IMAGE = "empty_image"
STATUS_NOT_AN_IMAGE = "not_an_image"
STATUS_DECOMPRESSION_BOMB = "decompression_bomb"
STATUS_TRUNCATED_IMAGE = "truncated_image"
STATUS_DECODE_ERROR = "decode_error"
DECODE_STATUSES = (
    STATUS_OK,
    STATUS_NO_IMAGE,
    STATUS_SEVERAL_IMAGES,
    STATUS_EMPTY_IMAGE,
    STATUS_NOT_AN_IMAGE,
    STATUS_DECOMPRESSION_BOMB,
    STATUS_TRUNCATED_IMAGE,
    STATUS_DECODE_ERROR,
)

# Only plain raster formats: never let Pillow pick a plugin such as EPS (runs Ghostscript).
# Camera JPEGs that Pillow reports as "MPO" are opened through the JPEG entry.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
# "broken data stream" is corrupt data (bad zlib, bad LZW), not a cut: it stays decode_error.
_TRUNCATION_HINTS = ("truncated", "unexpected end", "end of file")
_OPEN_LOCK = threading.Lock()


@dataclass
class DecodedImage:
    """Pixels ready for the encoder, or the reason there are none."""

    status: str
    error: str | None
    pixels: np.ndarray | None  # (size, size, 3) uint8 RGB
    width: int | None  # original width
    height: int | None  # original height
    sha256: str | None  # of the image member's bytes


def _failed(status: str, error: str | None, **extra: Any) -> DecodedImage:
    fields = {"pixels": None, "width": None, "height": None, "sha256": None, **extra}
    return DecodedImage(status=status, error=one_line(error) if error else error, **fields)


def matching_members(sample: Sample, exts: tuple[str, ...]) -> list[Member]:
    """The sample's members of an extension in ``exts``, else those whose extension's last part is
    one. The fallback accepts WebDataset-style compound extensions such as ``left.png``, and the
    members of a key with dots (``a.b.jpg`` and ``a.b.txt``: key ``a``, extensions ``b.jpg`` and
    ``b.txt``), so that image, caption and json are found by one rule."""
    exact = [m for m in sample.members if split_key(m.name)[1] in exts]
    return exact or [m for m in sample.members if split_key(m.name)[1].rsplit(".", 1)[-1] in exts]


def find_member(sample: Sample, exts: tuple[str, ...]) -> tuple[str, bytes] | None:
    """The first of the sample's ``matching_members``: its caption or json."""
    found = matching_members(sample, exts)
    return (found[0].name, found[0].data) if found else None


def find_image_member(sample: Sample) -> tuple[str, bytes] | None:
    """The sample's image: its one image member (``matching_members``). None where it has none, or
    several: a training pipeline reads whichever its settings name first (open_clip's ``jpg;png``),
    so scoring one would pass the other as clean unscored (``several_images``)."""
    found = matching_members(sample, IMAGE_EXTS)
    return (found[0].name, found[0].data) if len(found) == 1 else None


def image_differs(sample: Sample, status: str, digest: str | None) -> bool:
    """Whether the sample's image member is not the one its manifest row recorded: every row whose
    image bytes were read holds their sha256 (ok rows, and not_an_image, decode_error and the like),
    so a file that now holds another image under the same key is told apart whatever its status was."""
    if status != STATUS_OK and digest is None:
        return False  # no image bytes were read (no_image, empty_image, a cut or link): nothing to compare
    image = find_image_member(sample)
    return image is None or sha256_hex(image[1]) != digest


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha is composited onto black."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode.startswith("I;16"):
            grey = (arr.astype(np.uint16) >> 8).astype(np.uint8)
        elif mode == "I":  # 32-bit int, in practice 16-bit data: keep the top 8 of 16 bits
            grey = (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        else:  # float: 0..1 if it fits there, else 0..255
            arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
            grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def _resize_crop(im: Image.Image, size: int, max_pixels: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then a centre crop, as torchvision Resize+CenterCrop.

    An image far wider than tall (a 1,000,000 x 1 PNG is 3 KB) would be resized to billions of
    pixels first; where that step passes ``max_pixels``, only the cropped box is resampled."""
    w, h = im.size
    if (w, h) != (size, size):
        if w <= h:
            new_w, new_h = size, max(size, int(size * h / w))
        else:
            new_w, new_h = max(size, int(size * w / h)), size
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        if new_w * new_h > max_pixels:
            sx, sy = w / new_w, h / new_h
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            return im.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
        im = im.crop((left, top, left + size, top + size))
    return im


def _draft_size(w: int, h: int, size: int) -> tuple[int, int]:
    """The smallest decode size whose shorter side still covers ``size``."""
    short = min(w, h)
    return -(-w * size // short), -(-h * size // short)


def _classify_load_error(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, OSError | SyntaxError | EOFError) and any(hint in text for hint in _TRUNCATION_HINTS):
        return STATUS_TRUNCATED_IMAGE
    return STATUS_DECODE_ERROR


def _no_image_message(sample: Sample) -> str:
    """Names the extensions the sample has, so that an .avif, .heic or .svg image reads as a format
    left out, not as a sample without any image."""
    exts = ", ".join(dict.fromkeys(repr(split_key(m.name)[1]) for m in sample.members))
    return f"sample has no member with an image extension ({', '.join(IMAGE_EXTS)}); its extensions: {exts}"


def decode_image(sample: Sample, size: int, max_pixels: int = 50_000_000) -> DecodedImage:
    """Decode the sample's image to a ``(size, size, 3)`` uint8 array, or say why not.

    The pixel count in the header is checked against ``max_pixels`` before any pixel is
    decoded. Pillow's own bomb warning (issued when the header is read) is raised as an error only
    inside this call. Safe to call from several threads.
    """
    if sample.status != STATUS_OK:
        return _failed(sample.status, sample.error)
    images = matching_members(sample, IMAGE_EXTS)
    if not images:
        return _failed(STATUS_NO_IMAGE, _no_image_message(sample))
    if len(images) > 1:
        names = shortlist([repr(m.name) for m in images])
        msg = f"sample has {len(images)} image members ({names}): a trainer may read any, so none is scored"
        return _failed(STATUS_SEVERAL_IMAGES, msg)
    name, data = images[0].name, images[0].data
    if not data:
        return _failed(STATUS_EMPTY_IMAGE, f"image member {name!r} has 0 bytes")
    digest = sha256_hex(data)
    return _decode_bytes(data, size, max_pixels, digest)


def _open(data: bytes) -> Image.Image:
    """Image.open with Pillow's bomb warning raised as an error. The warnings filters are process
    state that catch_warnings swaps in and out, so decoding threads take turns here; only the header
    is parsed under the lock, the pixels are decoded outside it in parallel."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=PIL_FORMATS)


def _unidentified(data: bytes, digest: str) -> DecodedImage:
    """Bytes that no supported format opens. Those that start as one does (a PNG whose header is corrupt
    or cut) are that format's reader's finding, which Pillow's open leaves out; the rest are not_an_image."""
    for fmt in PIL_FORMATS:
        factory, accept = Image.OPEN[fmt]
        found = accept(data[:16]) if accept is not None else False
        if not found or isinstance(found, str):
            continue
        try:
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                factory(io.BytesIO(data), None).close()
        except Exception as e:  # noqa: BLE001 - the reader's reason is the row's error
            return _failed(_classify_load_error(e), f"{fmt} header: {describe(e)}", sha256=digest)
        break
    return _failed(
        STATUS_NOT_AN_IMAGE, f"bytes are not a supported image ({', '.join(PIL_FORMATS)})", sha256=digest
    )


def _decode_bytes(data: bytes, size: int, max_pixels: int, digest: str) -> DecodedImage:
    try:
        im = _open(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _failed(STATUS_DECOMPRESSION_BOMB, describe(e), sha256=digest)
    except UnidentifiedImageError:
        return _unidentified(data, digest)
    except Exception as e:  # noqa: BLE001 - any header parsing failure is per-sample
        # a file cut inside its header (a small JPEG cut in half) is as truncated as one cut in its pixels
        return _failed(_classify_load_error(e), describe(e), sha256=digest)
    with im:
        w, h = im.size
        dims = {"width": w, "height": h, "sha256": digest}
        if w <= 0 or h <= 0:
            return _failed(STATUS_DECODE_ERROR, f"image has size {w}x{h}", **dims)
        if w * h > max_pixels:
            msg = f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}"
            return _failed(STATUS_DECOMPRESSION_BOMB, msg, **dims)
        try:
            if im.format in ("JPEG", "MPO") and min(w, h) >= 2 * size:
                im.draft("RGB", _draft_size(w, h, size))
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return _failed(STATUS_DECOMPRESSION_BOMB, describe(e), **dims)
        except Exception as e:  # noqa: BLE001
            return _failed(_classify_load_error(e), describe(e), **dims)
        try:
            out = _resize_crop(_to_rgb(im), size, max_pixels)
            pixels = np.array(out, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001
            return _failed(STATUS_DECODE_ERROR, describe(e), **dims)
    if pixels.shape != (size, size, 3):
        return _failed(STATUS_DECODE_ERROR, f"decoded to shape {pixels.shape}", **dims)
    return DecodedImage(STATUS_OK, None, pixels, w, h, digest)


def _json_object(sample: Sample) -> dict[str, Any] | None:
    found = find_member(sample, ("json",))
    if found is None or not found[1] or len(found[1]) > MAX_JSON_BYTES:
        return None
    data = found[1]
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _caption_text(data: bytes) -> str:
    """A text member's caption: UTF-8 without a leading byte-order mark, or UTF-16 where its BOM says
    so (Windows' "Unicode" text, which read as UTF-8 held a NUL after every letter)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8-sig", errors="replace")


def decode_text(sample: Sample) -> str | None:
    """The caption: a text member, else the json member's "caption"/"text" string field."""
    caption: str | None = None
    text = find_member(sample, TEXT_EXTS)
    if text is not None:
        caption = _caption_text(text[1]).strip()
    else:
        obj = _json_object(sample)
        if obj is not None:
            for field in ("caption", "text"):
                if isinstance(obj.get(field), str):
                    caption = obj[field].strip()
                    break
    return caption[:MAX_CAPTION_CHARS] if caption is not None else None


def decode_label(sample: Sample) -> bool | None:
    """Benchmark ground truth: the json member's boolean "poisoned" field, else None."""
    try:
        obj = _json_object(sample)
    except Exception:  # noqa: BLE001 - a label is optional; never fail a sample over it
        return None
    value = obj.get("poisoned") if obj is not None else None
    return value if isinstance(value, bool) else None
