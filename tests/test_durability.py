"""What `score` and `clean` make durable, and how many fsyncs that costs: each file is synced before
its rename, each directory once a marking of finished shards (not once a file), a shard's stats marker
only after its manifest's rename is durable, its split marker only after its tars' renames are, a
forgotten shard's markers gone durably before its manifest and tars go, and everything before run.json
records the run as finished.

Linux: an fsync's file is named by /proc/self/fd."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

import sanitizer.clean as clean
import sanitizer.pipeline.collect as collect
from sanitizer.clean import clean_run
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.pipeline.job import ScoreJob, run_score_job
from sanitizer.rundir import RunDir

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds by /proc")

SHARDS = 8

Event = tuple[
    str, Path
]  # ("fsync" | "rename" | "remove", the file or directory; a temp file by its final name)


@pytest.fixture
def small_shards(tmp_path: Path) -> Path:
    """Many shards of few samples: the case where syncing is most of a job's time."""
    data = tmp_path / "data"
    write_image_shards(data, synthetic_images(SHARDS * 3, 32, seed=5), per_shard=3)
    return data


def final_name(path: Path) -> Path:
    """An atomic write's temp file (`.NAME.tmp-PID-HEX`) by the name it is published under."""
    name = path.name
    return path.with_name(name[1:].rsplit(".tmp-", 1)[0]) if ".tmp-" in name else path


