"""Shard expansion and stem rules: stems name every output file, so they must be stable."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import lzma
import os
import shutil
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.spec import AbstractFileSystem

from sanitizer.data.shards import (
    ShardRef,
    assign_stems,
    base_stem,
    changed_since,
    expand_shards,
    file_stamp,
    is_file_stamp,
    ranged_count,
)
from sanitizer.errors import SanitizerError, UsageError

SUFFIXES = ".tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .tar.zst, .tar.lz4"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("url", "stem"),
    [
        ("/d/shard-000001.tar", "shard-000001"),
        ("/d/x.tar.gz", "x"),
        ("/d/x.tgz", "x"),
        ("/d/X.TAR", "X"),
        ("/d/a.b.tar", "a.b"),
        ("/d/we ird#name.tar", "we_ird_name"),
        ("/d/ü.tar", "shard"),
        ("/d/.hidden.tar", "hidden"),
        ("/d/..tar", "shard"),
        ("/d/.tar", "shard"),
        ("/d/...x.tar", "x"),
        ("/d/_a.tar", "a"),
        ("/d/-a.tar", "a"),
        ("/d/数据-0001.tar", "0001"),
        ("s3://bucket/p/s-1.tar?versionId=3", "s-1"),
        ("https://host/a/b/c.tar.gz", "c"),
        ("/d/c.tgz", "c"),
        ("/d/b.TGZ", "b"),
        ("/d/e.Tar.Gz", "e"),
        ("/d/f.tar.bz2", "f"),
        ("/d/g.tar.xz", "g"),
        ("/d/h.tar.zst", "h"),
        ("/d/i.TAR.LZ4", "i"),
        ("file:///d/j.tar", "j"),
    ],
)
def test_base_stem_rules(url: str, stem: str) -> None:
    assert base_stem(url) == stem


def test_stem_is_at_most_120_chars_and_file_safe() -> None:
    stem = base_stem("/d/" + "a" * 300 + ".tar")
    assert stem == "a" * 120
    for url in ["/d/../.tar", "/d/..", "/d/.", "/d/a\\b.tar", "/d/x\x00y.tar"]:
        s = base_stem(url)
        assert s not in (".", "..", "")
        assert "/" not in s and "\\" not in s and not s.startswith(".")


def test_pandas_reads_the_manifest_of_every_shard_as_one_table(tmp_path: Path) -> None:
    """README's audit, `pd.read_parquet(RUN_DIR/manifest)`, skips files named `_*` and `.*`: a shard
    named `_a.tar`, `.b.tar` or `ü.tar` had a stem so named, and its rows were silently left out."""
    urls = ["/d/_a.tar", "/d/.b.tar", "/d/ü.tar", "/d/数据-0001.tar", "/d/c.tar"]
    for i, ref in enumerate(assign_stems(urls)):
        pq.write_table(pa.table({"shard": [ref.stem], "index": [i]}), tmp_path / f"{ref.stem}.parquet")
    assert sorted(pd.read_parquet(tmp_path)["index"]) == [0, 1, 2, 3, 4]


def test_colliding_stems_all_get_their_own_hash_whatever_the_order() -> None:
    urls = ["/a/x.tar", "/b/x.tar", "/c/y.tar", "/d/x.tar.gz"]
    refs = assign_stems(urls)
    sha = {u: hashlib.sha1(u.encode()).hexdigest()[:8] for u in urls}
    assert refs == [
        ShardRef("/a/x.tar", f"x-{sha['/a/x.tar']}"),
        ShardRef("/b/x.tar", f"x-{sha['/b/x.tar']}"),
        ShardRef("/c/y.tar", "y"),
        ShardRef("/d/x.tar.gz", f"x-{sha['/d/x.tar.gz']}"),
    ]
    reordered = assign_stems(list(reversed(urls)))
    assert {r.url: r.stem for r in reordered} == {r.url: r.stem for r in refs}
    assert len({r.stem for r in refs}) == len(refs)


def test_stems_that_differ_only_in_case_collide() -> None:
    """On a case-insensitive file system clean/A.tar and clean/a.tar are one file: one shard's outputs
    would overwrite the other's."""
    urls = ["/d/A.tar", "/d/a.tar", "/d/b.tar"]
    sha = {u: hashlib.sha1(u.encode()).hexdigest()[:8] for u in urls}
    assert assign_stems(urls) == [
        ShardRef("/d/A.tar", f"A-{sha['/d/A.tar']}"),
        ShardRef("/d/a.tar", f"a-{sha['/d/a.tar']}"),
        ShardRef("/d/b.tar", "b"),
    ]


