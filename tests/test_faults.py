"""Hostile inputs and faults: nothing lost, nothing unsafe runs, and a crash costs only time.

One corpus (the hostile shards of sanitizer.data.hostile plus four ordinary shards) is scored and
cleaned once, undisturbed, in-process: that run is the reference. Every fault below (SIGKILL of
the whole job at several moments, with and without Ray; a Ray actor killed mid-task; a full disk;
an unwritable RUN_DIR; a second job on the same RUN_DIR) must end, after a re-run, with outputs
equal to the reference and a run that `sanitizer verify` passes. bench/faults.py is the longer,
randomized version.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import save_file

from sanitizer import faultkit
from sanitizer.checkpoint import file_sha256
from sanitizer.data.hostile import (
    PWNED_FILE,
    SHARD_ERROR_SHARDS,
    expected_statuses,
    pickle_payload,
    write_hostile_corpus,
)
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.data.tario import TAR_ENCODING, TAR_ERRORS, printable
from sanitizer.faultkit import (
    CliResult,
    cli,
    cmdline,
    descendants,
    full_disk,
    half_parquet,
    half_tar_member,
    kill_job,
    outputs,
    session_pids,
    stats_count,
)
from sanitizer.joblock import recorded_pid
from sanitizer.manifest import read_manifest
from sanitizer.verify import verify_run

from .conftest import RESET

SYNTH = [f"synth-{i:06d}" for i in range(4)]
DONE = sorted([n for n in expected_statuses() if n not in SHARD_ERROR_SHARDS] + SYNTH)
WAIT_S = 300  # generous: a loaded CI machine takes long to import torch and start Ray


# ---------------------------------------------------------------- helpers


def score_args(decoder: Path, data: Path, run: Path, workers: int) -> list[str]:
    return [
        "score",
        "--decoder",
        str(decoder),
        "--data",
        str(data),
        "--out",
        str(run),
        "--workers",
        str(workers),
    ]


# A scoring call of 8 rows, not the default 512 (every sample of the corpus in one call, its shards'
# stats markers then written together): the job's shards finish, and are marked, one call after
# another, so that a signal sent once the first marker is written finds the job part-way through.
# The scores are the same (one micro-batch, 64).
PART_WAY = ["--batch-size", "8"]


def cut_short(corpus: Path, stem: str) -> str:
    """The read error of a corpus shard whose `flaky://` transfer ends after 3000 bytes (`cut`)."""
    return f"read ended after 3000 of its {(corpus / f'{stem}.tar').stat().st_size} bytes"


def assert_same_outputs(run: Path, reference: Path) -> None:
    got, want = outputs(run), outputs(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the undisturbed run"


def assert_nothing_partial(run: Path) -> None:
    """Every file under a final name is complete; the only others are hidden temp files."""
    for path in run.rglob("*"):
        if path.is_dir() or path.name == ".lock":
            continue
        if path.name.startswith(".") and ".tmp-" in path.name:
            continue  # a killed writer's temp file: removed by the next run
        if path.suffix == ".parquet":
            read_manifest(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            with tarfile.open(path) as tar:
                for info in tar:
                    tar.extractfile(info).read()  # raises on a cut tar


def score_actors(pids: list[int]) -> dict[int, str]:
    return {p: c for p in pids if "ScoreStage" in (c := cmdline(p))}


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen | None, what: str, log: Path | None = None
):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if proc is not None and proc.poll() is not None:
            detail = log.read_text()[-2000:] if log is not None else ""
            pytest.fail(f"the job exited ({proc.returncode}) before {what}:\n{detail}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


JOBS: list[subprocess.Popen] = []


@pytest.fixture(scope="module", autouse=True)
def _no_job_outlives_the_tests():
    yield
    for job in JOBS:
        if job.poll() is None or session_pids(job.pid):
            kill_job(job)


def start_job(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """faultkit.start_job, remembered so that no job outlives the tests."""
    job = faultkit.start_job(args, cwd, log)
    JOBS.append(job)
    return job


# ---------------------------------------------------------------- the corpus and the reference run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault_corpus")
    write_hostile_corpus(out)
    pixels = synthetic_images(80, 32, seed=7)
    write_image_shards(
        out, pixels, captions=[f"picture {i}" for i in range(80)], per_shard=20, prefix="synth"
    )
    return out


@dataclass
class Reference:
    run: Path
    cwd: Path
    score: CliResult
    clean: CliResult


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tiny_decoder_dir) -> Reference:
    """The undisturbed run, in-process without Ray, from a scratch working directory."""
    base = tmp_path_factory.mktemp("reference")
    cwd, run = base / "cwd", base / "run"
    cwd.mkdir()
    scored = cli(*score_args(tiny_decoder_dir, corpus, run, 0), cwd=cwd)
    cleaned = cli("clean", run, cwd=cwd)
    return Reference(run, cwd, scored, cleaned)


# ---------------------------------------------------------------- hostile input


def test_every_sample_gets_its_exact_status(reference):
    run = reference.run
    for name, expected in expected_statuses().items():
        if expected is None:
            continue
        table = read_manifest(run / "manifest" / f"{name}.parquet")
        rows = list(zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True))
        assert rows == [(printable(k), s) for k, s in expected], name
        assert table.column("index").to_pylist() == list(range(len(expected)))
        errors = table.column("error").to_pylist()
        assert all((e is None) == (s == "ok") for e, (_, s) in zip(errors, expected, strict=True)), name
        stats = json.loads((run / "stats" / f"{name}_stats.json").read_text())
        assert stats["count"] == len(expected)
    truncated = json.loads((run / "stats" / "truncated_stats.json").read_text())
    assert truncated["shard_error"].startswith("shard cut off inside member 't2.png'")
    for name in SYNTH:
        assert read_manifest(run / "manifest" / f"{name}.parquet").column("status").to_pylist() == ["ok"] * 20


def test_not_a_tar_shards_fail_the_run_and_the_others_complete(reference):
    info = json.loads((reference.run / "run.json").read_text())
    assert reference.score.rc == 1
    assert info["state"] == "incomplete"
    assert [f["stem"] for f in info["failed_shards"]] == ["not_a_tar_gzip", "not_a_tar_random"]
    assert {f["error"] for f in info["failed_shards"]} == {
        "not a readable tar file: ReadError: invalid header"
    }
    for stem in SHARD_ERROR_SHARDS:
        assert (
            f"FAILED shard {stem}: not a readable tar file: ReadError: invalid header" in reference.score.out
        )
    totals = info["totals"]
    assert (totals["shards"], totals["shards_done"], totals["samples"]) == (16, 14, 145)
    assert reference.clean.rc == 1
    assert reference.clean.out.splitlines()[1:] == [
        f"skipped shard {s}: it was not scored (see run.json)" for s in sorted(SHARD_ERROR_SHARDS)
    ]


def test_run_dir_holds_exactly_the_outputs(reference):
    files = {p.relative_to(reference.run).as_posix() for p in reference.run.rglob("*")}
    expected = {
        ".lock",
        "run.json",
        "sizes.json",
        "clean/sizes.json",
        "manifest",
        "stats",
        "clean",
        "quarantine",
    }
    for stem in DONE:
        expected |= {
            f"manifest/{stem}.parquet",
            f"stats/{stem}_stats.json",
            f"stats/{stem}_clean.json",
            f"clean/{stem}.tar",
            f"quarantine/{stem}.tar",
        }
    assert files == expected


def test_pickle_payloads_never_run(reference, corpus):
    assert b"PWNED" in (corpus / "names.tar").read_bytes()  # the payload is really there
    for where in (reference.cwd, reference.run, corpus, Path.cwd()):
        assert not (where / PWNED_FILE).exists()
    assert not list(reference.run.parent.rglob(PWNED_FILE))
    names = _member_names(reference.run, "names")
    assert {"pickled.pyd", "pickled.pickle"} <= names  # copied as opaque bytes


def _member_names(run: Path, stem: str) -> set[str]:
    names: set[str] = set()
    for part in ("clean", "quarantine"):
        with tarfile.open(run / part / f"{stem}.tar", encoding=TAR_ENCODING, errors=TAR_ERRORS) as tar:
            names |= set(tar.getnames())
    return names


def test_path_traversal_names_are_copied_but_never_followed(reference, corpus):
    names = _member_names(reference.run, "names")
    assert {"../../evil.png", "../../evil.txt", "/abs/root.png", "caf\udce9.png", "k" * 300 + ".txt"} <= names
    run = reference.run
    for base in (run, run / "clean", run / "quarantine", run / "manifest", reference.cwd, corpus):
        assert not (base / "../../evil.png").resolve().exists()
        assert not (base / "../../evil.txt").resolve().exists()
    assert not Path("/abs/root.png").exists()


def test_verify_passes_on_the_hostile_run(reference):
    """No violation; the shards that are not tars were never scored, which makes it exit 1, as score."""
    assert verify_run(reference.run) == []
    result = cli("verify", reference.run)
    never = (
        "never scored (not a readable tar file: ReadError: invalid header): in neither clean/ nor quarantine/"
    )
    assert (result.rc, result.out) == (
        1,
        f"shard not_a_tar_gzip: {never}\nshard not_a_tar_random: {never}\n"
        f"verify: 0 violations in {reference.run}; incomplete: 2 of 16 shards never scored\n",
    )


# ---------------------------------------------------------------- the whole job killed


@dataclass
class KilledRun:
    run: Path
    second: CliResult  # a second job tried while the first held the lock
    holder: str
    done_at_first_kill: int
    rerun: CliResult
    clean: CliResult


@pytest.fixture(scope="module")
def killed_local(tmp_path_factory, corpus, tiny_decoder_dir) -> KilledRun:
    """SIGKILL after the first shard is done; SIGKILL the re-run at a seeded random moment;
    re-run to completion; clean. A second job is tried while the first holds the lock."""
    base = tmp_path_factory.mktemp("killed_local")
    run, log = base / "run", base / "job.log"
    args = [*score_args(tiny_decoder_dir, corpus, run, 0), *PART_WAY]
    first = start_job(args, base, log)
    wait_for(lambda: recorded_pid(run) == first.pid, first, "the job took the lock", log)
    second = cli(*args, cwd=base)
    wait_for(lambda: stats_count(run) > 0, first, "the first stats marker", log)
    assert kill_job(first), "the job ended before it was killed"
    done = stats_count(run)
    assert_nothing_partial(run)

    again = start_job(args, base, log)
    wait_for(lambda: recorded_pid(run) == again.pid, again, "the re-run took the lock", log)
    time.sleep(random.Random(7).uniform(0.0, 1.0))
    kill_job(again)  # it may have finished by then on a fast machine: the outcome must not differ
    assert_nothing_partial(run)

    rerun = cli(*args, cwd=base)
    return KilledRun(
        run, second, f"{first.pid} on {socket.gethostname()}", done, rerun, cli("clean", run, cwd=base)
    )


def test_second_job_on_a_busy_run_dir_is_refused(killed_local):
    assert killed_local.second.rc == 75  # busy: a scheduler tells it from a broken job
    assert killed_local.second.err.splitlines()[-1] == (
        f"sanitizer: error: another sanitizer job (pid {killed_local.holder}) is using {killed_local.run}"
    )


def test_killed_job_rerun_equals_the_undisturbed_run(killed_local, reference):
    assert killed_local.done_at_first_kill < len(DONE)  # the kill came before the job was done
    assert killed_local.rerun.rc == 1  # the two not-a-tar shards
    assert_same_outputs(killed_local.run, reference.run)
    assert verify_run(killed_local.run) == []


def test_a_job_stopped_by_sigterm_says_so_and_the_rerun_completes_it(
    tmp_path, corpus, tiny_decoder_dir, reference
):
    """Schedulers stop jobs with SIGTERM: the job stops as on Ctrl-C (one line, exit 143, temp files
    removed) instead of dying wherever the signal found it, and a re-run completes the run."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    args = [*score_args(tiny_decoder_dir, corpus, run, 0), *PART_WAY]
    job = start_job(args, tmp_path, log)
    wait_for(lambda: stats_count(run) > 0, job, "the first stats marker", log)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 143, log.read_text()
    assert "sanitizer: terminated (SIGTERM); run it again to resume" in log.read_text()
    assert "Traceback" not in log.read_text()
    assert stats_count(run) < len(DONE)
    assert_nothing_partial(run)
    assert cli(*args, cwd=tmp_path).rc == 1  # the two not-a-tar shards
    cli("clean", run, cwd=tmp_path)
    assert_same_outputs(run, reference.run)


