"""The scoring job and clean: the invariants of MISSION.md checked exactly."""

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import sanitizer.clean
from sanitizer.atomic import write_json_atomic
from sanitizer.clean import clean_run
from sanitizer.cli import main
from sanitizer.data.decode import find_member
from sanitizer.data.shards import changed_since
from sanitizer.data.synth import encode_image, synthetic_images, write_image_shards
from sanitizer.data.tario import iter_samples, write_shards
from sanitizer.errors import Busy, UsageError
from sanitizer.joblock import job_lock
from sanitizer.manifest import MANIFEST_SCHEMA, SCHEMA_VERSION
from sanitizer.pipeline.job import ScoreJob, run_score_job
from sanitizer.pipeline.run_stage import stderr_without
from sanitizer.pipeline.stages import ScoreStage
from sanitizer.report import encoder_verdict
from sanitizer.rundir import RunDir
from sanitizer.verify import verify_run

from .conftest import killed_rethreshold


def score(decoder_dir, data, out, **kw):
    return run_score_job(ScoreJob(decoder_dir=decoder_dir, data=str(data), out=out, **kw), progress=False)


def score_argv(decoder: Path, data: Path, out: Path) -> list[str]:
    """`sanitizer score` with a decoder, data and RUN_DIR, as the CLI tests below call it."""
    return ["score", "--decoder", str(decoder), "--data", str(data), "--out", str(out)]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file's digest but the lock's (it holds the pid of the last job: not an output)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def forget_flag_inputs(run: Path) -> None:
    """Drop run.json's digest of what the flags follow from, as a re-run killed before it flagged does:
    the next re-run runs the collapse pass again instead of skipping it."""
    info = json.loads((run / "run.json").read_text())
    del info["flag_inputs"]
    write_json_atomic(run / "run.json", info)


def manifests(run: Path):
    return {p.stem: pq.read_table(p) for p in sorted((run / "manifest").glob("*.parquet"))}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_decoder_dir, tiny_shards):
    out = tmp_path_factory.mktemp("local") / "run"
    summary = score(tiny_decoder_dir, tiny_shards, out, workers=0)
    clean_run(out)
    return out, summary


def test_every_input_sample_has_exactly_one_row(local_run, tiny_shards):
    run, summary = local_run
    assert (summary.samples, summary.ok, summary.shards_done) == (120, 120, 3)
    for shard in sorted(tiny_shards.glob("*.tar")):
        table = pq.read_table(run / "manifest" / f"{shard.stem}.parquet")
        assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
        samples = list(iter_samples(str(shard)))
        assert table.column("key").to_pylist() == [s.key for s in samples]
        assert table.column("index").to_pylist() == list(range(len(samples)))
        assert set(table.column("shard").to_pylist()) == {shard.stem}
        assert table.column("caption").to_pylist() == [find_member(s, ("txt",))[1].decode() for s in samples]
        stats = RunDir(run).read_stats(shard.stem)
        assert (stats["count"], stats["ok"]) == (40, 40)
        assert stats["flagged"] == sum(table.column("flagged").to_pylist())


def test_flags_follow_the_threshold(local_run):
    run, summary = local_run
    for table in manifests(run).values():
        score_, flagged = (
            table.column("score").to_numpy(),
            table.column("flagged").to_numpy(zero_copy_only=False),
        )
        threshold, collapse, needed = (
            table.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
            for c in ("threshold", "collapse", "collapse_threshold")
        )  # the collapse pass runs by default: it sets each row's score threshold, and a row's collapse
        # flags it too
        assert summary.neighbours_threshold is not None and not np.isnan(threshold).any()
        assert np.array_equal(flagged, (score_ > threshold) | (collapse > needed))


def test_clean_and_quarantine_hold_the_ok_rows_byte_for_byte(local_run, tiny_shards):
    run, _ = local_run
    sizes = json.loads((run / "sizes.json").read_text())
    for stem, table in manifests(run).items():
        inputs = {s.key: s for s in iter_samples(str(tiny_shards / f"{stem}.tar"))}
        clean = list(iter_samples(str(run / "clean" / f"{stem}.tar")))
        quarantine = list(iter_samples(str(run / "quarantine" / f"{stem}.tar")))
        flagged = dict(zip(table.column("key").to_pylist(), table.column("flagged").to_pylist(), strict=True))
        assert [s.key for s in clean] == [k for k, f in flagged.items() if not f]  # input order kept
        assert [s.key for s in quarantine] == [k for k, f in flagged.items() if f]
        for sample in clean + quarantine:
            assert sample.members == inputs[sample.key].members  # same names, same bytes
        assert sizes[f"clean/{stem}.tar"] == len(clean)


def test_rerun_of_a_finished_job_changes_nothing(local_run, tiny_decoder_dir, tiny_shards):
    run, _ = local_run
    before = tree_digest(run)
    again = score(tiny_decoder_dir, tiny_shards, run, workers=0)
    assert again.scored_now == 0 and again.samples == 120
    clean_run(run)
    assert tree_digest(run) == before


def test_resume_after_partial_run_ends_with_identical_outputs(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards
):
    run, _ = local_run
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    shutil.rmtree(partial / "clean"), shutil.rmtree(partial / "quarantine")
    (partial / "sizes.json").unlink()
    (partial / "stats" / "shard-000001_stats.json").unlink()  # killed after its manifest, before its marker
    (partial / "manifest" / "shard-000002.parquet").unlink()  # killed before this shard was written
    (partial / "stats" / "shard-000002_stats.json").unlink()
    (partial / "manifest" / ".shard-000002.parquet.tmp-1-abcd").write_bytes(b"partial")
    summary = score(tiny_decoder_dir, tiny_shards, partial, workers=0)
    assert summary.scored_now == 80
    clean_run(partial)
    digest = tree_digest(partial)
    assert not [p for p in digest if ".tmp-" in p]
    expected = {k: v for k, v in tree_digest(run).items() if not k.startswith("stats/")}
    assert {k: v for k, v in digest.items() if not k.startswith("stats/")} == expected


def test_ray_workers_and_batch_size_do_not_change_scores(
    tmp_path, ray_session, local_run, tiny_decoder_dir, tiny_shards
):
    run, _ = local_run  # local: one process, 256-row reads
    summary = score(tiny_decoder_dir, tiny_shards, tmp_path / "ray", workers=2, batch_size=7)
    assert (summary.samples, summary.scored_now) == (120, 120)
    for stem in manifests(run):
        ray_part = (tmp_path / "ray" / "manifest" / f"{stem}.parquet").read_bytes()
        assert ray_part == (run / "manifest" / f"{stem}.parquet").read_bytes()


def test_a_ray_run_prints_no_note_of_ray_data_progress_bars(
    tmp_path, ray_session, tiny_decoder_dir, tiny_shards, capfd
):
    from ray.util.debug import reset_log_once

    reset_log_once("ray_data_progress_manager_disabled")  # Ray says it once per process
    score(tiny_decoder_dir, tiny_shards, tmp_path / "ray", workers=1)
    assert "Progress bars disabled" not in capfd.readouterr().err


def test_shard_order_does_not_change_scores(tmp_path, local_run, tiny_decoder_dir, tiny_shards):
    run, _ = local_run
    reordered = ",".join(str(p) for p in sorted(tiny_shards.glob("*.tar"), reverse=True))
    score(tiny_decoder_dir, reordered, tmp_path / "rev", workers=0)
    for stem in manifests(run):
        assert (tmp_path / "rev/manifest" / f"{stem}.parquet").read_bytes() == (
            run / "manifest" / f"{stem}.parquet"
        ).read_bytes()


def test_a_run_resumes_with_its_shards_listed_in_another_order(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards
):
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    reordered = ",".join(str(p) for p in sorted(tiny_shards.glob("*.tar"), reverse=True))
    assert score(tiny_decoder_dir, reordered, run, workers=0).shards_done == 3  # not "another input"
    before = {k: v for k, v in tree_digest(local_run[0]).items() if k.startswith(("manifest/", "stats/"))}
    assert {k: v for k, v in tree_digest(run).items() if k in before} == before
    assert verify_run(run) == []


def test_second_job_on_the_same_run_dir_is_refused(tmp_path, tiny_decoder_dir, tiny_shards):
    with (
        RunDir(tmp_path / "busy").lock(),
        pytest.raises(Busy, match="another sanitizer job .* is using"),
    ):
        score(tiny_decoder_dir, tiny_shards, tmp_path / "busy", workers=0)


def never_loaded(*args, **kwargs):
    raise AssertionError("the encoder was loaded")


@pytest.mark.parametrize("held", ["run", "decoder"])
def test_a_busy_run_dir_or_decoder_dir_is_refused_before_the_encoder_loads(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch, held
):
    """A RUN_DIR held by the last scheduled run was refused only after the encoder had loaded (seconds
    to minutes, and memory on the GPU that run uses). A DECODER_DIR a `train` holds, with no
    decoder.json yet, was "not a decoder directory ...; run `sanitizer train`", exit 2, while that
    train ran: busy, as a scheduler should retry it."""
    import sanitizer.pipeline.job as job_module

    monkeypatch.setattr(job_module, "load_stage", never_loaded)
    decoder = tiny_decoder_dir if held == "run" else tmp_path / "training"
    busy = tmp_path / "run" if held == "run" else decoder
    with job_lock(busy, "--out"), pytest.raises(Busy) as refused:
        score(decoder, tiny_shards, tmp_path / "run", workers=0)
    assert (
        str(refused.value)
        == f"another sanitizer job (pid {os.getpid()} on {socket.gethostname()}) is using {busy}"
    )
    if held == "decoder":
        assert not (tmp_path / "run").exists()  # RUN_DIR not made for a job that could not run


def test_run_dir_of_another_input_is_refused_naming_the_shards_it_lacks(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards
):
    run, _ = local_run
    other = tmp_path / "copy"
    shutil.copytree(run, other)
    before = tree_digest(other)
    with pytest.raises(UsageError) as caught:
        score(tiny_decoder_dir, str(tiny_shards / "shard-000000.tar"), other, workers=0)
    gone = f"{tiny_shards / 'shard-000001.tar'}, {tiny_shards / 'shard-000002.tar'}"
    assert str(caught.value) == (
        f"{other} holds a run of another input (2 of its shards not in --data: {gone}); use a new --out"
    )
    assert tree_digest(other) == before


def test_an_input_of_the_same_file_name_that_renames_a_scored_shard_is_refused_saying_so():
    """A new shard of the same file name gives both stems a hash suffix: no url left --data, and the
    refusal said that it had ('1 of its shards not in --data: /x/a.tar')."""
    from sanitizer.pipeline.job import identity_change

    same = {"decoder_sha256": "d", "scoring": {}, "device_type": "cpu", "manifest": SCHEMA_VERSION}
    recorded = {**same, "shards": [{"stem": "a", "url": "/x/a.tar"}]}
    now = {**same, "shards": [{"stem": "a-1", "url": "/x/a.tar"}, {"stem": "a-2", "url": "/y/a.tar"}]}
    assert identity_change(recorded, now) == (
        "input (the stem of /x/a.tar is a-1, the run's is a: another input shares its file name, or "
        "the run was scored by a version that named stems otherwise)"
    )
    assert identity_change(recorded, {**now, "shards": [*recorded["shards"], now["shards"][1]]}) is None


def test_a_run_scored_under_other_stem_rules_is_refused_naming_both_stems():
    """Stems used to keep a leading `_` (`_a.tar`, `.a.tar`); a re-score of such a run was refused as
    one whose input gained a shard of the same file name, which it had not."""
    from sanitizer.pipeline.job import identity_change

    same = {"decoder_sha256": "d", "scoring": {}, "device_type": "cpu", "manifest": SCHEMA_VERSION}
    recorded = {**same, "shards": [{"stem": "_a", "url": "/x/_a.tar"}]}
    now = {**same, "shards": [{"stem": "a", "url": "/x/_a.tar"}]}
    assert identity_change(recorded, now) == (
        "input (the stem of /x/_a.tar is a, the run's is _a: another input shares its file name, or "
        "the run was scored by a version that named stems otherwise)"
    )


