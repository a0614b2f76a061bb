"""Decoding: every status string exactly, every odd image mode to RGB, nothing unpickled."""

from __future__ import annotations

import hashlib
import io
import json
import pickletools
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sanitizer.data import hostile
from sanitizer.data.decode import (
    DECODE_STATUSES,
    decode_image,
    decode_label,
    decode_text,
)
from sanitizer.data.hostile import (
    SHARD_ERROR_SHARDS,
    expected_statuses,
    pickle_payload,
    write_hostile_corpus,
)
from sanitizer.data.synth import encode_image, synthetic_images
from sanitizer.data.tario import Member, Sample, ShardError, iter_samples

SIZE = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_hostile_corpus(tmp_path_factory.mktemp("hostile"))


def _samples(corpus: dict[str, Path], shard: str) -> dict[str, Sample]:
    return {s.key: s for s in iter_samples(str(corpus[shard]))}


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _one(name: str, data: bytes) -> Sample:
    return Sample(name.split(".")[0], 0, [Member(name, data)])


def test_corpus_matches_its_expectations(corpus: dict[str, Path]) -> None:
    for name, expected in expected_statuses().items():
        if expected is None:
            assert name in SHARD_ERROR_SHARDS
            with pytest.raises(ShardError):
                list(iter_samples(str(corpus[name])))
            continue
        got = [(s.key, decode_image(s, SIZE).status) for s in iter_samples(str(corpus[name]))]
        assert got == expected, name


def test_corpus_is_small_and_deterministic(corpus: dict[str, Path], tmp_path: Path) -> None:
    hostile._specs.cache_clear()  # rebuild every byte from scratch
    again = write_hostile_corpus(tmp_path)
    assert sum(p.stat().st_size for p in corpus.values()) < 2_000_000
    for name, path in corpus.items():
        assert path.read_bytes() == again[name].read_bytes(), name


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        ("html", "not_an_image", "not a supported image"),
        ("truncated_jpeg", "truncated_image", "truncated"),
        ("empty_png", "empty_image", "0 bytes"),
        ("bomb_8k", "decompression_bomb", "8000x8000"),
        ("bomb_10k", "decompression_bomb", "100000000 pixels"),
        ("bomb_20k", "decompression_bomb", "400000000 pixels"),
        ("text_only", "no_image", "no member with an image extension"),
        ("random_jpg", "not_an_image", "not a supported image"),
        ("corrupt_png", "decode_error", "broken data stream"),
        ("wrong_ext", "ok", None),
    ],
)
def test_each_status_string(corpus: dict[str, Path], key: str, status: str, message: str) -> None:
    d = decode_image(_samples(corpus, "hostile")[key], SIZE)
    assert d.status == status
    assert status in DECODE_STATUSES
    if message is None:
        assert d.error is None and d.pixels is not None
    else:
        assert d.pixels is None and d.error and message in d.error
        assert "\n" not in d.error and len(d.error) <= 300


def test_bomb_refused_before_decoding_and_warnings_left_alone(corpus: dict[str, Path]) -> None:
    samples = _samples(corpus, "hostile")
    before = list(warnings.filters)
    d = decode_image(samples["bomb_8k"], SIZE)
    assert (d.width, d.height, d.sha256 is not None) == (8000, 8000, True)
    decode_image(samples["bomb_10k"], SIZE)
    assert list(warnings.filters) == before
    small = decode_image(samples["wrong_ext"], SIZE, max_pixels=100)
    assert small.status == "decompression_bomb" and "max_pixels=100" in (small.error or "")


