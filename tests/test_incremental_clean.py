"""`sanitizer clean` splits only the shards whose tars no longer hold what a split would write, and
ends with the bytes a clean from scratch writes."""

import json
import os
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pytest

import sanitizer.clean
from sanitizer.cli import main
from sanitizer.manifest import read_manifest, write_manifest
from sanitizer.pipeline.job import ScoreJob, run_score_job
from sanitizer.thresholds import DEFAULT_COLLAPSE_RULE
from sanitizer.verify import verify_run

NAMES = ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar")
OUTPUTS = ("clean", "quarantine")


def score(decoder_dir: Path, data: Path, out: Path, collapse: str | None = None) -> None:
    """Without the collapse pass by default: a grown run's old shards keep their flags."""
    job = ScoreJob(decoder_dir=decoder_dir, data=str(data), out=out, workers=0, collapse=collapse)
    run_score_job(job, progress=False)


def clean(run: Path, capsys, *options: str) -> str:
    """`sanitizer clean`'s summary line (exit 0)."""
    assert main(["clean", str(run), *options]) == 0
    return capsys.readouterr().out.strip()


def stamps(run: Path) -> dict[str, tuple[int, int]]:
    """Each output tar's inode and mtime: what a rewrite changes, identical bytes or not."""
    tars = sorted(p for d in OUTPUTS for p in (run / d).glob("*.tar"))
    return {f"{p.parent.name}/{p.name}": (p.stat().st_ino, p.stat().st_mtime_ns) for p in tars}


def markers(run: Path) -> list[str]:
    """The shards whose split marker is written."""
    return sorted(p.name.removesuffix("_clean.json") for p in (run / "stats").glob("*_clean.json"))


def outputs(run: Path) -> dict[str, bytes]:
    """The bytes clean writes: both tar sets, both sizes.json; and run.json's record of clean."""
    files = sorted(p for d in OUTPUTS for p in (run / d).iterdir()) + [run / "sizes.json"]
    record = json.loads((run / "run.json").read_text())["clean"]
    return {str(p.relative_to(run)): p.read_bytes() for p in files} | {"clean": json.dumps(record).encode()}


def from_scratch(run: Path, tmp_path: Path, capsys) -> dict[str, bytes]:
    """What clean writes into a copy of `run` that holds no clean outputs and no record of them."""
    copy = tmp_path / "scratch"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock", *OUTPUTS, "sizes.json", "*_clean.json"))
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "clean"}))
    assert "3 split, 0 already clean" in clean(copy, capsys)
    return outputs(copy)


def summary(split: int, already: int) -> str:
    return f"(3 shards: {split} split, {already} already clean; threshold"


@pytest.fixture
def grown(request, tmp_path, tiny_decoder_dir, tiny_shards, capsys) -> tuple[Path, Path]:
    """A run cleaned over two shards, then scored again over an input grown by a third (with the
    collapse rule the test names, if any)."""
    data, run, collapse = tmp_path / "data", tmp_path / "run", getattr(request, "param", None)
    data.mkdir()
    for name in NAMES[:2]:
        shutil.copy2(tiny_shards / name, data / name)
    score(tiny_decoder_dir, data, run, collapse)
    assert "(2 shards: 2 split, 0 already clean; threshold" in clean(run, capsys)
    shutil.copy2(tiny_shards / NAMES[2], data / NAMES[2])
    score(tiny_decoder_dir, data, run, collapse)
    return data, run


def test_clean_of_a_grown_run_splits_the_new_shard_alone_and_writes_a_clean_from_scratchs_bytes(
    grown, tmp_path, capsys
):
    """A scheduled job re-read and rewrote every shard of the dataset at each run."""
    _, run = grown
    before = stamps(run)
    assert summary(1, 2) in clean(run, capsys)
    after = stamps(run)
    assert {k: after[k] for k in before} == before  # not rewritten: the same files, untouched
    assert len(after) == 6
    assert verify_run(run) == []
    assert outputs(run) == from_scratch(run, tmp_path, capsys)
    assert summary(0, 3) in clean(run, capsys)  # a finished clean, re-run, rewrites nothing
    assert stamps(run) == after