def test_a_run_that_recorded_file_urls_resumes_by_url_or_path_and_verifies_and_cleans(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch
):
    """A version before file:// URLs were read as their paths passed them through as remote: run.json
    and the stats markers name the URL, and two shards of one file name have stems hashed from their
    URLs. The same command was refused ("input (3 of its shards not in --data: file:///...)"); it, and
    one naming the files by their paths, resume scoring nothing and leave those records as they were."""
    import sanitizer.pipeline.job as job_module
    from sanitizer.data.shards import assign_stems, expand_shards, split_top_level

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    paths = [one / "shard-000000.tar", two / "shard-000000.tar", one / "shard-000002.tar"]
    for path, source in zip(paths, ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"], strict=True):
        shutil.copy2(tiny_shards / source, path)
    by_url, by_path = (",".join(f"{form}{p}" for p in paths) for form in ("file://", ""))
    run = tmp_path / "run"
    with monkeypatch.context() as old:  # the old listing: a file:// URL passed through as remote
        old.setattr(job_module, "expand_shards", lambda spec: assign_stems(split_top_level(spec)))
        score(tiny_decoder_dir, by_url, run, workers=0)
    recorded = json.loads((run / "run.json").read_text())["identity"]["shards"]
    hashed = [f"shard-000000-{hashlib.sha1(f'file://{p}'.encode()).hexdigest()[:8]}" for p in paths[:2]]
    assert recorded == [
        {"url": f"file://{p}", "stem": stem} for p, stem in zip(paths, [*hashed, "shard-000002"], strict=True)
    ]
    assert {s.stem for s in expand_shards(by_url)}.isdisjoint(hashed)  # stems differ as well as urls
    kept = {k: v for k, v in tree_digest(run).items() if k.startswith(("manifest/", "stats/"))}

    assert main([*score_argv(tiny_decoder_dir, by_url, run), "--workers", "0"]) == 0
    summary = score(tiny_decoder_dir, by_path, run, workers=0)
    assert (summary.scored_now, summary.shards_done, summary.samples) == (0, 3, 120)
    assert json.loads((run / "run.json").read_text())["identity"]["shards"] == recorded
    assert {k: v for k, v in tree_digest(run).items() if k in kept} == kept
    assert verify_run(run) == []
    clean_run(run)
    assert sorted(p.stem for p in (run / "clean").glob("*.tar")) == sorted(s["stem"] for s in recorded)
    assert verify_run(run) == []


def test_a_recorded_file_url_of_an_unsafe_stem_is_not_taken_for_the_shard():
    """A job takes a recorded file:// URL's stem for the file's outputs: one that would name a file
    outside RUN_DIR (run.json damaged) is not taken, so the run is refused as another input's."""
    from sanitizer.data.shards import ShardRef
    from sanitizer.pipeline.job import as_recorded

    shards = [ShardRef(url="/d/a.tar", stem="a")]
    assert as_recorded(shards, [{"url": "file:///d/a.tar", "stem": "a-1"}]) == [
        ShardRef(url="file:///d/a.tar", stem="a-1")
    ]
    for damaged in ({"url": "file:///d/a.tar", "stem": "../a"}, {"url": "file:///d/a.tar"}, "a"):
        assert as_recorded(shards, [damaged]) == shards


def test_a_recorded_stem_of_a_links_target_is_taken_only_where_the_listing_names_it_after_a_link():
    """A run recorded a linked shard under its target's name (blobs/f00d: f00d) where the listing now
    names it after the link (00000): the recorded stem is the shard's. A stem the listing hashed since
    (a new input of the same file name), or one another shard now takes, is not: the run is refused
    as another input's, as it was, rather than two shards writing one stem's outputs."""
    from sanitizer.data.shards import ShardRef, assign_stems
    from sanitizer.pipeline.job import as_recorded

    shards = [ShardRef("/c/blobs/f00d", "00000"), *assign_stems(["/d/x.tar", "/e/x.tar"])]
    assert as_recorded(shards, [{"url": "/c/blobs/f00d", "stem": "f00d"}]) == [
        ShardRef("/c/blobs/f00d", "f00d"),
        *shards[1:],
    ]
    for other in [{"url": "/d/x.tar", "stem": "x"}, {"url": "/c/blobs/f00d", "stem": "f00e"}]:
        assert as_recorded(shards, [other]) == shards
    taken = [ShardRef("/c/blobs/f00d", "00000"), ShardRef("/c/blobs/beef", "F00D")]  # a link F00D.tar
    assert as_recorded(taken, [{"url": "/c/blobs/f00d", "stem": "f00d"}]) == taken


def test_a_run_whose_input_grew_scores_only_the_new_shards_and_ends_as_a_run_of_all(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, caplog
):
    """A scheduled job over a scraped dataset: the same --data (a folder) holds new shards at its next
    run. It was refused as "another input", so each run had to score everything into a new --out."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):
        shutil.copy2(tiny_shards / name, data / name)
    run = tmp_path / "run"
    score(tiny_decoder_dir, data, run, workers=0)
    clean_run(run)
    shutil.copy2(tiny_shards / "shard-000002.tar", data / "shard-000002.tar")
    summary = score(tiny_decoder_dir, data, run, workers=0)
    assert (summary.scored_now, summary.shards_done, summary.samples) == (40, 3, 120)
    assert "1 shard was scored since it was cleaned; run `sanitizer clean" in caplog.text
    assert "clean" not in json.loads((run / "run.json").read_text())
    full = manifests(local_run[0])  # the collapse pass and the flags are those of a run of all three
    assert {stem: t.equals(full[stem]) for stem, t in manifests(run).items()} == dict.fromkeys(full, True)
    clean_run(run)
    assert verify_run(run) == []


def test_a_run_scored_on_another_device_is_refused_naming_the_device(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards
):
    """Scored on a GPU, resumed where there is none: it said "another decoder, input or scoring
    settings", none of which had changed."""
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    _edit_run_json(lambda info: info["identity"].update(device_type="cuda"))(run)
    with pytest.raises(UsageError) as caught:
        score(tiny_decoder_dir, tiny_shards, run, workers=0)
    assert str(caught.value) == (
        f"{run} holds a run of another device (scored on cuda, this job runs on cpu); use a new --out"
    )


def test_out_holding_other_files_is_refused_untouched(tmp_path, tiny_decoder_dir, tiny_shards):
    """--out naming the input's folder: nothing written there, no temp-like file of the user's removed."""
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    (folder / ".notes.txt.tmp-1-ab").write_text("the user's")
    before = tree_digest(folder)
    with pytest.raises(
        UsageError,
        match=r"holds other files \('\.notes\.txt\.tmp-1-ab', 'shard-000000\.tar', 'shard-000001\.tar', "
        r"\.\.\.\) and no run\.json",
    ):
        score(tiny_decoder_dir, folder, folder, workers=0)
    assert tree_digest(folder) == before and not (folder / ".lock").exists()


def test_empty_out_or_one_left_by_a_run_killed_before_run_json_is_used(
    tmp_path, tiny_decoder_dir, tiny_shards
):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("4242")
    (out / ".run.json.tmp-4242-0123abcd").write_text("{")
    assert score(tiny_decoder_dir, tiny_shards, out, workers=0).shards_done == 3
    assert not (out / ".run.json.tmp-4242-0123abcd").exists()


def test_quantile_rule_needs_matching_calibration(tmp_path, tiny_decoder_dir, tiny_shards):
    with pytest.raises(UsageError, match="reads the calibration"):
        score(tiny_decoder_dir, tiny_shards, tmp_path / "r", workers=0, num_masks=7)


def test_mad_rule_and_rethreshold_without_rescoring(tmp_path, local_run, tiny_decoder_dir, tiny_shards):
    summary = score(tiny_decoder_dir, tiny_shards, tmp_path / "mad", workers=0, threshold="mad:1")
    scores = np.concatenate([t.column("score").to_numpy() for t in manifests(tmp_path / "mad").values()])
    median = np.median(scores)
    assert summary.threshold == pytest.approx(median + 1.4826 * np.median(np.abs(scores - median)), rel=1e-6)
    assert summary.flagged_by["score"] == int((scores > np.float32(summary.threshold)).sum())
    result = clean_run(tmp_path / "mad", threshold="value:0")
    assert (result.kept, result.quarantined) == (0, 120)
    assert all(t.column("flagged").to_pylist() == [True] * 40 for t in manifests(tmp_path / "mad").values())


def test_image_only_shards_and_bad_samples_get_rows_and_statuses(tmp_path, tiny_decoder_dir, capsys):
    data = tmp_path / "data"
    write_image_shards(data, synthetic_images(5, 32, seed=9), per_shard=5, prefix="img")
    write_shards(
        [
            {"__key__": "html", "jpg": b"<!doctype html><html>blocked</html>"},
            {"__key__": "zero", "png": b""},
            {"__key__": "textonly", "txt": b"no image here"},
            {
                "__key__": "pickle",
                "pyd": b"\x80\x04K\x01.",
                "png": encode_image(synthetic_images(1, 32)[0]),
            },
        ],
        data,
        prefix="bad",
    )
    (data / "broken.tar").write_bytes(b"this is not a tar file at all" * 40)
    code = main(
        [
            "score",
            "--decoder",
            str(tiny_decoder_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--workers",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1 and "FAILED shard broken" in out
    # the encoder verdict over the shards that finished (one ok sample cannot show a backdoor)
    assert "\nverdict: no evidence of a backdoor" in out or "\nverdict: no verdict" in out
    run = RunDir(tmp_path / "run")
    assert [f["stem"] for f in run.read_run()["failed_shards"]] == ["broken"]
    bad = pq.read_table(tmp_path / "run/manifest/bad-000000.parquet")
    assert bad.column("status").to_pylist() == ["not_an_image", "empty_image", "no_image", "ok"]
    # samples that were not scored are never flagged (the ok one is, or is not, on its score)
    assert bad.column("score").null_count == 3 and not any(bad.column("flagged").to_pylist()[:3])
    images = pq.read_table(tmp_path / "run/manifest/img-000000.parquet")
    assert images.column("status").to_pylist() == ["ok"] * 5 and images.column("caption").null_count == 5
    assert Counter(run.read_run()["totals"]["status_counts"]) == Counter(
        ok=6, not_an_image=1, empty_image=1, no_image=1
    )


def test_a_key_repeated_in_a_shard_is_kept_once_so_the_outputs_read_back_as_scored(
    tmp_path, tiny_decoder_dir
):
    """`a`, a bad `b`, `a` again (other extensions): copied beside each other once `b` is left out,
    the two `a` read back as one sample of two images (`a.jpg a.txt a.png a.json`), which clean/'s
    count and verify did not see. The later `a` is `duplicate_key`, not copied."""
    image = encode_image(synthetic_images(1, 32)[0])
    write_shards(
        [
            {"__key__": "a", "jpg": image, "txt": b"first"},
            {"__key__": "b", "jpg": b"<html>"},
            {"__key__": "a", "png": image, "json": b'{"caption": "second"}'},
        ],
        tmp_path / "data",
    )
    score(tiny_decoder_dir, tmp_path / "data", tmp_path / "run", workers=0)
    clean_run(tmp_path / "run")
    table = pq.read_table(tmp_path / "run/manifest/shard-000000.parquet")
    assert table.column("status").to_pylist() == ["ok", "not_an_image", "duplicate_key"]
    assert (
        table.column("error").to_pylist()[2]
        == "key 'a' is sample 0's: only the first sample of a key is kept"
    )
    back = [
        s
        for d in ("clean", "quarantine")
        for s in iter_samples(str(tmp_path / "run" / d / "shard-000000.tar"))
    ]
    assert [(s.key, [m.name for m in s.members]) for s in back] == [("a", ["a.jpg", "a.txt"])]
    assert verify_run(tmp_path / "run") == []


def test_a_json_caption_holding_a_lone_surrogate_escape_costs_no_sample(tmp_path, tiny_decoder_dir):
    """`"\\ud800"` is valid JSON (a scraped caption cut inside an emoji's pair): the caption it made
    could not be stored as UTF-8, and the whole shard failed (`FAILED shard ...: UnicodeEncodeError`),
    none of its samples scored or cleaned. The surrogate reads as U+FFFD, as bytes that are not UTF-8 do."""
    image = encode_image(synthetic_images(1, 32)[0])
    write_shards(
        [
            {"__key__": "a", "jpg": image, "txt": b"plain"},
            {"__key__": "b", "jpg": image, "json": b'{"caption": "cut \\ud83d", "url": "u"}'},
            {"__key__": "c", "jpg": image, "json": b'{"caption": "pair \\ud83d\\ude00 \\udfff"}'},
        ],
        tmp_path / "data",
    )
    summary = score(tiny_decoder_dir, tmp_path / "data", tmp_path / "run", workers=0)
    assert summary.failed_shards == {}
    table = pq.read_table(tmp_path / "run/manifest/shard-000000.parquet")
    assert table.column("status").to_pylist() == ["ok"] * 3
    assert table.column("caption").to_pylist() == ["plain", "cut \ufffd", "pair \U0001f600 \ufffd"]
    clean_run(tmp_path / "run")
    assert verify_run(tmp_path / "run") == []


def test_clean_refuses_a_sample_not_an_image_when_scored_that_is_an_image_now(tmp_path, tiny_decoder_dir):
    """A page saved as .jpg (not_an_image), since replaced by an image under the same key: clean
    compares its digest too, where it left the sample out of clean/ and quarantine/ unseen."""
    data, image = tmp_path / "data", encode_image(synthetic_images(1, 32)[0])
    shard = [{"__key__": "img", "png": image}, {"__key__": "page", "jpg": b"<!doctype html><html></html>"}]
    write_shards(shard, data, prefix="web")
    score(tiny_decoder_dir, data, tmp_path / "run", workers=0)
    write_shards([shard[0], {"__key__": "page", "jpg": image}], data, prefix="web")
    with pytest.raises(UsageError, match=r"changed since it was scored \(image of 'page' differs\)"):
        clean_run(tmp_path / "run")


def test_a_sample_with_two_images_gets_no_score_and_clean_refuses_one_that_gained_a_second(
    tmp_path, tiny_decoder_dir
):
    """`k.jpg` and `k.png`: a trainer reads either, so neither is scored (`several_images`, in no tar).
    A sample scored `ok` on its one image that has a second one now was copied to clean/ with it,
    unscored, as its first image still matched."""
    data, (image, other) = tmp_path / "data", (encode_image(p) for p in synthetic_images(2, 32))
    write_shards([{"__key__": "two", "jpg": b"", "png": image}, {"__key__": "one", "png": image}], data)
    score(tiny_decoder_dir, data, tmp_path / "run", workers=0)
    rows = pq.read_table(tmp_path / "run/manifest/shard-000000.parquet").to_pydict()
    assert rows["status"] == ["several_images", "ok"] and rows["score"][0] is None
    assert (
        rows["error"][0]
        == "sample has 2 image members ('two.jpg', 'two.png'): a trainer may read any, so none is scored"
    )
    write_shards(
        [{"__key__": "two", "jpg": b"", "png": image}, {"__key__": "one", "png": image, "webp": other}], data
    )
    with pytest.raises(UsageError, match=r"changed since it was scored \(image of 'one' differs\)"):
        clean_run(tmp_path / "run")


def test_clean_of_a_shard_replaced_keeping_its_size_and_mtime_says_how_to_score_it_again(
    tmp_path, tiny_decoder_dir, tiny_shards
):
    """A copy that kept size and mtime (`cp -p`, `rsync -t`) is not seen by `score`'s re-run; clean
    stopped with 'changed since it was scored' and no word of what to do."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):
        shutil.copy2(tiny_shards / name, data / name)
    score(tiny_decoder_dir, data, tmp_path / "run", workers=0)
    replaced, stamp = data / "shard-000001.tar", (data / "shard-000001.tar").stat()
    replaced.write_bytes((tiny_shards / "shard-000002.tar").read_bytes())
    assert replaced.stat().st_size == stamp.st_size
    os.utime(replaced, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert score(tiny_decoder_dir, data, tmp_path / "run", workers=0).scored_now == 0
    with pytest.raises(UsageError) as caught:
        clean_run(tmp_path / "run")
    assert str(caught.value) == (
        f"{replaced} changed since it was scored (sample 0 differs): score it again (`sanitizer score` "
        "re-scores a shard whose size, mtime or version changed; `touch` a local one if none did), then clean"
    )
    replaced.touch()  # as it says
    assert score(tiny_decoder_dir, data, tmp_path / "run", workers=0).scored_now == 40
    assert clean_run(tmp_path / "run").shards == 2
    assert verify_run(tmp_path / "run") == []


NEWER_SETTINGS = ("axis_aggregate", "axis_error", "error_pool", "error", "relax_steps", "relax_radius")


def test_decoder_and_run_from_before_error_pool_keep_per_pixel_unrelaxed_scores(
    tmp_path, tiny_decoder_dir, tiny_shards
):
    """decoder.json and run.json written before axis_aggregate, error_pool, error and relax_steps
    existed: scored by per-pixel squared errors without relaxation, every row by one aggregate, as
    calibrated, and an unfinished run of that time resumes instead of being refused."""
    old_decoder = tmp_path / "decoder"
    shutil.copytree(tiny_decoder_dir, old_decoder)
    meta = json.loads((old_decoder / "decoder.json").read_text())
    meta["scoring"] = {k: v for k, v in meta["scoring"].items() if k not in NEWER_SETTINGS}
    del meta["calibration"]["axis_scale"]
    (old_decoder / "decoder.json").write_text(json.dumps(meta))
    first = str(tiny_shards / "shard-000000.tar")
    score(old_decoder, first, tmp_path / "run", workers=0)  # the quantile rule reads the calibration
    run_json = tmp_path / "run" / "run.json"
    info = json.loads(run_json.read_text())
    saved = info["identity"]["scoring"]
    assert (saved["error_pool"], saved["error"], saved["relax_steps"]) == (1, "mse", 0)
    assert saved["axis_aggregate"] == saved["aggregate"] == "q25" and saved["axis_error"] == "mse"
    info["identity"]["scoring"] = {k: v for k, v in saved.items() if k not in NEWER_SETTINGS}
    run_json.write_text(json.dumps(info))
    resumed = score(old_decoder, first, tmp_path / "run", workers=0)
    assert (resumed.samples, resumed.scored_now) == (40, 0)
    # the report's verdict reads that calibration too, rather than fall back to the binomial test
    assert encoder_verdict(tmp_path / "run")["test"] == "beta-binomial"
    per_pixel = manifests(tmp_path / "run")["shard-000000"].column("score").to_numpy()
    score(
        tiny_decoder_dir, first, tmp_path / "pooled", workers=0, error="mse", relax_steps=0,
        axis_aggregate="q25", threshold="mad:3", collapse=None,  # every row measured as the old decoder did
    )  # fmt: skip
    pooled = manifests(tmp_path / "pooled")["shard-000000"].column("score").to_numpy()
    assert (pooled < per_pixel).all()  # the square of a mean is at most the mean of the squares


def test_relax_flags_reach_the_scores(tmp_path, local_run, tiny_decoder_dir, tiny_shards, capsys):
    """`score --relax-steps 0` scores every sample unrelaxed (almost all higher than with the
    decoder's relaxed default) and records it; the decoder's calibration no longer applies, to the
    quantile rule or to the collapse pass."""
    argv = ["score", "--decoder", str(tiny_decoder_dir), "--data", str(tiny_shards), "--workers", "0"]
    assert main([*argv, "--out", str(tmp_path / "q"), "--relax-steps", "0"]) == 2
    assert "scoring with {" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "r"), "--relax-steps", "0", "--threshold", "mad:3"]) == 2
    assert "the collapse pass reads the calibration, which was made with" in capsys.readouterr().err
    assert (
        main(
            [
                *argv,
                "--out",
                str(tmp_path / "r"),
                "--relax-steps",
                "0",
                "--threshold",
                "mad:3",
                "--no-collapse",
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["identity"]["scoring"]["relax_steps"] == 0
    relaxed, unrelaxed = (
        {k: t.column("score").to_numpy() for k, t in manifests(run).items()}
        for run in (local_run[0], tmp_path / "r")
    )
    assert relaxed.keys() == unrelaxed.keys()
    lower = np.concatenate([unrelaxed[k] - relaxed[k] for k in relaxed])
    # A signed step can overshoot on a sample (1 of 120 here, by 2e-4), so: most scores, and on average.
    assert (lower != 0).all() and (lower > 0).mean() >= 0.95 and lower.mean() > 0


def test_an_axis_aggregate_is_scored_with_the_decoders_own_scale(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys
):
    """A decoder calibrated with the default --axis-aggregate mean scores with the scale its calibration
    fitted, and run.json records the setting. Another pair of aggregates has no scale, whatever the
    threshold rule; every row measured alike needs none, and is refused only where the calibration is
    read, as any other setting."""
    argv = ["score", "--decoder", str(tiny_decoder_dir), "--data", str(tiny_shards), "--workers", "0"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert (info["identity"]["scoring"]["axis_aggregate"], info["identity"]["scoring"]["axis_error"]) == (
        "mean",
        "mse",
    )
    stage = ScoreStage(str(tiny_decoder_dir), info["identity"]["scoring"], "cpu")
    saved = json.loads((tiny_decoder_dir / "decoder.json").read_text())["calibration"]["axis_scale"]
    assert stage.scorer.axis_scale.to_dict() == saved
    capsys.readouterr()
    rule = ["--threshold", "mad:3", "--no-collapse"]
    assert main([*argv, "--out", str(tmp_path / "m"), "--aggregate", "median", *rule]) == 2
    err = capsys.readouterr().err
    assert (
        "--aggregate median --axis-aggregate mean --error ssim --axis-error mse needs a decoder calibrated"
        in err
    )
    assert not (tmp_path / "m").exists()
    one = [*argv, "--axis-aggregate", "q25", "--axis-error", "ssim"]
    assert main([*one, "--out", str(tmp_path / "q")]) == 2
    assert "'axis_aggregate': 'q25'" in capsys.readouterr().err
    assert main([*one, "--out", str(tmp_path / "q"), *rule]) == 0
    assert (
        json.loads((tmp_path / "q" / "run.json").read_text())["identity"]["scoring"]["axis_aggregate"]
        == "q25"
    )


def test_error_pool_that_does_not_tile_the_patches_is_refused_before_scoring(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys
):
    argv = ["score", "--decoder", str(tiny_decoder_dir), "--data", str(tiny_shards)]
    code = main([*argv, "--out", str(tmp_path / "r"), "--workers", "0", "--error-pool", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--error-pool 3 does not divide the decoder's 8 px patches" in err
    assert "Traceback" not in err and not (tmp_path / "r" / "manifest").exists()


LOCAL_CPU_WORKERS = min(8, os.cpu_count())


@pytest.mark.parametrize(
    ("device", "address", "cluster", "expected"),
    [
        (
            "auto",
            "ray://head:10001",
            {"GPU": 4.0, "CPU": 64.0},
            ("cuda", 4),
        ),  # a GPU-less head: the cluster's
        ("cuda", "ray://head:10001", {"GPU": 2.0, "CPU": 8.0}, ("cuda", 2)),
        ("auto", "ray://head:10001", {"CPU": 48.0}, ("cpu", 48)),  # a CPU cluster: an actor per CPU
        ("cpu", "ray://head:10001", {"GPU": 4.0, "CPU": 48.0}, ("cpu", 48)),  # the cluster's CPUs too
        ("auto", "local", {"GPU": 4.0}, ("cpu", LOCAL_CPU_WORKERS)),  # a Ray started here: this machine
        ("auto", None, {"GPU": 4.0}, ("cpu", LOCAL_CPU_WORKERS)),
    ],
)
def test_a_job_that_joins_a_cluster_fills_the_clusters_devices(
    monkeypatch, tmp_path, device, address, cluster, expected
):
    import sanitizer.pipeline.job as job_module

    asked = []
    monkeypatch.setattr(job_module, "cluster_resources", lambda at: asked.append(at) or cluster)
    monkeypatch.setattr(job_module.torch.cuda, "is_available", lambda: False)  # as on this CI machine
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = ScoreJob(
        decoder_dir=tmp_path, data="x.tar", out=tmp_path / "run", device=device, ray_address=address
    )
    placed, workers = job_module.scoring_device(job)
    assert (placed.type, workers) == expected
    assert asked == ([address] if address not in (None, "local") else [])


def test_cuda_on_a_cluster_without_gpus_is_one_usage_error(monkeypatch, tmp_path):
    import sanitizer.pipeline.job as job_module

    monkeypatch.setattr(job_module, "cluster_resources", lambda at: {"CPU": 16.0})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as `ray job submit` sets it
    job = ScoreJob(decoder_dir=tmp_path, data="x.tar", out=tmp_path / "run", device="cuda")
    with pytest.raises(
        UsageError, match="--device cuda was asked for, but the Ray cluster at 10.0.0.1:6379 has no GPUs"
    ):
        job_module.scoring_device(job)
    assert job_module.scoring_device(replace(job, workers=0, device="cpu"))[0].type == "cpu"  # no Ray: here


def test_run_json_records_the_cluster_that_ray_address_in_the_environment_joined(
    monkeypatch, tmp_path, tiny_decoder_dir, tiny_shards
):
    """Inside `ray job submit` the address comes from RAY_ADDRESS: run.json said `ray_address: null`,
    as for a Ray of the job's own."""
    import sanitizer.pipeline.job as job_module

    monkeypatch.setattr(job_module, "cluster_resources", lambda at: {"CPU": 16.0})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(tiny_shards), out=tmp_path / "run", device="cpu")
    assert job_module.plan_job(job).config["ray_address"] == "10.0.0.1:6379"
    assert job_module.plan_job(replace(job, workers=0)).config["ray_address"] is None  # no Ray at all
    assert job_module.plan_job(replace(job, ray_address="local")).config["ray_address"] is None


@pytest.mark.parametrize(
    ("option", "message"), [(("--batch-size", "-5"), "--batch-size must be at least 1, not -5"),
                            (("--workers", "-1"), "--workers must be at least 0, not -1"),
                            (("--micro-batch", "0"), "--micro-batch must be at least 1, not 0"),
                            (("--micro-batch", "-3"), "--micro-batch must be at least 1, not -3")]
)  # fmt: skip
def test_score_counts_out_of_range_stop_before_the_run_dir_is_made(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys, option, message
):
    argv = score_argv(tiny_decoder_dir, tiny_shards, tmp_path / "r")
    assert main([*argv, *option]) == 2
    assert capsys.readouterr().err.strip() == f"sanitizer: error: {message}"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("device", "size", "option", "shape"),
    [
        ("cpu", 32, [], (64, 512)),  # the defaults: 64 on the CPU; a call is 8 of them, <= 64 MiB
        ("cuda", 32, [], (1024, 8192)),
        ("cuda", 224, [], (512, 512)),
        ("cpu", 32, ["--micro-batch", "8"], (8, 64)),
        ("cuda", 224, ["--micro-batch", "100"], (100, 400)),
        ("cuda", 224, ["--micro-batch", "100", "--batch-size", "250"], (100, 250)),  # padded to 300
    ],
)
def test_micro_batch_sets_the_models_batch_and_the_default_batch_size_follows_it(
    monkeypatch, device, size, option, shape
):
    import sanitizer.pipeline.job as job_module

    jobs = []
    monkeypatch.setattr(job_module, "run_score_job", lambda job: jobs.append(job) or sys.exit(0))
    with pytest.raises(SystemExit):
        main([*score_argv(Path("d"), Path("x.tar"), Path("r")), *option])
    assert job_module.batch_shape(jobs[0], torch.device(device), size) == shape


def test_a_rerun_at_another_micro_batch_keeps_the_finished_shards_and_says_so(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, caplog
):
    """After running out of memory a user lowers --micro-batch and runs it again: it resumes, as the
    error said, scoring only what is not done; the finished shards keep their scores and their record
    of the model batch they were scored in."""
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    (run / "stats" / "shard-000002_stats.json").unlink()
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):
        assert score(tiny_decoder_dir, tiny_shards, run, workers=0, micro_batch=8).scored_now == 40
    assert [m for m in caplog.messages if "finished shard" in m] == [
        "2 finished shards were scored in model batches of 64: those scores are kept, and can differ in "
        "their last bits from scores in batches of 8; to score every shard in batches of 8, score into "
        "a new --out"
    ]
    before, after = manifests(local_run[0]), manifests(run)
    for stem in ("shard-000000", "shard-000001"):
        assert after[stem].select(["score", "sketch"]) == before[stem].select(["score", "sketch"])
    stats = {stem: RunDir(run).read_stats(stem)["micro_batch"] for stem in after}
    assert stats == {"shard-000000": 64, "shard-000001": 64, "shard-000002": 8}
    assert json.loads((run / "run.json").read_text())["config"]["micro_batch"] == 8
    caplog.clear()
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):  # a finished run: nothing scored
        assert score(tiny_decoder_dir, tiny_shards, run, workers=0, micro_batch=64).scored_now == 0
    assert "1 finished shard was scored in model batches of 8: those scores are kept" in caplog.text


def _edit_json(relative: str, change):
    def damage(run: Path) -> None:
        record = json.loads((run / relative).read_text())
        change(record)
        (run / relative).write_text(json.dumps(record))

    return damage


def _edit_run_json(change):
    return _edit_json("run.json", change)


ALL = ("clean", "report", "score")
DAMAGES = {  # what is damaged: (how, which commands read it, the message)
    "run.json cut short": (
        lambda run: (run / "run.json").write_text((run / "run.json").read_text()[:40]),
        ALL,
        "run.json is damaged: not valid JSON",
    ),
    "run.json a list": (
        lambda run: (run / "run.json").write_text("[1, 2]"),
        ALL,
        "run.json is damaged: a JSON list",
    ),
    "a shard entry with another key": (  # score refuses it as another job's identity
        _edit_run_json(lambda info: info["identity"]["shards"][0].update(extra=1)),
        ("clean", "report"),
        "run.json is damaged: identity.shards holds",
    ),
    "a stem that leaves RUN_DIR": (
        _edit_run_json(lambda info: info["identity"]["shards"][0].update(stem="../../outside/x")),
        ("clean", "report"),
        "run.json is damaged: shard stem '../../outside/x' is not a safe file name",
    ),
    "threshold not a mapping": (  # score rewrites it
        _edit_run_json(lambda info: info.update(threshold=[1])),
        ("clean", "report"),
        "run.json is damaged: threshold is list, not dict",
    ),
    "a record of clean not a mapping": (  # a re-run weighs it, the report shows it: AttributeErrors
        _edit_run_json(lambda info: info.update(clean=5)),
        ("report", "score"),  # clean writes it afresh (test_verify: ..._a_damaged_record_of_clean_...)
        "run.json is damaged: clean is int, not dict",
    ),
    "a record of clean's count of text": (  # the report's tile formatted it: a ValueError
        _edit_run_json(lambda info: info.update(clean={"kept": "7", "quarantined": 1, "shards": 2})),
        ("report", "score"),
        "run.json is damaged: clean.kept is str, not int",
    ),
    "a threshold value of text": (
        _edit_run_json(lambda info: info["threshold"].update(value="0.5")),
        ("clean", "report"),
        "run.json is damaged: threshold.value is str, not int or float",
    ),
    "a manifest overwritten": (
        lambda run: (run / "manifest/shard-000001.parquet").write_bytes(b"garbage"),
        ALL,
        "cannot read manifest ",
    ),
    "a stats marker overwritten": (  # clean reads it as it re-flags (rundir.rewrite)
        lambda run: (run / "stats/shard-000001_stats.json").write_text("garbage"),
        ALL,
        "shard-000001_stats.json is damaged: not valid JSON",
    ),
    "a stats marker without counts": (
        lambda run: (run / "stats/shard-000001_stats.json").write_text("{}"),
        ALL,
        "shard-000001_stats.json is damaged: its counts are missing or not whole numbers",
    ),
    "a stats marker without flagged_by": (  # its totals read it: a KeyError's traceback
        _edit_json("stats/shard-000001_stats.json", lambda stats: stats.pop("flagged_by")),
        ALL,
        "shard-000001_stats.json is damaged: its counts are missing or not whole numbers",
    ),
    "a stats marker's status counts of text": (  # score summed them: a TypeError traceback
        _edit_json("stats/shard-000001_stats.json", lambda stats: stats.update(status_counts={"ok": "40"})),
        ALL,
        "shard-000001_stats.json is damaged: its counts are missing or not whole numbers",
    ),
    "a stats marker's input stamp edited": (  # it read as "changed": score re-scored, verify blamed the input
        _edit_json(
            "stats/shard-000001_stats.json", lambda stats: stats.update(input={"size": "1", "mtime_ns": 0})
        ),
        ALL,
        "shard-000001_stats.json is damaged: its input stamp is not {size, mtime_ns} in whole numbers, or "
        "a remote object's size and version as text",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_run_dir_is_one_line_for_clean_report_and_a_rerun(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, capsys, damage
):
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    change, readers, message = DAMAGES[damage]
    change(run)
    commands = {
        "clean": ["clean", str(run)],
        "report": ["report", str(run)],
        "score": [*score_argv(tiny_decoder_dir, tiny_shards, run), "--workers", "0"],
    }
    for name in readers:
        assert main(commands[name]) == 2, name
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("sanitizer: error: ") and message in err, (name, err)
        assert "Traceback" not in err
    assert not (tmp_path / "outside").exists()


DECODER_EDITS = {
    "a list": (lambda meta: [meta], "a JSON list, not an object"),
    "no model": (lambda meta: meta.pop("model") and meta, "model is NoneType, not dict"),
    "a model key this version lacks": (lambda meta: meta["model"].update(colour=1) or meta, "colour"),
    "width as text": (lambda meta: meta["model"].update(width="32") or meta, "cannot be used"),
    "no encoder hash": (
        lambda meta: meta["encoder"].pop("weights_sha256") and meta,
        "encoder.weights_sha256",
    ),
    "no calibration": (lambda meta: meta.pop("calibration") and meta, "calibration is NoneType, not dict"),
    "calibration of text": (
        lambda meta: meta["calibration"].update(scores=["a"]) or meta,
        "calibration.scores holds something other than finite numbers",
    ),
    "calibration of NaN (a decoder that diverged)": (
        lambda meta: meta["calibration"].update(scores=[float("nan")] * 3) or meta,
        "calibration.scores holds something other than finite numbers",
    ),
    "axis scale of text": (
        lambda meta: meta["calibration"]["axis_scale"].update(source=["a"]) or meta,
        "could not convert string to float",
    ),
    "axis scale descending": (
        lambda meta: meta["calibration"]["axis_scale"].update(source=[2.0, 1.0], target=[0.0, 1.0]) or meta,
        "calibration.axis_scale is not two ascending lists of finite numbers",
    ),
    "axis scale of two lengths": (
        lambda meta: meta["calibration"]["axis_scale"].update(source=[1.0, 2.0], target=[1.0]) or meta,
        "calibration.axis_scale's lists differ in length",
    ),
    "image size as text": (
        lambda meta: meta["encoder"]["preprocess"].update(image_size="32") or meta,
        "cannot be used",
    ),
}


@pytest.mark.parametrize("edit", DECODER_EDITS)
def test_a_decoder_json_edited_by_hand_is_one_line(tmp_path, tiny_decoder_dir, tiny_shards, capsys, edit):
    decoder = Path(shutil.copytree(tiny_decoder_dir, tmp_path / "decoder"))
    change, message = DECODER_EDITS[edit]
    meta = json.loads((decoder / "decoder.json").read_text())
    (decoder / "decoder.json").write_text(json.dumps(change(meta)))
    argv = score_argv(decoder, tiny_shards, tmp_path / "r")
    assert main([*argv, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sanitizer: error: {decoder / 'decoder.json'} ") and message in err, err
    assert not (tmp_path / "r").exists()


def test_a_local_run_starts_its_own_ray_beside_a_cluster_ray_start_left(tiny_decoder_dir, tiny_shards):
    """`ray start` records its cluster where ray.init() without an address looks for one: a local run
    joined it, and refused our local settings with a traceback (or scored on whatever it was). The
    record here points at an address where nothing runs; a short temp dir keeps Ray's sockets short.
    A process of its own, as Ray logs its actor-restart warning once per process: every such run
    printed `core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(ReadScoreStage))' ...
    has constructor arguments in the object store and max_restarts > 0 ...` (spend_restart_warning)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp", prefix="rt") as temp:
        (Path(temp) / "ray").mkdir()
        (Path(temp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
        argv = [*score_argv(tiny_decoder_dir, tiny_shards, Path(temp) / "r"), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": temp}
        done = subprocess.run(
            [sys.executable, "-m", "sanitizer.cli", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads((Path(temp) / "r" / "run.json").read_text())["totals"]["samples"] == 120
        assert "core_worker.cc" not in done.stderr
        assert "score: 100%" in done.stderr  # the stderr of the run, which the bar draws on


def test_stderr_without_drops_only_the_matching_lines_also_of_a_library_writing_to_fd_2(capfd):
    with stderr_without(r"class name: '[^']*Spend' .* max_restarts > 0"):
        os.write(2, b"kept 1\n[E] core_worker.cc:1: class name: 'x.Spend' and ID: 'a' max_restarts > 0.\n")
        os.write(2, b"kept 2\n")
        os.write(2, b"[E] core_worker.cc:2: class name: 'Other' and ID: 'b' max_restarts > 0.\n")
    assert capfd.readouterr().err == (
        "kept 1\nkept 2\n[E] core_worker.cc:2: class name: 'Other' and ID: 'b' max_restarts > 0.\n"
    )


OLDER_CLUSTER = '"""an older sanitizer.pipeline.cluster, without the probe task"""\n'
ANOTHER = (
    "No module named 'sanitizer.pipeline'; 'sanitizer' is not a package",
    {"sanitizer.py": '"""another package of this name"""'},
)
OLDER = (
    "Can't get attribute '_files_there' on <module 'sanitizer.pipeline.cluster' from 'STUB/sanitizer/"
    "pipeline/cluster.py'>",
    {
        "sanitizer/__init__.py": "",
        "sanitizer/pipeline/__init__.py": "",
        "sanitizer/pipeline/cluster.py": OLDER_CLUSTER,
    },
)


def cluster_import_check(tmp_path: Path, stub: dict[str, str], start_ray: str) -> str:
    """What check_cluster says, run in a process of its own (this checkout's package) on the
    Ray that `start_ray` starts, whose workers see the `stub` files first on sys.argv[1]."""
    import os
    import subprocess
    import sys

    for name, text in stub.items():
        (tmp_path / "stub" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stub" / name).write_text(text)
    (tmp_path / "probe.py").write_text(
        "import sys, ray\n"
        "from sanitizer.errors import UsageError\n"
        "from sanitizer.pipeline.cluster import check_cluster\n"
        f"{start_ray}"
        "try:\n"
        "    check_cluster('HEAD:6379', [])\n"
        "except UsageError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "probe.py", str(tmp_path / "stub")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().replace(str(tmp_path / "stub"), "STUB")


def cannot_import(reason: str) -> str:
    return (
        f"the workers of the Ray cluster at HEAD:6379 cannot import sanitizer ({reason}): install this "
        "package on every node (the Dockerfile's image has it), or submit the job with "
        "`ray job submit --working-dir .`"
    )


@pytest.mark.parametrize(("reason", "stub"), [ANOTHER, OLDER], ids=["another module", "an older install"])
def test_a_cluster_whose_workers_lack_the_package_is_one_line(tmp_path, reason, stub):
    """Its scoring actors failed and were retried in 220 lines of tracebacks, and the run died saying
    nothing of what to do. Here the workers find another module named sanitizer first, or an older
    install of it on the nodes, whose cluster module lacks the probe task (that one was a traceback); the
    driver, started elsewhere, has this one."""
    start = (
        "ray.init(address='local', num_cpus=1, include_dashboard=False,\n"
        "         runtime_env={'env_vars': {'PYTHONPATH': sys.argv[1]}})\n"
    )
    assert cluster_import_check(tmp_path, stub, start) == cannot_import(reason)


def test_a_cluster_node_that_lacks_the_package_is_found_beside_one_that_has_it(tmp_path):
    """The probe task asked for no CPU, so Ray ran it on the driver's own node, which has the package
    (the driver imports it): a second node that lacks it passed the check, and every scoring actor
    placed there failed as before. Each node that can hold an actor (one with CPUs) is asked now."""
    start = (
        "from ray.cluster_utils import Cluster\n"
        "cluster = Cluster(initialize_head=True, head_node_args={'num_cpus': 1})\n"
        "cluster.add_node(num_cpus=1, env_vars={'PYTHONPATH': sys.argv[1]})  # the stub only\n"
        "ray.init(address=cluster.address, include_dashboard=False)\n"
    )
    assert cluster_import_check(tmp_path, ANOTHER[1], start) == cannot_import(ANOTHER[0])


def test_a_cluster_whose_workers_import_the_package_and_read_the_files_passes_the_check(
    ray_session, tiny_decoder_dir
):
    from sanitizer.pipeline.cluster import check_cluster
    from sanitizer.pipeline.stages import stage_files

    check_cluster("local", stage_files(str(tiny_decoder_dir)))  # raises where they cannot


def test_the_files_a_scoring_stage_reads_are_named_as_the_workers_get_them(tiny_decoder_dir):
    """Relative paths stay relative: each worker resolves them where it runs, as its actor will."""
    from sanitizer.pipeline.stages import stage_files

    assert stage_files(str(tiny_decoder_dir), "weights/victim.safetensors") == [
        f"{tiny_decoder_dir}/decoder.json",
        f"{tiny_decoder_dir}/decoder.safetensors",
        "weights/victim.safetensors",
    ]


def test_a_file_above_the_hashed_size_is_fingerprinted_by_its_size(tmp_path, monkeypatch):
    import sanitizer.pipeline.cluster as cluster_module

    (tmp_path / "big").write_bytes(b"12345")
    (tmp_path / "small").write_bytes(b"1234")
    monkeypatch.setattr(cluster_module, "HASHED_BYTES", 4)
    assert cluster_module.fingerprint(str(tmp_path / "big")) == cluster_module.Fingerprint(5)
    assert cluster_module.fingerprint(str(tmp_path / "small")).sha256 == hashlib.sha256(b"1234").hexdigest()
    assert cluster_module.fingerprint(str(tmp_path / "gone")) == cluster_module.Fingerprint(
        why="No such file or directory"
    )


def _unlink(path: Path) -> None:
    path.unlink()


def _append_a_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b" ")


def _flip_the_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


@pytest.mark.parametrize(
    ("name", "change", "why"),
    [
        ("decoder.safetensors", _unlink, "cannot read {path} (No such file or directory)"),
        (
            "decoder.json",
            _append_a_byte,
            "holds another {path} than the driver ({size} bytes, the driver's {was})",
        ),
        (
            "decoder.safetensors",
            _flip_the_last_byte,
            "holds another {path} than the driver (same size, another sha256)",
        ),
    ],
    ids=["missing", "another size", "another sha256"],
)
def test_a_cluster_node_without_the_files_the_actors_read_is_one_line_before_any_actor(
    tmp_path, ray_session, tiny_decoder_dir, tiny_shards, monkeypatch, capsys, name, change, why
):
    """DECODER_DIR on the driver's local disk, not on a worker node's (or a stale copy there): each
    scoring actor died loading it, Ray printed its traceback, and the job ended 'a scoring actor
    stopped'. Each node now reads the files first. The one local node stands in for a worker node
    that sees the file otherwise than the driver: it is changed right after the driver read it."""
    import ray

    import sanitizer.pipeline.cluster as cluster_module

    decoder = shutil.copytree(tiny_decoder_dir, tmp_path / "decoder")
    path = decoder / name
    was = path.stat().st_size
    driver_fingerprint = cluster_module.fingerprint

    def changed_after_the_driver_read_it(file: str) -> cluster_module.Fingerprint:
        seen = driver_fingerprint(file)
        if file == str(path):
            change(path)
        return seen

    monkeypatch.setattr(cluster_module, "fingerprint", changed_after_the_driver_read_it)
    argv = score_argv(decoder, tiny_shards, tmp_path / "run")
    assert main([*argv, "--workers", "1", "--device", "cpu", "--ray-address", "HEAD:6379"]) == 2
    ip = ray.nodes()[0]["NodeManagerAddress"]
    size = path.stat().st_size if path.exists() else None
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sanitizer: error: node {ip} of the Ray cluster at HEAD:6379 "
        + why.format(path=path, size=size, was=was)
        + ": put DECODER_DIR and the encoder weights on storage that every node shares, or copy them to "
        "the same paths on every node"
    )
    assert not list((tmp_path / "run" / "manifest").glob("*"))


def test_a_cluster_address_nothing_answers_at_is_refused_at_once(tmp_path, tiny_decoder_dir, tiny_shards):
    """In a process of its own: one where this session's Ray is not already running."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = score_argv(tiny_decoder_dir, tiny_shards, tmp_path / "r")
    argv += ["--workers", "1", "--ray-address", f"127.0.0.1:{port}", "--device", "cpu"]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sanitizer.cli", *argv], capture_output=True, text=True, timeout=300
    )
    assert time.monotonic() - started < 60  # ray.init alone retried for minutes
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sanitizer: error: cannot reach the Ray cluster at 127.0.0.1:{port} (")


def test_verify_reports_a_malformed_threshold_as_a_violation(tmp_path, local_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    _edit_run_json(lambda info: info.update(threshold=[1]))(run)
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr()
    assert "run.json: threshold is list, not dict" in out.out + out.err and "Traceback" not in out.err


def test_rescoring_a_run_cleaned_at_another_threshold_says_to_clean_again(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, caplog
):
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    clean_run(run, "value:0.5")
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):
        score(tiny_decoder_dir, tiny_shards, run, workers=0)  # its default rule, not clean's
    assert f"this run re-flagged 3 shards; run `sanitizer clean {run}` again" in caplog.text
    caplog.clear()
    assert "clean" not in json.loads((run / "run.json").read_text())
    clean_run(run)  # at the score's threshold now: a rescore changes nothing and says nothing
    cleaned = tree_digest(run)
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):
        score(tiny_decoder_dir, tiny_shards, run, workers=0)
    assert "again" not in caplog.text
    assert tree_digest(run) == cleaned and verify_run(run) == []
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):  # the collapse flags cleared
        score(tiny_decoder_dir, tiny_shards, run, workers=0, collapse=None)
    assert "re-flagged" in caplog.text and "clean" not in json.loads((run / "run.json").read_text())


def test_a_refused_rerun_leaves_a_finished_run_as_it_was(tmp_path, local_run, tiny_decoder_dir, tiny_shards):
    """A mistyped --encoder-weights is refused before run.json is touched: it used to be marked
    running without its threshold, totals and record of clean, which verify then failed for good."""
    from sanitizer.errors import SanitizerError

    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    before = tree_digest(run)
    with pytest.raises(SanitizerError):
        score(
            tiny_decoder_dir, tiny_shards, run, workers=0, encoder_weights=str(tmp_path / "nope.safetensors")
        )
    assert tree_digest(run) == before and verify_run(run) == []


@pytest.mark.parametrize("scored", [False, True], ids=["nothing-scored", "a-shard-scored"])
def test_a_rerun_killed_before_it_finishes_leaves_the_record_of_clean_for_the_next(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, monkeypatch, caplog, scored
):
    """Killed after it marked the run running (here: in the collapse pass; a re-run that scores
    nothing skips it, so that one once it skipped it, as it sums the totals). The next re-run finishes
    the run as an undisturbed one would: the record of clean kept if nothing was scored since it was
    made, dropped with the warning to clean again if the killed run had scored a shard."""
    import sanitizer.pipeline.job as job_module

    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    before = tree_digest(run)
    if scored:
        (run / "stats" / "shard-000001_stats.json").unlink()  # as if it had failed, and been mended

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job_module, "apply_flags" if scored else "summarize", killed)
    with pytest.raises(KeyboardInterrupt):
        score(tiny_decoder_dir, tiny_shards, run, workers=0)
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "running" and "clean" in info and "threshold" in info
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):
        score(tiny_decoder_dir, tiny_shards, run, workers=0)
    if scored:
        assert "clean/ and quarantine/ no longer match the flags: " in caplog.text
        assert "clean" not in json.loads((run / "run.json").read_text())
        clean_run(run)
    else:
        assert "again" not in caplog.text
    timed = {"stats/shard-000001_stats.json"} if scored else set()  # its `seconds` are this run's
    after = tree_digest(run)
    assert {k: after[k] for k in after.keys() - timed} == {k: before[k] for k in before.keys() - timed}
    assert after.keys() == before.keys() and verify_run(run) == []


def test_a_rethreshold_whose_split_fails_leaves_run_json_matching_the_manifests(
    tmp_path, local_run, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))

    def fail(*_):
        raise UsageError("the input changed")

    monkeypatch.setattr(sanitizer.clean, "split_shard", fail)
    with pytest.raises(UsageError, match="the input changed"):
        clean_run(run, "value:0.5")
    info = json.loads((run / "run.json").read_text())
    flagged = sum(t.column("flagged").to_numpy().sum() for t in manifests(run).values())
    assert info["threshold"] == {"rule": "value:0.5", "value": 0.5} and "clean" not in info
    assert info["totals"]["flagged"] == flagged
    monkeypatch.undo()
    clean_run(run)  # finishes the split at the new threshold
    assert verify_run(run) == []


def test_clean_after_a_rethreshold_killed_mid_reflag_splits_at_run_jsons_threshold(
    tmp_path, local_run, monkeypatch
):
    """`clean --threshold 0.5` killed after re-flagging one manifest (run.json already at 0.5): a plain
    `clean` re-flags the others and writes what an undisturbed `clean --threshold 0.5` wrote."""
    run, undisturbed = tmp_path / "run", tmp_path / "undisturbed"
    for copy in (run, undisturbed):
        shutil.copytree(local_run[0], copy, ignore=shutil.ignore_patterns(".lock"))
    clean_run(undisturbed, "0.5")
    killed_rethreshold(run, "0.5", monkeypatch)
    clean_run(run)
    mended, whole = (  # the split markers aside: they stamp their own tars
        {k: v for k, v in tree_digest(r).items() if not k.endswith("_clean.json")} for r in (run, undisturbed)
    )
    assert mended == whole
    assert verify_run(run) == []


def test_rescoring_a_shard_of_a_cleaned_run_says_to_clean_again(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, caplog
):
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    (run / "stats" / "shard-000001_stats.json").unlink()  # as if that shard had failed, and been mended
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):
        score(tiny_decoder_dir, tiny_shards, run, workers=0)
    assert f"1 shard was scored since it was cleaned; run `sanitizer clean {run}` again" in caplog.text
    assert "clean" not in json.loads((run / "run.json").read_text())


