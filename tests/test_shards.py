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


def _hub_cache(root: Path, tars: list[bytes]) -> Path:
    """A Hugging Face hub cache of `tars`: snapshots/rev/data/00000.tar, 00001.tar, ... each a link to
    blobs/<sha256>, a name with no suffix. Returns the data directory."""
    blobs, data = root / "blobs", root / "snapshots" / "rev" / "data"
    blobs.mkdir(parents=True)
    data.mkdir(parents=True)
    for i, tar in enumerate(tars):
        blob = blobs / hashlib.sha256(tar).hexdigest()
        blob.write_bytes(tar)
        (data / f"{i:05d}.tar").symlink_to(os.path.relpath(blob, data))
    return data


def test_shards_reached_through_links_are_named_after_the_links(tmp_path: Path) -> None:
    """A hub cache's shards were named after the blobs their links lead to: clean/<64 hex>.tar. They
    are the files the links lead to, named after the links, however the directory is reached."""
    data = _hub_cache(tmp_path / "hub", [b"0", b"1"])
    (tmp_path / "linked").symlink_to(data, target_is_directory=True)
    want = [ShardRef(str((data / f"{i:05d}.tar").resolve()), f"{i:05d}") for i in range(2)]
    assert [Path(r.url).parent.name for r in want] == ["blobs", "blobs"]
    for spec in [
        str(data),
        f"{data}/*.tar",
        f"{data}/{{00000,00001}}.tar",
        f"{data}/00001.tar,{data}/00000.tar,{data}",
        str(tmp_path / "linked"),
        f"file://{tmp_path}/linked/",
    ]:
        assert sorted(expand_shards(spec), key=lambda r: r.stem) == want, spec


def test_a_file_listed_by_several_names_is_one_shard_named_alike_in_any_order(tmp_path: Path) -> None:
    """A link listed beside its target is the target's shard, named after it as it always was; a file
    reached only through links is named after the smallest of their names, whatever the order of
    --data's parts. Two files whose links share a name get hashes of their own paths."""
    d = tmp_path / "d"
    target = _touch(d / "a.tar")
    (d / "z.tar").symlink_to(target)
    blob = tmp_path / "blobs" / "f00d"
    blob.parent.mkdir()
    blob.write_bytes(b"x")
    for name in ["c.tar", "b.tar"]:
        (d / name).symlink_to(blob)
    parts = [str(d / "z.tar"), str(target), str(d / "c.tar"), str(d / "b.tar")]
    want = {str(target.resolve()): "a", str(blob.resolve()): "b"}
    for spec in [",".join(parts), ",".join(reversed(parts)), str(d), f"{d}/[zcba].tar"]:
        refs = expand_shards(spec)
        assert {r.url: r.stem for r in refs} == want, spec
        assert len(refs) == 2

    one, two = _hub_cache(tmp_path / "one", [b"1"]), _hub_cache(tmp_path / "two", [b"2"])
    urls = [str((data / "00000.tar").resolve()) for data in (one, two)]
    sha = [hashlib.sha1(url.encode()).hexdigest()[:8] for url in urls]
    for spec in [f"{one},{two}", f"{two},{one}"]:
        assert sorted(expand_shards(spec), key=lambda r: r.url) == [
            ShardRef(urls[0], f"00000-{sha[0]}"),
            ShardRef(urls[1], f"00000-{sha[1]}"),
        ]


def _cli(*argv: str | Path) -> int:
    from sanitizer.cli import main

    return main([str(a) for a in argv])


def _digests(run: Path) -> dict[str, str]:
    """Each manifest's and stats marker's sha256, by its path in RUN_DIR."""
    files = [*(run / "manifest").iterdir(), *(run / "stats").iterdir()]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_hub_cache_is_scored_and_cleaned_into_tars_named_after_its_links(
    tmp_path: Path, tiny_shards: Path, tiny_decoder_dir: Path
) -> None:
    """`score --data snapshots/REV/data` wrote manifest/<sha256>.parquet and clean/<sha256>.tar."""
    tars = [(tiny_shards / f"shard-00000{i}.tar").read_bytes() for i in range(3)]
    data, run = _hub_cache(tmp_path / "hub", tars), tmp_path / "run"
    assert _cli("score", "--decoder", tiny_decoder_dir, "--data", data, "--out", run, "--workers", "0") == 0
    assert _cli("clean", run) == 0
    names = ["00000", "00001", "00002"]
    assert sorted(p.name for p in (run / "clean").glob("*.tar")) == [f"{n}.tar" for n in names]
    assert sorted(p.stem for p in (run / "manifest").glob("*.parquet")) == names
    shards = json.loads((run / "run.json").read_text())["identity"]["shards"]
    assert shards == [{"url": str((data / f"{n}.tar").resolve()), "stem": n} for n in names]
    for name, tar in zip(names, tars, strict=True):
        assert _members(run / "clean" / f"{name}.tar", run / "quarantine" / f"{name}.tar") == _members(tar)
    assert _cli("verify", run) == 0


def test_a_run_that_named_linked_shards_after_their_targets_resumes_verifies_and_cleans(
    tmp_path: Path, tiny_shards: Path, tiny_decoder_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version before links named shards recorded a hub cache's shards under their blobs' names.
    The same --data now names them 00000, ...: `score` resumes the run under its recorded stems,
    scoring nothing and leaving its records as they were, and `verify` and `clean` work on it."""
    import sanitizer.data.shards as shards_module

    tars = [(tiny_shards / f"shard-00000{i}.tar").read_bytes() for i in range(3)]
    data, run = _hub_cache(tmp_path / "hub", tars), tmp_path / "run"
    score = ["score", "--decoder", tiny_decoder_dir, "--data", data, "--out", run, "--workers", "0"]
    with monkeypatch.context() as old:  # the old listing: each shard named after its resolved file
        old.setattr(shards_module, "link_names", lambda listed_as: {})
        assert _cli(*score) == 0
    blobs = sorted(str((data / f"0000{i}.tar").resolve()) for i in range(3))
    recorded = json.loads((run / "run.json").read_text())["identity"]["shards"]
    assert sorted(recorded, key=lambda s: s["url"]) == [{"url": b, "stem": Path(b).name} for b in blobs]
    assert {s.stem for s in expand_shards(str(data))} == {"00000", "00001", "00002"}
    kept = _digests(run)

    assert _cli(*score) == 0
    assert json.loads((run / "run.json").read_text())["identity"]["shards"] == recorded
    assert _digests(run) == kept
    assert _cli("verify", run) == 0
    assert _cli("clean", run) == 0
    assert sorted(p.stem for p in (run / "clean").glob("*.tar")) == sorted(Path(b).name for b in blobs)
    assert _cli("verify", run) == 0
    assert _cli(*score) == 0  # and again after clean, which added its split markers
    assert {k: v for k, v in _digests(run).items() if k in kept} == kept


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
