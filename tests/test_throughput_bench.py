"""bench/throughput.py --model-only: the GPU machine's check, which must run without Ray or shards."""

import json
import sys

from bench import throughput


def test_model_only_times_the_model_loop_alone(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing ray would fail, as on the GPU machine
    out = tmp_path / "r.json"
    argv = ["--model-only", "--relax-steps", "0", "--model-seconds", "0.2", "--work-dir", str(tmp_path)]
    assert throughput.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["relax_steps"] == 0 and result["model_only_img_s"] > 0
    assert result["pipeline_img_s"] is None and result["train_img_s"] is None
    assert result["pipeline_by_workers_img_s"] == {}
    assert not (tmp_path / "shards").exists()  # no shards written for a run that reads none


def test_the_pipeline_phase_scores_with_the_default_collapse_pass(tmp_path, tiny_encoder, tiny_shards):
    """The random decoder holds random held-out images, so the timed job is the default one, pass
    included (a decoder without them would be refused)."""
    from sanitizer.decoder_meta import ScoreSettings
    from sanitizer.pipeline.job import ScoreJob, run_score_job

    decoder_dir = throughput.make_decoder(tiny_encoder, tmp_path / "decoder", ScoreSettings())
    summary = run_score_job(ScoreJob(decoder_dir, str(tiny_shards), tmp_path / "run", workers=0), False)
    assert summary.collapse_rule == "quantile:0.98" and summary.collapse_threshold is not None
    assert summary.samples == 120


def test_the_training_phase_times_an_epoch_of_rows_as_fit_holds_them(tiny_encoder):
    """It passed bare arrays to train_epoch after fit came to hold its images as Rows, and crashed at
    the end of a full run, after every other phase was measured."""
    from sanitizer.train import TrainSettings

    out = throughput.training(tiny_encoder, 40, TrainSettings(batch_size=16))
    assert out["img_s"] > 0 and out["embed_img_s"] > 0 and out["seconds"] > 0


def test_a_shard_counts_as_finished_when_its_stats_marker_first_appears(tmp_path):
    """The collapse pass rewrites the markers at the job's end: their mtimes made every shard look
    finished then, and the steady rate fell back to the whole job's."""
    import os
    import time

    stats = tmp_path / "stats"
    with throughput.first_seen(stats, interval=0.01) as seen:
        time.sleep(0.05)  # the folder does not exist yet
        stats.mkdir()
        (stats / "a_stats.json").write_text("{}")
        deadline = time.monotonic() + 10  # a loaded CI machine may starve the poller a while
        while "a_stats.json" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        first = seen["a_stats.json"]
        time.sleep(0.05)
        (stats / "tmp").write_text("{}")
        os.replace(stats / "tmp", stats / "a_stats.json")  # the pass's atomic rewrite
        time.sleep(0.05)
    assert seen["a_stats.json"] == first < (stats / "a_stats.json").stat().st_mtime


def test_a_whole_run_at_a_tiny_size_measures_every_phase(tmp_path):
    """The bench end to end without Ray (`--workers 0`): a part of it that falls behind the package
    fails here, not at the end of a long run on a lent GPU."""
    out = tmp_path / "r.json"
    argv = ["--samples", "64", "--per-shard", "32", "--train-samples", "64", "--workers", "0"]
    argv += ["--model-seconds", "0.2", "--work-dir", str(tmp_path), "--json", str(out)]
    assert throughput.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == 64 and result["pipeline_by_workers_img_s"]["0"] > 0
    assert result["train_img_s"] > 0 and result["embed_img_s"] > 0
    job_seconds = 64 / result["pipeline_job_img_s"]["pipeline workers=0"]
    assert 0 < result["first_shard_s"]["pipeline workers=0"] <= job_seconds + 0.1  # polled every 0.05 s
