"""Tar streaming and writing: WebDataset grouping, per-sample failures, byte-identical output."""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import json
import lzma
import os
import random
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from webdataset.tariterators import tar_file_iterator

from sanitizer.atomic import atomic_path, remove_stale_temps, write_json_atomic
from sanitizer.data.decode import find_member
from sanitizer.data.hostile import pickle_payload, write_hostile_corpus
from sanitizer.data.tario import (
    Member,
    Sample,
    ShardError,
    ShardReadError,
    TarWriter,
    iter_samples,
    split_key,
    write_shards,
)
from sanitizer.errors import SanitizerError

from .conftest import RESET, FlakyFile


def _raw_tar(path: Path, members: list[tuple[str, bytes]], *, gz: bool = False) -> Path:
    """A tar written with plain tarfile, independent of TarWriter."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = gzip.compress(buf.getvalue(), mtime=0) if gz else buf.getvalue()
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_hostile_corpus(tmp_path_factory.mktemp("hostile"))


def _keys(url: Path | str) -> list[tuple[str, list[str], str]]:
    return [(s.key, [m.name for m in s.members], s.status) for s in iter_samples(str(url))]


@pytest.mark.parametrize(
    ("name", "key", "ext"),
    [
        ("a/b.seg.png", "a/b", "seg.png"),
        ("x.JPG", "x", "jpg"),
        ("d.1/e.f.TXT", "d.1/e", "f.txt"),
        ("README", "README", ""),
        ("dir/noext", "dir/noext", ""),
        ("../../evil.png", "../../evil", "png"),
        ("a/.hidden", "a/", "hidden"),
    ],
)
def test_split_key(name: str, key: str, ext: str) -> None:
    assert split_key(name) == (key, ext)


def test_grouping_and_index(tmp_path: Path) -> None:
    members = [
        ("a.jpg", b"1"),
        ("a.txt", b"2"),
        ("d/b.seg.png", b"3"),
        ("d/b.PNG", b"4"),
        ("c", b"5"),
    ]
    samples = list(iter_samples(str(_raw_tar(tmp_path / "t.tar", members))))
    assert [(s.key, s.index, s.status, s.error) for s in samples] == [
        ("a", 0, "ok", None),
        ("d/b", 1, "ok", None),
        ("c", 2, "ok", None),
    ]
    assert samples[0].members == [Member("a.jpg", b"1"), Member("a.txt", b"2")]
    assert [split_key(m.name)[1] for m in samples[1].members] == ["seg.png", "png"]
    assert samples[2].members == [Member("c", b"5")]


def test_duplicate_keys_give_separate_samples(tmp_path: Path) -> None:
    members = [
        ("a.png", b"1"),
        ("a.txt", b"t"),
        ("b.png", b"2"),
        ("a.png", b"3"),  # same key again, not adjacent
        ("c.png", b"4"),
        ("c.png", b"5"),  # same key and ext, adjacent
        ("c.txt", b"6"),
    ]
    got = _keys(_raw_tar(tmp_path / "t.tar", members))
    assert got == [
        ("a", ["a.png", "a.txt"], "ok"),
        ("b", ["b.png"], "ok"),
        ("a", ["a.png"], "duplicate_key"),
        ("c", ["c.png"], "ok"),
        ("c", ["c.png", "c.txt"], "duplicate_key"),
    ]
    errors = [s.error for s in iter_samples(str(tmp_path / "t.tar"))]
    assert errors[2] == "key 'a' is sample 0's: only the first sample of a key is kept"
    assert errors[4] == "key 'c' is sample 3's: only the first sample of a key is kept"


def test_a_repeated_key_is_not_copied_so_no_output_tar_merges_two_samples(tmp_path: Path) -> None:
    """`a` (jpg, txt), `b`, `a` (png, json): with `b` removed, both `a` side by side in one tar read
    back as one sample of two images and two captions (and WebDataset's reader agrees). The later
    `a` is not ok, so clean never copies it."""
    members = [("a.jpg", b"1"), ("a.txt", b"t"), ("b.jpg", b"2"), ("a.png", b"3"), ("a.json", b"{}")]
    samples = list(iter_samples(str(_raw_tar(tmp_path / "in.tar", members))))
    assert [s.status for s in samples] == ["ok", "ok", "duplicate_key"]
    with TarWriter(tmp_path / "out.tar") as writer:
        for sample in (s for s in samples if s.key != "b" and s.status == "ok"):
            writer.write(sample)
    assert _keys(tmp_path / "out.tar") == [("a", ["a.jpg", "a.txt"], "ok")]


def test_the_first_member_of_an_extension_wins() -> None:
    s = Sample("k", 0, [Member("k.PNG", b"1"), Member("k.png", b"2")])
    assert find_member(s, ("png",)) == ("k.PNG", b"1")


def test_links_and_devices_mark_their_sample_and_directories_are_passed_over(tmp_path: Path) -> None:
    """A link is never followed (its target may be another sample's member or a file here), and a
    sample holding one is recorded, not dropped: a sample made of a link alone still gets its row."""
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        d = tarfile.TarInfo("a.dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        specials = [("a.lnk", tarfile.SYMTYPE, "/etc/passwd"), ("b.jpg", tarfile.LNKTYPE, "a.png")]
        for name, kind, target in [*specials, ("c.fifo", tarfile.FIFOTYPE, "")]:
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, target
            tar.addfile(link)
            if name == "a.lnk":
                info = tarfile.TarInfo("a.png")
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
    a, b, c = iter_samples(str(path))
    assert (a.key, a.status, a.members) == (
        "a",
        "special_member",
        [Member("a.lnk", b""), Member("a.png", b"x")],
    )
    assert a.error == "member 'a.lnk' is a symbolic link to '/etc/passwd'"
    assert (b.key, b.status, b.error) == ("b", "special_member", "member 'b.jpg' is a hard link to 'a.png'")
    assert (c.key, c.status, c.error) == (
        "c",
        "special_member",
        "member 'c.fifo' is not a file (tar type b'6')",
    )


def test_gzipped_tar(tmp_path: Path) -> None:
    path = _raw_tar(tmp_path / "t.tar.gz", [("a.png", b"1"), ("b.png", b"2")], gz=True)
    assert _keys(path) == [("a", ["a.png"], "ok"), ("b", ["b.png"], "ok")]


def _cut_tar(tmp_path: Path, where: str) -> Path:
    members = [(f"s{i}.{ext}", bytes([i]) * 700) for i in range(3) for ext in ("png", "txt")]
    data = _raw_tar(tmp_path / "full.tar", members).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        info = tar.getmember("s1.txt")
    cut = {
        "mid_member": info.offset_data + 100,
        "mid_header": info.offset + 200,
        "at_header": info.offset,
    }[where]
    path = tmp_path / f"{where}.tar"
    path.write_bytes(data[:cut])
    return path


@pytest.mark.parametrize("where", ["mid_member", "mid_header", "at_header"])
def test_truncated_tar_keeps_earlier_samples_and_marks_the_cut_one(tmp_path: Path, where: str) -> None:
    samples = list(iter_samples(str(_cut_tar(tmp_path, where))))
    assert [(s.key, s.index, s.status) for s in samples] == [
        ("s0", 0, "ok"),
        ("s1", 1, "truncated_shard"),
    ]
    assert samples[0].members == [Member("s0.png", b"\0" * 700), Member("s0.txt", b"\0" * 700)]
    assert samples[1].error and "\n" not in samples[1].error
    assert samples[1].members[0] == Member("s1.png", b"\1" * 700)


THREE_SAMPLES = [(f"s{i}.{ext}", bytes([i]) * 700) for i in range(3) for ext in ("png", "txt")]
ALL_OK = [("s0", "ok", None), ("s1", "ok", None), ("s2", "ok", None)]


def _unclosed_tar(tmp_path: Path, members: list[tuple[str, bytes]], cut: Any, *, gz: bool = False) -> Path:
    """A tar of ``members`` ending where ``cut(last, before)`` of its last two members' TarInfo says,
    before its end-of-archive blocks: a writer killed before it closed the tar, or a stream cut there."""
    data = _raw_tar(tmp_path / "full.tar", members).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        infos = tar.getmembers()
    end = cut(infos[-1], infos[-2] if len(infos) > 1 else None)
    path = tmp_path / ("unclosed.tar.gz" if gz else "unclosed.tar")
    path.write_bytes(gzip.compress(data[:end], mtime=0) if gz else data[:end])
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "gz"])
@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (lambda last, _: last.offset_data + 1024, ALL_OK),  # 700 bytes and their padding: no end blocks
        (lambda last, _: last.offset_data + 1024 + 300, ALL_OK),  # the first end block cut
        (lambda last, _: last.offset_data + 700, ALL_OK),  # no padding after the data
        (lambda last, _: last.offset_data + 800, ALL_OK),  # the padding cut
        (
            lambda last, _: last.offset_data + 699,
            ALL_OK[:2]
            + [
                (
                    "s2",
                    "truncated_shard",
                    "shard cut off inside member 's2.txt': ReadError: unexpected end of data",
                )
            ],
        ),
        (lambda _, before: before.offset + 200, ALL_OK[:2]),  # the header of s2's first member cut
        (
            lambda last, _: last.offset,  # between s2's two members
            ALL_OK[:2]
            + [
                (
                    "s2",
                    "truncated_shard",
                    "shard ends without an end-of-archive marker (cut off?), "
                    "its last sample without the 'txt' members of the one before",
                )
            ],
        ),
    ],
    ids=["no_end_blocks", "end_block_cut", "no_padding", "padding_cut", "data_cut", "header_cut", "between"],
)
def test_a_tar_that_ends_after_whole_members_keeps_every_whole_sample(
    tmp_path: Path, cut: Any, expected: list, gz: bool
) -> None:
    """A tar that ends after whole members, without its end-of-archive blocks (GNU tar and WebDataset
    read every sample of it) or inside the padding after its last data: every whole sample `ok` (the
    last was `truncated_shard`, never copied). A last sample without an extension the one before it
    has (a cut between two of its members), or with a member whose data is cut, is marked."""
    path = _unclosed_tar(tmp_path, THREE_SAMPLES, cut, gz=gz)
    samples = list(iter_samples(str(path)))
    assert [(s.key, s.status, s.error) for s in samples] == expected
    whole = [s for s in samples if s.status == "ok"]
    assert [m for s in whole for m in s.members] == [Member(n, d) for n, d in THREE_SAMPLES[: 2 * len(whole)]]


def test_an_unclosed_tar_of_one_sample_marks_it(tmp_path: Path) -> None:
    """With no sample before it to show which members a sample has, an unclosed tar's only sample may
    lack its later members: it stays `truncated_shard`, saying why."""
    path = _unclosed_tar(tmp_path, THREE_SAMPLES[:2], lambda last, _: last.offset_data + 1024)
    assert [(s.key, s.status, s.error) for s in iter_samples(str(path))] == [
        (
            "s0",
            "truncated_shard",
            "shard ends without an end-of-archive marker (cut off?), after its first sample, "
            "which may lack later members",
        )
    ]


def test_score_and_clean_copy_every_sample_of_a_tar_without_its_end(
    tmp_path: Path, tiny_shards: Path, tiny_decoder_dir: Path
) -> None:
    """A shard whose writer never closed it (no end-of-archive blocks, no padding after its last
    member's data): each of its 40 samples is scored `ok` and copied to clean/ or quarantine/."""
    from sanitizer.cli import main

    full = tiny_shards / "shard-000000.tar"
    with tarfile.open(full) as tar:
        last = tar.getmembers()[-1]
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "unclosed.tar").write_bytes(full.read_bytes()[: last.offset_data + last.size])
    argv = ["score", f"--decoder={tiny_decoder_dir}", f"--data={data}", f"--out={run}", "--workers=0"]
    assert main(argv) == 0
    stats = json.loads((run / "stats" / "unclosed_stats.json").read_text())
    assert (stats["count"], stats["ok"], stats["shard_error"]) == (40, 40, None)
    assert main(["clean", str(run)]) == 0
    copies = [run / "clean" / "unclosed.tar", run / "quarantine" / "unclosed.tar"]
    copied = [m for p in copies if p.exists() for s in iter_samples(str(p)) for m in s.members]
    assert sorted(copied, key=lambda m: m.name) == [m for s in iter_samples(str(full)) for m in s.members]


@pytest.mark.parametrize(("end", "statuses"), [(6244, ["ok", "truncated_shard"]), (11364, ["ok", "ok"])])
def test_a_gzip_stream_cut_short_marks_only_a_sample_it_cuts(
    tmp_path: Path, end: int, statuses: list
) -> None:
    """A `.tar.gz` cut short ends its tar where the deflate stream ends: inside s1's data (at 6144-11144),
    s1 is cut; inside s2's header (at 11264), s1 is whole."""
    members = [(f"s{i}.bin", bytes([i]) * 5000) for i in range(4)]
    stored = gzip.compress(_raw_tar(tmp_path / "t.tar", members).read_bytes(), compresslevel=0, mtime=0)
    cut = stored[: 10 + 5 + end]  # the gzip header, the stored block's header, then the tar's bytes
    assert len(zlib.decompressobj(wbits=31).decompress(cut)) == end
    (tmp_path / "cut.tar.gz").write_bytes(cut)
    assert [(s.key, s.status) for s in iter_samples(str(tmp_path / "cut.tar.gz"))] == list(
        zip(["s0", "s1"], statuses, strict=True)
    )


@pytest.mark.parametrize("after", [b"", b"trailing garbage"])
def test_a_gzip_of_several_members_reads_as_gzip_and_tar_read_it(tmp_path: Path, after: bytes) -> None:
    """bgzip, pgzip and `cat` of gzipped parts write a gzip of several members; tarfile's reader stopped
    after the first: the samples after it had no rows and the shard read as cut off. Bytes after the
    last member are ignored, as gzip ignores trailing garbage."""
    members = [(f"s{i}.{ext}", bytes([i]) * 700) for i in range(3) for ext in ("png", "txt")]
    data = _raw_tar(tmp_path / "t.tar", members).read_bytes()
    cut = 3 * 512  # s0.png's header and data, and s0.txt's header
    path = tmp_path / "multi.tar.gz"
    path.write_bytes(gzip.compress(data[:cut], mtime=0) + gzip.compress(data[cut:], mtime=0) + after)
    samples = list(iter_samples(str(path)))
    assert [(s.key, s.status) for s in samples] == [("s0", "ok"), ("s1", "ok"), ("s2", "ok")]
    assert [m for s in samples for m in s.members] == [Member(n, d) for n, d in members]


def test_hostile_truncated_shard(hostile: dict[str, Path]) -> None:
    paths = hostile
    samples = list(iter_samples(str(paths["truncated"])))
    assert [(s.key, s.status) for s in samples] == [
        ("t0", "ok"),
        ("t1", "ok"),
        ("t2", "truncated_shard"),
    ]
    assert "t2.png" in (samples[2].error or "")


@pytest.mark.parametrize("content", [os.urandom(3000), gzip.compress(b"hello " * 200, mtime=0)])
def test_not_a_tar_raises_shard_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    with pytest.raises(ShardError) as info:
        list(iter_samples(str(path)))
    assert isinstance(info.value, SanitizerError)
    assert info.value.url == str(path) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("magic", "name"), [(b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "LZ4")], ids=["zstd", "lz4"]
)
def test_a_tar_compressed_with_zstd_or_lz4_fails_saying_so(tmp_path: Path, magic: bytes, name: str) -> None:
    """`tar --zstd` and `tar --lz4` write these frames, which tarfile cannot read: the shard fails, as
    before, but saying why, where `not a readable tar file: ReadError: invalid header` read as damage."""
    path = tmp_path / "a.tar.zst"
    path.write_bytes(magic + os.urandom(3000))
    with pytest.raises(ShardError) as info:
        list(iter_samples(str(path)))
    assert info.value.message == (
        f"compressed with {name}, which is not read (plain, gzip, bzip2 and xz tars are): "
        "decompress it, or compress it with gzip"
    )


@pytest.mark.parametrize("compress", [bz2.compress, lzma.compress], ids=["bzip2", "xz"])
def test_bzip2_and_xz_tars_are_read(tmp_path: Path, compress: Any) -> None:
    data = _raw_tar(tmp_path / "t.tar", [("a.png", b"A"), ("a.txt", b"cap")]).read_bytes()
    (tmp_path / "t.tar.c").write_bytes(compress(data))
    assert _keys(tmp_path / "t.tar.c") == [("a", ["a.png", "a.txt"], "ok")]


def _directory_header() -> bytes:
    info = tarfile.TarInfo("images")
    info.type = tarfile.DIRTYPE
    return info.tobuf(tarfile.GNU_FORMAT)


@pytest.mark.parametrize(
    ("after", "problem"),
    [
        (b"", "shard ends without an end-of-archive marker (cut off?)"),
        (
            b"garbage " * 64 + bytes(1024),
            "shard cut off or corrupt at a member header: InvalidHeaderError: invalid header",
        ),
    ],
    ids=["cut", "corrupt"],
)
def test_a_shard_that_stops_before_its_first_sample_fails(tmp_path: Path, after: bytes, problem: str) -> None:
    """Directory entries start no sample: a shard cut or corrupt after them read as an empty shard, all
    its samples lost without a word. It is a failed shard."""
    path = tmp_path / "dir_then_cut.tar"
    path.write_bytes(_directory_header() + after)
    with pytest.raises(ShardError) as info:
        list(iter_samples(str(path)))
    assert info.value.message == f"{problem}, before its first sample"


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (tarfile.DIRTYPE, "ok"),
        (tarfile.SYMTYPE, "special_member"),
        (tarfile.LNKTYPE, "special_member"),
        (tarfile.FIFOTYPE, "special_member"),
    ],
    ids=["dir", "symlink", "hardlink", "fifo"],
)
def test_entries_that_declare_data_are_passed_over_whole(tmp_path: Path, kind: bytes, status: str) -> None:
    """A directory, link or device with a size (and an old tar's regular file named ``old/``, a directory
    too) has that many bytes of data, as GNU tar reads it; read as headers, they cut the shard there."""
    path = tmp_path / "sizes.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, typ, data in [
            ("a.png", tarfile.REGTYPE, b"A" * 10),
            ("a.txt", kind, b"x" * 700),
            ("old/", tarfile.AREGTYPE, b"y" * 600),
            ("b.png", tarfile.REGTYPE, b"B" * 5),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = typ, len(data), "a.png"
            tar.addfile(info, io.BytesIO(data))
    samples = [(s.key, s.status, s.members) for s in iter_samples(str(path))]
    a_members = [Member("a.png", b"A" * 10)] + ([Member("a.txt", b"")] if status != "ok" else [])
    assert samples == [("a", status, a_members), ("b", "ok", [Member("b.png", b"B" * 5)])]


