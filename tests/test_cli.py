"""The command line itself: version, usage, exit codes, and the README's CLI block as its contract."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
from importlib.metadata import version
from pathlib import Path

import pytest

from sanitizer import cli
from sanitizer.cli import build_parser, main
from sanitizer.errors import Busy, ReadFailed, Terminated, UsageError


def exits(argv: list[str]) -> int:
    """The exit code argparse ends with (it raises SystemExit rather than returning)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_version_prints_the_installed_package_version(capsys):
    assert exits(["--version"]) == 0
    assert capsys.readouterr().out == f"sanitizer {version('sanitizer')}\n"


def test_run_json_records_the_same_version():
    from sanitizer.pipeline.job import versions

    assert versions()["sanitizer"] == version("sanitizer")


def test_no_command_prints_the_usage_and_exits_2(capsys):
    assert exits([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: sanitizer ")
    assert err.splitlines()[-1] == "sanitizer: error: the following arguments are required: command"


CHECKOUT = Path(__file__).resolve().parents[1]  # where a fresh interpreter finds this package
README = CHECKOUT / "README.md"
OPTION = re.compile(r"(-{1,2}[a-z][a-z-]*)((?: \[[A-Z][A-Z_]*\]| [A-Z][A-Z_]*| [a-z0-9]+(?:\|[a-z0-9]+)+)*)")


def readme_cli_text() -> str:
    return README.read_text().split("## CLI\n\n```\n", 1)[1].split("```", 1)[0]


def readme_cli_block() -> dict[str, str]:
    """The README's CLI block as {command: its synopsis}; "" holds the options before the command."""
    block = readme_cli_text()
    synopses: dict[str, str] = {}
    command = None
    for line in block.splitlines():
        line = re.split(r"\s{4,}", line.strip())[0]  # a line's remark, after a wide gap, is prose
        if line.startswith("sanitizer "):
            word = line.split()[1]
            command = "" if word.startswith("-") else word
            line = line.removeprefix(f"sanitizer {word}") if command else line[len("sanitizer ") :]
            line = line.replace("COMMAND ...", "")  # `sanitizer -v COMMAND ...`: where the options go
        synopses[command] = synopses.get(command, "") + " " + line
    return synopses


def parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"": top, **commands.choices}


def metavar(action: argparse.Action) -> str:
    """How the option's value reads in a synopsis: `[RULE]` for one that may be left out, as --help shows."""
    if action.nargs == 0:
        return ""
    name = " ".join(action.metavar) if isinstance(action.metavar, tuple) else str(action.metavar)
    return f"[{name}]" if action.nargs == "?" else name


@pytest.mark.parametrize("command", ["", "train", "score", "clean", "report", "verify", "demo"])
def test_the_readme_cli_block_is_what_help_shows(command):
    """Every option in README's synopsis exists with the same metavar, and every option is there."""
    synopsis = readme_cli_block()[command]
    documented = {flag: names.strip() for flag, names in OPTION.findall(synopsis)}
    parser = parsers()[command]
    shown = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if not action.option_strings:  # a positional: its metavar is in the synopsis as a word
            assert re.search(rf"\b{action.metavar}\b", synopsis), (command, action.metavar)
            continue
        flag = next((f for f in action.option_strings if f in documented), action.option_strings[-1])
        shown[flag] = metavar(action)
    assert shown == documented


def example_commands() -> list[list[str]]:
    """Every whole `sanitizer` and `bench/detection.py` command in the fenced code blocks of the README,
    docs/*.md and examples/*.md, continuation lines joined and comments left out (the CLI block's synopses are
    tested above)."""
    docs = [
        README,
        *sorted((README.parent / "docs").glob("*.md")),
        *sorted((README.parent / "examples").glob("*.md")),
    ]
    commands = []
    blocks = [b for doc in docs for b in re.findall(r"```\w*\n(.*?)```", doc.read_text(), re.S)]
    for block in (b for b in blocks if b != readme_cli_text()):
        for line in block.replace("\\\n", " ").splitlines():
            if not re.match(r"\s*(\S*python \S*bench/detection\.py|sanitizer) ", line):
                continue  # python code or prose
            words = shlex.split(line, comments=True)
            commands.append(words[next(i for i, w in enumerate(words) if "python" not in w) :])
    return commands


def test_every_example_command_in_the_docs_parses():
    """A newcomer copies them as written: each must be accepted by the parser it is for."""
    from bench.detection import parse_args as detection_args

    commands = example_commands()
    assert {c[0] for c in commands} == {"sanitizer", "bench/detection.py"} and len(commands) >= 8, commands
    for program, *argv in commands:
        try:
            build_parser().parse_args(argv) if program == "sanitizer" else detection_args(argv)
        except SystemExit:
            pytest.fail(f"{program} {shlex.join(argv)}: refused by its parser")


def test_the_job_config_in_the_ray_example_is_one_the_job_runs():
    """examples/submit_ray_job.md's YAML is copied to make a config: steps() refuses one it cannot run."""
    import yaml

    from jobs.score_job import steps

    text = (README.parent / "examples" / "submit_ray_job.md").read_text()
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    assert [argv[0] for argv in steps(config)] == ["score", "clean", "report"]


@pytest.mark.parametrize("command", ["train", "score", "clean", "report", "verify", "demo"])
def test_help_states_every_default(command):
    """An option that has a default says it in --help as `(default X)`, as the README's prose does."""
    for action in parsers()[command]._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        assert re.search(rf"\(default {re.escape(str(action.default))}[,;)]", action.help or ""), (
            action.option_strings
        )


def test_the_readme_names_the_demos_default_out():
    block = readme_cli_block()
    assert "(--out default: demo-out)" in README.read_text()
    assert "--out DIR" in block["demo"]
    assert str(parsers()["demo"].get_default("out")) == "demo-out"


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        (["--collapse", "mad:3", "--no-collapse"], "--no-collapse"),
        (["--no-collapse", "--collapse"], "--collapse"),
    ],
)
def test_collapse_and_no_collapse_together_are_refused(capsys, given, refused):
    """The README's `[--collapse RULE | --no-collapse]`: the later one used to win in silence."""
    assert exits(["score", "--decoder", "d", "--data", "x", "--out", "o", *given]) == 2
    other = "--collapse" if refused == "--no-collapse" else "--no-collapse"
    expected = f"sanitizer score: error: argument {refused}: not allowed with argument {other}"
    assert capsys.readouterr().err.splitlines()[-1] == expected


