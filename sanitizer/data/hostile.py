"""A small corpus of hostile shards: every way a scraped shard can go wrong, with expectations.

Used by the tests, the benchmarks and users' own CI::

    paths = write_hostile_corpus(Path("hostile"))
    expected = expected_statuses()   # {shard name: [(key, status), ...] or None}

``None`` means ``iter_samples`` raises ``ShardError`` for that shard. Each ``status`` is what a
manifest row must say: the reading status if not ``ok``, else the ``decode_image`` status.
All bytes are deterministic (fixed seeds, fixed tar metadata).
"""

from __future__ import annotations

import builtins
import functools
import gzip
import io
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from sanitizer.data.tario import Member, Sample, TarWriter, split_key

MemberSpec = tuple[str, bytes]
SampleSpec = tuple[list[MemberSpec], str]  # members, expected status
ShardSpec = list[SampleSpec] | Callable[[], bytes]

SHARD_ERROR_SHARDS = ("not_a_tar_random", "not_a_tar_gzip")
PWNED_FILE = "PWNED"


class _Pwn:
    """Pickling this yields bytes that create ``PWNED`` in the CWD when unpickled."""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (builtins.open, (PWNED_FILE, "w"))


def pickle_payload() -> bytes:
    """A real malicious pickle; only ever written, never loaded."""
    return pickle.dumps(_Pwn(), protocol=4)


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth colour gradient with mild noise: compresses well, looks like an image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], 2)
    noise = rng.integers(-12, 13, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    return _save(Image.fromarray(arr), "PNG")


def _jpeg(arr: np.ndarray, quality: int = 85) -> bytes:
    return _save(Image.fromarray(arr), "JPEG", quality=quality)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` zeros: a few KB that inflate to a huge image."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _corrupt_png(arr: np.ndarray) -> bytes:
    """A structurally valid PNG whose compressed pixel data is garbage (CRCs fixed up)."""
    data = bytearray(_png(arr))
    at = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    payload = bytearray(data[at + 4 : at + 4 + length])
    payload[:2] = b"\x00\x00"  # invalid zlib header
    data[at + 4 : at + 4 + length] = payload
    data[at + 4 + length : at + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + payload) & 0xFFFFFFFF)
    return bytes(data)


def _good_samples() -> list[SampleSpec]:
    """Image-text pairs with a benchmark label; poisoned ones carry a white corner patch."""
    out: list[SampleSpec] = []
    for i in range(8):
        w, h = (48, 40) if i % 2 == 0 else (40, 56)
        arr = _photo(w, h, seed=100 + i)
        poisoned = i in (2, 5)
        if poisoned:
            arr[-8:, -8:] = 255
        image = ("png", _png(arr)) if i % 2 == 0 else ("jpg", _jpeg(arr))
        caption = f"a synthetic gradient photo number {i}"
        meta = f'{{"caption": "{caption}", "poisoned": {str(poisoned).lower()}}}'.encode()
        key = f"good{i:03d}"
        members = [(f"{key}.{image[0]}", image[1]), (f"{key}.txt", caption.encode())]
        out.append((members + [(f"{key}.json", meta)], "ok"))
    return out


def _bad_ihdr_png(arr: np.ndarray) -> bytes:
    """A PNG whose header chunk's checksum is wrong: Pillow's open cannot identify it."""
    data = bytearray(_png(arr))
    data[29] ^= 0xFF  # the last byte of IHDR's CRC
    return bytes(data)


def _hostile_samples() -> list[SampleSpec]:
    """One sample per decode failure, plus the image that is fine despite a wrong extension."""
    arr = _photo(48, 40, seed=7)
    html = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>"
    jpeg = _jpeg(_photo(64, 64, seed=8))
    rng = np.random.default_rng(9)
    return [
        ([("html.jpg", html), ("html.txt", b"an html page saved as jpg")], "not_an_image"),
        ([("truncated_jpeg.jpg", jpeg[: len(jpeg) // 2])], "truncated_image"),
        ([("empty_png.png", b""), ("empty_png.txt", b"zero bytes")], "empty_image"),
        ([("bomb_8k.png", bomb_png(8000, 8000))], "decompression_bomb"),  # > max_pixels only
        ([("bomb_10k.png", bomb_png(10000, 10000))], "decompression_bomb"),  # Pillow warns
        ([("bomb_20k.png", bomb_png(20000, 20000))], "decompression_bomb"),  # Pillow raises
        ([("text_only.txt", b"no image here"), ("text_only.json", b"{}")], "no_image"),
        ([("random_jpg.jpg", rng.bytes(2048))], "not_an_image"),
        ([("corrupt_png.png", _corrupt_png(arr))], "decode_error"),
        ([("wrong_ext.jpg", _png(arr)), ("wrong_ext.txt", b"png bytes in a .jpg")], "ok"),
        ([("bad_ihdr_png.png", _bad_ihdr_png(arr))], "decode_error"),
        ([("avif_image.avif", b"\x00\x00\x00\x1cftypavif" + bytes(64))], "no_image"),
    ]


def _mode_samples() -> list[SampleSpec]:
    """Every Pillow mode a scrape produces; all must decode to (size, size, 3) uint8."""
    arr = _photo(48, 40, seed=11)
    rgb = Image.fromarray(arr)
    grey = np.asarray(rgb.convert("L"))
    rgba = np.concatenate([arr, (np.arange(48)[None, :, None] * 5).repeat(40, 0)], 2)
    frames = [Image.fromarray(_photo(48, 40, seed=20 + i)).convert("P") for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    specs: list[tuple[str, str, bytes]] = [
        ("rgb_png", "png", _png(arr)),
        ("cmyk_jpeg", "jpg", _save(rgb.convert("CMYK"), "JPEG", quality=85)),
        ("cmyk_tiff", "tif", _save(rgb.convert("CMYK"), "TIFF")),
        ("grey16_png", "png", _save(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")),
        ("int32_tiff", "tiff", _save(Image.fromarray(grey.astype(np.int32) * 257), "TIFF")),
        ("float_tiff", "tiff", _save(Image.fromarray(grey.astype(np.float32) / 255), "TIFF")),
        ("rgba_png", "png", _save(Image.fromarray(rgba.astype(np.uint8), "RGBA"), "PNG")),
        ("la_png", "png", _save(Image.fromarray(rgba.astype(np.uint8)).convert("LA"), "PNG")),
        ("palette_png", "png", _save(palette, "PNG")),
        ("palette_transparent_png", "png", _save(palette, "PNG", transparency=0)),
        ("grey_jpeg", "jpeg", _save(Image.fromarray(grey), "JPEG", quality=85)),
        ("bilevel_png", "png", _save(Image.fromarray(grey).convert("1"), "PNG")),
        ("animated_gif", "gif", gif.getvalue()),
        ("lossless_webp", "webp", _save(rgb, "WEBP", lossless=True)),
        ("rgb_bmp", "bmp", _save(rgb, "BMP")),
        ("rgb_ppm", "ppm", _save(rgb, "PPM")),
        ("big_jpeg", "jpg", _jpeg(_photo(640, 480, seed=12), quality=70)),  # JPEG draft path
        ("wide_png", "png", _png(_photo(200, 20, seed=13))),
        ("tall_png", "png", _png(_photo(20, 200, seed=14))),
        ("tiny_png", "png", _png(_photo(3, 2, seed=15))),
        ("long_strip_png", "png", _png(np.full((1, 1_000_000, 3), 128, np.uint8))),  # resized: 32e6 x 32
    ]
    return [([(f"{key}.{ext}", data)], "ok") for key, ext, data in specs]


def _duplicate_samples() -> list[SampleSpec]:
    """A key repeated after another key, and the same key+ext twice in a row: 5 rows, the repeats
    `duplicate_key`."""
    a, b, c = (_png(_photo(32, 32, seed=s)) for s in (30, 31, 32))
    return [
        ([("dup_a.png", a), ("dup_a.txt", b"first a")], "ok"),
        ([("dup_b.png", b)], "ok"),
        ([("dup_a.png", a), ("dup_a.txt", b"second a, same key, not adjacent")], "duplicate_key"),
        ([("dup_c.png", c)], "ok"),
        ([("dup_c.png", c), ("dup_c.txt", b"same key and ext right after")], "duplicate_key"),
    ]


def _name_samples() -> list[SampleSpec]:
    """Odd member names and payloads that must stay opaque bytes."""
    png = _png(_photo(32, 32, seed=40))
    long_key = "k" * 300
    return [
        ([("../../evil.png", png), ("../../evil.txt", b"path traversal")], "ok"),
        ([("/abs/root.png", png)], "ok"),
        ([(f"{long_key}.png", png), (f"{long_key}.txt", b"300-char key")], "ok"),
        ([("caf\udce9.png", png), ("caf\udce9.txt", b"non-UTF-8 member name")], "ok"),
        ([("dir.with.dots/x.left.png", png), ("dir.with.dots/x.txt", b"multi-dot")], "ok"),
        ([("long_caption.png", png), ("long_caption.txt", b"word " * 4000)], "ok"),
        (
            [("latin1_caption.png", png), ("latin1_caption.txt", "café crème".encode("latin-1"))],
            "ok",
        ),
        (
            [
                ("pickled.png", png),
                ("pickled.pyd", pickle_payload()),
                ("pickled.pickle", pickle_payload()),
            ],
            "ok",
        ),
        ([("pickle_only.pickle", pickle_payload())], "no_image"),
        ([("README", b"a member without any dot")], "no_image"),
    ]


def _truncated_tar() -> bytes:
    """A valid 4-sample tar cut in the middle of the third sample's image data."""
    samples = [([(f"t{i}.png", _png(_photo(32, 32, seed=50 + i)))], "ok") for i in range(4)]
    data = _tar_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember("t2.png")
    return data[: info.offset_data + info.size // 2]


def _not_a_tar_random() -> bytes:
    return b"RANDOM" + np.random.default_rng(60).bytes(4090)


def _not_a_tar_gzip() -> bytes:
    text = b"this is a gzip of plain text, not a tar archive\n" * 50
    return gzip.compress(text, compresslevel=9, mtime=0)


def _truncated_expected() -> list[tuple[str, str]]:
    return [("t0", "ok"), ("t1", "ok"), ("t2", "truncated_shard")]


def _links_tar() -> bytes:
    """A shard as `tar` archives deduplicated files: an image stored once, then hard-linked from a
    second sample; and a sample whose only member is a symbolic link out of the archive."""
    png, caption = _png(_photo(32, 32, seed=70)), b"a sample whose image is a link"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, target, data in (
            ("target.png", tarfile.REGTYPE, "", png),
            ("linked.png", tarfile.LNKTYPE, "target.png", b""),
            ("linked.txt", tarfile.REGTYPE, "", caption),
            ("symlink_only.png", tarfile.SYMTYPE, "/etc/passwd", b""),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, target, len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _links_expected() -> list[tuple[str, str]]:
    return [("target", "ok"), ("linked", "special_member"), ("symlink_only", "special_member")]


def _sized_entries_tar() -> bytes:
    """A directory and a symbolic link that declare data, as old or odd writers make them: GNU tar
    skips it; read as headers, it cut the shard."""
    png = _png(_photo(32, 32, seed=71))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in (
            ("sized_a.png", tarfile.REGTYPE, png),
            ("sized_dir", tarfile.DIRTYPE, b"d" * 700),
            ("sized_link.png", tarfile.SYMTYPE, b"l" * 600),
            ("sized_b.png", tarfile.REGTYPE, png),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), "sized_a.png"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sized_entries_expected() -> list[tuple[str, str]]:
    return [("sized_a", "ok"), ("sized_link", "special_member"), ("sized_b", "ok")]


@functools.cache
def _specs() -> dict[str, ShardSpec]:
    """Built once per process; callers must not mutate the result."""
    return {
        "good": _good_samples(),
        "hostile": _hostile_samples(),
        "modes": _mode_samples(),
        "duplicates": _duplicate_samples(),
        "names": _name_samples(),
        "empty": [],
        "zero_bytes": lambda: b"",
        "truncated": _truncated_tar,
        "links": _links_tar,
        "sized_entries": _sized_entries_tar,
        "not_a_tar_random": _not_a_tar_random,
        "not_a_tar_gzip": _not_a_tar_gzip,
    }


_RAW_EXPECTED = {
    "truncated": _truncated_expected,
    "links": _links_expected,
    "sized_entries": _sized_entries_expected,
}  # shards written as raw bytes


def _to_sample(members: list[MemberSpec], index: int) -> Sample:
    key = split_key(members[0][0])[0]
    return Sample(key=key, index=index, members=[Member(n, d) for n, d in members])


def _tar_bytes(samples: list[SampleSpec]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for members, _ in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_hostile_corpus(out_dir: Path) -> dict[str, Path]:
    """Write every hostile shard as ``<name>.tar`` into ``out_dir``; return {name: path}. The expected
    statuses hold for any decode size. The whole corpus is about 0.4 MB.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, spec in _specs().items():
        path = out_dir / f"{name}.tar"
        if callable(spec):
            path.write_bytes(spec())
        else:
            with TarWriter(path) as writer:
                for i, (members, _) in enumerate(spec):
                    writer.write(_to_sample(members, i))
        paths[name] = path
    return paths


def expected_statuses() -> dict[str, list[tuple[str, str]] | None]:
    """{shard name: [(key, status), ...] in file order}; ``None``: the shard raises ShardError."""
    out: dict[str, list[tuple[str, str]] | None] = {}
    for name, spec in _specs().items():
        if name in SHARD_ERROR_SHARDS:
            out[name] = None
        elif name in _RAW_EXPECTED:
            out[name] = _RAW_EXPECTED[name]()
        elif callable(spec):
            out[name] = []
        else:
            out[name] = [(split_key(m[0][0])[0], status) for m, status in spec]
    return out