def record(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[Event]:
    """Every fsync, rename and removal under `root` from now on, in order."""
    events: list[Event] = []
    fsync, replace, unlink = os.fsync, os.replace, os.unlink

    def noted(kind: str, path: Path) -> None:
        if path.is_relative_to(root):
            events.append((kind, path))

    def recorded_fsync(fd: int) -> None:
        noted("fsync", final_name(Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recorded_replace(src: str | Path, dst: str | Path) -> None:
        replace(src, dst)
        noted("rename", Path(dst).resolve())

    def recorded_unlink(path: str | Path, **kwargs) -> None:
        unlink(path, **kwargs)
        noted("remove", Path(path).resolve())

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    monkeypatch.setattr(os, "unlink", recorded_unlink)
    return events


def renames(events: list[Event]) -> list[tuple[int, Path]]:
    """Each rename's place in `events`, and the file renamed."""
    return [(i, path) for i, (kind, path) in enumerate(events) if kind == "rename"]


def assert_synced_before_renamed(events: list[Event]) -> None:
    """Each file under a final name is complete after a crash of the machine."""
    for i, path in renames(events):
        assert ("fsync", path) in events[:i], f"{path} renamed before its data was synced"


def durable_by(events: list[Event], path: Path, i: int) -> bool:
    """Whether the last rename of `path` before event `i` was made durable (its directory synced)
    before event `i`."""
    published = max(j for j, p in renames(events) if p == path and j < i)
    return ("fsync", path.parent) in events[published:i]


def assert_durable_before_run_json(events: list[Event], run: Path) -> None:
    """Every rename into a directory synced before run.json's last rename records the job as done."""
    finished = max(i for i, path in renames(events) if path == run / "run.json")
    for i, path in renames(events):
        assert ("fsync", path.parent) in events[i:finished] or path == run / "run.json", path


def score(decoder: Path, data: Path, run: Path) -> None:
    run_score_job(ScoreJob(decoder_dir=decoder, data=str(data), out=run, workers=0), progress=False)


def test_a_fresh_score_syncs_each_file_once_a_write_and_each_directory_once_a_marking(
    tmp_path, tiny_decoder_dir, small_shards, monkeypatch
):
    """3 fsyncs a shard (its manifest scored and flagged by the collapse pass, its stats marker), 4
    where the collapse pass changes its counts, and a few a directory whatever the shards: it was 8 a
    shard (each manifest and marker written twice, each file and its directory synced), a third of a
    fresh score's time on 1,500 shards of 4 samples."""
    monkeypatch.setattr(collect, "MARK_EVERY_S", 3600.0)  # the first shards marked at once, then the rest
    run = tmp_path.resolve() / "run"
    events = record(monkeypatch, run)
    score(tiny_decoder_dir, small_shards, run)
    synced = Counter(path for kind, path in events if kind == "fsync")
    stems = sorted(p.stem for p in (run / "manifest").iterdir())
    assert len(stems) == SHARDS
    collapsed = [s for s in stems if RunDir(run).read_stats(s)["flagged_by"]["collapse"]]
    assert 0 < len(collapsed) < SHARDS  # both kinds are counted
    files = Counter({run / "run.json": 2, run: 2})  # run.json written as the job begins and ends
    files.update({RunDir(run).manifest(s): 2 for s in stems} | {RunDir(run).stats(s): 1 for s in stems})
    files.update(RunDir(run).stats(s) for s in collapsed)
    assert {path: synced[path] for path in files} == files
    # the scoring's markings (here the first table's shards, then the rest), and the collapse pass's
    assert synced[run / "manifest"] <= 3 and synced[run / "stats"] <= 3
    assert set(synced) == set(files) | {run / "manifest", run / "stats"}


def test_a_marker_is_published_only_once_its_manifest_is_durable_and_run_json_last(
    tmp_path, tiny_decoder_dir, small_shards, monkeypatch
):
    """What a crash of the machine must not undo: each file synced before its rename (so a file under
    a final name is complete); a shard's stats marker first renamed only after a sync of manifest/
    that followed its manifest's rename (a marker must not outlast its manifest: the shard would be
    done without one; the collapse pass's rewrites need no such order, as a re-run mends a manifest
    or a marker left behind); and every rename into a directory synced before run.json records the
    run as finished."""
    monkeypatch.setattr(collect, "MARK_EVERY_S", 0.0)  # a marking a table: the most interleaving
    run = tmp_path.resolve() / "run"
    events = record(monkeypatch, run)
    score(tiny_decoder_dir, small_shards, run)
    assert_synced_before_renamed(events)
    marked = {}  # each stats marker's first rename
    for i, path in renames(events):
        marked.setdefault(path, i)
    for path, i in marked.items():
        if path.parent.name == "stats":
            manifest = RunDir(run).manifest(path.name.removesuffix("_stats.json"))
            assert durable_by(events, manifest, i), f"{path} outran its manifest"
    assert_durable_before_run_json(events, run)


def test_an_interrupted_score_marks_the_shards_it_finished_before_it_stops(
    tmp_path, tiny_decoder_dir, small_shards, monkeypatch
):
    """Stopped (Ctrl-C) while its finished shards wait for their marking, the job marks them as it
    stops, so the re-run scores only the others."""
    monkeypatch.setattr(collect, "MARK_EVERY_S", 3600.0)
    written, write_manifest = [], collect.write_manifest

    def stopped_at_the_fourth(path: Path, table) -> None:
        if len(written) == 3:
            raise KeyboardInterrupt
        write_manifest(path, table)
        written.append(path.stem)

    monkeypatch.setattr(collect, "write_manifest", stopped_at_the_fourth)
    run = tmp_path / "run"
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(small_shards), out=run, workers=0, batch_size=3)
    with pytest.raises(KeyboardInterrupt):
        run_score_job(job, progress=False)
    assert sorted(p.name for p in (run / "stats").iterdir()) == sorted(f"{s}_stats.json" for s in written)
    monkeypatch.undo()
    summary = run_score_job(job, progress=False)
    assert (summary.shards_done, summary.scored_now) == (SHARDS, (SHARDS - 3) * 3)


def scored(tiny_decoder: Path, data: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A finished run of `data`, and its stems."""
    run = tmp_path.resolve() / "run"
    score(tiny_decoder, data, run)
    return run, sorted(p.stem for p in (run / "manifest").iterdir())


def test_a_fresh_clean_syncs_each_file_once_and_each_directory_once_a_marking(
    tmp_path, tiny_decoder_dir, small_shards, monkeypatch
):
    """3 fsyncs a shard (its clean and quarantine tars, its split marker) and a few a directory
    whatever the shards: it was 6 a shard, each file and its directory."""
    run, stems = scored(tiny_decoder_dir, small_shards, tmp_path)
    monkeypatch.setattr(clean, "MARK_EVERY_S", 3600.0)  # the first shard marked at once, then the rest
    events = record(monkeypatch, run)
    clean_run(run)
    synced = Counter(path for kind, path in events if kind == "fsync")
    r = RunDir(run)
    files = Counter([run / "run.json", r.sizes_json, r.clean_sizes_json])
    files.update(path for s in stems for path in (r.clean(s), r.quarantine(s), r.split_marker(s)))
    assert {path: synced[path] for path in files} == files
    directories = {run, run / "clean", run / "quarantine", run / "stats"}
    assert {d: synced[d] for d in directories} == {
        run: 2,
        run / "clean": 3,
        run / "quarantine": 2,
        run / "stats": 2,
    }
    assert set(synced) == set(files) | directories


def test_a_split_marker_is_written_only_once_its_tars_are_durable_and_run_json_last(
    tmp_path, tiny_decoder_dir, small_shards, monkeypatch
):
    """A split marker must not outlast the tars it describes in a crash of the machine: its shard
    would count as split with another split's tars, or none."""
    run, stems = scored(tiny_decoder_dir, small_shards, tmp_path)
    monkeypatch.setattr(clean, "MARK_EVERY_S", 0.0)  # a marking a shard: the most interleaving
    events = record(monkeypatch, run)
    clean_run(run)
    assert_synced_before_renamed(events)
    r = RunDir(run)
    for i, path in renames(events):
        if path.name.endswith("_clean.json"):
            stem = path.name.removesuffix("_clean.json")
            for tar in (r.clean(stem), r.quarantine(stem)):
                assert durable_by(events, tar, i), f"{path} outran {tar}"
    assert sorted(p.name for p in (run / "stats").glob("*_clean.json")) == [f"{s}_clean.json" for s in stems]
    assert_durable_before_run_json(events, run)


def test_a_forgotten_shards_markers_go_durably_before_its_manifest_and_tars(
    tmp_path, tiny_decoder_dir, small_shards, monkeypatch
):
    """A crash of the machine must not bring back a marker whose manifest is gone: the shard would be
    done without one. Each removal is synced, as the writes are."""
    run, stems = scored(tiny_decoder_dir, small_shards, tmp_path)
    clean_run(run)
    events = record(monkeypatch, run)
    r, stem = RunDir(run), stems[0]
    r.unmark(stem)
    assert events == [
        ("remove", r.stats(stem)),
        ("remove", r.split_marker(stem)),
        ("fsync", run / "stats"),
        ("remove", r.manifest(stem)),
        ("remove", r.clean(stem)),
        ("remove", r.quarantine(stem)),
        ("fsync", run / "clean"),
        ("fsync", run / "manifest"),
        ("fsync", run / "quarantine"),
    ]