def nightly_run(tmp_path: Path, tiny_decoder_dir: Path, tiny_shards: Path) -> tuple[Path, Path]:
    """(run, shard): the tiny shards scored and cleaned while the last one was still downloading (its
    first 20,000 bytes there), the whole file written in its place since."""
    data = tmp_path / "nightly"
    shutil.copytree(tiny_shards, data)
    shard = (data / "shard-000002.tar").resolve()
    whole = shard.read_bytes()
    shard.write_bytes(whole[:20000])
    run = tmp_path / "run"
    assert score(tiny_decoder_dir, data, run, workers=0).samples < 120
    clean_run(run)
    shard.write_bytes(whole)
    return run, shard


def test_a_shard_that_changed_since_it_was_scored_is_scored_again(
    tmp_path, tiny_decoder_dir, tiny_shards, caplog
):
    run, shard = nightly_run(tmp_path, tiny_decoder_dir, tiny_shards)
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):
        summary = score(tiny_decoder_dir, shard.parent, run, workers=0)
    assert f"{shard} changed since it was scored: scoring it again" in caplog.text
    assert f"1 shard was scored since it was cleaned; run `sanitizer clean {run}` again" in caplog.text
    assert (summary.samples, summary.scored_now, summary.shards_done) == (120, 40, 3)
    assert "clean" not in json.loads((run / "run.json").read_text())
    clean_run(run)
    assert verify_run(run) == []
    assert score(tiny_decoder_dir, shard.parent, run, workers=0).scored_now == 0


