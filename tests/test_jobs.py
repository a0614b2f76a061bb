import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import score_job
from jobs.score_job import ConfigError, main, options, step_options, steps
from sanitizer.cli import main as sanitizer_main
from sanitizer.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent  # where `python -m jobs.score_job` finds this checkout


def test_options_become_cli_flags():
    assert options({"batch_size": 8, "data": "a.tar", "workers": None}) == [
        "--batch-size",
        "8",
        "--data",
        "a.tar",
    ]
    assert options({"no_collapse": True, "other": False}) == ["--no-collapse"]  # true: a bare flag


def test_job_config_scores_cleans_and_reports_like_the_cli(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch, capsys
):
    import sanitizer.report

    reported = []
    monkeypatch.setattr(sanitizer.report, "write_report", lambda run_dir: reported.append(run_dir) or run_dir)
    config = {
        "score": {
            "decoder": str(tiny_decoder_dir),
            "data": str(tiny_shards),
            "out": str(tmp_path / "run"),
            "workers": 0,
        },
        "clean": {},  # as the shipped configs say it: clean with the defaults
        "report": True,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "job.yaml")]) == 0
    assert len(list((tmp_path / "run" / "clean").glob("*.tar"))) == 3
    assert pq.read_table(tmp_path / "run/manifest/shard-000000.parquet").num_rows == 40
    assert [str(p) for p in reported] == [str(tmp_path / "run")]
    last = capsys.readouterr().out.splitlines()[-1]  # what a scheduler's log ends with
    assert last == "score_job: score exit 0, clean exit 0, report exit 0; exit 0"


def test_a_step_that_fails_ends_the_job_and_its_last_line_says_which(tmp_path, tiny_shards, capsys):
    config = {
        "score": {"decoder": str(tmp_path / "absent"), "data": str(tiny_shards), "out": str(tmp_path / "r")}
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "job.yaml")]) == 2
    assert capsys.readouterr().out.splitlines()[-1] == (
        "score_job: score exit 2, clean not run, report not run; exit 2"
    )
    assert not (tmp_path / "r").exists()  # the RUN_DIR the job held, and wrote nothing into


def test_a_run_dir_another_job_holds_ends_the_job_busy_with_75(
    tmp_path, tiny_decoder_dir, tiny_shards, capsys
):
    """It exited 2, as a broken config does: an hourly scheduler could not tell "the last run is still
    going, skip this tick" from "the job is broken". Busy is 75 (EX_TEMPFAIL), named on the last line."""
    out = tmp_path / "run"
    config = {
        "score": {"decoder": str(tiny_decoder_dir), "data": str(tiny_shards), "out": str(out), "workers": 0}
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    with RunDir(out).lock():  # as a score still running holds it
        assert main(["--config", str(tmp_path / "job.yaml")]) == 75
        assert [p.name for p in out.iterdir()] == [".lock"]
    out_text, err = capsys.readouterr()
    assert out_text.splitlines()[-1] == "score_job: score busy, clean not run, report not run; exit 75"
    holder = f"{os.getpid()} on {socket.gethostname()}"
    assert err.splitlines()[-1] == f"sanitizer: error: another sanitizer job (pid {holder}) is using {out}"


def test_a_second_job_arriving_between_the_first_ones_steps_is_the_one_told_busy(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch, capsys
):
    """Each step took RUN_DIR's lock alone: a second job started between the first one's score and
    its clean took it, scored everything again, and the first ended `clean busy`, exit 75, its
    scoring done. The job holds RUN_DIR throughout: the second, a process of its own, is refused."""
    import sanitizer.report

    monkeypatch.setattr(sanitizer.report, "write_report", lambda run_dir: run_dir)
    out = tmp_path / "run"
    score = {"decoder": str(tiny_decoder_dir), "data": str(tiny_shards), "out": str(out), "workers": 0}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"score": {**score, "device": "cpu"}}))
    second = []

    def step_then_second_job(argv: list[str]) -> int:
        code = sanitizer_main(argv)
        if argv[0] == "score":  # the first job is between its steps: a second one starts now
            command = [sys.executable, "-m", "jobs.score_job", "--config", str(tmp_path / "job.yaml")]
            second.append(subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600))
        return code

    monkeypatch.setattr(score_job, "sanitizer", step_then_second_job)
    assert main(["--config", str(tmp_path / "job.yaml")]) == 0
    first = capsys.readouterr().out.splitlines()[-1]
    assert first == "score_job: score exit 0, clean exit 0, report exit 0; exit 0"
    assert second[0].returncode == 75, second[0].stderr
    assert (
        second[0].stdout.splitlines()[-1] == "score_job: score busy, clean not run, report not run; exit 75"
    )
    holder = f"{os.getpid()} on {socket.gethostname()}"
    assert second[0].stderr.splitlines()[-1] == (
        f"sanitizer: error: another sanitizer job (pid {holder}) is using {out}"
    )
    assert len(list((out / "clean").glob("*.tar"))) == 3