def ends(outcome: object):
    """A stand-in command that returns `outcome`, or raises it when it is an exception."""

    def command(args: argparse.Namespace) -> int:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return command


def test_help_lists_the_readmes_exit_codes():
    """`sanitizer --help` ends with the exit codes, the README's table's rows and no others."""
    table = README.read_text().split("**Exit codes**", 1)[1].split("\n\n", 2)[1]
    documented = [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)]
    listed = [
        int(m)
        for m in re.findall(r"^  (\d+) ", build_parser().format_help().split("exit codes:", 1)[1], re.M)
    ]
    assert sorted(documented) == sorted(listed) == [0, 1, 2, 75, 130, 141, 143]


@pytest.mark.parametrize(
    ("outcome", "code", "stderr"),
    [
        (0, 0, ""),  # done
        (1, 1, ""),  # finished but incomplete: a shard that is not a tar, a verify violation
        (UsageError("bad setting"), 2, "sanitizer: error: bad setting\n"),
        (  # another job holds the directory: a scheduler skips this tick rather than page someone
            Busy("another sanitizer job (pid 7 on h) is using /r"),
            75,
            "sanitizer: error: another sanitizer job (pid 7 on h) is using /r\n",
        ),
        (ReadFailed("read failed after 5 bytes"), 1, "sanitizer: error: read failed after 5 bytes\n"),
        (
            OSError(errno.ENOSPC, "No space left on device", "/r/manifest/a.parquet"),
            1,
            "sanitizer: error: No space left on device: /r/manifest/a.parquet\n",
        ),
        (KeyboardInterrupt(), 130, "sanitizer: interrupted (SIGINT); run it again to resume\n"),
        (Terminated(), 143, "sanitizer: terminated (SIGTERM); run it again to resume\n"),
        (BrokenPipeError(), 141, ""),  # silently: the reader of its output went away
    ],
)
def test_the_readmes_exit_codes(monkeypatch, capsys, outcome, code, stderr):
    """README "Exit codes", row by row, through main()'s handlers."""
    monkeypatch.setattr(cli, "run_report", ends(outcome))
    monkeypatch.setattr(os, "dup2", lambda *fds: None)  # leave pytest's descriptors alone
    with open(os.devnull, "w") as sink:  # a real file: the broken pipe's handler asks its descriptor
        monkeypatch.setattr(sys, "stdout", sink)
        assert main(["report", "RUN"]) == code
    assert capsys.readouterr().err == stderr