def _gnu_incremental_header(name: str, kind: bytes, data: bytes) -> bytes:
    """A member as GNU tar's incremental archives (`tar -g`) write it: GNU format, with the atime and
    ctime that only GNU headers hold at bytes 345-369, where a POSIX header holds a name prefix."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[345:369] = b"15305253145\0" + b"15305253146\0"
    return _checksummed(header) + _padded(data)


def _checksummed(header: bytearray) -> bytes:
    """A header edited by hand, its checksum made valid again."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def test_a_gnu_header_s_atime_is_not_read_as_a_name_prefix(tmp_path: Path) -> None:
    """tarfile read a GNU header's atime as a POSIX name prefix: `a/k0.png` of an incremental archive
    read (and was copied to clean/) as `15305253145/a/k0.png`. GNU tar reads `a/k0.png`."""
    entries = [("a/k0.png", tarfile.REGTYPE, b"P" * 600), ("a/k0.txt", tarfile.REGTYPE, b"cap")]
    path = tmp_path / "incremental.tar"
    path.write_bytes(b"".join(_gnu_incremental_header(*e) for e in entries) + bytes(1024))
    assert [(s.key, s.status, s.members) for s in iter_samples(str(path))] == [
        ("a/k0", "ok", [Member("a/k0.png", b"P" * 600), Member("a/k0.txt", b"cap")])
    ]


