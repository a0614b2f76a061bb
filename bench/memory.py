"""Peak memory of `sanitizer score` for 1x and 10x the number of shards: it must not grow with the data.

    .venv/bin/python bench/memory.py [--shards 4] [--per-shard 200] [--workers 0|N]

Runs each job in a fresh process and samples the resident memory of that process and all its
descendants (Ray's raylet and workers included) from /proc every 0.1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.decoder_meta import ScoreSettings
from sanitizer.encoders import load_encoder
from sanitizer.train import TrainSettings, train_decoder

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of pid and every descendant, read from /proc (no psutil needed)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak MB over the process tree, wall seconds) of a command run to completion."""
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return peak / 2**20, time.time() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shards", type=int, default=4, help="shards in the 1x set (10x gets ten times more)"
    )
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="scoring actors; 0 = one process, no Ray")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sanitizer-mem-") as tmp:
        work = Path(tmp)
        prepare(work, args.shards * 10 * args.per_shard, args.per_shard)
        rows = [peak_of_run(work, args.shards * factor, args.per_shard, args.workers) for factor in (1, 10)]
    result = {
        "workers": args.workers,
        "rows": rows,
        "growth": round(rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3),
    }
    print("| shards | samples | peak RSS (MB, process tree) | seconds |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shards']} | {r['samples']} | {r['peak_rss_mb']} | {r['seconds']} |")
    print(json.dumps(result))
    return result


def prepare(work: Path, n: int, per_shard: int) -> None:
    """`n` generated images in shards under work/data, and a decoder trained on the first shard."""
    write_image_shards(work / "data", synthetic_images(n, 32, seed=0), per_shard=per_shard)
    train_decoder(
        load_encoder("timm:resnet18_cifar"),
        str(work / "data/shard-000000.tar"),
        work / "dec",
        TrainSettings(epochs=1),
        ScoreSettings(),
        progress=False,
    )


def peak_of_run(work: Path, shards: int, per_shard: int, workers: int) -> dict:
    """`sanitizer score` of the first `shards` shards in a fresh process: its peak and wall time."""
    data = f"{work}/data/shard-{{000000..{shards - 1:06d}}}.tar"
    cmd = [sys.executable, "-m", "sanitizer.cli", "score", "--decoder", str(work / "dec"), "--data", data]
    cmd += ["--out", str(work / f"run{shards}"), "--workers", str(workers)]
    peak_mb, seconds = peak_rss_of(cmd)
    return {
        "shards": shards,
        "samples": shards * per_shard,
        "peak_rss_mb": round(peak_mb),
        "seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