def test_long_colliding_stems_stay_within_120_chars() -> None:
    refs = assign_stems(["/a/" + "z" * 200 + ".tar", "/b/" + "z" * 200 + ".tar"])
    assert all(len(r.stem) == 120 for r in refs)
    assert refs[0].stem != refs[1].stem


def test_literal_hash_like_name_cannot_collide() -> None:
    a, b = "/a/x.tar", "/b/x.tar"
    fake = f"/c/x-{hashlib.sha1(a.encode()).hexdigest()[:8]}.tar"
    refs = assign_stems([a, b, fake])
    assert len({r.stem for r in refs}) == 3


def test_brace_pattern(tmp_path: Path) -> None:
    for i in range(3):
        _touch(tmp_path / f"shard-{i:06d}.tar")
    refs = expand_shards(str(tmp_path / "shard-{000000..000002}.tar"))
    assert [r.stem for r in refs] == ["shard-000000", "shard-000001", "shard-000002"]
    assert all(Path(r.url).is_absolute() for r in refs)


def test_brace_pattern_with_a_missing_shard_names_it_and_says_how_to_take_the_others(tmp_path: Path) -> None:
    """img2dataset leaves out the shards that failed: a brace range over its output lacks them. That
    is refused (a mistyped range must not pass), but not as "no shards found", and with the way on."""
    _touch(tmp_path / "s-0.tar")
    with pytest.raises(UsageError) as info:
        expand_shards(str(tmp_path / "s-{0..1}.tar"))
    assert str(info.value) == (
        f"1 of the shards --data names not found (1 found): shard file {str(tmp_path / 's-1.tar')!r} "
        "does not exist; to take only those that exist, give their directory or a glob"
    )


def test_glob_sorted_and_files_only(tmp_path: Path) -> None:
    for name in ["b.tar", "a.tar", "c.tar.gz"]:
        _touch(tmp_path / name)
    (tmp_path / "d.tar").mkdir()
    refs = expand_shards(str(tmp_path / "*.tar*"))
    assert [Path(r.url).name for r in refs] == ["a.tar", "b.tar", "c.tar.gz"]


def test_glob_over_img2dataset_output_leaves_its_side_files_out(tmp_path: Path, caplog) -> None:
    """img2dataset writes NNNNN.parquet and NNNNN_stats.json beside each NNNNN.tar: `data/*` is
    its shards, and the side files are named in one warning instead of failing as shards."""
    for i in range(2):
        for name in [f"{i:05d}.tar", f"{i:05d}.parquet", f"{i:05d}_stats.json"]:
            _touch(tmp_path / name)
    with caplog.at_level("WARNING", logger="sanitizer.data.shards"):
        refs = expand_shards(str(tmp_path / "*"))
    assert [r.stem for r in refs] == ["00000", "00001"]
    assert [r.getMessage() for r in caplog.records] == [
        f"pattern {str(tmp_path / '*')!r} also matches files that are not {SUFFIXES} shards, "
        "left out: 00000.parquet, 00000_stats.json, 00001.parquet (and 1 more)"
    ]
    with pytest.raises(UsageError) as info:
        expand_shards(str(tmp_path / "*.parquet"))
    assert str(info.value) == (
        f"no shards found: pattern {str(tmp_path / '*.parquet')!r} matches no {SUFFIXES} files"
    )