def test_a_stopped_command_shuts_down_only_the_ray_its_scoring_started(monkeypatch, capsys):
    """A command a signal stops shuts down the Ray its scoring started and was stopped on (OWN_RAY),
    after its line; never one that was running before it (a caller's, a test session's) nor one a
    finished scoring leaves up for the process's next job."""
    import ray

    from sanitizer.pipeline import cluster

    shut: list[bool] = []
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    monkeypatch.setattr(cli, "run_report", ends(Terminated()))
    monkeypatch.setattr(cluster, "OWN_RAY", threading.Event())
    assert main(["report", "RUN"]) == 143
    assert shut == []
    cluster.OWN_RAY.set()
    assert main(["report", "RUN"]) == 143
    assert shut == [True]
    assert not cluster.OWN_RAY.is_set()
    assert capsys.readouterr().err == "sanitizer: terminated (SIGTERM); run it again to resume\n" * 2


def test_main_leaves_the_callers_logging_as_it_found_it(monkeypatch, capsys):
    """main() replaced the root logger's handlers for good (basicConfig(force=True)), closing the
    caller's, and left its own bound to the stderr of the call: once that stream closed (a test's
    capture, a redirect's buffer), every later log line printed `--- Logging error ---` and a stack."""
    said = []
    mine = logging.Handler()
    mine.emit = lambda record: said.append(record.getMessage())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [mine])
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(cli, "run_report", lambda args: logging.getLogger("sanitizer.x").info("during") or 0)
    with contextlib.redirect_stderr(io.StringIO()) as during:
        assert main(["report", "RUN"]) == 0
        assert during.getvalue() == "sanitizer: during\n"  # the command's own lines, on its stderr
    during.close()
    logging.getLogger("caller").warning("after")
    assert (root.handlers, root.level, said) == ([mine], logging.WARNING, ["after"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "last_line"),
    [
        (["train"], "sanitizer train: error: the following arguments are required: --encoder, --data, --out"),
        (
            ["score", "--workers", "two"],
            "sanitizer score: error: argument --workers: invalid int value: 'two'",
        ),
        (
            ["score", "--micro-batch", "1.5"],
            "sanitizer score: error: argument --micro-batch: invalid int value: '1.5'",
        ),
        (["clean"], "sanitizer clean: error: the following arguments are required: RUN_DIR"),
    ],
)
def test_a_malformed_command_line_exits_2_with_argparses_lines(capsys, argv, last_line):
    assert exits(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"usage: sanitizer {argv[0]} ") and err[-1] == last_line


def test_a_path_that_is_not_utf8_is_one_line_and_exit_2(capsys):
    bad = os.fsdecode(b"/data/\xff.tar")
    assert main(["score", "--decoder", "d", "--data", bad, "--out", "o"]) == 2
    assert capsys.readouterr().err == f"sanitizer: error: argument {bad!r} is not UTF-8; rename the path\n"


def test_a_bad_encoder_spec_names_the_forms_as_help_does(capsys, tmp_path):
    """torchscript: and export: take a file's path, as --help and the README say, not a NAME."""
    assert main(["train", "--encoder", "bogus", "--data", "x", "--out", str(tmp_path / "d")]) == 2
    expected = "encoder spec 'bogus' is not one of timm:NAME, open_clip:NAME, torchscript:PATH, export:PATH"
    assert capsys.readouterr().err == f"sanitizer: error: {expected}\n"