@pytest.mark.parametrize("grown", [DEFAULT_COLLAPSE_RULE], indirect=True)
def test_a_grown_run_that_the_collapse_pass_reflagged_is_cleaned_as_from_scratch(grown, tmp_path, capsys):
    _, run = grown
    assert "(3 shards: " in clean(run, capsys)
    assert verify_run(run) == []
    assert outputs(run) == from_scratch(run, tmp_path, capsys)


def edit_a_tar(run: Path, data: Path) -> None:
    """A byte of a clean tar changed in place: same size, another mtime."""
    tar = run / "clean" / "shard-000001.tar"
    raw = bytearray(tar.read_bytes())
    raw[600] ^= 1
    tar.write_bytes(bytes(raw))


def drop_the_markers(run: Path, data: Path) -> None:
    """The run as a clean of an earlier version left it: a record of clean and no split markers."""
    for marker in (run / "stats").glob("*_clean.json"):
        marker.unlink()


def edit_markers(run: Path, edit: dict) -> None:
    for marker in (run / "stats").glob("*_clean.json"):
        marker.write_text(json.dumps({**json.loads(marker.read_text()), **edit}))


def of_another_version(run: Path, data: Path) -> None:
    edit_markers(run, {"sanitizer": "0.0.1"})


def damage_a_marker(run: Path, data: Path) -> None:
    (run / "stats" / "shard-000001_clean.json").write_text("{")


@pytest.mark.parametrize(
    ("change", "split"),
    [
        (lambda run, data: (run / "quarantine" / "shard-000000.tar").unlink(), {"shard-000000"}),
        (lambda run, data: (run / "clean" / "shard-000002.tar").unlink(), {"shard-000002"}),
        (edit_a_tar, {"shard-000001"}),
        (lambda run, data: (data / NAMES[1]).touch(), {"shard-000001"}),  # score scores it again
        (drop_the_markers, {"shard-000000", "shard-000001", "shard-000002"}),
        (of_another_version, {"shard-000000", "shard-000001", "shard-000002"}),
        (lambda run, data: (run / "stats" / "shard-000002_clean.json").unlink(), {"shard-000002"}),
        (damage_a_marker, {"shard-000001"}),
    ],
    ids=[
        "deleted-quarantine-tar",
        "deleted-clean-tar",
        "edited-tar",
        "rescored",
        "no-markers",
        "version",
        "deleted-marker",
        "damaged-marker",
    ],  # fmt: skip
)
def test_what_changed_since_the_last_clean_is_split_again_and_nothing_else(
    grown, tmp_path, tiny_decoder_dir, capsys, change, split
):
    data, run = grown
    clean(run, capsys)
    before = stamps(run)
    change(run, data)
    score(tiny_decoder_dir, data, run)  # as a scheduled job runs it before clean: a no-op but a touch
    assert summary(len(split), 3 - len(split)) in clean(run, capsys)
    after = stamps(run)
    assert {k for k in after if after[k] != before.get(k)} == {f"{d}/{s}.tar" for s in split for d in OUTPUTS}
    assert verify_run(run) == []
    assert markers(run) == ["shard-000000", "shard-000001", "shard-000002"]
    assert outputs(run) == from_scratch(run, tmp_path, capsys)


def test_another_threshold_splits_the_shards_whose_flags_it_changes_and_its_return_too(
    grown, tmp_path, capsys
):
    _, run = grown
    clean(run, capsys)
    assert summary(3, 0) in clean(run, capsys, "--threshold", "value:0.05")  # every ok sample flagged
    assert verify_run(run) == []
    assert outputs(run) == from_scratch(run, tmp_path, capsys)
    assert summary(0, 3) in clean(run, capsys, "--threshold", "value:0.05")
    assert summary(3, 0) in clean(run, capsys, "--threshold", "quantile:0.97")
    assert verify_run(run) == []