def test_gnu_directory_and_volume_label_entries_are_passed_over(tmp_path: Path) -> None:
    """GNU tar's incremental archives store a directory as a ``D`` entry (its data a list of its files),
    `tar -V` writes a volume label (``V``): GNU tar lists them as such, WebDataset passes them over. They
    were each a sample of their own, `special_member` (`member 'a/' is not a file (tar type b'D')`)."""
    entries = [
        ("label", b"V", b""),
        ("a/", b"D", b"Yk0.png\0Yk0.txt\0\0"),
        ("a/k0.png", tarfile.REGTYPE, b"P" * 600),
        ("a/k0.txt", tarfile.REGTYPE, b"cap"),
    ]
    path = tmp_path / "incremental.tar"
    path.write_bytes(b"".join(_gnu_incremental_header(*e) for e in entries) + bytes(1024))
    assert _keys(path) == [("a/k0", ["a/k0.png", "a/k0.txt"], "ok")]


def test_a_regular_file_named_as_a_directory_is_passed_over(tmp_path: Path) -> None:
    """GNU tar lists a regular file (type ``0``) named ``k0.txt/`` as a directory, WebDataset passes it
    over (its name has no extension): it was a sample of its own (key ``k0.txt/``, then `no_image`)."""
    path = _raw_tar(tmp_path / "t.tar", [("k0.png", b"P" * 10), ("k0.txt/", b"T" * 5), ("k1.png", b"Q")])
    assert _keys(path) == [("k0", ["k0.png"], "ok"), ("k1", ["k1.png"], "ok")]


