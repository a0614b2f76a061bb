"""Ray job entry point: score, clean and report one dataset as described by a YAML config.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.score_job --config jobs/configs/clip_pairs.yaml

Inside a Ray job RAY_ADDRESS is set, so the scoring actors run on the cluster's GPUs. The config's
`score` mapping holds `sanitizer score` options (underscores or dashes); `clean` and `report` say
whether to run those steps. The job is resumable: submit it again and finished shards are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from sanitizer.cli import EXIT_OK
from sanitizer.cli import main as sanitizer


def options(mapping: dict) -> list[str]:
    """{"batch_size": 1024, "data": "x", "no_collapse": true} -> ["--batch-size", "1024", "--data", "x",
    "--no-collapse"]: true is a bare flag; null and false leave the option out."""
    argv = []
    for key, value in mapping.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def run(config: dict) -> int:
    score = dict(config["score"])
    out = score["out"]
    code = sanitizer(["score", *options(score)])
    if code != EXIT_OK:
        return code
    if config.get("clean", True):
        clean = config.get("clean") if isinstance(config.get("clean"), dict) else {}
        code = sanitizer(["clean", out, *options(clean)])
    if code == EXIT_OK and config.get("report", True):
        code = sanitizer(["report", out])
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="YAML job config (see jobs/configs/)")
    args = parser.parse_args(argv)
    return run(yaml.safe_load(args.config.read_text()))


if __name__ == "__main__":
    sys.exit(main())