def test_jpeg_cut_inside_its_header_is_truncated_image() -> None:
    """A small JPEG cut in half ends inside its header: Pillow fails while opening it ("Truncated File
    Read"), and that is as much a truncated image as one cut in its pixels, not a decode_error."""
    jpeg = encode_image(synthetic_images(1, 32, seed=3)[0], "jpeg")
    d = decode_image(Sample("k", 0, [Member("k.jpg", jpeg[: len(jpeg) // 2])]), SIZE)
    assert (d.status, d.error, d.pixels) == ("truncated_image", "OSError: Truncated File Read", None)
    assert d.sha256 is not None


def _png_with_bad_ihdr_checksum() -> bytes:
    png = bytearray(encode_image(synthetic_images(1, 32, seed=3)[0], "png"))
    png[29] ^= 0xFF  # the last byte of IHDR's CRC
    return bytes(png)


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (
            _png_with_bad_ihdr_checksum(),
            "decode_error",
            "PNG header: SyntaxError: broken PNG file (bad header checksum in b'IHDR')",
        ),
        (
            encode_image(synthetic_images(1, 32, seed=3)[0], "png")[:40],
            "decode_error",
            "PNG header: SyntaxError: broken PNG file (chunk b'IDA')",
        ),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            "not_an_image",
            "bytes are not a supported image (JPEG, PNG, WEBP, BMP, GIF, TIFF, PPM)",
        ),
    ],
    ids=["bad_ihdr_checksum", "cut_in_its_header", "svg"],
)
def test_a_supported_format_with_a_broken_header_says_why(data: bytes, status: str, error: str) -> None:
    """Pillow's open says only that it cannot identify bytes whose header its PNG reader refused: such a
    PNG is a broken image, not an HTML page, and its row carries the reader's reason."""
    d = decode_image(Sample("k", 0, [Member("k.png", data)]), SIZE)
    assert (d.status, d.error, d.pixels, d.sha256 is not None) == (status, error, None, True)


@pytest.mark.parametrize(
    ("names", "exts"),
    [
        (["k.avif", "k.txt"], "'avif', 'txt'"),
        (["k.heic"], "'heic'"),
        (["k.svg", "k.json", "k.svg.txt"], "'svg', 'json', 'svg.txt'"),
        (["k"], "''"),
    ],
)
def test_no_image_names_the_extensions_it_has(names: list[str], exts: str) -> None:
    """An AVIF, HEIC or SVG file is an image in a format that is left out: the row says which."""
    d = decode_image(Sample("k", 0, [Member(n, b"bytes") for n in names]), SIZE)
    assert (d.status, d.sha256) == ("no_image", None)
    assert d.error == (
        f"sample has no member with an image extension (jpg, jpeg, png, webp, bmp, gif, tif, tiff, ppm); "
        f"its extensions: {exts}"
    )


@pytest.mark.parametrize(
    ("fmt", "ext", "options"),
    [("GIF", "gif", {}), ("PNG", "png", {}), ("WEBP", "webp", {"lossless": True}), ("TIFF", "tif", {})],
    ids=["gif", "apng", "webp", "tiff_pages"],
)
def test_an_animation_or_multipage_file_is_scored_on_its_first_frame(
    fmt: str, ext: str, options: dict[str, object]
) -> None:
    """Which frame a trigger must be in to be seen: the first (red here; green and blue follow)."""
    frames = [Image.new("RGB", (SIZE, SIZE), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], **options)
    d = decode_image(Sample("k", 0, [Member(f"k.{ext}", buf.getvalue())]), SIZE)
    assert d.status == "ok" and d.pixels is not None
    assert np.unique(d.pixels.reshape(-1, 3), axis=0).tolist() == [[250, 0, 0]]


def test_reading_status_passes_through() -> None:
    s = Sample("k", 0, [Member("k.png", b"")], status="truncated_shard", error="cut")
    d = decode_image(s, SIZE)
    assert (d.status, d.error, d.pixels) == ("truncated_shard", "cut", None)
    s = Sample("k", 0, [Member("k.png", b"")], status="member_too_large", error="big")
    assert decode_image(s, SIZE).status == "member_too_large"


@pytest.mark.parametrize("size", [SIZE, 17])
def test_all_modes_give_rgb_uint8(corpus: dict[str, Path], size: int) -> None:
    samples = _samples(corpus, "modes")
    assert len(samples) == 21
    for key, sample in samples.items():
        d = decode_image(sample, size)
        assert d.status == "ok", (key, d.error)
        assert d.pixels is not None and d.pixels.shape == (size, size, 3), key
        assert d.pixels.dtype == np.uint8, key
        assert d.width and d.height and len(d.sha256 or "") == 64


def test_mode_conversions_keep_the_picture(corpus: dict[str, Path]) -> None:
    samples = _samples(corpus, "modes")
    rgb = decode_image(samples["rgb_png"], SIZE).pixels
    assert np.array_equal(decode_image(samples["cmyk_tiff"], SIZE).pixels, rgb)
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    for key in ("grey16_png", "int32_tiff", "float_tiff", "grey_jpeg", "bilevel_png"):
        got = decode_image(samples[key], SIZE).pixels
        assert (got[..., 0] == got[..., 2]).all(), key
        tolerance = 60 if key == "bilevel_png" else 4
        assert abs(got[..., 0] - luma).mean() < tolerance, key
    assert decode_image(samples["big_jpeg"], SIZE).width == 640  # original size, not draft


def test_alpha_is_composited_on_black() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 4:, 3] = 255
    d = decode_image(_one("a.png", _png(rgba, "RGBA")), 8)
    assert d.status == "ok"
    assert (d.pixels[:, :4] == 0).all() and (d.pixels[:, 4:] == 255).all()


def test_resize_shorter_side_then_center_crop() -> None:
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 200  # the centre third
    d = decode_image(_one("w.png", _png(arr)), 20)
    assert (d.width, d.height) == (60, 20)
    assert (d.pixels[:, 2:-2] == 200).all()


def test_decode_is_deterministic(corpus: dict[str, Path]) -> None:
    for shard in ("good", "modes"):
        for sample in iter_samples(str(corpus[shard])):
            a, b = decode_image(sample, SIZE), decode_image(sample, SIZE)
            assert np.array_equal(a.pixels, b.pixels)
            assert (a.width, a.height, a.sha256) == (b.width, b.height, b.sha256)


def test_captions(corpus: dict[str, Path]) -> None:
    names = _samples(corpus, "names")
    assert decode_text(names["long_caption"]) == ("word " * 4000).strip()[:10_000]
    assert len(decode_text(names["long_caption"]) or "") == 10_000
    assert decode_text(names["latin1_caption"]) == "caf\ufffd cr\ufffdme"
    assert decode_text(names["caf\udce9"]) == "non-UTF-8 member name"
    assert decode_text(names["pickled"]) is None
    good = _samples(corpus, "good")
    assert decode_text(good["good003"]) == "a synthetic gradient photo number 3"


@pytest.mark.parametrize(
    ("members", "caption"),
    [
        ([("k.txt", b"  hi  \n"), ("k.json", b'{"caption": "no"}')], "hi"),
        ([("k.json", b'{"caption": " from json "}')], "from json"),
        ([("k.json", b'{"text": "t"}')], "t"),
        ([("k.json", b'{"caption": 3, "text": "t"}')], "t"),
        ([("k.json", b"[1, 2]")], None),
        ([("k.json", b"{not json")], None),
        ([("k.json", b"\xff\xfe")], None),
        ([("k.caption", b"c")], "c"),
        # A UTF-8 byte-order mark (Windows editors write one) is no part of the caption: str.strip()
        # left it as an invisible first character.
        ([("k.txt", b"\xef\xbb\xbf with a BOM")], "with a BOM"),
        # UTF-16 with its BOM (Windows' "Unicode" text) read as UTF-8 as "\ufffd\ufffdc\x00a\x00f\x00..."
        ([("k.txt", " café ☕ ".encode("utf-16"))], "café ☕"),
        ([("k.txt", b"\xfe\xff" + "café ☕".encode("utf-16-be"))], "café ☕"),
        ([("k.png", b"x")], None),
        # A key with dots: `a.b.jpg` and `a.b.txt` are key `a`'s `b.jpg` and `b.txt`; the caption is
        # found by the rule that finds the image, an exact extension first.
        ([("a.b.jpg", b"x"), ("a.b.txt", b"dots in the key")], "dots in the key"),
        ([("a.b.jpg", b"x"), ("a.b.json", b'{"caption": "json of a dotted key"}')], "json of a dotted key"),
        ([("k.seg.txt", b"compound"), ("k.txt", b"exact")], "exact"),
    ],
)
def test_decode_text_rules(members: list[tuple[str, bytes]], caption: str | None) -> None:
    assert decode_text(Sample("k", 0, [Member(n, d) for n, d in members])) == caption


@pytest.mark.parametrize(
    ("data", "label"),
    [
        (b'{"poisoned": true}', True),
        (b'{"poisoned": false}', False),
        (b'{"poisoned": "yes"}', None),
        (b'{"poisoned": 1}', None),
        (b"{}", None),
        (b"{broken", None),
        (b"[" * 100_000, None),
        (b"", None),
    ],
)
def test_decode_label(data: bytes, label: bool | None) -> None:
    assert decode_label(Sample("k", 0, [Member("k.json", data)])) is label


def test_a_json_member_over_1_mib_is_not_parsed() -> None:
    """A 190 MB json member took 15 s and 1.9 GB to parse for a caption, and as much again for a label:
    per sample, in every decoding thread. One over 1 MiB gives neither; up to that, both."""
    for size, caption, label in ((1 << 20, "c", True), ((1 << 20) + 1, None, None)):
        head = b'{"caption": "c", "poisoned": true, "pad": "'
        data = head + b"x" * (size - len(head) - 2) + b'"}'
        sample = Sample("k", 0, [Member("k.jpg", b"x"), Member("k.json", data)])
        assert len(data) == size and decode_text(sample) == caption and decode_label(sample) is label
    assert decode_label(Sample("k", 0, [Member("k.png", b"")])) is None
    dotted = [Member("a.b.jpg", b"x"), Member("a.b.json", data)]
    assert decode_label(Sample("a", 0, dotted)) is label


def test_good_shard_labels(corpus: dict[str, Path]) -> None:
    labels = {k: decode_label(s) for k, s in _samples(corpus, "good").items()}
    assert [k for k, v in labels.items() if v] == ["good002", "good005"]
    assert sum(v is False for v in labels.values()) == 6


def test_pickles_are_never_loaded(
    corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = {(op.name, arg) for op, arg, _ in pickletools.genops(pickle_payload())}
    assert ("SHORT_BINUNICODE", "PWNED") in ops and ("SHORT_BINUNICODE", "open") in ops
    monkeypatch.chdir(tmp_path)
    for name, path in corpus.items():
        if name in SHARD_ERROR_SHARDS:
            continue
        for sample in iter_samples(str(path)):
            decode_image(sample, SIZE)
            decode_text(sample)
            decode_label(sample)
    names = _samples(corpus, "names")
    assert decode_image(names["pickled"], SIZE).status == "ok"
    assert decode_image(names["pickle_only"], SIZE).status == "no_image"
    assert not (tmp_path / "PWNED").exists()
    assert not Path("PWNED").exists()


_LONG_STRIP = """
import io, json, resource
from PIL import Image
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from sanitizer.data.decode import decode_image
from sanitizer.data.tario import Member, Sample
buf = io.BytesIO()
Image.new("RGB", (1_000_000, 1), (10, 200, 30)).save(buf, "PNG")
d = decode_image(Sample("strip", 0, [Member("strip.png", buf.getvalue())]), 32)
pixels = None if d.pixels is None else [list(d.pixels.shape), d.pixels[0, 0].tolist()]
print(json.dumps([len(buf.getvalue()), d.status, d.error, pixels, d.width, d.height]))
"""


def test_a_long_strip_is_resampled_in_bounded_memory() -> None:
    """A 1,000,000 x 1 PNG (3 KB) is within max_pixels, but resizing its shorter side to 32 px before
    the crop meant a 32,000,000 x 32 image (3 GB): it decodes under a 1 GiB address-space limit."""
    done = subprocess.run([sys.executable, "-c", _LONG_STRIP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    size, *decoded = json.loads(done.stdout)
    assert size < 10_000
    assert decoded == ["ok", None, [[32, 32, 3], [10, 200, 30]], 1_000_000, 1]


def test_png_metadata_inflating_past_pillows_limit_is_a_decode_error() -> None:
    """A 50 MB ICC profile deflates to 50 KB; Pillow refuses to inflate PNG metadata past 1 MB."""
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(buf, "PNG", icc_profile=bytes(50 << 20))
    d = decode_image(Sample("k", 0, [Member("k.png", buf.getvalue())]), SIZE)
    assert len(buf.getvalue()) < 100_000
    assert (d.status, d.error) == (
        "decode_error",
        "ValueError: Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK",
    )


def _sample(*members: tuple[str, bytes]) -> Sample:
    return Sample(members[0][0].split(".")[0], 0, [Member(name, data) for name, data in members])


@pytest.mark.parametrize(
    "names",
    [("k.jpg", "k.png"), ("k.png", "k.jpg"), ("k.jpg", "k.webp"), ("k.left.png", "k.right.png")],
)
def test_a_sample_with_several_image_members_is_not_scored_whatever_their_order(names) -> None:
    """A trainer reads whichever image its settings name first (open_clip's `jpg;png`): scoring one
    would pass the other as clean unscored, so neither is scored, in either order."""
    image = _png(synthetic_images(1, SIZE, seed=3)[0])
    d = decode_image(_sample(*[(name, image) for name in names]), SIZE)
    assert (d.status, d.pixels, d.sha256) == ("several_images", None, None)
    listed = f"{names[0]!r}, {names[1]!r}"
    assert d.error == f"sample has 2 image members ({listed}): a trainer may read any, so none is scored"


def test_an_empty_image_member_beside_a_valid_one_is_several_images_not_empty_image() -> None:
    image = _png(synthetic_images(1, SIZE, seed=3)[0])
    d = decode_image(_sample(("k.jpg", b""), ("k.png", image), ("k.txt", b"a cat")), SIZE)
    assert d.status == "several_images" and d.error.startswith(
        "sample has 2 image members ('k.jpg', 'k.png')"
    )


def test_a_plain_image_extension_is_the_image_beside_compound_ones() -> None:
    """`k.jpg` and `k.seg.png` (a mask): the plain extension is the image, as `jpg;png` reads it."""
    image, mask = (_png(p) for p in synthetic_images(2, SIZE, seed=3))
    d = decode_image(_sample(("k.seg.png", mask), ("k.jpg", image)), SIZE)
    assert d.status == "ok" and d.sha256 == hashlib.sha256(image).hexdigest()
