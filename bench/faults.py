"""Faults and hostile input, the long randomized version of tests/test_faults.py.

    .venv/bin/python bench/faults.py                      # about 4 minutes on 2 CPU cores (session 45)
    .venv/bin/python bench/faults.py --kills 3 --ray-kills 1 --shards 4   # a quick pass
    .venv/bin/python bench/faults.py --ray-kills 0 --actor-kills 0        # no Ray (0: that fault left out)
    .venv/bin/python bench/faults.py --json results.json

Builds a corpus (the hostile shards of sanitizer.data.hostile plus --shards ordinary shards of
--per-shard images), trains a tiny decoder, scores and cleans it once undisturbed (the reference),
then tries every fault below. After each: the re-run's outputs (manifests as tables, stats without
timings, run.json totals, clean/quarantine tar bytes, sizes.json) must equal the reference and
`sanitizer verify` must pass. Prints one table row per fault: trials and outcome.

Faults: `score` SIGKILLed at random moments (random times, and right after the k-th stats marker
for random k), without Ray and with Ray (the driver and its whole local Ray killed, as a machine
would die); `clean` SIGKILLed at random moments; the Ray scoring actor SIGKILLed mid-task, several
times in one job; ENOSPC at a random manifest write and at a random tar member of `clean`; two jobs
started at the same moment on one RUN_DIR; an unwritable RUN_DIR; and `verify` against tampered
runs. Every process killed is one this script started (its own session), found by session id.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sanitizer.data.hostile import PWNED_FILE, expected_statuses, write_hostile_corpus
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.data.tario import printable
from sanitizer.decoder_meta import ScoreSettings
from sanitizer.encoders import load_encoder
from sanitizer.faultkit import (
    cli,
    cmdline,
    descendants,
    full_disk,
    half_parquet,
    half_tar_member,
    kill_job,
    outputs,
    start_job,
    stats_count,
)
from sanitizer.joblock import recorded_pid
from sanitizer.manifest import read_manifest, write_manifest
from sanitizer.train import TrainSettings, train_decoder
from sanitizer.verify import verify_run

TINY_MODEL = {"patch_size": 8, "width": 32, "depth": 1, "decoder_depth": 1, "heads": 2}
ROWS: list[tuple[str, str, str]] = []  # (fault, trials, outcome)


def row(fault: str, trials: object, outcome: str) -> None:
    ROWS.append((fault, str(trials), outcome))
    print(f"  {fault}: {outcome} ({trials})", flush=True)


# ---------------------------------------------------------------- processes


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen | None, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------- runs


def is_scored(rel: str) -> bool:
    """A file that `score` writes: a manifest or a stats marker (stats/ also holds `clean`'s
    <stem>_clean.json split markers)."""
    return rel.startswith("manifest/") or (rel.startswith("stats/") and rel.endswith("_stats.json"))


def differences(run: Path, reference: Path, clean: bool = True) -> list[str]:
    got, want = outputs(run), outputs(reference)
    if not clean:  # a run that was only scored: compare what scoring wrote, not clean's split markers
        want, got = ({k: v for k, v in d.items() if is_scored(k)} for d in (want, got))
        return [f"differs {k}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    diff = [f"missing {k}" for k in sorted(set(want) - set(got))]
    diff += [f"extra {k}" for k in sorted(set(got) - set(want))]
    diff += [f"differs {k}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    return diff + [f"verify: {v}" for v in verify_run(run)]


def partial_files(run: Path) -> list[str]:
    """Files under a final name that are not complete (must be none, whenever the job dies)."""
    bad = []
    for path in run.rglob("*"):
        if path.is_dir() or path.name == ".lock" or (path.name.startswith(".") and ".tmp-" in path.name):
            continue
        try:
            if path.suffix == ".parquet":
                read_manifest(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            else:
                with tarfile.open(path) as tar:
                    for info in tar:
                        tar.extractfile(info).read()
        except Exception as e:  # noqa: BLE001 - any failure to read means a partial file
            bad.append(f"{path.relative_to(run)}: {type(e).__name__}")
    return bad


def outcome(problems: list[str], ok: str = "identical outputs, verify passes") -> str:
    return (
        ok if not problems else "FAILED: " + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else "")
    )


# ---------------------------------------------------------------- faults


def score_args(ws: dict, run: Path, workers: int) -> list[str]:
    args = ["score", "--decoder", ws["decoder"], "--data", ws["corpus"], "--out", run, "--workers", workers]
    return [str(a) for a in args]


def holds_lock(run: Path, job: subprocess.Popen) -> Callable[[], bool]:
    return lambda: recorded_pid(run) == job.pid


def baseline(ws: dict, args: list[str], run: Path, name: str) -> float:
    """Seconds from taking the lock to exiting, for an undisturbed job in a fresh process."""
    job = start_job(args, ws["tmp"], ws["tmp"] / f"{name}.log")
    wait_until(holds_lock(run, job), job)
    started = time.monotonic()
    job.wait()
    return time.monotonic() - started


def sigkill_score(ws: dict, workers: int, trials: int, rng: random.Random) -> None:
    """Each trial: a fresh RUN_DIR; the job killed, its re-run killed again, then a re-run to the end.

    Kills alternate between a random time after the job took the lock (uniform over the time an
    undisturbed job holds it) and right after a random k-th stats marker of that attempt.
    """
    name = f"baseline_w{workers}"
    seconds = baseline(ws, score_args(ws, ws["tmp"] / name, workers), ws["tmp"] / name, name)
    landed, problems = Counter(), differences(ws["tmp"] / name, ws["reference"], clean=False)
    for t in range(trials):
        run = ws["tmp"] / f"kill_w{workers}_{t}"
        args = score_args(ws, run, workers)
        for attempt in range(2):
            job = start_job(args, ws["tmp"], ws["tmp"] / f"kill_w{workers}_{t}.log")
            remaining = ws["done"] - stats_count(run)
            if (t + attempt) % 2 == 0 or remaining < 2:
                wait_until(holds_lock(run, job), job)
                time.sleep(rng.uniform(0, seconds))
                how = "at a random time"
            else:
                target = stats_count(run) + rng.randint(1, remaining - 1)
                wait_until(lambda target=target, run=run: stats_count(run) >= target, job)
                how = "after the k-th stats marker"
            landed[f"{how}: " + ("killed" if kill_job(job) else "had ended")] += 1
            problems += partial_files(run)
        cli(*args, cwd=ws["tmp"])
        cli("clean", run, cwd=ws["tmp"])
        problems += differences(run, ws["reference"])
    fault = "SIGKILL of `score`" + (" with Ray (driver + its Ray)" if workers else " (no Ray)")
    detail = "; ".join(f"{n} {k}" for k, n in sorted(landed.items()))
    row(
        fault,
        f"{2 * trials} kills in {trials} runs ({detail}); undisturbed: {seconds:.0f} s",
        outcome(problems, "re-run: identical outputs, verify passes"),
    )


def sigkill_clean(ws: dict, kills: int, rng: random.Random) -> None:
    def fresh(name: str) -> Path:
        run = Path(shutil.copytree(ws["reference"], ws["tmp"] / name))
        for sub in ("clean", "quarantine"):
            shutil.rmtree(run / sub)
        (run / "sizes.json").unlink()
        return run

    seconds = baseline(ws, ["clean", str(fresh("clean_baseline"))], ws["tmp"] / "clean_baseline", "clean")
    problems, landed = [], Counter()
    for t in range(kills):
        run = fresh(f"kill_clean_{t}")
        job = start_job(["clean", str(run)], ws["tmp"], ws["tmp"] / "kill_clean.log")
        wait_until(holds_lock(run, job), job)
        time.sleep(rng.uniform(0, seconds))
        landed["killed" if kill_job(job) else "had ended"] += 1
        problems += partial_files(run)
        cli("clean", run)
        problems += differences(run, ws["reference"])
    detail = ", ".join(f"{n} {k}" for k, n in landed.items())
    row(
        "SIGKILL of `clean` at a random time",
        f"{kills} kills ({detail}); undisturbed: {seconds:.1f} s",
        outcome(problems, "re-run: identical tars, verify passes"),
    )


def kill_actor(ws: dict, kills: int) -> None:
    from sanitizer.pipeline.cluster import ensure_ray

    ensure_ray(None, num_cpus=2)
    run = ws["tmp"] / "kill_actor"
    seen, killed, stop = set(), [], threading.Event()

    def killer() -> None:
        while not stop.is_set():
            for pid in descendants(os.getpid()):
                cmd = cmdline(pid)
                if "ScoreStage" in cmd:
                    seen.add(pid)
                    if ".submit" in cmd and len(killed) < kills and pid not in killed:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        rc, _, _ = cli(
            "score", "--decoder", ws["decoder"], "--data", ws["corpus"], "--out", run, "--workers", 1
        )
    finally:
        stop.set()
        thread.join()
    cli("clean", run)
    problems = differences(run, ws["reference"])
    row(
        "Ray scoring actor SIGKILLed mid-task",
        f"{len(killed)} kills, {len(seen)} actor processes",
        outcome(problems, "Ray restarts the actor and retries: identical outputs, verify passes"),
    )


def enospc(ws: dict, trials: int, rng: random.Random) -> None:
    real_write, real_add = pq.write_table, tarfile.TarFile.addfile
    problems: list[str] = []
    for t in range(trials):
        run = ws["tmp"] / f"enospc_{t}"
        at = rng.randint(1, ws["done"])
        write = full_disk(real_write, at, half_parquet(real_write))
        pq.write_table = write
        try:
            rc, _, err = cli(
                "score", "--decoder", ws["decoder"], "--data", ws["corpus"], "--out", run, "--workers", 0
            )
        finally:
            pq.write_table = real_write
        if (
            rc != 1
            or "Traceback" in err
            or not err.strip().splitlines()[-1].startswith("sanitizer: error: No space")
        ):
            problems.append(f"manifest write {at}: rc {rc}, {err.strip()[-200:]!r}")
        problems += partial_files(run)
        cli("score", "--decoder", ws["decoder"], "--data", ws["corpus"], "--out", run, "--workers", 0)
        cli("clean", run)
        problems += differences(run, ws["reference"])
    row(
        "ENOSPC at a random manifest write",
        f"{trials} runs",
        outcome(
            problems, "exit 1, one line 'No space left on device: <file>', no partial file; re-run identical"
        ),
    )
    problems = []
    members = 0  # addfile calls of one clean: the members of the reference's output tars
    for path in sorted(ws["reference"].glob("*/*.tar")):
        with tarfile.open(path) as tar:
            members += len(tar.getmembers())
    for t in range(trials):
        run = Path(shutil.copytree(ws["reference"], ws["tmp"] / f"enospc_clean_{t}"))
        for name in ("clean", "quarantine"):
            shutil.rmtree(run / name)
        (run / "sizes.json").unlink()
        at = rng.randint(1, members)
        add = full_disk(real_add, at, half_tar_member)
        tarfile.TarFile.addfile = add
        try:
            rc, _, err = cli("clean", run)
        finally:
            tarfile.TarFile.addfile = real_add
        if rc != 1 or "Traceback" in err or "No space left on device" not in err:
            problems.append(f"member {at}: rc {rc}, {err.strip()[-200:]!r}")
        problems += partial_files(run)
        cli("clean", run)
        problems += differences(run, ws["reference"])
    row(
        "ENOSPC at a random tar member of `clean`",
        f"{trials} runs",
        outcome(problems, "exit 1, one line naming the tar, no partial tar; re-run identical"),
    )


def two_jobs(ws: dict, trials: int) -> None:
    problems, refused = [], 0
    for t in range(trials):
        run = ws["tmp"] / f"two_{t}"
        args = ["score", "--decoder", ws["decoder"], "--data", ws["corpus"], "--out", run, "--workers", 0]
        logs = [ws["tmp"] / f"two_{t}_{i}.log" for i in range(2)]
        jobs = [start_job([str(a) for a in args], ws["tmp"], log) for log in logs]
        codes = sorted(job.wait() for job in jobs)
        texts = [log.read_text() for log in logs]
        if codes != [1, 75]:
            problems.append(f"exit codes {codes}")
        if sum("another sanitizer job (pid" in text for text in texts) != 1:
            problems.append("no clear refusal message")
        else:
            refused += 1
        cli("clean", run)
        problems += differences(run, ws["reference"])
    row(
        "two `score` jobs started at once on one RUN_DIR",
        f"{trials} races",
        outcome(
            problems,
            f"one runs, the other exits 75 'another sanitizer job (pid N) is using ...' ({refused}/{trials})",
        ),
    )


def unwritable(ws: dict) -> None:
    blocker = ws["tmp"] / "a_file"
    blocker.write_text("x")
    rc, _, err = cli(
        "score", "--decoder", ws["decoder"], "--data", ws["corpus"], "--out", blocker / "run", "--workers", 0
    )
    line = err.strip().splitlines()[-1]
    ok = rc == 2 and line.endswith("as RUN_DIR: Not a directory") and not (blocker.parent / "run").exists()
    row(
        "RUN_DIR under a regular file",
        1,
        f"exit {rc}: {line.split(': ', 2)[-1]}" if ok else f"FAILED: {rc} {err!r}",
    )
    parent = ws["tmp"] / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            row(
                "RUN_DIR in a read-only directory",
                0,
                "not tried: running as root, permissions are not enforced",
            )
            return
        rc, _, err = cli("score", "--decoder", ws["decoder"], "--data", ws["corpus"], "--out", parent / "run")
        line = err.strip().splitlines()[-1]
        ok = rc == 2 and line.endswith("Permission denied") and not list(parent.iterdir())
        row("RUN_DIR in a read-only directory", 1, f"exit {rc}: {line}" if ok else f"FAILED: {rc} {err!r}")
    finally:
        parent.chmod(0o755)


def tampering(ws: dict) -> None:
    def deleted_row(run: Path) -> None:
        path = sorted((run / "manifest").glob("synth*.parquet"))[0]
        table = read_manifest(path)
        write_manifest(path, pa.concat_tables([table.slice(0, 3), table.slice(4)]))

    def changed_byte(run: Path) -> None:
        path = sorted((run / "clean").glob("synth*.tar"))[0]
        with tarfile.open(path) as tar:
            info = tar.getmembers()[0]
        data = bytearray(path.read_bytes())
        data[info.offset_data] ^= 1
        path.write_bytes(bytes(data))

    def missing_shard(run: Path) -> None:
        stem = sorted((run / "stats").glob("synth*.json"))[0].name[: -len("_stats.json")]
        (run / "stats" / f"{stem}_stats.json").unlink()
        (run / "manifest" / f"{stem}.parquet").unlink()

    def sizes(run: Path) -> None:
        data = json.loads((run / "sizes.json").read_text())
        first = sorted(data)[0]
        data[first] += 1
        (run / "sizes.json").write_text(json.dumps(data))

    for name, tamper in (
        ("deleted manifest row", deleted_row),
        ("changed byte in a clean member", changed_byte),
        ("missing shard (stats + manifest)", missing_shard),
        ("sizes.json off by one", sizes),
    ):
        run = Path(shutil.copytree(ws["reference"], ws["tmp"] / f"tamper_{tamper.__name__}"))
        tamper(run)
        found = verify_run(run)
        rc, _, _ = cli("verify", run)
        row(f"verify on a run with a {name}", 1, f"exit {rc}, {len(found)} violation(s): {found[0][:90]}")


def hostile_table(ws: dict) -> None:
    run = ws["reference"]
    info = json.loads((run / "run.json").read_text())
    failed = {f["stem"]: f["error"] for f in info.get("failed_shards", [])}
    wrong = []
    statuses: Counter = Counter()
    for name, expected in expected_statuses().items():
        if expected is None:
            if name not in failed:
                wrong.append(f"{name} not reported failed")
            continue
        table = read_manifest(run / "manifest" / f"{name}.parquet")
        got = list(zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True))
        if got != [(printable(k), s) for k, s in expected]:
            wrong.append(f"{name}: statuses differ")
        statuses.update(s for _, s in got)
    pwned = [str(p) for p in ws["tmp"].rglob(PWNED_FILE)]
    row(
        "hostile corpus (every bad input of issue 3 and 7)",
        f"{sum(statuses.values())} samples",
        outcome(
            wrong + pwned,
            f"each sample its expected status {dict(sorted(statuses.items()))}; "
            f"{len(failed)} not-a-tar shards failed in run.json; no PWNED file",
        ),
    )


# ---------------------------------------------------------------- main


def workspace(tmp: Path, shards: int, per_shard: int, seed: int) -> dict:
    corpus = tmp / "corpus"
    write_hostile_corpus(corpus)
    pixels = synthetic_images(shards * per_shard, 32, seed=seed)
    write_image_shards(
        corpus,
        pixels,
        captions=[f"picture {i}" for i in range(len(pixels))],
        per_shard=per_shard,
        prefix="synth",
    )
    decoder = tmp / "decoder"
    train_decoder(
        load_encoder("timm:test_resnet", image_size=32),
        str(corpus / "synth-*.tar"),
        decoder,
        TrainSettings(epochs=1, batch_size=32, max_samples=200),
        ScoreSettings(num_masks=2),
        TINY_MODEL,
        progress=False,
    )
    ws = {"tmp": tmp, "corpus": corpus, "decoder": decoder, "reference": tmp / "reference"}
    (tmp / "cwd").mkdir()
    cli(
        "score",
        "--decoder",
        decoder,
        "--data",
        corpus,
        "--out",
        ws["reference"],
        "--workers",
        0,
        cwd=tmp / "cwd",
    )
    cli("clean", ws["reference"], cwd=tmp / "cwd")
    ws["done"] = stats_count(ws["reference"])  # the split markers beside them are not shards
    return ws


def main(argv: list[str] | None = None) -> list[tuple[str, str, str]]:
    """Run every fault asked for (a count of 0 leaves that fault out) and return the table's rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6, help="runs of `score` (no Ray) killed twice each")
    parser.add_argument("--ray-kills", type=int, default=2, help="runs of `score` with Ray killed twice each")
    parser.add_argument("--clean-kills", type=int, default=6)
    parser.add_argument("--actor-kills", type=int, default=3)
    parser.add_argument("--enospc", type=int, default=4, help="trials of each ENOSPC fault")
    parser.add_argument("--races", type=int, default=2, help="two-job races")
    parser.add_argument("--shards", type=int, default=8, help="ordinary shards besides the hostile ones")
    parser.add_argument("--per-shard", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.monotonic()
    ROWS.clear()
    with tempfile.TemporaryDirectory(prefix="sanitizer-faults-") as tmp:
        print("building the corpus, the decoder and the reference run ...", flush=True)
        ws = workspace(Path(tmp), args.shards, args.per_shard, args.seed)
        hostile_table(ws)
        tampering(ws)
        unwritable(ws)
        faults = (
            (args.enospc, lambda: enospc(ws, args.enospc, rng)),
            (args.races, lambda: two_jobs(ws, args.races)),
            (args.kills, lambda: sigkill_score(ws, 0, args.kills, rng)),
            (args.clean_kills, lambda: sigkill_clean(ws, args.clean_kills, rng)),
            (args.ray_kills, lambda: sigkill_score(ws, 1, args.ray_kills, rng)),
            (args.actor_kills, lambda: kill_actor(ws, args.actor_kills)),
        )
        for count, run_fault in faults:
            if count > 0:  # so `--ray-kills 0 --actor-kills 0` starts no Ray
                run_fault()
        pwned = [str(p) for p in Path(tmp).rglob(PWNED_FILE)] + [
            str(p) for p in [Path.cwd() / PWNED_FILE] if p.exists()
        ]
        row(
            "pickle payloads over all runs above",
            "all",
            "never unpickled (no PWNED file)" if not pwned else f"FAILED: {pwned}",
        )
    width = max(len(r[0]) for r in ROWS)
    print(f"\n{'fault':<{width}}  trials  outcome")
    for fault, trials, result in ROWS:
        print(f"{fault:<{width}}  {trials}  {result}")
    print(f"\n{time.monotonic() - started:.0f} s in all")
    if args.json:
        args.json.write_text(
            json.dumps([dict(zip(("fault", "trials", "outcome"), r, strict=True)) for r in ROWS], indent=2)
        )
    return list(ROWS)


if __name__ == "__main__":
    sys.exit(1 if any(r[2].startswith("FAILED") for r in main()) else 0)