DIALECT_MEMBERS = [
    ("k0.png", b"P" * 600),
    ("k0.txt", b"cap"),
    ("k1.jpg", b"J" * 513),
    ("k1.txt", b"\xe2\x98\x83"),  # U+2603: _lone_zero_block cuts the zero bytes after the last member
]
LONG_DIR = "d" * 60 + "/" + "e" * 70 + "/"  # member names over 100 characters
USTAR_DIR = "p" * 90 + "/" + "q" * 20 + "/"  # a POSIX header splits these names into a prefix and a name


def _tarfile_tar(fmt: int, prefix: str = "", *, dirs: bool = False, **kwargs: Any) -> bytes:
    """DIALECT_MEMBERS under ``prefix`` as tarfile writes them in ``fmt``: with the directory entries
    of ``prefix``, a PAX global header (``global_pax``: git archive writes one), per-file PAX records
    (``pax``, and the member's ``size``), a ``uid`` and ``gid``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=kwargs.get("global_pax")) as tar:
        parts = prefix.split("/")[:-1] if dirs else []
        for i in range(len(parts)):
            directory = tarfile.TarInfo("/".join(parts[: i + 1]) + "/")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
        for name, data in DIALECT_MEMBERS:
            info = tarfile.TarInfo(prefix + name)
            info.size, info.uid, info.gid = len(data), kwargs.get("uid", 0), kwargs.get("uid", 0)
            if "pax" in kwargs:
                info.pax_headers = {**kwargs["pax"], "size": str(len(data))}
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _edited_headers(data: bytes, edits: dict[tuple[int, int], bytes]) -> bytes:
    """Each member's header with the byte ranges of ``edits`` replaced, its checksum made valid again."""
    out = bytearray(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            at = info.offset_data - tarfile.BLOCKSIZE
            header = bytearray(out[at : at + tarfile.BLOCKSIZE])
            for (start, end), value in edits.items():
                header[start:end] = value
            out[at : at + tarfile.BLOCKSIZE] = _checksummed(header)
    return bytes(out)


def _base256_sizes() -> bytes:
    """GNU headers whose size fields are base-256 numbers, as GNU tar writes sizes of 8 GiB and over."""
    out = []
    for name, data in DIALECT_MEMBERS:
        header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.GNU_FORMAT))
        header[124:136] = b"\x80" + len(data).to_bytes(11, "big")
        out.append(_checksummed(header) + _padded(data))
    return b"".join(out) + bytes(2 * tarfile.BLOCKSIZE)


