"""`sanitizer verify`: passes on good runs (local and Ray), names each deliberate tampering exactly."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sanitizer import verify as verify_module
from sanitizer.clean import clean_run
from sanitizer.cli import main
from sanitizer.data.tario import TarWriter, iter_samples
from sanitizer.manifest import read_manifest, write_manifest
from sanitizer.pipeline.job import ScoreJob, run_score_job
from sanitizer.verify import verify_run


def score_and_clean(decoder_dir: Path, data: Path, out: Path, workers: int) -> Path:
    job = ScoreJob(decoder_dir=decoder_dir, data=str(data), out=out, workers=workers)
    summary = run_score_job(job, progress=False)
    assert not summary.failed_shards
    clean_run(out)
    return out


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_decoder_dir, tiny_shards) -> Path:
    return score_and_clean(tiny_decoder_dir, tiny_shards, tmp_path_factory.mktemp("verify") / "run", 0)


@pytest.fixture
def run_copy(good_run, tmp_path) -> Path:
    """A fresh copy of the good run for one test to tamper with."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def first_flagged(run: Path) -> tuple[str, int]:
    """(stem, index) of the first quarantined sample of the run."""
    for path in sorted((run / "manifest").glob("*.parquet")):
        flagged = read_manifest(path).column("flagged").to_pylist()
        if any(flagged):
            return path.stem, flagged.index(True)
    raise AssertionError("the tiny run flagged nothing")


def test_good_local_run_passes(good_run, capsys):
    assert verify_run(good_run) == []
    assert main(["verify", str(good_run)]) == 0
    assert capsys.readouterr().out == f"verify: 0 violations in {good_run}\n"


def test_good_ray_run_passes_and_matches_the_local_one(
    ray_session, tmp_path, good_run, tiny_decoder_dir, tiny_shards
):
    run = score_and_clean(tiny_decoder_dir, tiny_shards, tmp_path / "ray", workers=1)
    assert verify_run(run) == []
    for path in sorted((good_run / "manifest").glob("*.parquet")):
        assert pq.read_table(run / "manifest" / path.name).equals(pq.read_table(path))
    for name in ("clean", "quarantine"):
        for path in sorted((good_run / name).glob("*.tar")):
            assert (run / name / path.name).read_bytes() == path.read_bytes()


