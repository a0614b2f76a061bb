"""Ray job entry point: score, clean and report one dataset as described by a YAML config.

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.score_job \\
        --config jobs/configs/clip_pairs.yaml

Inside a Ray job RAY_ADDRESS is set, so the scoring actors run on the cluster's GPUs. The config's
`score` mapping holds `sanitizer score` options (underscores or dashes; paths absolute or URLs);
`clean` and `report` are true (the default), false, or a mapping of that command's options (`clean:
{}` runs it with its defaults). The job is resumable: submit it again and finished shards are
skipped; shards added to `data` since are scored and split (with the old ones whose manifest the re-run
rewrote), and the whole run reported again. The last line says how each step ended; the exit code is
the worst of theirs (0 done, 1 incomplete, 2 a usage error, 75 busy: another job holds RUN_DIR, skip
this run, 130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from sanitizer.cli import EXIT_BUSY, EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, build_parser, user_path
from sanitizer.cli import main as sanitizer
from sanitizer.data.shards import split_top_level
from sanitizer.errors import SanitizerError
from sanitizer.rundir import RunDir


class ConfigError(ValueError):
    """A job config that cannot be run as written; the message says which key and why."""


def options(mapping: dict) -> list[str]:
    """{"batch_size": 1024, "data": "x", "no_collapse": true} -> ["--batch-size", "1024", "--data", "x",
    "--no-collapse"]: true is a bare flag; null and false leave the option out."""
    argv = []
    for key, value in mapping.items():
        if not isinstance(key, str) or isinstance(value, list | dict):
            raise ConfigError(f"option {key!r}: {value!r} is not a name and a single value")
        if key in ("help", "h"):  # would print a help page and exit 0, the job not run
            raise ConfigError(f"`{key}` is not an option a job can take")
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def step_options(config: dict, step: str) -> list[str] | None:
    """The CLI options of an optional step, or None to skip it. Absent or true: run with the defaults;
    a mapping, even an empty one (`clean: {}`): run with those options; false or null: skip."""
    value = config.get(step, True)
    if value is True:
        return []
    if value is False or value is None:
        return None
    if isinstance(value, dict):
        return options(value)
    raise ConfigError(f"`{step}` must be true, false or a mapping of options, not {value!r}")


def score_options(config: object) -> tuple[list[str], str]:
    """The `score` step's options and its run directory, which clean and report read."""
    score = config.get("score") if isinstance(config, dict) else None
    if not isinstance(score, dict) or not score.get("out"):
        raise ConfigError("the config needs a `score` mapping with at least `out` (and `decoder`, `data`)")
    return options(score), str(score["out"])


# The `score` options that name files; `data` may list several, comma-separated outside braces,
# and only `data` is read through fsspec: the others are local paths (or a mount's).
PATH_OPTIONS = ("decoder", "data", "out", "encoder_weights")


def refuse_relative_paths(score: dict) -> None:
    """A relative path would be read against the job's working directory, which under `ray job submit
    --working-dir` is Ray's temporary copy of it: RUN_DIR would land there and be lost, and the next
    run would start afresh. Absolute paths, and URLs for `data`; a URL elsewhere was taken as the
    relative path `s3:/bucket/run` and lost in the same way."""
    for key, value in score.items():
        name = str(key).replace("-", "_")
        if name not in PATH_OPTIONS or value is None or value is False:
            continue
        for part in split_top_level(str(value)) if name == "data" else [str(value)]:
            if "://" in part and name != "data":
                raise ConfigError(
                    f"`score.{key}` is a URL ({part!r}): `sanitizer score` reads and writes it as a local "
                    "path (a disk or a mount); only `data` may be URLs. Give an absolute path"
                )
            if "://" not in part and not Path(part).is_absolute():
                raise ConfigError(
                    f"`score.{key}` is a relative path ({part!r}): a job runs in a working directory of "
                    "Ray's (a temporary copy under `ray job submit --working-dir`); give an absolute path "
                    "or a URL"
                )


STEPS = ("score", "clean", "report")


def steps(config: object) -> list[list[str]]:
    """The command lines the config runs, in order, each checked as its command would parse it: a
    typo in `clean` or a value of the wrong type is found before hours of scoring."""
    if isinstance(config, dict) and (unknown := sorted(str(k) for k in config if k not in STEPS)):
        raise ConfigError(f"unknown key `{unknown[0]}`: a config holds {', '.join(STEPS)}")
    score, out = score_options(config)
    argvs = [["score", *score]]
    for step in STEPS[1:]:
        if (argv := step_options(config, step)) is not None:
            argvs.append([step, out, *argv])
    for argv in argvs:
        check_parses(argv)
    refuse_relative_paths(config["score"])
    return argvs


def check_parses(argv: list[str]) -> None:
    """A ConfigError where `sanitizer` would refuse the command line: argparse's own complaint as one
    line (it printed a usage page of the command and exited, the config never named)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            _, unknown = build_parser().parse_known_args(argv)
    except SystemExit:
        said = stderr.getvalue().strip().splitlines() or ["it cannot be parsed"]
        complaint = said[-1].split(": error: ", 1)[-1]
        raise ConfigError(f"`{argv[0]}`: {complaint}") from None
    if unknown:
        raise ConfigError(f"`{argv[0]}` has no option {unknown[0]!r}")


def run(config: object) -> int:
    """Each step in turn; a run that finished incomplete (a shard that is not a tar) is still cleaned
    and reported, as `sanitizer clean` and `report` would do by hand, and the job exits 1. The last
    line says how each step ended: a scheduler's log otherwise ends with whatever the last step said."""
    argvs, codes = steps(config), []
    with held_for_the_job(score_options(config)[1]):
        for argv in argvs:
            codes.append(sanitizer(argv))
            if codes[-1] not in (EXIT_OK, EXIT_INCOMPLETE):
                break
    code = max(codes)
    ended = [f"{argv[0]} {ending(c)}" for argv, c in zip(argvs, codes, strict=False)]
    ended += [f"{argv[0]} not run" for argv in argvs[len(codes) :]]
    print(f"score_job: {', '.join(ended)}; exit {code}", flush=True)
    return code


@contextlib.contextmanager
def held_for_the_job(out: str) -> Iterator[None]:
    """RUN_DIR, locked from the job's start to its end: each step locking it alone let a second job
    take it between this job's score and its clean, leaving this one `busy` with its scoring done and
    the second redoing it. Where it cannot be taken (another job holds it, it holds other files, its
    filesystem has no locks) the job goes on without: its score step refuses it, as `sanitizer score`
    does, with that command's message and exit code."""
    with contextlib.ExitStack() as held:
        with contextlib.suppress(SanitizerError):
            run = RunDir(user_path(out))
            run.refuse_foreign()  # before the lock file is made in a directory of other files
            held.enter_context(run.lock_for_steps())
        yield


def ending(code: int) -> str:
    """How a step ended, for the last line: `busy` (another job holds RUN_DIR; the scheduler's next
    tick will do it) rather than a number to look up."""
    return "busy" if code == EXIT_BUSY else f"exit {code}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.score_job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML job config (see jobs/configs/)")
    args = parser.parse_args(argv)
    try:
        return run(read_config(args.config))
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        print(f"score_job: error: {args.config}: {e}", file=sys.stderr)
        return EXIT_USAGE


def read_config(path: Path) -> object:
    """The YAML document; a ConfigError of one line where it is not YAML (the parser's own message
    spans lines of context and a caret, which a scheduler's log shows as separate entries)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"not YAML: {e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not YAML: {' '.join(str(e).split())}") from None


if __name__ == "__main__":
    sys.exit(main())