def _lone_zero_block() -> bytes:
    """The members, then one zero block of the two that end a tar: GNU tar warns (`A lone zero block`)."""
    return _padded(_tarfile_tar(tarfile.GNU_FORMAT).rstrip(b"\0")) + bytes(tarfile.BLOCKSIZE)


ZERO_SIZE = {(124, 136): b"0" * 11 + b"\0"}  # a header's size field, 0
BLANK_FIELDS = {(100, 108): b" " * 8, (108, 116): b" " * 8, (116, 124): bytes(8)}  # mode, uid, gid
NON_ASCII_PAX = {"mtime": "1700000000.25", "uid": "4000000000", "uname": "j\u00fcrgen", "gname": "\u2603"}
TAR_DIALECTS = {
    "ustar": (lambda: _tarfile_tar(tarfile.USTAR_FORMAT), ""),
    "gnu": (lambda: _tarfile_tar(tarfile.GNU_FORMAT), ""),
    "pax": (lambda: _tarfile_tar(tarfile.PAX_FORMAT), ""),
    "ustar_name_prefix": (lambda: _tarfile_tar(tarfile.USTAR_FORMAT, USTAR_DIR), USTAR_DIR),
    "gnu_longname": (lambda: _tarfile_tar(tarfile.GNU_FORMAT, LONG_DIR), LONG_DIR),
    "pax_path": (lambda: _tarfile_tar(tarfile.PAX_FORMAT, LONG_DIR), LONG_DIR),
    "pax_global_header": (lambda: _tarfile_tar(tarfile.PAX_FORMAT, global_pax={"comment": "0" * 40}), ""),
    "pax_records": (  # each member's size in its PAX record alone, as for 8 GiB and over
        lambda: _edited_headers(_tarfile_tar(tarfile.PAX_FORMAT, pax=NON_ASCII_PAX), ZERO_SIZE),
        "",
    ),
    "blank_mode_uid_gid": (lambda: _edited_headers(_tarfile_tar(tarfile.USTAR_FORMAT), BLANK_FIELDS), ""),
    "gnu_base256_uid": (lambda: _tarfile_tar(tarfile.GNU_FORMAT, uid=8**9), ""),
    "gnu_base256_size": (_base256_sizes, ""),
    "dot_slash": (lambda: _tarfile_tar(tarfile.GNU_FORMAT, "./", dirs=True), "./"),
    "directories": (lambda: _tarfile_tar(tarfile.GNU_FORMAT, "a/b/", dirs=True), "a/b/"),
    "no_directory_entries": (lambda: _tarfile_tar(tarfile.GNU_FORMAT, "a/b/"), "a/b/"),
    "lone_zero_block": (_lone_zero_block, ""),
}