def test_directory_lists_tar_files_sorted(tmp_path: Path) -> None:
    for name in ["b.tgz", "a.tar", "c.tar.gz", "notes.txt", "x.parquet"]:
        _touch(tmp_path / name)
    (tmp_path / "sub.tar").mkdir()
    refs = expand_shards(str(tmp_path))
    assert [Path(r.url).name for r in refs] == ["a.tar", "b.tgz", "c.tar.gz"]
    assert [r.stem for r in refs] == ["a", "b", "c"]


def test_a_directory_or_glob_lists_tars_of_every_compression(tmp_path: Path) -> None:
    """bzip2 and xz tars are read when named, but a directory of them was "no shards found"; zstd and
    LZ4 tars, which fail saying they are not read when named, were left out of a directory unseen."""
    names = ["a.tar", "b.tar.gz", "c.tgz", "d.tar.bz2", "e.tar.xz", "f.tar.zst", "g.TAR.LZ4"]
    for name in [*names, "notes.txt", "h.zst", "i.xz"]:
        _touch(tmp_path / name)
    for spec in [str(tmp_path), str(tmp_path / "*")]:
        refs = expand_shards(spec)
        assert [Path(r.url).name for r in refs] == names
        assert [r.stem for r in refs] == ["a", "b", "c", "d", "e", "f", "g"]


def test_one_shard_however_it_is_named_is_listed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `file://` URL was passed on as a remote one: beside the path of the same file it was a second
    shard, scored and cleaned twice under two hashed stems, and a `file://` directory or glob was not
    listed at all. Every spelling of one file is one shard, named after the file."""
    d = tmp_path / "d"
    shard = _touch(d / "a.tar")
    (d / "link.tar").symlink_to(shard)
    monkeypatch.chdir(d)
    one = [ShardRef(str(shard.resolve()), "a")]
    for spec in [
        f"file://{shard},{shard}",
        "./a.tar,a.tar",
        f"{d},{d}/",
        f"{d}/*.tar,{shard}",
        f"{d}/link.tar,{shard}",
        f"file://{d}/",
        f"file://{d}/*.tar",
    ]:
        assert expand_shards(spec) == one, spec
    with pytest.raises(UsageError) as info:
        expand_shards(f"file://{d}/b.tar")
    assert str(info.value) == f"no shards found: shard file {str(d / 'b.tar')!r} does not exist"


def _zstd(data: bytes) -> bytes:
    """`data` as a zstd frame of raw blocks (what `zstd -d` reads), with no zstd module to hand."""
    blocks = [data[i : i + (128 << 10)] for i in range(0, len(data), 128 << 10)]
    parts = [b"\x28\xb5\x2f\xfd", bytes([0, 7 << 3])]  # magic; no checksum, a 128 KiB window
    for i, block in enumerate(blocks):
        parts += [((len(block) << 3) | (i == len(blocks) - 1)).to_bytes(3, "little"), block]
    return b"".join(parts)


def _members(*tars: Path | bytes) -> list[tuple[str, bytes]]:
    """Every member's name and bytes, of tars given as files or as bytes, sorted."""
    members = []
    for tar in tars:
        with tarfile.open(fileobj=io.BytesIO(tar if isinstance(tar, bytes) else tar.read_bytes())) as t:
            members += [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    return sorted(members)


def test_score_and_clean_a_directory_of_compressed_tars_named_twice(
    tmp_path: Path, tiny_shards: Path, tiny_decoder_dir: Path, capsys
) -> None:
    """A directory of bzip2, xz and zstd tars, and one of them named again as a `file://` URL: the bzip2
    and xz tars are scored once each and cleaned into clean/<stem>.tar, the zstd one fails saying why."""
    from sanitizer.cli import main

    plain = [(tiny_shards / f"shard-00000{i}.tar").read_bytes() for i in range(3)]
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "b.tar.bz2").write_bytes(bz2.compress(plain[0]))
    (data / "x.tar.xz").write_bytes(lzma.compress(plain[1]))
    (data / "z.tar.zst").write_bytes(_zstd(plain[2]))
    spec = f"{data},file://{data}/b.tar.bz2"
    assert (
        main(
            ["score", "--decoder", str(tiny_decoder_dir), "--data", spec, "--out", str(run), "--workers", "0"]
        )
        == 1
    )
    assert (
        "FAILED shard z: compressed with zstd, which is not read (plain, gzip, bzip2 and xz tars are): "
        "decompress it, or compress it with gzip"
    ) in capsys.readouterr().out
    assert [s["stem"] for s in json.loads((run / "run.json").read_text())["identity"]["shards"]] == [
        "b",
        "x",
        "z",
    ]
    assert main(["clean", str(run)]) == 1  # a shard not scored is not cleaned
    assert "skipped shard z: it was not scored (see run.json)" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "clean").glob("*.tar")) == ["b.tar", "x.tar"]
    for stem, tar in [("b", plain[0]), ("x", plain[1])]:
        assert _members(run / "clean" / f"{stem}.tar", run / "quarantine" / f"{stem}.tar") == _members(tar)