def test_a_rerun_killed_after_it_rescored_a_changed_shard_leaves_no_stale_record_of_clean(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch
):
    """The shard's old clean and quarantine tars and run.json's record of clean go as it is forgotten:
    a kill before the run finishes used to leave that record for the next re-run to keep."""
    import sanitizer.pipeline.job as job_module

    run, shard = nightly_run(tmp_path, tiny_decoder_dir, tiny_shards)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job_module, "apply_flags", killed)
    with pytest.raises(KeyboardInterrupt):
        score(tiny_decoder_dir, shard.parent, run, workers=0)
    monkeypatch.undo()
    assert "clean" not in json.loads((run / "run.json").read_text())
    assert not (run / "clean" / "shard-000002.tar").exists()
    assert not (run / "quarantine" / "shard-000002.tar").exists()
    assert score(tiny_decoder_dir, shard.parent, run, workers=0).samples == 120
    assert "clean" not in json.loads((run / "run.json").read_text())
    clean_run(run)
    assert verify_run(run) == []


def test_a_changed_shard_that_no_longer_reads_leaves_no_outputs_of_its_old_samples(
    tmp_path, tiny_decoder_dir, tiny_shards, caplog
):
    run, shard = nightly_run(tmp_path, tiny_decoder_dir, tiny_shards)
    shard.write_bytes(b"not a tar" * 100)
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):
        summary = score(tiny_decoder_dir, shard.parent, run, workers=0)
    assert summary.failed_shards and summary.shards_done == 2
    assert "the run has 2 finished shards and clean split 3; run `sanitizer clean" in caplog.text
    assert not (run / "clean" / "shard-000002.tar").exists()
    clean_run(run)
    assert verify_run(run) == []