@pytest.mark.parametrize("dialect", TAR_DIALECTS)
def test_tar_dialects_read_as_gnu_tar_and_webdataset_read_them(tmp_path: Path, dialect: str) -> None:
    """What users' tools write (checked against `tar -xf` and WebDataset's tariterators): the same
    samples, keys, names and bytes, whatever the format, name encoding or header fields."""
    build, prefix = TAR_DIALECTS[dialect]
    path = tmp_path / f"{dialect}.tar"
    path.write_bytes(build())
    members = [Member(prefix + name, data) for name, data in DIALECT_MEMBERS]
    assert [(s.key, s.status, s.members) for s in iter_samples(str(path))] == [
        (prefix + "k0", "ok", members[:2]),
        (prefix + "k1", "ok", members[2:]),
    ]


def test_a_header_with_a_field_that_is_no_number_is_corrupt(tmp_path: Path) -> None:
    """As WebDataset reads it: a uid `zzzz` in the first header fails the shard (GNU tar reads on)."""
    path = tmp_path / "garbage.tar"
    path.write_bytes(_edited_headers(_tarfile_tar(tarfile.USTAR_FORMAT), {(108, 116): b"zzzz" + bytes(4)}))
    with pytest.raises(ShardError) as info:
        list(iter_samples(str(path)))
    assert info.value.message == "not a readable tar file: ReadError: invalid header"


def test_a_gnu_sparse_member_reads_whole(tmp_path: Path) -> None:
    """A sparse file (GNU ``S``, `tar --sparse`) reads as GNU tar extracts it: its holes as zeros."""
    info = tarfile.TarInfo("k0.npy")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 516  # the bytes stored: 512 of the start, 4 at the end
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:434] = b"%011o\0%011o\0" % (0, 512) + b"%011o\0%011o\0" % (2996, 4)  # the sparse map
    header[483:495] = b"%011o\0" % 3000  # the file's size
    path = tmp_path / "sparse.tar"
    path.write_bytes(_checksummed(header) + _padded(b"h" * 512 + b"tail") + bytes(2 * tarfile.BLOCKSIZE))
    assert _keys(path) == [("k0", ["k0.npy"], "ok")]
    assert next(iter_samples(str(path))).members[0].data == b"h" * 512 + bytes(2484) + b"tail"


@pytest.mark.parametrize("tail", [b"GARBAGE" * 300, b"second tar"], ids=["garbage", "second_tar"])
def test_bytes_after_the_end_of_archive_are_not_read(tmp_path: Path, tail: bytes) -> None:
    """The end-of-archive blocks end the shard, as for tar and WebDataset: what follows them (garbage,
    or a second tar appended with cat) is not read, and the last sample is complete."""
    first = _raw_tar(tmp_path / "first.tar", [("a.png", b"A"), ("a.txt", b"cap")]).read_bytes()
    if tail == b"second tar":
        tail = _raw_tar(tmp_path / "second.tar", [("b.png", b"B")]).read_bytes()
    path = tmp_path / "joined.tar"
    path.write_bytes(first + tail)
    assert _keys(path) == [("a", ["a.png", "a.txt"], "ok")]


def test_missing_file_raises_shard_error(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="cannot open"):
        list(iter_samples(str(tmp_path / "nope.tar")))


def test_empty_tar_and_zero_byte_file_yield_nothing(tmp_path: Path, hostile: dict[str, Path]) -> None:
    assert list(iter_samples(str(_raw_tar(tmp_path / "e.tar", [])))) == []
    (tmp_path / "z.tar").write_bytes(b"")
    assert list(iter_samples(str(tmp_path / "z.tar"))) == []
    paths = hostile
    assert list(iter_samples(str(paths["empty"]))) == []
    assert list(iter_samples(str(paths["zero_bytes"]))) == []