def ok_scores(run: Path) -> list[float]:
    return sorted(
        s for p in (run / "manifest").iterdir() for s in read_manifest(p, ["score"])["score"].to_pylist()
    )


def test_a_threshold_that_flips_no_flag_splits_nothing(grown, tmp_path, capsys):
    """Every shard was split again at any new threshold value, though its tars hold the same samples."""
    _, run = grown
    clean(run, capsys)
    before = stamps(run)
    value = json.loads((run / "run.json").read_text())["threshold"]["value"]
    above = min(s for s in ok_scores(run) if s > value)  # between the threshold and the next score
    assert summary(0, 3) in clean(run, capsys, "--threshold", f"value:{(value + above) / 2}")
    assert stamps(run) == before
    assert verify_run(run) == []
    assert outputs(run) == from_scratch(run, tmp_path, capsys)


def rewrite_manifest(run: Path, stem: str, columns: dict[str, object]) -> None:
    """A manifest with `columns` set to one value in every row, as the collapse pass rewrites them."""
    path = run / "manifest" / f"{stem}.parquet"
    table = read_manifest(path)
    for name, value in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(
            i, table.schema.field(i), pa.array([value] * table.num_rows, table.schema.field(i).type)
        )
    write_manifest(path, table)


def test_a_manifest_rewritten_with_the_same_flags_is_not_split_and_one_with_other_flags_is(
    grown, tmp_path, capsys
):
    """The collapse pass of a grown run rewrites every old manifest's collapse columns: each shard was
    split again, though only those whose flags changed hold other samples in their tars."""
    _, run = grown
    clean(run, capsys)
    before = stamps(run)
    rewrite_manifest(run, "shard-000000", {"collapse": 0.0, "collapse_threshold": 1.0, "score_std": 0.5})
    assert summary(0, 3) in clean(run, capsys)
    assert stamps(run) == before
    rewrite_manifest(run, "shard-000001", {"collapse": 1.0, "collapse_threshold": 0.0})  # all flagged
    assert summary(1, 2) in clean(run, capsys)
    changed = {k for k, v in stamps(run).items() if before[k] != v}
    assert changed == {"clean/shard-000001.tar", "quarantine/shard-000001.tar"}
    assert json.loads((run / "sizes.json").read_text())["clean/shard-000001.tar"] == 0


def test_a_clean_stopped_by_sigterm_keeps_what_it_split_and_the_rerun_splits_the_rest(
    grown, tmp_path, capsys, monkeypatch
):
    _, run = grown
    drop_the_markers(run, Path())  # three shards to split
    split_shard, calls = sanitizer.clean.split_shard, []

    def stopped_at_the_third(run_dir, shard, rows):
        calls.append(shard.stem)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return split_shard(run_dir, shard, rows)

    monkeypatch.setattr(sanitizer.clean, "split_shard", stopped_at_the_third)
    assert main(["clean", str(run)]) == 143
    assert "sanitizer: terminated (SIGTERM); run it again to resume" in capsys.readouterr().err
    assert not list((run / "clean").glob(".*"))  # no temp file left
    assert markers(run) == ["shard-000000", "shard-000001"]
    assert verify_run(run)  # not cleaned yet: run.json has no record of clean
    calls.clear()
    assert summary(1, 2) in clean(run, capsys)
    assert calls == ["shard-000002"]
    assert verify_run(run) == []
    monkeypatch.undo()
    assert outputs(run) == from_scratch(run, tmp_path, capsys)


def test_the_split_is_marked_per_shard_not_recorded_in_run_json(grown, tmp_path, capsys):
    """A record in run.json would be an entry per shard split (~15 MB for 60,000 shards)."""
    _, run = grown
    clean(run, capsys)
    info = json.loads((run / "run.json").read_text())
    assert "split" not in info and set(info["clean"]) == {"kept", "quarantined", "shards"}
    assert markers(run) == ["shard-000000", "shard-000001", "shard-000002"]
    marker = json.loads((run / "stats" / "shard-000000_clean.json").read_text())
    tar = run / "clean" / "shard-000000.tar"
    assert marker["tars"]["clean"] == {"size": tar.stat().st_size, "mtime_ns": tar.stat().st_mtime_ns}
    assert marker["kept"] == json.loads((run / "sizes.json").read_text())["clean/shard-000000.tar"]