@pytest.mark.parametrize(("codes", "last"), [((0, 75), "score exit 0, clean busy, report not run; exit 75")])
def test_a_later_step_that_finds_the_run_busy_ends_the_job_with_75(
    tmp_path, monkeypatch, capsys, codes, last
):
    """A later step that finds RUN_DIR busy (another job took it between this job's steps, where this
    one could not hold it throughout) stops the job there, busy, rather than as a broken job."""
    ends = iter(codes)
    monkeypatch.setattr(score_job, "sanitizer", lambda argv: next(ends))
    assert score_job.run({"score": {"out": str(tmp_path / "r"), "decoder": "/d", "data": "/x.tar"}}) == 75
    assert capsys.readouterr().out == f"score_job: {last}\n"


def test_help_describes_the_config():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    assert out.getvalue().startswith("usage: python -m jobs.score_job [-h] --config CONFIG")
    assert "`clean` and `report` are" in out.getvalue()
    assert (  # as words: the docstring's line breaks move as it is edited
        "(0 done, 1 incomplete, 2 a usage error, 75 busy: another job holds RUN_DIR, skip this run, "
        "130 Ctrl-C, 143 SIGTERM)" in " ".join(out.getvalue().split())
    )


@pytest.mark.parametrize("code", [130, 143])
def test_a_step_stopped_by_a_signal_ends_the_job_with_its_code(tmp_path, monkeypatch, capsys, code):
    """Ctrl-C and SIGTERM stop `sanitizer` with 130 and 143: the job stops there, with that code."""
    monkeypatch.setattr(score_job, "sanitizer", lambda argv: code)
    assert score_job.run({"score": {"out": str(tmp_path / "r"), "decoder": "/d", "data": "/x.tar"}}) == code
    assert (
        capsys.readouterr().out
        == f"score_job: score exit {code}, clean not run, report not run; exit {code}\n"
    )


def test_a_run_with_a_shard_that_is_not_a_tar_is_still_cleaned_and_reported(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch, capsys
):
    import shutil

    import sanitizer.report

    reported = []
    monkeypatch.setattr(sanitizer.report, "write_report", lambda run_dir: reported.append(run_dir) or run_dir)
    data = shutil.copytree(tiny_shards, tmp_path / "data")
    (data / "shard-000003.tar").write_bytes(b"not a tar" * 100)
    config = {"score": {"decoder": str(tiny_decoder_dir), "data": str(data), "out": str(tmp_path / "run"),
                        "workers": 0}}  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "job.yaml")]) == 1  # incomplete, as score and clean say
    assert len(list((tmp_path / "run" / "clean").glob("*.tar"))) == 3
    assert [str(p) for p in reported] == [str(tmp_path / "run")]
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "score_job: score exit 1, clean exit 1, report exit 0; exit 1"