def test_member_too_large_is_not_read(tmp_path: Path) -> None:
    members = [("a.png", b"x" * 5000), ("a.txt", b"small"), ("b.png", b"y" * 10)]
    samples = list(iter_samples(str(_raw_tar(tmp_path / "t.tar", members)), max_member_bytes=1000))
    a, b = samples
    assert a.status == "member_too_large"
    assert "a.png" in (a.error or "") and "5000" in (a.error or "")
    assert a.members == [Member("a.png", b""), Member("a.txt", b"small")]
    assert (b.key, b.status, b.members) == ("b", "ok", [Member("b.png", b"y" * 10)])


def test_pickle_members_are_opaque_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostile: dict[str, Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    paths = hostile
    by_key = {s.key: s for s in iter_samples(str(paths["names"]))}
    assert find_member(by_key["pickled"], ("pyd",))[1] == pickle_payload()
    assert find_member(by_key["pickled"], ("pickle",))[1] == pickle_payload()
    assert not (tmp_path / "PWNED").exists()


def _samples() -> list[Sample]:
    return [
        Sample("a", 0, [Member("a.png", b"\x89PNG..."), Member("a.txt", "héllo".encode())]),
        Sample("caf\udce9", 1, [Member("caf\udce9.png", b"raw")]),
        Sample("k" * 300, 2, [Member("k" * 300 + ".json", b"{}")]),
        Sample("../up", 3, [Member("../up.png", b"")]),
    ]


def test_tar_writer_round_trip_is_byte_identical(tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        with TarWriter(tmp_path / f"run{i}" / "out.tar") as writer:
            for s in _samples():
                writer.write(s)
        assert writer.count == 4
        outs.append((tmp_path / f"run{i}" / "out.tar").read_bytes())
    assert outs[0] == outs[1]
    back = list(iter_samples(str(tmp_path / "run0" / "out.tar")))
    assert [(s.key, s.members) for s in back] == [(s.key, s.members) for s in _samples()]
    raw_names = []
    with tarfile.open(tmp_path / "run0" / "out.tar", encoding="latin-1") as tar:
        for info in tar:
            raw_names.append(info.name.encode("latin-1"))
            assert (info.mtime, info.mode, info.uid, info.gid, info.uname) == (0, 0o644, 0, 0, "")
    assert b"caf\xe9.png" in raw_names  # non-UTF-8 name bytes preserved


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_tar_writer_output_reads_back_in_gnu_tar_and_webdataset(tmp_path: Path) -> None:
    """What clean/ and quarantine/ hold is read by `tar` and WebDataset under the input's exact names
    (over 100 characters, non-UTF-8: GNU ``L`` records of the raw bytes) and with its bytes."""
    long = "d" * 150 + "/caf\udce9"
    samples = [*_samples(), Sample(long, 4, [Member(long + ".png", b"P" * 700), Member(long + ".txt", b"t")])]
    path = tmp_path / "out.tar"
    with TarWriter(path) as writer:
        for sample in samples:
            writer.write(sample)
    members = [m for sample in samples for m in sample.members]
    raw_names = [m.name.encode("utf-8", "surrogateescape") for m in members]
    listed = subprocess.run(  # -P: every name as stored, `../up.png` too
        ["tar", "-P", "--quoting-style=literal", "-tf", str(path)], capture_output=True, check=True
    )
    assert (listed.stdout.splitlines(), listed.stderr) == (raw_names, b"")
    extracted = subprocess.run(["tar", "-P", "-xOf", str(path)], capture_output=True, check=True)
    assert extracted.stdout == b"".join(m.data for m in members)
    with path.open("rb") as f:
        read = [(x["fname"], x["data"]) for x in tar_file_iterator(f)]
    assert read == [(m.name, m.data) for m in members]


def test_tar_writer_copies_hostile_shards_exactly(tmp_path: Path, hostile: dict[str, Path]) -> None:
    paths = hostile
    for name in ("good", "names", "duplicates", "modes"):
        samples = list(iter_samples(str(paths[name])))
        with TarWriter(tmp_path / f"{name}.tar") as writer:
            for s in samples:
                writer.write(s)
        again = list(iter_samples(str(tmp_path / f"{name}.tar")))
        assert [(s.key, s.members) for s in again] == [(s.key, s.members) for s in samples]
        assert (tmp_path / f"{name}.tar").read_bytes() == paths[name].read_bytes()


def test_tar_writer_leaves_no_file_on_exception(tmp_path: Path) -> None:
    final = tmp_path / "out" / "x.tar"
    with pytest.raises(RuntimeError), TarWriter(final) as writer:
        writer.write(_samples()[0])
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_tar_writer_refuses_incomplete_samples(tmp_path: Path) -> None:
    bad = Sample("a", 0, [Member("a.png", b"")], status="member_too_large", error="big")
    with pytest.raises(ValueError, match="incomplete"), TarWriter(tmp_path / "x.tar") as w:
        w.write(bad)
    assert not (tmp_path / "x.tar").exists()


def test_write_shards_splits_and_is_deterministic(tmp_path: Path) -> None:
    records = [{"__key__": f"s{i:03d}", "png": bytes([i]), "txt": f"c{i}"} for i in range(5)]
    paths = write_shards(records, tmp_path / "a", prefix="p", per_shard=2)
    assert [p.name for p in paths] == ["p-000000.tar", "p-000001.tar", "p-000002.tar"]
    again = write_shards(iter(records), tmp_path / "b", prefix="p", per_shard=2)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    got = [s for p in paths for s in iter_samples(str(p))]
    assert [s.key for s in got] == [r["__key__"] for r in records]
    assert got[3].members == [Member("s003.png", b"\3"), Member("s003.txt", b"c3")]
    assert write_shards([], tmp_path / "c") == []


def test_atomic_path_publishes_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "d" / "f.bin"
    with pytest.raises(KeyError), atomic_path(final) as tmp:
        tmp.write_bytes(b"partial")
        assert tmp.parent == final.parent and tmp.name.startswith(".f.bin.tmp-")
        raise KeyError("x")
    assert list(final.parent.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"done")
    assert final.read_bytes() == b"done"
    assert [p.name for p in final.parent.iterdir()] == ["f.bin"]


def test_write_json_atomic_format(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": "é"})
    text = (tmp_path / "a.json").read_bytes().decode("utf-8")
    assert text == '{\n  "a": "é",\n  "b": 1\n}\n'
    assert json.loads(text) == {"a": "é", "b": 1}


def test_remove_stale_temps(tmp_path: Path) -> None:
    (tmp_path / ".x.tar.tmp-123-abcd").write_bytes(b"")
    (tmp_path / ".y.json.tmp-9-ff").write_bytes(b"")
    (tmp_path / "keep.tar").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"")
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "keep.tar"]
    assert remove_stale_temps(tmp_path / "missing") == 0


def test_fsspec_url(tmp_path: Path) -> None:
    path = _raw_tar(tmp_path / "t.tar", [("a.png", b"1")])
    assert _keys(f"file://{path}") == [("a", ["a.png"], "ok")]
    with pytest.raises(ShardError, match="cannot open"):
        list(iter_samples(f"file://{tmp_path}/missing.tar"))


def test_a_tar_writer_stopped_while_it_opens_publishes_nothing(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM as `clean` opens an output: the temp file goes, no empty tar appears under
    the final name (verify then read it as a broken output)."""
    import sanitizer.data.tario as tario

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tario.tarfile, "open", stopped)
    with pytest.raises(KeyboardInterrupt), TarWriter(tmp_path / "out.tar"):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("fail_after", [0, 3000, 6144])
def test_a_read_error_fails_the_shard_where_a_cut_would_mark_it_truncated(tmp_path, flaky, gz, fail_after):
    """A remote read that fails (a reset connection) says nothing of the file's own end: the shard
    fails (a re-run reads it again) instead of ending early as `truncated_shard`, or, before its
    first byte, as an empty shard, both of which count as done."""
    members = [
        (f"s{i}.{ext}", random.Random(f"{i}.{ext}").randbytes(1000))
        for i in range(4)
        for ext in ("png", "txt")
    ]
    path = _raw_tar(tmp_path / ("t.tar.gz" if gz else "t.tar"), members, gz=gz)  # over 6 KB, gzipped too
    assert [s.status for s in iter_samples(f"flaky://{path}")] == ["ok"] * 4
    flaky.broken = {path.name: fail_after}
    with pytest.raises(ShardError) as info:
        list(iter_samples(f"flaky://{path}"))
    assert str(info.value) == f"flaky://{path}: read failed after {fail_after} bytes: {RESET}"


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (TimeoutError("read timed out"), "TimeoutError: read timed out"),
        (OSError(errno.EIO, os.strerror(errno.EIO)), "OSError: [Errno 5] Input/output error"),
        (ValueError("I/O operation on closed file"), "ValueError: I/O operation on closed file"),
    ],
)
def test_any_read_error_of_a_local_file_fails_the_shard(tmp_path, monkeypatch, error, text):
    """A disk's EIO mid-file, as a timeout: the shard fails, never reads as cut off or empty."""
    import sanitizer.data.tario as tario

    path = _raw_tar(tmp_path / "t.tar", [(f"s{i}.png", b"x" * 700) for i in range(4)])
    monkeypatch.setattr(tario, "open", lambda p, mode: FlakyFile(p, 2048, error), raising=False)
    with pytest.raises(ShardError) as info:
        list(iter_samples(str(path)))
    assert info.value.message == f"read failed after 2048 bytes: {text}"


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("served", [0, 3000, 6144])
def test_a_remote_transfer_cut_short_fails_the_shard_where_a_cut_file_would_mark_it_truncated(
    tmp_path, flaky, gz, served
):
    """A server that ends the transfer before the size its store gives read as a tar cut there:
    `truncated_shard`, done, and the rest of the shard lost from clean/ for good. It is a read that
    failed: the shard fails, and a re-run reads it again."""
    members = [
        (f"s{i}.{ext}", random.Random(f"{i}.{ext}").randbytes(1000))
        for i in range(4)
        for ext in ("png", "txt")
    ]
    path = _raw_tar(tmp_path / ("t.tar.gz" if gz else "t.tar"), members, gz=gz)
    flaky.cut = {path.name: served}
    with pytest.raises(ShardReadError) as info:
        list(iter_samples(f"flaky://{path}"))
    size = path.stat().st_size
    assert str(info.value) == f"flaky://{path}: read ended after {served} of its {size} bytes"