def test_a_stats_marker_without_its_inputs_stamp_still_marks_the_shard_done(
    tmp_path, tiny_decoder_dir, tiny_shards
):
    """Markers written before the stamp was recorded force no re-score, nor do remote inputs whose
    store cannot be asked."""
    run, shard = nightly_run(tmp_path, tiny_decoder_dir, tiny_shards)
    marker = run / "stats" / "shard-000002_stats.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "input"}))
    assert score(tiny_decoder_dir, shard.parent, run, workers=0).scored_now == 0
    assert not changed_since({"size": 0, "mtime_ns": 0}, "nostore://bucket/shard-000002.tar")  # no such store
    assert changed_since({"size": 0, "mtime_ns": 0}, f"file://{shard}")  # a local file by URL is stamped


def test_a_data_rule_with_no_ok_sample_still_finishes_the_run(tmp_path, tiny_decoder_dir, capsys):
    """mad:K on shards without a single ok sample: the run is recorded (an empty shard done, a broken
    one failed) and verifies, with no threshold, instead of stopping before run.json."""
    (tmp_path / "data").mkdir()
    tarfile.open(tmp_path / "data" / "empty.tar", "w").close()
    (tmp_path / "data" / "broken.tar").write_bytes(b"not a tar at all" * 64)
    argv = score_argv(tiny_decoder_dir, tmp_path / "data", tmp_path / "run")
    assert main([*argv, "--workers", "0", "--threshold", "mad:3"]) == 1  # the broken shard failed
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["state"], info["threshold"]["value"], info["totals"]["shards_done"]) == (
        "incomplete",
        None,
        1,
    )
    assert [f["stem"] for f in info["failed_shards"]] == ["broken"]
    assert "needs scored samples and this run has none" in capsys.readouterr().err
    assert verify_run(tmp_path / "run") == []