def test_what_a_dataset_names_cannot_drive_the_terminal(tmp_path, tiny_decoder_dir, tiny_shards, capsys):
    """A shard's file name is the dataset's: its escape sequence or bidi override is printed as its
    escape in score's warning, its summary and an error line, never raw (it would clear the screen)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(next(tiny_shards.glob("*.tar")), data / "good.tar")
    (data / "bad\x1b[2J\u202eraw.tar").write_bytes(b"not a tar" * 100)
    argv = ["score", "--decoder", str(tiny_decoder_dir), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*argv, "--workers", "0", "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\u202e" not in out + err
    assert "bad\\x1b[2J\\u202eraw.tar" in err  # the warning names the file, escaped
    missing = str(tmp_path / "gone\x1b[31m.tar")
    assert (
        main(["score", "--decoder", str(tiny_decoder_dir), "--data", missing, "--out", str(tmp_path / "r2")])
        == 2
    )
    err = capsys.readouterr().err
    assert "\x1b" not in err and "gone\\x1b[31m.tar" in err and err.count("\n") == 1


def test_the_summarys_rate_counts_samples_as_it_says_not_images(tmp_path):
    """scored_now counts every manifest row, not_an_image and no_image rows too: the rate said img/s."""
    from sanitizer.pipeline.job import Summary

    summary = Summary(
        run_dir=tmp_path,
        shards=1,
        shards_done=1,
        failed_shards={},
        samples=120,
        ok=100,
        status_counts={"no_image": 5, "not_an_image": 15, "ok": 100},
        flagged=3,
        flagged_by={"score": 3, "collapse": 0},
        threshold=0.5,
        threshold_rule="quantile:0.97",
        neighbours_threshold=None,
        collapse_threshold=None,
        collapse_rule=None,
        seconds=2.0,
        scored_now=120,
    )
    assert "throughput: 120 samples in 2.0 s (60 samples/s)" in cli.format_summary(summary).splitlines()
    summary = dataclasses.replace(summary, scored_now=1)  # one sample, not "1 samples"
    assert "throughput: 1 sample in 2.0 s (0 samples/s)" in cli.format_summary(summary).splitlines()


HEAVY = ("torch", "timm", "open_clip", "ray")  # seconds to import, each
RUN_MAIN = "from sanitizer.cli import main\nassert main(sys.argv[1:]) == 0"  # for heavy_imports


def fresh_python(code: str, *argv: str, redirects: str = "") -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter with this checkout's package, whatever is installed
    (sys.argv[1:] = argv), its standard streams captured, or as `redirects` (sh's: `2>&-`) leave them."""
    started = ["sh", "-c", f'exec "$@" {redirects}', "sh", sys.executable, "-c", code, *argv]
    return subprocess.run(started, cwd=CHECKOUT, capture_output=True, text=True)


def heavy_imports(statement: str, *argv: str, modules: tuple[str, ...] = HEAVY) -> str:
    """Which of `modules` a fresh interpreter has loaded after running `statement` (sys.argv[1:] =
    argv); the last line it prints."""
    code = f"import sys\n{statement}\nprint(sorted(m for m in {modules!r} if m in sys.modules))"
    done = fresh_python(code, *argv)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


def test_the_cli_module_loads_without_torch():
    """cli.py keeps its help texts to itself so that `--help` and a mistyped flag answer at once, but
    it imported DEFAULT_COLLAPSE_RULE from sanitizer.collapse, which loads torch (about a second)."""
    assert heavy_imports("import sanitizer.cli") == "[]"


def test_the_cli_module_loads_nothing_slow_before_main_runs():
    """Until main runs, a signal ends the command as Python's default does: Ctrl-C in a traceback,
    SIGTERM unsaid. Importing sanitizer.cli loaded numpy (for two threshold rules' names) and
    importlib.metadata (for the version): 0.4-0.6 s of every start on the loaded 2-core dev VM."""
    assert heavy_imports("import sanitizer.cli", modules=("numpy", "importlib.metadata")) == "[]"