def test_a_path_that_holds_no_run_is_a_usage_error(tmp_path, tiny_decoder_dir, capsys):
    """Nothing there, an empty directory, a DECODER_DIR, a file: one error line and exit 2, as clean
    and report give; no violation is counted, there being no run to violate anything."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "nonexistent", tmp_path / "empty", tiny_decoder_dir, tmp_path / "file"):
        assert main(["verify", str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert (
            captured.err
            == f"sanitizer: error: {path} is not a RUN_DIR (no run.json); run `sanitizer score` first\n"
        )


def test_a_run_that_lost_its_run_json_is_a_violation(run_copy, capsys):
    (run_copy / "run.json").unlink()
    assert verify_run(run_copy) == [f"run.json is missing: {run_copy} is not a finished run"]
    assert main(["verify", str(run_copy)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"verify: 1 violation in {run_copy}"


def test_a_shard_named_like_a_temp_file_is_an_output_not_a_leftover(tmp_path, tiny_decoder_dir, tiny_shards):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_shards / "shard-000000.tar", data / "batch.tmp-001.tar")
    run = score_and_clean(tiny_decoder_dir, data, tmp_path / "run", 0)
    assert (run / "clean" / "batch.tmp-001.tar").is_file() and verify_run(run) == []


def test_verify_into_a_closed_pipe_stops_quietly(tmp_path):
    """`sanitizer verify RUN | head -1`: no error line and no traceback, the shell's SIGPIPE status."""
    shards = [{"url": f"/nowhere/s{i}.tar", "stem": f"s{i}"} for i in range(5000)]  # 5000 violations
    (tmp_path / "run.json").write_text(json.dumps({"identity": {"shards": shards}, "state": "complete"}))
    verify = subprocess.Popen(
        [sys.executable, "-m", "sanitizer.cli", "verify", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert verify.stdout.readline().startswith(b"shard s0: has no stats marker")
    verify.stdout.close()
    assert verify.wait(timeout=120) == 141
    assert verify.stderr.read() == b""


def test_a_shard_stem_leaving_run_dir_is_reported_and_never_followed(run_copy):
    info = json.loads((run_copy / "run.json").read_text())
    info["identity"]["shards"][0]["stem"] = "../../outside"
    (run_copy / "run.json").write_text(json.dumps(info))
    violations = verify_run(run_copy)
    assert violations[0] == "run.json: shard stem '../../outside' is not a safe file name"
    assert not (run_copy.parent.parent / "outside_stats.json").exists()


def test_deleted_manifest_row(run_copy):
    path = run_copy / "manifest" / "shard-000001.parquet"
    table = read_manifest(path)
    key = table.column("key")[7].as_py()
    write_manifest(path, pa.concat_tables([table.slice(0, 7), table.slice(8)]))
    assert verify_run(run_copy) == [
        f"shard shard-000001: input sample 7 key {key!r} has no manifest row",
        "shard shard-000001: manifest has 39 rows, the input has 40 samples",
        "shard shard-000001: stats count is 40, the manifest says 39",
        "shard shard-000001: stats ok is 40, the manifest says 39",
        "shard shard-000001: stats status_counts is {'ok': 40}, the manifest says {'ok': 39}",
        "run.json totals.samples is 120, the manifests add up to 119",
        "run.json totals.ok is 120, the manifests add up to 119",
        "run.json totals.status_counts is {'ok': 120}, the manifests add up to {'ok': 119}",
    ]


def point_input_at(run: Path, stem: str, url: str) -> None:
    """Record `url` as the input of shard `stem`, in run.json and in its stats marker, as if the run
    had scored it there."""
    info = json.loads((run / "run.json").read_text())
    info["identity"]["shards"] = [
        {**s, "url": url} if s["stem"] == stem else s for s in info["identity"]["shards"]
    ]
    (run / "run.json").write_text(json.dumps(info))
    marker = run / "stats" / f"{stem}_stats.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "url": url}))


def test_an_input_moved_away_is_one_violation_the_totals_still_add_up(run_copy, tmp_path):
    moved = str(tmp_path / "moved" / "shard-000001.tar")
    point_input_at(run_copy, "shard-000001", moved)
    violations = verify_run(run_copy)
    assert len(violations) == 1, violations
    assert violations[0].startswith(f"shard shard-000001: input {moved!r} cannot be read (cannot open: ")


def test_an_edited_input_stamp_is_one_violation_and_the_input_is_still_checked(run_copy):
    """A stamp of the wrong form tells nothing of the input: it used to read as "changed" and stop
    the shard's checks there, blaming an input that never changed."""
    marker = run_copy / "stats" / "shard-000001_stats.json"
    stats = json.loads(marker.read_text())
    marker.write_text(json.dumps({**stats, "input": {"size": "1", "mtime_ns": 0}}))
    (run_copy / "clean" / "shard-000001.tar").write_bytes(b"")
    violations = verify_run(run_copy)
    assert violations[0] == (
        "shard shard-000001: stats input is {'size': '1', 'mtime_ns': 0}, not {size, mtime_ns} in whole "
        "numbers, or a remote object's size and version as text"
    )
    assert any("clean/shard-000001.tar" in v for v in violations[1:]), violations


def test_an_input_that_changed_since_it_was_scored_is_one_violation(run_copy, tiny_shards, tmp_path):
    """Scored in full, cut short since (or the other way round, as a shard scored while downloading)."""
    changed = tmp_path / "shard-000001.tar"
    changed.write_bytes((tiny_shards / "shard-000001.tar").read_bytes()[:20000])
    point_input_at(run_copy, "shard-000001", str(changed))
    assert verify_run(run_copy) == [
        f"shard shard-000001: input {str(changed)!r} changed since it was scored (its size, mtime or "
        "version is not what its stats marker recorded): run `sanitizer score` again"
    ]


def scored_with_a_failed_shard(tmp_path: Path, decoder_dir: Path, tiny_shards: Path) -> ScoreJob:
    """A run of a good shard a and a shard b that is not a tar, scored and cleaned."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_shards / "shard-000000.tar", data / "a.tar")
    (data / "b.tar").write_bytes(b"not a tar at all" * 64)
    job = ScoreJob(decoder_dir=decoder_dir, data=str(data), out=tmp_path / "run", workers=0, collapse=None)
    assert run_score_job(job, progress=False).failed_shards
    clean_run(job.out)
    return job


def test_a_failed_shard_makes_the_run_incomplete(tmp_path, tiny_decoder_dir, tiny_shards, capsys):
    """A run consistent in every other way but with a shard never scored: verify, used as a gate
    before training, says which and exits 1, as score and clean do for that run."""
    job = scored_with_a_failed_shard(tmp_path, tiny_decoder_dir, tiny_shards)
    assert verify_run(job.out) == []
    assert main(["verify", str(job.out)]) == 1
    assert capsys.readouterr().out == (
        "shard b: never scored (not a readable tar file: ReadError: invalid header): in neither clean/ "
        "nor quarantine/\n"
        f"verify: 0 violations in {job.out}; incomplete: 1 of 2 shards never scored\n"
    )
    info = json.loads((job.out / "run.json").read_text())
    info["failed_shards"][0]["error"] = "cut\x1b[2J\nshort"  # as a terminal would obey it: escaped
    (job.out / "run.json").write_text(json.dumps(info))
    assert main(["verify", str(job.out)]) == 1
    assert "shard b: never scored (cut\\x1b[2J\\nshort): in neither" in capsys.readouterr().out


def test_a_failed_shard_that_reads_now_is_one_violation(tmp_path, tiny_decoder_dir, tiny_shards):
    """Not a tar when scored, replaced by a good one since: verify reads it again and says to score;
    once scored, that clean/ is out of date is said once, not as a tar both missing and holding 40."""
    job = scored_with_a_failed_shard(tmp_path, tiny_decoder_dir, tiny_shards)
    data = tmp_path / "data"
    shutil.copy(tiny_shards / "shard-000001.tar", data / "b.tar")
    assert verify_run(job.out) == [
        "shard b: listed as failed but now reads (40 samples, no manifest rows): run `sanitizer score` again"
    ]
    run_score_job(job, progress=False)
    assert verify_run(job.out) == [
        "shard b: clean/b.tar is missing",
        "shard b: quarantine/b.tar is missing",
        "run.json has no record of clean, but clean/ exists (a `score` re-run since changed the flags, "
        "or a clean did not finish): run `sanitizer clean` again",
    ]
    clean_run(job.out)
    assert verify_run(job.out) == []


def test_renamed_key_is_one_violation_not_a_cascade(run_copy):
    path = run_copy / "manifest" / "shard-000001.parquet"
    table = read_manifest(path)
    key = table.column("key")[7].as_py()
    keys = table.column("key").to_pylist()
    keys[7] = "renamed"
    column = table.schema.get_field_index("key")
    write_manifest(path, table.set_column(column, table.schema.field(column), pa.array(keys)))
    assert verify_run(run_copy) == [
        f"shard shard-000001: input sample 7 key {key!r} but row 7 has key 'renamed'"
    ]


def test_totals_flagged_by_is_checked(run_copy):
    info = json.loads((run_copy / "run.json").read_text())
    truth = info["totals"]["flagged_by"]
    info["totals"]["flagged_by"] = {**truth, "score": 999}
    (run_copy / "run.json").write_text(json.dumps(info))
    assert verify_run(run_copy) == [
        f"run.json totals.flagged_by is {info['totals']['flagged_by']!r}, the manifests add up to {truth!r}"
    ]


def test_an_unreadable_manifest_is_reported_once(run_copy):
    (run_copy / "manifest" / "shard-000001.parquet").write_bytes(b"not parquet")
    violations = verify_run(run_copy)
    assert violations[0].startswith("shard shard-000001: manifest/shard-000001.parquet cannot be read")
    assert not [v for v in violations if "sizes.json" in v]


def test_changed_byte_in_a_clean_member(run_copy):
    path = run_copy / "clean" / "shard-000002.tar"
    with tarfile.open(path) as tar:
        info = [m for m in tar.getmembers() if m.name.endswith(".png")][3]
    data = bytearray(path.read_bytes())
    data[info.offset_data + 100] ^= 0x01
    path.write_bytes(bytes(data))
    key = info.name.rsplit(".", 1)[0]
    index = int(key[-8:])  # synth keys are shard<global index>
    assert verify_run(run_copy) == [
        f"shard shard-000002: clean/shard-000002.tar, sample {index - 80} key {key!r}: "
        f"member {info.name!r} differs from the input (sha256)"
    ]


def test_missing_shard(run_copy):
    (run_copy / "manifest" / "shard-000000.parquet").unlink()
    (run_copy / "stats" / "shard-000000_stats.json").unlink()
    violations = verify_run(run_copy)
    assert violations[0] == (
        "shard shard-000000: has no stats marker and no manifest and is not listed as failed in run.json"
    )
    assert "run.json totals.shards_done is 3, the manifests add up to 2" in violations
    assert "clean/shard-000000.tar: not an output of this run" in violations


def test_sizes_json_off_by_one(run_copy):
    sizes = json.loads((run_copy / "sizes.json").read_text())
    sizes["clean/shard-000001.tar"] += 1
    (run_copy / "sizes.json").write_text(json.dumps(sizes))
    n = sizes["clean/shard-000001.tar"]
    assert verify_run(run_copy) == [
        f"sizes.json: 'clean/shard-000001.tar' is {n}, but that clean tar holds {n - 1} samples"
    ]


def test_flagged_sample_in_clean(run_copy, tiny_shards):
    stem, index = first_flagged(run_copy)
    flagged = read_manifest(run_copy / "manifest" / f"{stem}.parquet").column("flagged").to_pylist()
    samples = list(iter_samples(str(tiny_shards / f"{stem}.tar")))
    with TarWriter(run_copy / "clean" / f"{stem}.tar") as writer:
        for s in samples:
            if not flagged[s.index] or s.index == index:
                writer.write(s)
    bad = samples[index]
    violations = verify_run(run_copy)
    assert violations[0] == (
        f"shard {stem}: clean/{stem}.tar, sample {index + 1} key {samples[index + 1].key!r}: "
        f"member {bad.members[0].name!r} (flagged sample {index}) found where "
        f"{samples[index + 1].members[0].name!r} should be"
    )
    assert len(violations) == 1


def test_symlink_member_in_an_output_tar_is_a_violation(run_copy):
    path = run_copy / "quarantine" / "shard-000000.tar"
    with tarfile.open(path, "a") as tar:
        link = tarfile.TarInfo("escape.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link, io.BytesIO(b""))
    assert verify_run(run_copy) == [
        "shard shard-000000: quarantine/shard-000000.tar: unexpected member 'escape.png' (no manifest row) "
        "after the last sample"
    ]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda t: t.drop_columns(["collapse", "sketch"]), "no column collapse, sketch"),
        (lambda t: t.append_column("note", pa.array(["x"] * t.num_rows)), "extra column note"),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("score"), "score", t.column("score").cast(pa.float64())
            ),
            "column score is double, not float",
        ),
        (
            lambda t: t.replace_schema_metadata({b"schema": b"manifest-v2"}),
            "its metadata says schema 'manifest-v2'",
        ),
    ],
)
def test_a_manifest_of_another_schema_says_how_it_differs(run_copy, change, why):
    """The line said `is not manifest-v4 (schema 'manifest-v4')` whatever differed (a column missing
    or of another type), contradicting itself; it names the difference now."""
    path = sorted((run_copy / "manifest").glob("*.parquet"))[0]
    table = pq.read_table(path)
    changed = change(table)
    pq.write_table(changed.replace_schema_metadata(changed.schema.metadata or table.schema.metadata), path)
    assert f"shard {path.stem}: manifest/{path.name} is not manifest-v4: {why}" in verify_run(run_copy)


@pytest.mark.parametrize("command", ["verify", "clean", "report"])
def test_a_run_a_job_is_using_is_refused_busy(run_copy, capsys, command):
    """verify read a run while a job held its lock (a `score` still writing it): its half-written
    files showed as violations, or a run about to change passed. It is refused as a second job is,
    as clean and report are, with 75 (busy: try again later), not 2 (a usage error): a scheduler
    tells "still running" from "broken". The lock file holds a pid alone, as versions before the
    host was recorded wrote it."""
    import fcntl
    import os

    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    fd = os.open(run_copy / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242", 0)
        assert main([command, str(run_copy)]) == 75
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"sanitizer: error: another sanitizer job (pid 4242) is using {run_copy}\n")
    finally:
        os.close(fd)
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert main(["verify", str(run_copy)]) == 0


@pytest.mark.parametrize("command", ["verify", "clean"])
def test_a_filesystem_without_locks_is_one_line_naming_the_lock_and_exit_2(
    run_copy, capsys, monkeypatch, command
):
    """NFS without its lock service gives ENOLCK: it was `sanitizer: error: No locks available`, exit 1,
    as for a full disk, naming no path, though running it again fails the same way."""
    import errno

    import sanitizer.joblock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(sanitizer.joblock.fcntl, "flock", no_locks)
    assert main([command, str(run_copy)]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: cannot lock {run_copy / '.lock'}: No locks available; a job needs a filesystem "
        "with file locks there (a local disk, NFS with its lock service, Lustre mounted with flock) to keep "
        "two jobs apart\n"
    )


def test_a_job_that_used_the_run_while_verify_read_it_makes_verify_busy(run_copy, capsys, monkeypatch):
    """verify checked the lock as it started only: a scheduled `clean` (or `score`) that ran while an
    hours-long verify read the shards again changed the files under it, and verify printed violations
    of a run that had none, exit 1. It now ends busy, 75, naming that job, with nothing printed."""
    import os
    import socket

    import sanitizer.verify

    check_shards = sanitizer.verify._check_shards

    def a_clean_meanwhile(run, *args):
        clean_run(run.root, "quantile:0.5")  # another threshold: other flags, clean/ and run.json
        return check_shards(run, *args)

    monkeypatch.setattr(sanitizer.verify, "_check_shards", a_clean_meanwhile)
    assert main(["verify", str(run_copy)]) == 75
    out, err = capsys.readouterr()
    holder = f"{os.getpid()} on {socket.gethostname()}"
    assert (out, err) == (
        "",
        f"sanitizer: error: another sanitizer job (pid {holder}) used {run_copy} while "
        "verify read it; run verify again\n",
    )
    monkeypatch.undo()
    assert main(["verify", str(run_copy)]) == 0  # run again, it finds the run as clean left it


def test_a_run_json_that_lost_its_threshold_is_checked_against_the_rows(run_copy):
    """run.json's threshold deleted (or null) after clean: verify passed it, the rows' thresholds
    being compared only with a threshold run.json holds. Each row flagged at one is a violation now."""
    info = json.loads((run_copy / "run.json").read_text())
    del info["threshold"]
    (run_copy / "run.json").write_text(json.dumps(info))
    row = read_manifest(run_copy / "manifest" / "shard-000000.parquet").slice(0, 1).to_pylist()[0]
    violations = verify_run(run_copy)
    assert (
        f"shard shard-000000: row 0 key {row['key']!r}: threshold {row['threshold']} but run.json says None"
        in violations
    )


def test_a_threshold_rule_that_is_not_one_is_a_violation(run_copy):
    info = json.loads((run_copy / "run.json").read_text())
    info["threshold"]["rule"] = "mad:abc"
    (run_copy / "run.json").write_text(json.dumps(info))
    why = "threshold 'mad:abc' is not quantile:Q, mad:K, value:X, paper or a number"
    assert verify_run(run_copy) == [f"run.json: threshold.rule: {why}"]


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (5, "clean is int, not dict"),
        ({"kept": "7", "quarantined": 1, "shards": 2}, "clean.kept is str, not int"),
    ],
)
def test_a_damaged_record_of_clean_is_one_violation(run_copy, capsys, record, why):
    """A record of clean that is not one was not checked (the report crashed on it); it is one
    violation, not also a mismatch with the tars, and `clean` writes a good one over it."""
    info = json.loads((run_copy / "run.json").read_text())
    info["clean"] = record
    (run_copy / "run.json").write_text(json.dumps(info))
    assert verify_run(run_copy) == [f"run.json: {why}"]
    assert main(["clean", str(run_copy)]) == 0
    assert main(["verify", str(run_copy)]) == 0
    assert capsys.readouterr().out.endswith(f"verify: 0 violations in {run_copy}\n")


def test_each_stats_marker_is_read_once(good_run, monkeypatch):
    """For its input stamp and its counts alike: a large run has one marker per shard."""
    reads = Counter()
    read_json = verify_module._read_json

    def counting(path: Path):
        reads[path.relative_to(good_run).as_posix()] += 1
        return read_json(path)

    monkeypatch.setattr(verify_module, "_read_json", counting)
    assert verify_run(good_run) == []
    stats = {name: n for name, n in reads.items() if name.startswith("stats/")}
    assert stats == {f"stats/shard-00000{i}_stats.json": 1 for i in range(3)}


def manifest_v2(path: Path) -> None:
    """The manifest as manifest-v2 wrote it: no thumbnail column, v2 in its metadata."""
    table = pq.read_table(path).drop_columns(["thumbnail"])
    pq.write_table(table.replace_schema_metadata({"schema": "manifest-v2"}), path)


def as_manifest_v2(run: Path) -> None:
    """The run as the version before manifest-v4 wrote it: no thumbnail column, v2 in the metadata
    and in run.json's identity."""
    for path in (run / "manifest").glob("*.parquet"):
        manifest_v2(path)
    info = json.loads((run / "run.json").read_text())
    info["identity"]["manifest"] = "manifest-v2"
    (run / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize("args", [["clean"], ["clean", "--threshold", "mad:3"], ["report"]])
def test_clean_and_report_refuse_a_run_of_another_manifest_version(run_copy, args, capsys):
    """They read a manifest-v2 run as v3, its missing thumbnails as nulls, and `clean --threshold`
    rewrote them so, labelled manifest-v4, which verify then passed. Refused as verify reports it."""
    as_manifest_v2(run_copy)
    before = {p.name: p.read_bytes() for p in (run_copy / "manifest").iterdir()}
    assert main([args[0], str(run_copy), *args[1:]]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: {run_copy} was scored by another version of sanitizer (its manifests are "
        "manifest-v2, this one reads manifest-v4): score its input again into a new --out\n"
    )
    assert {p.name: p.read_bytes() for p in (run_copy / "manifest").iterdir()} == before
    assert not (run_copy / "report").exists()
    assert (
        "shard shard-000000: manifest/shard-000000.parquet is not manifest-v4: its metadata says schema "
        "'manifest-v2'; no column thumbnail" in verify_run(run_copy)
    )


def test_a_run_that_names_no_manifest_version_is_refused(run_copy, capsys):
    """run.json gained identity.manifest with manifest-v2: a run without it is older still."""
    info = json.loads((run_copy / "run.json").read_text())
    del info["identity"]["manifest"]
    (run_copy / "run.json").write_text(json.dumps(info))
    assert main(["clean", str(run_copy)]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: {run_copy} was scored by another version of sanitizer (its run.json names no "
        "manifest version, this one reads manifest-v4): score its input again into a new --out\n"
    )


def test_a_manifest_of_another_schema_in_a_run_of_this_one_cannot_be_read(run_copy, capsys):
    """clean read it in this schema, its missing columns as nulls, and wrote it back so under a new
    threshold; it is a manifest that cannot be read now, as one overwritten is."""
    path = run_copy / "manifest" / "shard-000001.parquet"
    manifest_v2(path)
    before = path.read_bytes()
    assert main(["clean", str(run_copy), "--threshold", "mad:3"]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: cannot read manifest {path} (not manifest-v4: its metadata says schema "
        "'manifest-v2'; no column thumbnail); restore it, or delete its shard's stats/<stem>_stats.json "
        "and re-run score to score that shard again\n"
    )
    assert path.read_bytes() == before