def test_a_rescored_shard_loses_its_marker_and_a_stray_marker_fails_verify(
    grown, tmp_path, tiny_decoder_dir, capsys
):
    data, run = grown
    clean(run, capsys)
    (data / NAMES[1]).touch()
    score(tiny_decoder_dir, data, run)
    assert markers(run) == ["shard-000000", "shard-000002"]
    clean(run, capsys)
    (run / "stats" / "other_clean.json").write_text("{}")
    assert verify_run(run) == ["stats/other_clean.json: not an output of this run"]


def score_remote(tiny_decoder_dir: Path, tiny_shards: Path, run: Path) -> None:
    score(tiny_decoder_dir, ",".join(f"flaky://{tiny_shards}/{name}" for name in NAMES[:2]), run)


def test_a_remote_input_whose_store_gives_a_version_is_split_once_until_it_changes(
    flaky, tmp_path, tiny_decoder_dir, tiny_shards, capsys
):
    """A remote shard was split at every clean, though its store's ETag shows that it did not change."""
    run = tmp_path / "run"
    score_remote(tiny_decoder_dir, tiny_shards, run)
    assert "(2 shards: 2 split, 0 already clean; threshold" in clean(run, capsys)
    before = stamps(run)
    assert "(2 shards: 0 split, 2 already clean; threshold" in clean(run, capsys)
    assert stamps(run) == before
    flaky.etags = {NAMES[1]: "2"}  # the same bytes as a new object: score scores it again
    score_remote(tiny_decoder_dir, tiny_shards, run)
    assert "(2 shards: 1 split, 1 already clean; threshold" in clean(run, capsys)
    changed = {k for k, v in stamps(run).items() if before[k] != v}
    assert changed == {"clean/shard-000001.tar", "quarantine/shard-000001.tar"}
    assert verify_run(run) == []


def test_a_remote_input_whose_store_gives_a_size_alone_is_split_at_every_clean(
    flaky, tmp_path, tiny_decoder_dir, tiny_shards, capsys, monkeypatch
):
    """A size stays the same when an object is replaced by one of the same size: only reading it shows
    that it still matches its manifest."""
    info = flaky.info
    monkeypatch.setattr(flaky, "info", lambda fs, path, **kw: {**info(fs, path), "ETag": None})
    run = tmp_path / "run"
    score_remote(tiny_decoder_dir, tiny_shards, run)
    assert json.loads((run / "stats" / "shard-000000_stats.json").read_text())["input"].keys() == {"size"}
    assert "(2 shards: 2 split, 0 already clean; threshold" in clean(run, capsys)
    before = stamps(run)
    assert "(2 shards: 2 split, 0 already clean; threshold" in clean(run, capsys)
    assert all(stamps(run)[k] != v for k, v in before.items())
    assert verify_run(run) == []


@pytest.mark.parametrize(("copy", "split"), [(shutil.copy2, 0), (shutil.copy, 3)], ids=["cp-a", "cp-r"])
def test_a_run_dir_copied_with_its_mtimes_is_already_clean_and_one_copied_without_is_split_again(
    grown, tmp_path, capsys, copy, split
):
    """What docs/invariants.md says of a RUN_DIR copied to another machine: the tars' stamps are their
    mtimes."""
    _, run = grown
    clean(run, capsys)
    copied = tmp_path / "copied"
    shutil.copytree(run, copied, copy_function=copy, ignore=shutil.ignore_patterns(".lock"))
    assert summary(split, 3 - split) in clean(copied, capsys)
    assert verify_run(copied) == []
    assert outputs(copied) == outputs(run)