STOPPED_AS_IT_PARSES = """
import os, signal, sys
from sanitizer import cli
parser = cli.build_parser
def signalled_parser():
    os.kill(os.getpid(), signal.Signals[sys.argv[1]])
    return parser()
cli.build_parser = signalled_parser
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [("SIGINT", 130, "interrupted (SIGINT)"), ("SIGTERM", 143, "terminated (SIGTERM)")],
)
def test_a_signal_as_the_command_starts_is_its_one_line(signum, code, said):
    """main handled a signal only once the command ran: one that came as it parsed its arguments (the
    first 0.3-0.8 s of a command on the loaded dev VM, with the imports) ended in a KeyboardInterrupt
    traceback, or for SIGTERM, unsaid."""
    done = fresh_python(STOPPED_AS_IT_PARSES, signum, "verify", "RUN")
    assert (done.returncode, done.stdout, done.stderr) == (
        code,
        "",
        f"sanitizer: {said}; run it again to resume\n",
    )


def test_an_error_said_to_a_reader_that_went_away_exits_141(tmp_path):
    """`sanitizer verify NOT_A_RUN 2>&1 | head -0`: the error line met the closed pipe in the error's
    own handler, and the BrokenPipeError ended the command with exit 1, a failed run's code, where
    `sanitizer verify RUN | head` ends with the shell's SIGPIPE status."""
    read, write = os.pipe()
    os.close(read)
    with open(write, "wb") as closed:
        command = [sys.executable, "-m", "sanitizer.cli", "verify", str(tmp_path)]
        done = subprocess.run(command, cwd=CHECKOUT, stdout=closed, stderr=closed)
    assert done.returncode == 141


STREAMS_AFTER_A_COMMAND = """
import json, os, sys
from sanitizer.cli import main
from sanitizer.progress import progress_bar
code = main(sys.argv[2:])
with progress_bar(True, total=1) as bar:  # what `score 2>&-` ended at: sys.stderr.isatty()
    bar.update(1)
with open(sys.argv[1], "w") as f:
    json.dump([code, [os.readlink(f"/proc/self/fd/{fd}") for fd in range(3)]], f)
"""


def test_standard_streams_closed_at_start_read_as_devnull(scored_run, tmp_path):
    """`score 2>&-` exited 1, silently: Python leaves a stream closed at start None, and the first
    progress bar raised an AttributeError there was nowhere to print. Its descriptor stayed free for
    the next file opened to take, where a library's or a child's writes to it would land."""
    result = tmp_path / "result.json"
    done = fresh_python(
        STREAMS_AFTER_A_COMMAND, str(result), "verify", str(scored_run), redirects="<&- >&- 2>&-"
    )
    assert done.returncode == 0
    assert json.loads(result.read_text()) == [0, [os.devnull] * 3]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_decoder_dir, tiny_shards) -> Path:
    out = tmp_path_factory.mktemp("scored") / "run"
    argv = ["score", "--decoder", str(tiny_decoder_dir), "--data", str(tiny_shards), "--out", str(out)]
    assert main([*argv, "--workers", "0", "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("command", ["clean", "verify"])
def test_the_steps_that_run_no_model_do_not_load_torch(scored_run, command):
    """clean and verify read the manifest and the shards, but imported torch and timm on the way (the
    scoring settings, decoder.json's checks, the collapse pass's constants): 3 s a call on the 2-core
    dev VM, for a step a scheduled job runs after every score and an auditor often."""
    assert heavy_imports(RUN_MAIN, command, str(scored_run)) == "[]"


def test_report_loads_the_models_only_to_draw_images(tmp_path, tiny_decoder_dir):
    """A run without an image to show: the page is written without torch (it loads the encoder and
    decoder only to render samples)."""
    from sanitizer.pipeline.job import ScoreJob, run_score_job

    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "a.tar", "w") as tar:
        member = tarfile.TarInfo("y.png")
        member.size = 9
        tar.addfile(member, io.BytesIO(b"not a png"))
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(tmp_path / "data"), out=tmp_path / "run", workers=0)
    run_score_job(job, progress=False)
    assert heavy_imports(RUN_MAIN, "report", str(tmp_path / "run")) == "[]"


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("open_clip:roberta-ViT-B-32", "cannot be built offline: open_clip fetches its text tower, the "),
        ("timm:resnet181", "timm has no model 'resnet181'; nearest: resnet18, resnet18d, resnet101"),
    ],
)
def test_train_refuses_an_encoder_it_cannot_build_offline_in_one_line(
    spec, why, tiny_shards, tmp_path, capsys, no_network
):
    """`train --encoder open_clip:roberta-ViT-B-32` ended in open_clip's RuntimeError traceback, exit 1
    ('Please `pip install transformers`'; with transformers, a download of roberta-base)."""
    out = tmp_path / "decoder"
    assert main(["train", "--encoder", spec, "--data", str(tiny_shards), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sanitizer: error: ")
    assert why in captured.err
    assert captured.err.count("\n") == 1
    assert not out.exists()
    assert no_network == []
