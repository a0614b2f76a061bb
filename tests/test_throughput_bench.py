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
