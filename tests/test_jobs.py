import pyarrow.parquet as pq
import yaml

from jobs.score_job import main, options


def test_options_become_cli_flags():
    assert options({"batch_size": 8, "data": "a.tar", "workers": None}) == [
        "--batch-size",
        "8",
        "--data",
        "a.tar",
    ]
    assert options({"no_collapse": True, "other": False}) == ["--no-collapse"]  # true: a bare flag


def test_job_config_scores_cleans_and_reports_like_the_cli(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch
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
        "clean": {"threshold": "mad:3"},
        "report": True,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "job.yaml")]) == 0
    assert len(list((tmp_path / "run" / "clean").glob("*.tar"))) == 3
    assert pq.read_table(tmp_path / "run/manifest/shard-000000.parquet").num_rows == 40
    assert [str(p) for p in reported] == [str(tmp_path / "run")]