def test_ctrl_c_twice_on_the_ray_path_ends_on_the_line_and_leaves_no_ray(
    tmp_path, corpus, tiny_decoder_dir, reference
):
    """Ctrl-C, and again as the job winds down (its local Ray stops for seconds): the line is the
    log's last, with no traceback. Ray's exit handler stopped that Ray after the line, printing its
    notes of the killed actors after it, and a second Ctrl-C there ended in Ray's traceback."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = start_job(score_args(tiny_decoder_dir, corpus, run, 1), tmp_path, log)
    wait_for(lambda: stats_count(run) > 0, job, "the first stats marker", log)
    job.send_signal(signal.SIGINT)
    time.sleep(0.3)
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=60) == 130
    assert log.read_text().splitlines()[-1] == "sanitizer: interrupted (SIGINT); run it again to resume"
    assert "Traceback" not in log.read_text()
    wait_for(lambda: not session_pids(job.pid), None, "its Ray's processes to end")
    assert_nothing_partial(run)
    assert cli(*score_args(tiny_decoder_dir, corpus, run, 0), cwd=tmp_path).rc == 1  # 2 not-a-tar shards
    cli("clean", run, cwd=tmp_path)
    assert_same_outputs(run, reference.run)


def test_ray_job_killed_then_actor_killed_on_rerun(
    ray_session, tmp_path, corpus, tiny_decoder_dir, reference
):
    """SIGKILL the Ray driver (and its Ray) while the actor scores; in the re-run, SIGKILL the
    scoring actor mid-task: Ray restarts it and retries, and the outputs equal the reference."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    args = score_args(tiny_decoder_dir, corpus, run, 1)
    job = start_job(args, tmp_path, log)

    def scoring() -> bool:
        return any(".submit" in c for c in score_actors(session_pids(job.pid)).values())

    wait_for(scoring, job, "the Ray actor scoring", log)
    assert kill_job(job), "the job ended before it was killed"
    assert_nothing_partial(run)
    assert stats_count(run) < len(DONE)

    seen: dict[int, str] = {}
    killed: list[int] = []
    stop = threading.Event()

    def kill_actor_once() -> None:
        while not stop.is_set():
            actors = score_actors(descendants(os.getpid()))
            seen.update(actors)
            busy = [p for p, c in actors.items() if ".submit" in c]
            if busy and not killed:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_actor_once, daemon=True)
    watcher.start()
    try:
        rerun = cli(*args, cwd=tmp_path)
    finally:
        stop.set()
        watcher.join()
    assert killed, "the scoring actor was never seen busy"
    assert len(seen) >= 2, "Ray did not restart the killed actor"
    assert rerun.rc == 1
    assert cli("clean", run, cwd=tmp_path).rc == 1
    assert_same_outputs(run, reference.run)
    assert verify_run(run) == []