def test_a_tilde_in_a_path_means_home_as_in_a_shell(tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch):
    """`--out '~/run'` (quoted, or from a job config): one RUN_DIR under $HOME, not `./~` beside it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_decoder_dir, tmp_path / "home" / "dec")
    argv = ["score", "--decoder", "~/dec", "--data", str(tiny_shards), "--out", "~/run", "--workers", "0"]
    assert main(argv) == 0 and main(["clean", "~/run"]) == 0
    assert len(list((tmp_path / "home" / "run" / "manifest").glob("*.parquet"))) == 3
    assert not (tmp_path / "~").exists()


def audit_example():
    """examples/audit_manifest.py as a module."""
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / "audit_manifest.py"
    spec = importlib.util.spec_from_file_location("audit_manifest", path)
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    return audit


def test_the_audit_example_reads_a_run_and_refuses_a_bad_rule_in_one_line(tmp_path, local_run, capsys):
    audit = audit_example()
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    assert audit.main([str(run), "--top", "2"]) == 0
    assert "what other score thresholds would flag" in capsys.readouterr().out
    assert audit.main([str(run), "--reclean", "bad"]) == 2
    assert capsys.readouterr().err.strip().startswith("audit_manifest: error: threshold 'bad' is not")


def test_the_audit_examples_current_threshold_is_each_rows_own_where_the_pass_set_them():
    """What-if's `current` flags score > the row's threshold: one value for the run, or, where the
    collapse pass set each row's from its neighbours' scores, no one value (NaN) but the same flags."""
    what_if = audit_example().what_if
    scores = np.array([0.1, 0.5, 0.9, 0.3])
    df = pd.DataFrame({"status": "ok", "score": scores, "label": None})
    same = what_if(df.assign(threshold=0.4)).set_index("threshold").loc["current"]
    assert (same["value"], same["flagged"]) == (0.4, 2)
    own = what_if(df.assign(threshold=[0.05, 0.6, 0.95, 0.2])).set_index("threshold").loc["current"]
    assert np.isnan(own["value"]) and own["flagged"] == 2  # rows 0 and 3


def test_the_audit_example_into_a_closed_pipe_ends_silently_as_sanitizer_does(local_run, monkeypatch):
    """`audit_manifest.py RUN | head`: once head had its lines, the next print raised BrokenPipeError
    and Python printed a traceback; it now ends as `sanitizer verify RUN | head` does, exit 141."""
    read, write = os.pipe()
    os.close(read)
    with open(write, "w", buffering=1) as closed:  # line-buffered: the first line meets the closed pipe
        monkeypatch.setattr(sys, "stdout", closed)
        assert audit_example().main([str(local_run[0])]) == 141


def test_the_audit_example_on_a_damaged_run_is_one_line(tmp_path, local_run, capsys):
    """A run.json damaged beside a manifest: the verdict's read of it raised a UsageError traceback."""
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    (run / "run.json").write_text("{not json")
    assert audit_example().main([str(run)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"audit_manifest: error: {run / 'run.json'} is damaged: not valid JSON (Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1)); restore it, or score into a new RUN_DIR"
    ]


def score_a_run_whose_every_shard_failed(tmp_path: Path, decoder_dir: Path) -> None:
    """tmp_path/run scored at the default rules from tmp_path/data, whose one shard is not a tar."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.tar").write_bytes(b"not a tar at all" * 64)
    assert main([*score_argv(decoder_dir, tmp_path / "data", tmp_path / "run"), "--workers", "0"]) == 1


def test_score_of_a_run_whose_every_shard_failed_says_why_there_is_no_collapse_threshold(
    tmp_path, tiny_decoder_dir, capsys
):
    """No ok sample: the collapse pass has nothing to weigh, and the summary says so, as it does for the
    score's threshold (it said 'the pass could not run, see above', with nothing above)."""
    score_a_run_whose_every_shard_failed(tmp_path, tiny_decoder_dir)
    line = "  by score: 0  by collapse: 0 (collapse evidence threshold none (no ok samples) [quantile:0.98])"
    assert line in capsys.readouterr().out.splitlines()


def test_the_verdict_on_a_run_with_no_ok_sample_says_that_is_why(tmp_path, tiny_decoder_dir, capsys):
    """It said 'no threshold, no ok samples or no usable calibration': the run had a threshold and a
    calibration, and the user had to guess which of the three it was."""
    score_a_run_whose_every_shard_failed(tmp_path, tiny_decoder_dir)
    assert capsys.readouterr().out.splitlines()[-1] == "verdict: no verdict: the run has no ok samples"


def test_the_audit_example_names_the_failed_shards_of_a_run_with_no_manifest(
    tmp_path, tiny_decoder_dir, capsys
):
    """A run whose every shard failed holds run.json alone: the example says so and lists them (it said
    to run `sanitizer score` first, which had been run), exit 1 as `sanitizer clean` there."""
    score_a_run_whose_every_shard_failed(tmp_path, tiny_decoder_dir)
    capsys.readouterr()
    assert audit_example().main([str(tmp_path / "run")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "no shard was scored: 1 of 1 failed (run.json failed_shards)",
        "  broken: not a readable tar file: ReadError: invalid header",
    ]


def score_a_run_with_a_failed_shard(tmp_path: Path, decoder_dir: Path, shards: Path) -> None:
    """tmp_path/run scored from one good shard and one that is not a tar."""
    (tmp_path / "data").mkdir()
    shutil.copy(shards / "shard-000000.tar", tmp_path / "data")
    (tmp_path / "data" / "broken.tar").write_bytes(b"not a tar at all" * 64)
    assert main([*score_argv(decoder_dir, tmp_path / "data", tmp_path / "run"), "--workers", "0"]) == 1


def test_the_audit_example_names_the_failed_shards_beside_the_manifest_and_exits_1(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys
):
    """A shard that failed has no rows: the audit said nothing of it and exited 0, so an auditor saw
    a complete run where part of the data was never looked at."""
    score_a_run_with_a_failed_shard(tmp_path, tiny_decoder_dir, tiny_shards)
    capsys.readouterr()
    assert audit_example().main([str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out.split("\n\n")
    assert out[1].splitlines() == [
        "1 of 2 failed (run.json failed_shards), and have no rows:",
        "  broken: not a readable tar file: ReadError: invalid header",
    ]


def test_the_audit_examples_reclean_names_skipped_shards_and_exits_1(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys
):
    """--reclean is `sanitizer clean --threshold`: a failed shard is named as skipped, exit 1 (it said
    nothing and exited 0)."""
    score_a_run_with_a_failed_shard(tmp_path, tiny_decoder_dir, tiny_shards)
    capsys.readouterr()
    assert audit_example().main([str(tmp_path / "run"), "--reclean", "value:0.5"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("re-cleaned at value:0.5 (threshold 0.5): kept ")
    assert out[-1] == "skipped shard broken: it was not scored (see run.json)"


def retrained_in_place(decoder_dir: Path) -> None:
    """Other weights under the same DECODER_DIR, as a weekly retrain into it leaves them."""
    from safetensors.torch import load_file

    from sanitizer.checkpoint import META, WEIGHTS, file_sha256, save_tensors

    tensors = load_file(str(decoder_dir / WEIGHTS))
    first = next(iter(tensors))
    save_tensors({**tensors, first: tensors[first] + 0.01}, decoder_dir / WEIGHTS)
    meta = json.loads((decoder_dir / META).read_text())
    (decoder_dir / META).write_text(
        json.dumps({**meta, "decoder_sha256": file_sha256(decoder_dir / WEIGHTS)})
    )


def test_a_decoder_retrained_in_place_is_not_read_as_the_runs(tmp_path, tiny_decoder_dir, tiny_shards):
    """Its calibration would give the same scores another quantile threshold and verdict, and its
    weights other rebuilds in the report: clean refuses a calibrated rule, the report leaves both out."""
    from sanitizer.errors import CheckpointError
    from sanitizer.report.verdict import decoder_calibration
    from sanitizer.report.views import load_scorer

    decoder = shutil.copytree(tiny_decoder_dir, tmp_path / "dec")
    run = tmp_path / "run"
    score(decoder, tiny_shards, run, workers=0)
    info = json.loads((run / "run.json").read_text())
    assert decoder_calibration(info)[0] is not None
    retrained_in_place(decoder)
    message = f"{decoder} now holds another decoder than the one the run was scored with"
    with pytest.raises(CheckpointError, match=message):
        clean_run(run, "quantile:0.9")
    with pytest.raises(CheckpointError, match=message):
        load_scorer(info)
    assert decoder_calibration(info) == (None, None)
    assert clean_run(run, "value:0.5").threshold == 0.5  # a rule that reads no calibration still works
    assert encoder_verdict(run)["text"] == (
        "no verdict: no usable calibration: the decoder the run was scored with is gone or replaced, and "
        "value:0.5 sets no false-positive rate without it"
    )


def test_sigterm_while_ray_starts_stops_the_job_as_terminated(monkeypatch):
    """Ray's own SIGTERM handler, active while ray.init runs, exits with the signal's number: the job
    would end with status 15 and no word instead of the CLI's 143 and its line."""
    import signal

    import ray

    from sanitizer.errors import Terminated
    from sanitizer.pipeline.cluster import ensure_ray

    def stopped_while_starting(**kwargs):
        raise SystemExit(signal.SIGTERM)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", stopped_while_starting)
    with pytest.raises(Terminated):
        ensure_ray(None, num_cpus=1)


def test_progress_in_a_log_is_a_line_a_minute_not_one_per_shard(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys
):
    """Where stderr is not a terminal (a scheduled job's log, `ray job logs`) each redraw of the bar
    stays as a line: a run of 100,000 shards wrote a line per shard and more. Each is a line ended by a
    newline, in ASCII: tqdm's carriage returns kept a whole run's redraws on one line of the log."""
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(tiny_shards), out=tmp_path / "r", workers=0)
    run_score_job(job, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.isascii()
    bar = [line for line in err.splitlines() if line.startswith("score:")]
    assert len(bar) == 2, bar  # drawn when it starts and when it ends
    assert bar[0].startswith("score:   0%|          | 0/3")
    assert bar[-1].startswith("score: 100%|##########| 3/3") and "samples=120" in bar[-1]


def test_a_reflag_killed_between_a_manifest_and_its_stats_is_mended_by_the_rerun(
    tmp_path, local_run, monkeypatch
):
    """`clean --threshold` killed after it rewrote a manifest, before that shard's stats marker: the
    re-run found the manifest already flagged, skipped the shard, and left its stats (and run.json's
    totals, summed from them) at the old flags."""
    import sanitizer.rundir

    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(sanitizer.rundir, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        clean_run(run, "value:0")  # flags every ok row
    monkeypatch.undo()
    clean_run(run, "value:0")
    for stem, table in manifests(run).items():
        assert RunDir(run).read_stats(stem)["flagged"] == table.num_rows == 40
    assert json.loads((run / "run.json").read_text())["totals"]["flagged"] == 120
    assert verify_run(run) == []


def test_the_collector_keeps_nothing_of_a_finished_shard_but_its_stem(tmp_path, tiny_shards):
    """Its memory must not grow with the number of shards: it kept each finished shard's expected and
    received counts and start time for the whole job."""
    import pyarrow as pa

    from sanitizer.pipeline.collect import ShardCollector
    from sanitizer.pipeline.stages import SCORE_FIELDS, read_shard

    def unscored(table: pa.Table) -> pa.Table:  # read_shard's rows as the collector takes them
        out = table.drop_columns(["pixels"])
        for f in SCORE_FIELDS:
            out = out.append_column(f, pa.nulls(out.num_rows, f.type))
        return out

    shards = {p.stem: str(p) for p in sorted(tiny_shards.glob("*.tar"))}
    collector = ShardCollector(RunDir(tmp_path / "run"), shards, None, 64)
    for stem, url in shards.items():
        for table in read_shard(url, stem, 32, chunk_rows=16):
            collector.add(unscored(table))
    assert collector.done == list(shards) and collector.samples == 120
    assert not (collector.parts or collector.expected or collector.received or collector.started)


@pytest.mark.parametrize("rule", ["mad:4", "paper"])
def test_clean_at_a_data_rule_of_a_run_whose_every_shard_failed_has_nothing_to_clean(
    tmp_path, tiny_decoder_dir, capsys, rule
):
    """As plain `clean` there: it was a usage error (exit 2), 'needs scored samples, and there are
    none', though no threshold could split a run that has no finished shard."""
    score_a_run_whose_every_shard_failed(tmp_path, tiny_decoder_dir)
    capsys.readouterr()
    assert main(["clean", str(tmp_path / "run"), "--threshold", rule]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "no shard was scored: nothing to clean",
        "skipped shard broken: it was not scored (see run.json)",
    ]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["threshold"] == {"rule": rule, "value": None}
    assert verify_run(tmp_path / "run") == []


def test_clean_reads_run_json_once_it_holds_the_lock(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, monkeypatch
):
    """A `score` that held the lock finishes (here at another threshold) just as `clean` starts: clean
    read run.json before it took the lock, so it re-flagged the manifests back to the old threshold
    and wrote the old run.json over the one the score job had just finished."""
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    lock = RunDir.lock
    raced = []

    def score_finishes_first(self):
        if not raced:
            raced.append(1)
            score(tiny_decoder_dir, tiny_shards, run, workers=0, threshold="value:0.5")
        return lock(self)

    monkeypatch.setattr(RunDir, "lock", score_finishes_first)
    clean_run(run)
    assert raced and json.loads((run / "run.json").read_text())["threshold"]["rule"] == "value:0.5"
    assert {np.float32(0.5)} == {
        t for m in manifests(run).values() for t in m.column("threshold").to_pylist()
    }
    assert verify_run(run) == []


def test_a_scoring_actor_that_cannot_load_the_decoder_is_one_line(
    tmp_path, ray_session, tiny_decoder_dir, tiny_shards, monkeypatch, capsys
):
    """The driver checks the decoder, but each actor loads it again, on a cluster on its own node,
    which may lack the file: that stopped the job with Ray's traceback of an ActorDiedError."""
    import sanitizer.pipeline.job as job_module

    decoder = shutil.copytree(tiny_decoder_dir, tmp_path / "decoder")
    load = job_module.load_stage

    def gone_after_the_check(job, plan):  # as on a node without DECODER_DIR
        stage = load(job, plan)
        (decoder / "decoder.safetensors").unlink()
        return stage

    monkeypatch.setattr(job_module, "load_stage", gone_after_the_check)
    assert main([*score_argv(decoder, tiny_shards, tmp_path / "run"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    # last: Ray's raylet prints its own traceback of the actor's death above it (docs/cluster.md)
    assert err.splitlines()[-1] == (
        f"sanitizer: error: a scoring actor stopped: {decoder} has decoder.json but no decoder.safetensors "
        "(on a Ray cluster, every node needs DECODER_DIR and the encoder weights at the paths given)"
    )


def test_a_job_on_a_ray_already_started_keeps_ray_datas_info_lines_off_the_console(
    tmp_path, ray_session, tiny_decoder_dir, tiny_shards, capsys
):
    """Importing ray.data sets its logger to DEBUG; ensure_ray quieted it only when it started Ray
    itself after that import, so a job that joins a cluster (which starts Ray before ray.data is
    imported) or finds Ray started printed Ray Data's INFO lines on every run."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.DEBUG)  # as `import ray.data` leaves it
    argv = score_argv(tiny_decoder_dir, tiny_shards, tmp_path / "run")
    assert main([*argv, "--workers", "1", "--no-collapse"]) == 0
    err = capsys.readouterr().err
    assert "Starting execution of Dataset" not in err and "INFO" not in err, err


def test_a_rerun_of_a_run_with_sketchless_samples_rewrites_nothing(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch, caplog
):
    import torch

    import sanitizer.neighbours as neighbours

    real = neighbours.effective_dim  # some embeddings on one feature: their sketch is NaN
    monkeypatch.setattr(neighbours, "effective_dim", lambda e: torch.where(e[:, 0] > e[:, 1], real(e), 1.0))
    out = tmp_path / "run"
    score(tiny_decoder_dir, tiny_shards, out, workers=0)
    table = pq.read_table(out / "manifest")
    ok = np.array(table.column("status").to_pylist()) == "ok"
    sketches = table.column("sketch").combine_chunks().flatten().to_numpy().reshape(len(ok), -1)
    none = np.isnan(sketches).all(1)
    assert none[ok].any() and not none[ok].all()
    axes = table.column("axis").to_numpy(zero_copy_only=False)  # null reads as NaN
    assert (np.isfinite(axes) == (ok & none)).all()  # the axis is kept exactly where the sketch is not
    clean_run(out)
    before = tree_digest(out)
    forget_flag_inputs(out)  # the pass runs again
    with caplog.at_level("WARNING", logger="sanitizer.pipeline.job"):
        score(tiny_decoder_dir, tiny_shards, out, workers=0)
    assert "no longer match" not in caplog.text
    assert tree_digest(out) == before  # run.json keeps its record of clean


def test_a_cluster_at_an_ipv6_address_as_ray_writes_it_is_reached():
    """Ray writes an IPv6 address in brackets ([::1]:6379); the check must reach it, not look up
    '[::1]' as a host name and refuse a cluster that answers."""
    import socket

    from sanitizer.pipeline.cluster import check_reachable

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with socket.socket(socket.AF_INET6) as server:
        try:
            server.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"[::1]:{port}")
        check_reachable(f"ray://[::1]:{port}")
    with pytest.raises(
        UsageError, match=rf"^cannot reach the Ray cluster at \[::1\]:{port} \(Connection refused\)"
    ):
        check_reachable(f"[::1]:{port}")


ADDRESS_FORMS = (
    "give the head's HOST:PORT (its GCS, port 6379 unless `ray start --port` chose), ray://HOST:PORT or auto"
)


NOT_AN_ADDRESS = "is not a Ray cluster's address: " + ADDRESS_FORMS


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1:6379x", NOT_AN_ADDRESS),  # was Ray's ValueError and its traceback, exit 1
        ("127.0.0.1", NOT_AN_ADDRESS),
        ("ray://127.0.0.1:99999", NOT_AN_ADDRESS),
        # was "cannot reach ... (Name or service not known)": the host it looked up was "http://127.0.0.1"
        (
            "http://127.0.0.1:8265",
            "is the address of the cluster's job server, which `ray job submit --address` takes; "
            + ADDRESS_FORMS,
        ),
    ],
)
def test_a_cluster_address_of_no_form_ray_takes_is_refused_in_one_line(address, why):
    from sanitizer.pipeline.cluster import check_reachable

    with pytest.raises(UsageError) as refused:
        check_reachable(address)
    assert str(refused.value) == f"--ray-address {address} {why}"


def test_a_cluster_that_asks_for_a_token_is_refused_naming_it(monkeypatch):
    """`ray start` on a machine with ~/.ray/auth_token starts a cluster with token authentication; a
    driver without RAY_AUTH_MODE=token gets Ray's bare "Failed to connect" after 20 s (exit 1). The
    error is Ray's, as ray.init raised it joining such a cluster (Ray 2.60)."""
    import ray

    from sanitizer.pipeline.cluster import ensure_ray

    def refused(**kwargs):
        try:
            raise RuntimeError(
                "Failed to connect to GCS. ... RPC error: InvalidAuthToken: Authentication token"
            )
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from e

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(UsageError) as stopped:
        ensure_ray("auto")
    assert str(stopped.value) == (
        "the Ray cluster at auto asks for its authentication token: run with RAY_AUTH_MODE=token, the "
        "cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
    )


@pytest.mark.parametrize(
    ("workers", "node_cpus", "threads"),
    [
        (1, [16.0], 16),  # one machine: its CPUs
        (2, [16.0], 8),
        (1, [1.0, 1.0], 1),  # asked 2 CPUs on nodes of 1: never placed, the job waited forever
        (2, [2.0, 2.0, 2.0], 2),  # not 3
        (6, [2.0, 2.0, 2.0], 1),
        (4, [0.0, 2.0], 1),  # a head without CPUs holds none
    ],
)
def test_a_cpu_actor_asks_for_no_more_cpus_than_one_node_holds(workers, node_cpus, threads):
    from sanitizer.pipeline.run_stage import actor_threads

    assert actor_threads(workers, node_cpus) == threads


def test_a_shard_killed_between_its_manifest_and_its_stats_that_then_fails_leaves_no_manifest(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch
):
    """A job killed after a shard's manifest was written and before its stats marker leaves a manifest
    of a shard not done; when the re-run cannot read that shard (it was replaced, or its store fails),
    the shard is listed as failed and its old manifest goes: it used to stay, read as rows of the run
    by `pd.read_parquet(RUN_DIR/manifest)` and a violation for `verify`."""
    import sanitizer.atomic as atomic  # where a marking writes the stats markers

    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    shard, run = data / "shard-000002.tar", tmp_path / "run"

    def killed(path, obj):
        if path.name == "shard-000002_stats.json":
            raise KeyboardInterrupt
        write_json_atomic(path, obj)

    monkeypatch.setattr(atomic, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        score(tiny_decoder_dir, data, run, workers=0)
    monkeypatch.undo()
    assert (run / "manifest" / "shard-000002.parquet").exists()
    shard.write_bytes(b"not a tar" * 100)
    summary = score(tiny_decoder_dir, data, run, workers=0)
    assert list(summary.failed_shards) == ["shard-000002"]
    assert not (run / "manifest" / "shard-000002.parquet").exists()
    assert verify_run(run) == []


# -- a re-run whose flags' inputs did not change skips flagging (the collapse pass)

SKIPPED = "collapse pass: unchanged since the last run, skipped"  # "flags: ..." with --no-collapse


def manifest_files(run: Path) -> dict[str, tuple[bytes, int, int]]:
    """Each manifest's bytes, inode and mtime: a skipped pass rewrites none."""
    files = sorted((run / "manifest").glob("*.parquet"))
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in files}


def copied_run(local_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(local_run[0], run, ignore=shutil.ignore_patterns(".lock"))
    return run


def rerun(decoder_dir: Path, data: Path, run: Path, caplog, **kw) -> bool:
    """Score `run` again; whether it skipped flagging (the collapse pass)."""
    caplog.clear()
    with caplog.at_level("INFO", logger="sanitizer.pipeline.job"):
        score(decoder_dir, data, run, workers=0, **kw)
    return any(m.endswith(SKIPPED.partition(":")[2]) for m in caplog.messages)


def test_an_identical_rerun_skips_the_collapse_pass(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, capsys, monkeypatch
):
    """It ran again on every re-run: 56-132 s on 1,500 shards, for the same flags. A RUN_DIR copied
    (new inodes and mtimes) holds the same outputs: skipped too."""
    import sanitizer.pipeline.job as job_module

    run = copied_run(local_run, tmp_path)
    files, before = manifest_files(run), tree_digest(run)

    def not_run(*_):
        raise AssertionError("the pass ran")

    monkeypatch.setattr(job_module, "apply_flags", not_run)
    capsys.readouterr()
    assert main([*score_argv(tiny_decoder_dir, tiny_shards, run), "--workers", "0"]) == 0
    assert f"sanitizer: {SKIPPED}" in capsys.readouterr().err.splitlines()
    assert manifest_files(run) == files and tree_digest(run) == before and verify_run(run) == []


def holdout_changed(decoder_dir: Path, tmp_path: Path) -> Path:
    """The decoder with two of its held-out images swapped: the same weights (the same run), another
    holdout to weigh the run against."""
    from sanitizer.checkpoint import load_holdout, save_holdout

    copy = tmp_path / "decoder"
    shutil.copytree(decoder_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    held = load_holdout(copy)
    order = np.arange(len(held.axes))
    order[[0, -1]] = order[[-1, 0]]
    save_holdout(copy, held.take(order))
    return copy


CHANGES = {  # a re-run's options, as a fresh run is given them
    "threshold-rule": {"threshold": "mad:3"},
    "collapse-rule": {"collapse": "quantile:0.9"},
    "no-collapse": {"collapse": None},
    "holdout": {"decoder_dir": holdout_changed},
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_rerun_with_another_rule_or_holdout_flags_as_a_fresh_run(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, caplog, change
):
    kw = dict(CHANGES[change])
    decoder = kw.pop("decoder_dir", lambda d, _: d)(tiny_decoder_dir, tmp_path)
    run = copied_run(local_run, tmp_path)
    assert not rerun(decoder, tiny_shards, run, caplog, **kw)
    fresh = tmp_path / "fresh"
    score(decoder, tiny_shards, fresh, workers=0, **kw)
    assert tree_digest(run / "manifest") == tree_digest(fresh / "manifest")
    flagged = [
        {k: json.loads((r / "run.json").read_text())[k] for k in ("threshold", "collapse")}
        for r in (run, fresh, local_run[0])
    ]
    assert flagged[0] == flagged[1] != flagged[2]
    assert rerun(decoder, tiny_shards, run, caplog, **kw)


def test_a_rerun_after_a_manifest_was_rewritten_runs_the_pass(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, caplog
):
    """`clean --threshold value:0` flags every row; `score` re-run at its own threshold flags them back."""
    run = copied_run(local_run, tmp_path)
    clean_run(run, "value:0")
    assert not rerun(tiny_decoder_dir, tiny_shards, run, caplog)
    assert tree_digest(run / "manifest") == tree_digest(local_run[0] / "manifest")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def noise_shards(root: Path) -> Path:
    """Uniform noise, nothing like the tiny decoder's held-out images (test_collapse's unlike data)."""
    noise = np.random.default_rng(3).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    write_image_shards(root / "noise", noise, per_shard=20)
    return root / "noise"


WARNED = {  # a first run's data and options, and what its pass warns of (a line each)
    "unlike-data": (noise_shards, {}, ["held-out images are unlike this data", "6 held-out images with a"]),
    # 6 held-out images attest p = 1/7 > e^-1.5; a value rule's score test reads no neighbours
    "no-warning": (None, {"collapse": "value:1.5", "threshold": "value:0.5"}, []),
}


@pytest.mark.parametrize("case", WARNED)
def test_a_skipped_pass_says_again_what_it_warned(tmp_path, tiny_decoder_dir, tiny_shards, caplog, case):
    """A re-run that skipped the pass did not repeat its warnings: a scheduled job's log read clean while
    the flags rested on a holdout it had warned of. Now it says the same lines, from run.json."""
    make, kw, said = WARNED[case]
    data, run = make(tmp_path) if make else tiny_shards, tmp_path / "run"
    with caplog.at_level("INFO", logger="sanitizer"):
        score(tiny_decoder_dir, data, run, workers=0, **kw)
    first, recorded = warnings_of(caplog), json.loads((run / "run.json").read_text())["flag_warnings"]
    assert len(recorded) == len(said) and all(any(s in w for w in recorded) for s in said)
    assert set(recorded) <= set(first)
    assert rerun(tiny_decoder_dir, data, run, caplog, **kw)
    assert warnings_of(caplog) == first  # the pass's, and the seeded weights' that every run gives


def test_a_run_that_recorded_no_warnings_runs_the_pass_again(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, caplog
):
    """A run.json of a version that did not record them: what its pass warned of is known only by
    running it, once (the same flags: no manifest rewritten); the next re-run skips it and says them."""
    run = copied_run(local_run, tmp_path)
    info = json.loads((run / "run.json").read_text())
    del info["flag_warnings"]
    write_json_atomic(run / "run.json", info)
    files = manifest_files(run)
    assert not rerun(tiny_decoder_dir, tiny_shards, run, caplog)
    warned = warnings_of(caplog)
    assert warned and rerun(tiny_decoder_dir, tiny_shards, run, caplog) and warnings_of(caplog) == warned
    assert manifest_files(run) == files


def test_a_pass_killed_part_way_runs_again(
    tmp_path, local_run, tiny_decoder_dir, tiny_shards, caplog, monkeypatch
):
    """Killed after it rewrote one manifest, before run.json recorded what it flagged from: the next
    re-run runs it again, with the same options as with the first ones."""
    import sanitizer.rundir

    run, written = copied_run(local_run, tmp_path), []
    real = sanitizer.rundir.write_manifest

    def killed_at_the_second(*args):
        if written:
            raise KeyboardInterrupt
        written.append(real(*args))

    monkeypatch.setattr(sanitizer.rundir, "write_manifest", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        score(tiny_decoder_dir, tiny_shards, run, workers=0, threshold="mad:3")
    monkeypatch.undo()
    assert len(written) == 1 and json.loads((run / "run.json").read_text())["state"] == "running"
    assert not rerun(tiny_decoder_dir, tiny_shards, run, caplog, threshold="mad:3")
    assert not rerun(tiny_decoder_dir, tiny_shards, run, caplog)
    assert tree_digest(run / "manifest") == tree_digest(local_run[0] / "manifest")
    assert rerun(tiny_decoder_dir, tiny_shards, run, caplog)