def test_comma_list_keeps_order_and_drops_duplicates(tmp_path: Path) -> None:
    for name in ["a.tar", "b.tar", "c.tar"]:
        _touch(tmp_path / name)
    d = tmp_path
    spec = f"{d}/c.tar, {d}/{{a,b}}.tar,{d}/a.tar,{d}/./c.tar"
    refs = expand_shards(spec)
    assert [Path(r.url).name for r in refs] == ["c.tar", "a.tar", "b.tar"]


def test_relative_paths_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path / "data" / "a.tar")
    monkeypatch.chdir(tmp_path)
    (ref,) = expand_shards("data/a.tar")
    assert ref.url == str((tmp_path / "data" / "a.tar").resolve())


def test_remote_urls_pass_through_after_brace_expansion() -> None:
    refs = expand_shards("s3://bucket/train-{0..1}.tar,gs://b/x.tar")
    assert [r.url for r in refs] == [
        "s3://bucket/train-0.tar",
        "s3://bucket/train-1.tar",
        "gs://b/x.tar",
    ]
    assert [r.stem for r in refs] == ["train-0", "train-1", "x"]


def test_nothing_matched_messages(tmp_path: Path) -> None:
    with pytest.raises(
        UsageError,
        match=r"pattern .*nope-\*\.tar.* matches no \.tar, \.tar\.gz, \.tgz, \.tar\.bz2, .* files",
    ):
        expand_shards(str(tmp_path / "nope-*.tar"))
    with pytest.raises(UsageError, match=r"missing\.tar.* does not exist"):
        expand_shards(str(tmp_path / "missing.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"directory .*empty.* contains no"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="no shards given"):
        expand_shards(" , ")
    with pytest.raises(UsageError, match="bad shard pattern"):
        expand_shards(str(tmp_path / "a-{0..1.tar"))


def test_one_missing_part_of_a_list_fails_the_whole_spec(tmp_path: Path) -> None:
    _touch(tmp_path / "a.tar")
    with pytest.raises(UsageError) as info:
        expand_shards(f"{tmp_path}/a.tar,{tmp_path}/b.tar")
    assert "b.tar" in str(info.value) and "a.tar" not in str(info.value).replace("b.tar", "")
    assert isinstance(info.value, SanitizerError)


def test_a_shard_whose_name_is_not_utf8_is_refused_before_any_work(tmp_path, tiny_shards, capsys):
    """run.json and decoder.json record shard paths as text; a name that is not UTF-8 would fail there,
    after the work (train lost a finished decoder this way)."""
    data = tmp_path / "e"
    data.mkdir()
    odd = os.fsdecode(b"\xff\xfe.tar")  # undecodable bytes come back as surrogates
    shutil.copy(tiny_shards / "shard-000000.tar", data / odd)
    with pytest.raises(UsageError, match="has a name that is not UTF-8; rename it"):
        expand_shards(str(data))
    from sanitizer.cli import main

    argv = [
        "score",
        "--decoder",
        str(tmp_path / "d"),
        "--data",
        str(data / odd),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 2
    assert "is not UTF-8; rename the path" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_mistyped_range_is_refused_before_it_is_listed():
    assert ranged_count("s{0..9}-{00..99..10}.tar") == 10 * 10 and ranged_count("{a..c}{1,2}.tar") == 1
    with pytest.raises(UsageError, match=r"names more than 100,000 shards; check its ranges"):
        expand_shards("shards/shard-{000000..99999999}.tar")  # listing it took 25 s and gigabytes


class InfoFileSystem(AbstractFileSystem):
    """`info://NAME`: an object whose info() is `objects[NAME]`, as a real store gives it."""

    protocol = "info"
    objects: ClassVar[dict[str, dict]] = {}

    def info(self, path: str, **kwargs) -> dict:
        return self.objects[self._strip_protocol(path)]


MODIFIED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
STORE_INFO = {  # what each store's info() holds of an object, and the stamp made of it
    "s3fs": (
        {
            "name": "b/s.tar",
            "size": 10,
            "Size": 10,
            "ETag": '"9a0"',
            "LastModified": MODIFIED,
            "VersionId": None,
        },
        {"size": 10, "etag": '"9a0"', "modified": "2026-01-02 03:04:05+00:00"},
    ),
    "gcsfs": (
        {
            "name": "b/s.tar",
            "size": 10,
            "etag": "CJ4=",
            "md5Hash": "XUF==",
            "generation": "1712",
            "updated": "2026-01-02T03:04:05Z",
            "mtime": MODIFIED,
        },
        {"size": 10, "etag": "CJ4=", "md5": "XUF==", "version": "1712", "modified": "2026-01-02T03:04:05Z"},
    ),
    "http, no size": (
        {"name": "h/s.tar", "size": None, "ETag": 'W/"x"', "Last-Modified": "Fri, 02 Jan 2026 03:04:05 GMT"},
        {"etag": 'W/"x"', "modified": "Fri, 02 Jan 2026 03:04:05 GMT"},
    ),
    "nothing": ({"name": "h/s.tar", "size": None, "type": "file"}, None),
}


@pytest.fixture
def info_store() -> type[InfoFileSystem]:
    fsspec.register_implementation("info", InfoFileSystem, clobber=True)
    InfoFileSystem.objects = {}
    return InfoFileSystem


@pytest.mark.parametrize("store", STORE_INFO)
def test_a_remote_stamp_is_the_size_and_version_its_store_gives(info_store, store):
    """A remote input was stamped `null`: nothing told a re-run that it was replaced."""
    info, stamp = STORE_INFO[store]
    info_store.objects = {"s.tar": info}
    assert file_stamp("info://s.tar") == stamp
    assert stamp is None or is_file_stamp(stamp)
    assert file_stamp("info://gone.tar") is None  # no such object: no stamp


def test_a_remote_stamp_differs_in_the_fields_both_stamps_hold(info_store):
    info_store.objects = {"s.tar": {"size": 10, "ETag": '"a"', "VersionId": "v2"}}
    assert not changed_since({"size": 10, "etag": '"a"'}, "info://s.tar")  # a listing gave no version
    assert changed_since({"size": 10, "etag": '"b"'}, "info://s.tar")
    assert changed_since({"size": 11}, "info://s.tar")
    assert not changed_since(None, "info://s.tar")  # a marker of an earlier version tells nothing


@pytest.mark.parametrize(
    "stamp",
    [
        {},
        {"size": "1", "mtime_ns": 0},
        {"size": 1},
        {"etag": 1},
        {"size": 1, "mtime_ns": 2, "etag": "x"},
        {"mtime_ns": 2},
        {"size": 1, "owner": "x"},
        [1, 2],
    ],
)
def test_only_stamps_of_file_stamps_form_are_stamps(stamp):
    assert is_file_stamp(stamp) is (stamp == {"size": 1})