def test_an_actor_killed_every_time_it_scores_stops_the_job(
    ray_session, tmp_path, corpus, tiny_decoder_dir, reference
):
    """A batch that kills its actor each time (the OOM killer, a crashing codec): Ray restarts it a
    few times (ACTOR_RESTARTS), then the job stops with one line and exit 1 instead of retrying
    forever at 0%; the shards finished before are kept, and a re-run resumes to the same outputs."""
    run = tmp_path / "run"
    args = score_args(tiny_decoder_dir, corpus, run, 1)
    killed: list[int] = []
    stop = threading.Event()

    def kill_busy_actors() -> None:
        while not stop.is_set():
            busy = [p for p, c in score_actors(descendants(os.getpid())).items() if ".submit" in c]
            for pid in busy:  # from the first shard done on, and no more than twice the budget
                if stats_count(run) and pid not in killed and len(killed) < 10:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_busy_actors, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        stopped = cli(*args, cwd=tmp_path)
    finally:
        stop.set()
        watcher.join()
    assert time.monotonic() - started < 300  # 25-45 s; 200 s on a 2-core machine busy with a benchmark
    assert len(killed) == 5  # once, then after each of the 4 restarts
    assert stopped.rc == 1
    assert stopped.err.splitlines()[-1] == (
        "sanitizer: error: a scoring actor died 5 times (Ray restarted it 4 times, retrying its "
        "shards): its process was killed, most often by the kernel's OOM killer as the host ran out of "
        "memory (`dmesg` says), or crashed; give a lower --batch-size (64 or less); finished shards "
        "are kept, so the re-run resumes"
    )
    assert "Traceback" not in stopped.err
    assert "deprecated" not in stopped.err  # Ray's warning about the ray_remote_args that set the budget
    assert 0 < stats_count(run) < len(DONE)
    assert_nothing_partial(run)
    assert verify_run(run) == [
        "run.json state is 'running': the job did not finish; run `sanitizer score` again to finish it"
    ]
    rerun = cli(*args, cwd=tmp_path)
    assert rerun.rc == 1  # the two not-a-tar shards
    assert cli("clean", run, cwd=tmp_path).rc == 1
    assert_same_outputs(run, reference.run)
    assert verify_run(run) == []