def test_a_config_that_is_not_utf8_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "job.yaml").write_bytes("score: {out: donn\u00e9es}\n".encode("latin-1"))
    assert main(["--config", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("score_job: error: ") and "can't decode" in err and "Traceback" not in err


def test_a_step_runs_unless_switched_off_and_an_empty_mapping_runs_it_with_defaults():
    assert step_options({}, "clean") == []
    assert step_options({"clean": True}, "clean") == []
    assert step_options({"clean": {}}, "clean") == []
    assert step_options({"clean": {"threshold": "mad:4"}}, "clean") == ["--threshold", "mad:4"]
    assert step_options({"clean": False}, "clean") is None
    assert step_options({"clean": None}, "clean") is None
    with pytest.raises(
        ConfigError, match="`report` must be true, false or a mapping of options, not 'yes please'"
    ):
        step_options({"report": "yes please"}, "report")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "needs a `score` mapping with at least `out`"),
        ("score: {decoder: d, data: x.tar}\n", "needs a `score` mapping with at least `out`"),
        ("score: {out: r}\nclean: 3\n", "`clean` must be true, false or a mapping of options, not 3"),
        (
            "score: [unclosed\n",
            "not YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)",
        ),
        ("score: {out: r, help: true}\n", "`help` is not an option a job can take"),
        (
            "score: {out: r, decoder: d, data: x.tar}\nclean: {treshold: 'mad:4'}\n",
            "`clean` has no option '--treshold'",
        ),
        ("score: {out: r, decoder: d, data: x.tar, bogus: 1}\n", "`score` has no option '--bogus'"),
        (
            "score: {out: r, decoder: d, data: x.tar, workers: two}\n",
            "`score`: argument --workers: invalid int value: 'two'",
        ),
        (
            "score: {out: r, decoder: d, data: x.tar, micro_batch: half}\n",
            "`score`: argument --micro-batch: invalid int value: 'half'",
        ),
        ("score: {out: r, decoder: d}\n", "`score`: the following arguments are required: --data"),
        (
            "score: {out: r, decoder: d, data: x.tar}\nclaen: false\n",
            "unknown key `claen`: a config holds score, clean, report",
        ),
        (
            "scor: {out: r, decoder: d, data: x.tar}\n",
            "unknown key `scor`: a config holds score, clean, report",
        ),
    ],
)
def test_a_config_that_cannot_run_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    (tmp_path / "job.yaml").write_text(text)
    assert main(["--config", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"score_job: error: {tmp_path / 'job.yaml'}: ") and message in err
    assert err.count("\n") == 1  # one line: a YAML error was 8 (the parser's context and a caret)
    assert "Traceback" not in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("score", "message"),
    [
        ("{out: runs/today, decoder: /d, data: /x.tar}", "`score.out` is a relative path ('runs/today')"),
        (
            "{out: /r, decoder: decoders/r18, data: /x.tar}",
            "`score.decoder` is a relative path ('decoders/r18')",
        ),
        ("{out: /r, decoder: /d, data: '/a.tar,b.tar'}", "`score.data` is a relative path ('b.tar')"),
        (
            "{out: /r, decoder: /d, data: /x.tar, encoder-weights: w.pt}",
            "`score.encoder-weights` is a relative",
        ),
    ],
)
def test_a_relative_path_in_a_job_config_is_refused(tmp_path, capsys, score, message):
    """Under `ray job submit --working-dir .` the job runs in Ray's temporary copy of the directory: a
    relative `out` put the run there, lost with it, and the next run of the schedule started afresh."""
    (tmp_path / "job.yaml").write_text(f"score: {score}\n")
    assert main(["--config", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"score_job: error: {tmp_path / 'job.yaml'}: {message}") and err.count("\n") == 1
    assert "give an absolute path or a URL" in err


@pytest.mark.parametrize("key", ["out", "decoder", "encoder-weights"])
def test_a_url_in_a_path_option_other_than_data_is_refused(tmp_path, capsys, key):
    """Only `data` is read through fsspec: `out: s3://b/run` passed as a URL and was taken as the
    relative path `s3:/b/run`, in Ray's temporary working directory, lost with it."""
    score = {"out": "/r", "decoder": "/d", "data": "s3://b/x.tar", key: "s3://b/it"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"score": score}))
    assert main(["--config", str(tmp_path / "job.yaml")]) == 2
    assert capsys.readouterr().err == (
        f"score_job: error: {tmp_path / 'job.yaml'}: `score.{key}` is a URL ('s3://b/it'): `sanitizer "
        "score` reads and writes it as a local path (a disk or a mount); only `data` may be URLs. Give an "
        "absolute path\n"
    )