def test_the_gpu_and_cpu_scoring_actors_both_get_the_restart_budget(ray_session):
    """The GPU pool cannot be run here: its actors get the same finite budget as the CPU pool's, which
    the test above kills, and neither Ray Data's default of restarting forever nor its warning."""
    import ray

    from sanitizer.pipeline.run_stage import cpu_scoring, gpu_scoring

    ds = ray.data.from_items([{"url": "x.tar", "stem": "x"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pools = [gpu_scoring(ds, {}, 32, None, 64, 1), cpu_scoring(ds, {}, None, 64, 1)]
    for pool in pools:
        remote_args = pool._logical_plan.dag.ray_remote_args
        assert (remote_args["max_restarts"], remote_args["max_task_retries"]) == (4, 4)


def test_a_worker_rays_memory_monitor_kills_is_one_line(tmp_path, corpus, tiny_decoder_dir, monkeypatch):
    """Ray's memory monitor kills a worker once the node's memory use passes RAY_memory_usage_threshold
    (95%), before the kernel would: at 1% it kills the scoring actor as it starts. That ended the job
    with Ray's traceback and pages of its memory report."""
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.01")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "50")
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = start_job([*score_args(tiny_decoder_dir, corpus, run, 1), "--device", "cpu"], tmp_path, log)
    assert job.wait(timeout=WAIT_S) == 1, log.read_text()[-3000:]
    err = log.read_text()
    # the last line of ours: at 1% the monitor also kills Ray Data's own actors, which its raylet reports
    errors = [line for line in err.splitlines() if line.startswith("sanitizer: error:")]
    assert len(errors) == 1, err[-3000:]
    assert re.fullmatch(
        r"sanitizer: error: Ray's memory monitor killed a worker of this job as the host ran low on "
        r"memory \(\S+ used / \S+ limit on node [\d.]+\); give a lower --batch-size \(64 or less\); "
        r"finished shards are kept, so the re-run resumes",
        errors[0],
    )
    assert "Traceback" not in err
    assert "Object store memory usage" not in err


# ---------------------------------------------------------------- disks and directories


def test_run_dir_under_a_regular_file_is_a_clean_error(tmp_path, corpus, tiny_decoder_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run = blocker / "run"
    result = cli(*score_args(tiny_decoder_dir, corpus, run, 0))
    assert result.rc == 2
    assert result.err.splitlines()[-1] == f"sanitizer: error: cannot use {run} as RUN_DIR: Not a directory"
    assert "Traceback" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert blocker.read_text() == "not a directory"


def test_read_only_parent_is_a_clean_error(tmp_path, corpus, tiny_decoder_dir):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        probe = parent / "probe"
        try:
            probe.mkdir()
        except PermissionError:
            pass
        else:
            probe.rmdir()
            pytest.skip("running with privileges that ignore directory permissions (root)")
        run = parent / "run"
        result = cli(*score_args(tiny_decoder_dir, corpus, run, 0))
        assert result.rc == 2
        assert (
            result.err.splitlines()[-1] == f"sanitizer: error: cannot use {run} as RUN_DIR: Permission denied"
        )
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_full_disk_while_scoring(monkeypatch, tmp_path, corpus, tiny_decoder_dir, reference):
    real = pq.write_table
    monkeypatch.setattr(pq, "write_table", full_disk(real, 3, half_parquet(real)))
    run = tmp_path / "run"
    args = score_args(tiny_decoder_dir, corpus, run, 0)
    result = cli(*args, cwd=tmp_path)
    failed = run / "manifest" / f"{DONE[2]}.parquet"  # shards are scored in order without Ray
    assert result.rc == 1
    assert result.err.splitlines()[-1] == f"sanitizer: error: No space left on device: {failed}"
    assert "Traceback" not in result.err
    assert not failed.exists()
    assert sorted(p.name for p in (run / "manifest").iterdir()) == [f"{s}.parquet" for s in DONE[:2]]
    assert sorted(p.name for p in (run / "stats").iterdir()) == [f"{s}_stats.json" for s in DONE[:2]]
    assert json.loads((run / "run.json").read_text())["state"] == "running"
    # the one line that matters, not one per row of the finished shards' unfinal thresholds
    assert verify_run(run) == [
        "run.json state is 'running': the job did not finish; run `sanitizer score` again to finish it"
    ]
    refused = cli("clean", run, cwd=tmp_path)
    assert (refused.rc, refused.err.splitlines()[-1]) == (
        2,
        f"sanitizer: error: {run} has no threshold yet: its `sanitizer score` did not finish (run it "
        "again to finish it), or found no ok score for a data rule; or give --threshold",
    )

    monkeypatch.setattr(pq, "write_table", real)  # space freed: the re-run completes
    assert cli(*args, cwd=tmp_path).rc == 1
    assert cli("clean", run, cwd=tmp_path).rc == 1
    assert_same_outputs(run, reference.run)
    assert verify_run(run) == []


def test_full_disk_while_cleaning(monkeypatch, tmp_path, reference):

    run = Path(shutil.copytree(reference.run, tmp_path / "run"))
    for name in ("clean", "quarantine"):
        shutil.rmtree(run / name)
    (run / "sizes.json").unlink()
    real = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", full_disk(real, 40, half_tar_member))
    result = cli("clean", run)
    assert result.rc == 1
    assert result.err.startswith("sanitizer: error: No space left on device: ")
    failed = Path(result.err.strip().rsplit(": ", 1)[1])
    assert failed.parent.name in ("clean", "quarantine") and failed.suffix == ".tar"
    assert not failed.exists()
    assert not (run / "sizes.json").exists()
    assert_nothing_partial(run)

    monkeypatch.setattr(tarfile.TarFile, "addfile", real)
    assert cli("clean", run).rc == 1
    assert_same_outputs(run, reference.run)
    assert verify_run(run) == []


# ---------------------------------------------------------------- weights that carry code


def test_a_decoder_without_its_weights_is_a_clean_error(tmp_path, corpus, tiny_decoder_dir):
    """The collapse pass keys its reference with the weights, before any scoring: a decoder directory
    that lost them is refused there, as loading it would be."""
    decoder = Path(shutil.copytree(tiny_decoder_dir, tmp_path / "decoder"))
    (decoder / "decoder.safetensors").unlink()
    result = cli(*score_args(decoder, corpus, tmp_path / "run", 0), cwd=tmp_path)
    assert result.rc == 2
    assert result.err.splitlines()[-1] == (
        f"sanitizer: error: {decoder} has decoder.json but no decoder.safetensors"
    )
    assert "Traceback" not in result.err


def test_pickled_weights_are_refused_and_never_run(tmp_path, corpus, tiny_decoder_dir):

    evil = tmp_path / "encoder.pt"
    evil.write_bytes(pickle_payload())
    result = cli(
        *score_args(tiny_decoder_dir, corpus, tmp_path / "run1", 0), "--encoder-weights", evil, cwd=tmp_path
    )
    assert result.rc == 2
    assert result.err.splitlines()[-1].startswith(
        f"sanitizer: error: refused {evil}: it holds more than plain tensors"
    )

    decoder = Path(shutil.copytree(tiny_decoder_dir, tmp_path / "decoder"))
    (decoder / "decoder.safetensors").write_bytes(pickle_payload())
    meta = json.loads((decoder / "decoder.json").read_text())
    meta["decoder_sha256"] = file_sha256(decoder / "decoder.safetensors")  # so that loading is attempted
    (decoder / "decoder.json").write_text(json.dumps(meta))
    result = cli(*score_args(decoder, corpus, tmp_path / "run2", 0), cwd=tmp_path)
    assert result.rc == 2
    assert result.err.splitlines()[-1].startswith(
        f"sanitizer: error: cannot read {decoder / 'decoder.safetensors'}: "
    )
    assert "Traceback" not in result.err
    assert not list(tmp_path.rglob(PWNED_FILE))


def test_score_names_the_encoder_weights_to_give(tmp_path, corpus, tiny_decoder_dir, tiny_encoder):
    decoder = Path(shutil.copytree(tiny_decoder_dir, tmp_path / "decoder"))
    meta = json.loads((decoder / "decoder.json").read_text())
    gone = tmp_path / "moved-away.safetensors"
    meta["encoder"]["weights_file"] = str(gone)  # trained with a file that is no longer there
    (decoder / "decoder.json").write_text(json.dumps(meta))
    result = cli(*score_args(decoder, corpus, tmp_path / "run1", 0), cwd=tmp_path)
    assert (result.rc, result.err.splitlines()[-1]) == (
        2,
        f"sanitizer: error: the decoder was trained with encoder weights {gone}, which are gone; "
        "give --encoder-weights where that file is now",
    )

    other = tmp_path / "other.safetensors"
    save_file({k: v * 2 for k, v in tiny_encoder.module.state_dict().items()}, str(other))
    result = cli(*score_args(decoder, corpus, tmp_path / "run2", 0), "--encoder-weights", other, cwd=tmp_path)
    expected = meta["encoder"]["weights_sha256"][:12]
    assert result.rc == 2
    assert result.err.splitlines()[-1].startswith(
        f"sanitizer: error: the decoder was trained for encoder timm:test_resnet with weights {expected}..., "
        f"but {other} gives "
    )
    assert result.err.splitlines()[-1].endswith(
        "...; give --encoder-weights the file it was trained with, or train a decoder for these weights"
    )
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


# ---------------------------------------------------------------- remote reads that fail


BROKEN = f"read failed after 3000 bytes: {RESET}"


@pytest.mark.parametrize("fault", ["broken", "cut"])
def test_a_remote_read_that_fails_part_way_fails_the_shard_and_the_rerun_scores_it(
    flaky, tmp_path, corpus, tiny_decoder_dir, fault
):
    """A remote shard whose connection breaks mid-read (`broken`), or whose transfer the server ends
    before the size its store gives (`cut`; it read as a tar cut there), is FAILED, not
    `truncated_shard` and done (its samples after the break lost from clean/ for good); `clean` and
    `verify` name the read error; once the store answers, the re-run scores it and ends as an
    undisturbed run."""
    urls = {stem: f"flaky://{corpus}/{stem}.tar" for stem in SYNTH[:2]}
    data = ",".join(urls.values())
    reference = tmp_path / "reference"
    assert cli(*score_args(tiny_decoder_dir, data, reference, 0)).rc == 0
    assert cli("clean", reference).rc == 0
    failure = {stem: BROKEN if fault == "broken" else cut_short(corpus, stem) for stem in SYNTH[:2]}

    run = tmp_path / "run"
    setattr(flaky, fault, {f"{SYNTH[1]}.tar": 3000})
    result = cli(*score_args(tiny_decoder_dir, data, run, 0))
    assert result.rc == 1
    assert f"FAILED shard {SYNTH[1]}: {failure[SYNTH[1]]}" in result.out
    failed = json.loads((run / "run.json").read_text())["failed_shards"]
    assert failed == [{"stem": SYNTH[1], "error": failure[SYNTH[1]]}]
    assert sorted(p.name for p in (run / "stats").iterdir()) == [f"{SYNTH[0]}_stats.json"]

    setattr(flaky, fault, {f"{SYNTH[0]}.tar": 3000})
    cleaned = cli("clean", run)
    assert cleaned.rc == 1  # an I/O error, not a usage error: a scheduler may simply run it again
    expected = f"cannot read {urls[SYNTH[0]]} again to clean it: {failure[SYNTH[0]]}; run clean again"
    assert cleaned.err == f"sanitizer: error: {expected}\n"
    assert (
        f"shard {SYNTH[0]}: input '{urls[SYNTH[0]]}' cannot be read ({failure[SYNTH[0]]}) but the shard "
        "is marked done"
    ) in verify_run(run)

    setattr(flaky, fault, {})
    assert cli(*score_args(tiny_decoder_dir, data, run, 0)).rc == 0
    assert cli("clean", run).rc == 0
    assert_same_outputs(run, reference)
    assert verify_run(run) == []


def test_a_remote_object_replaced_under_its_name_is_scored_again(flaky, tmp_path, corpus, tiny_decoder_dir):
    """A remote input's stats marker recorded no stamp: an object replaced under the same name was
    never scored again, and `clean` refused it at every run. Its store's size and ETag are its stamp
    now: `verify` names it, and the re-run scores it again, as a local file whose size or mtime changed."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for stem in SYNTH[:2]:
        shutil.copy(corpus / f"{stem}.tar", bucket / f"{stem}.tar")
    replaced = bucket / f"{SYNTH[1]}.tar"
    urls = [f"flaky://{bucket}/{stem}.tar" for stem in SYNTH[:2]]
    run = tmp_path / "run"
    assert cli(*score_args(tiny_decoder_dir, ",".join(urls), run, 0)).rc == 0
    marker = json.loads((run / "stats" / f"{SYNTH[1]}_stats.json").read_text())
    assert marker["input"] == {"size": replaced.stat().st_size, "etag": '"1"'}
    assert cli("clean", run).rc == 0

    replaced.write_bytes((corpus / f"{SYNTH[2]}.tar").read_bytes())
    assert replaced.stat().st_size == marker["input"]["size"]  # only the store's ETag tells
    flaky.etags = {replaced.name: "2"}
    cleaned = cli("clean", run)
    assert (cleaned.rc, cleaned.err) == (
        2,
        f"sanitizer: error: {urls[1]} changed since it was scored (sample 0 differs): score it again "
        "(`sanitizer score` re-scores a shard whose size, mtime or version changed; `touch` a local one "
        "if none did), then clean\n",
    )
    assert verify_run(run) == [
        f"shard {SYNTH[1]}: input '{urls[1]}' changed since it was scored (its size, mtime or version is "
        "not what its stats marker recorded): run `sanitizer score` again"
    ]
    rescored = cli(*score_args(tiny_decoder_dir, ",".join(urls), run, 0))
    assert rescored.rc == 0
    assert f"{urls[1]} changed since it was scored: scoring it again" in rescored.err
    assert json.loads((run / "stats" / f"{SYNTH[1]}_stats.json").read_text())["input"]["etag"] == '"2"'
    assert cli("clean", run).rc == 0
    assert verify_run(run) == []
    assert "scoring it again" not in cli(*score_args(tiny_decoder_dir, ",".join(urls), run, 0)).err