def test_urls_and_absolute_paths_are_taken():
    config = {
        "score": {"out": "/r", "decoder": "/d", "data": "s3://b/{0..9}.tar,/x/{a,b}.tar"},
        "report": False,
    }
    data = config["score"]["data"]
    assert steps(config) == [["score", "--out", "/r", "--decoder", "/d", "--data", data], ["clean", "/r"]]


def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_the_shipped_configs_score_clean_and_report():
    from pathlib import Path

    import jobs.score_job as job

    configs = sorted((Path(job.__file__).parent / "configs").glob("*.yaml"))
    assert len(configs) == 2
    for path in configs:
        config = yaml.safe_load(path.read_text())
        assert job.score_options(config)[1]
        assert step_options(config, "clean") is not None and step_options(config, "report") is not None


def test_the_img2dataset_config_names_its_output_folder_not_a_brace_range():
    """An img2dataset output lacks the shards of a worker that failed or of a run not finished, and
    score refuses a brace range naming one that is missing ('N of the shards --data names not found'):
    the shipped config for that output named {00000..00999}.tar. A folder takes the shards there are."""
    from pathlib import Path

    import jobs.score_job as job

    config = yaml.safe_load((Path(job.__file__).parent / "configs" / "clip_pairs.yaml").read_text())
    assert config["score"]["data"] == "/data/laion-subset"


def test_an_option_that_is_not_a_name_and_one_value_is_a_config_error():
    with pytest.raises(ConfigError, match="option 1: 2 is not a name and a single value"):
        options({1: 2})
    with pytest.raises(ConfigError, match=r"option 'out': \['a', 'b'\] is not a name and a single value"):
        options({"out": ["a", "b"]})


def test_the_image_installs_the_job_server_of_the_ray_it_pins():
    """`ray job submit` talks to the head's job server, which ray[data] lacks: a head started from the
    image took no job. The cluster extra adds it, pinned to the very Ray the package runs on."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pinned = {r.split("[")[0]: r.split("==")[1] for r in project["dependencies"] if r.startswith("ray[")}
    assert project["optional-dependencies"]["cluster"] == [f"ray[default]=={pinned['ray']}"]
    assert "pip install --quiet './[cluster]'" in (root / "Dockerfile").read_text()


def test_the_steps_of_a_job_take_its_lock_for_theirs_and_other_holders_are_still_refused(tmp_path):
    """A second open file of the lock conflicts with the first even in one process: the job's steps
    know the job's lock by its path (also spelt through a link); any other lock is refused as before."""
    from sanitizer.errors import Busy
    from sanitizer.joblock import job_lock, job_lock_for_steps, refuse_busy

    run, link = tmp_path / "run", tmp_path / "link"
    link.symlink_to(run)
    with job_lock_for_steps(run, "RUN_DIR"):
        refuse_busy(link)
        with job_lock(link, "RUN_DIR"), job_lock(run, "RUN_DIR"):
            pass
    with job_lock(run, "RUN_DIR"):  # as `sanitizer score` alone holds it: not a job's for its steps
        with pytest.raises(Busy):
            refuse_busy(run)
        with pytest.raises(Busy), job_lock_for_steps(run, "RUN_DIR"):
            pass
