"""`sanitizer demo`: the reduced mode runs end to end in CI (Ray included) and says what it found."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sanitizer import demo
from sanitizer.data.decode import decode_label
from sanitizer.data.shards import expand_shards
from sanitizer.data.tario import iter_samples
from sanitizer.errors import UsageError


def test_quick_demo_runs_end_to_end(tmp_path, ray_session, capsys):
    out = tmp_path / "demo"
    assert demo.run_demo(out, quick=True) == 0
    printed = capsys.readouterr().out
    assert re.search(r"detection AUC \(ground truth in the shards\): [01]\.\d{3}", printed), printed[-2000:]
    assert "[7/7] defender: writing the audit report" in printed
    # it said "10 epochs in N s" after "training ... on 1000 clean images": 950 trained, 50 held out
    assert re.search(
        r"\n      10 epochs on 950 images in [\d.]+ s, 50 held out to calibrate the threshold:", printed
    )
    run = out / "run"
    assert (run / "report" / "index.html").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "complete"
    assert info["clean"]["kept"] + info["clean"]["quarantined"] == info["totals"]["ok"] == demo.QUICK.dataset
    for line in ("manifest:", "clean shards:", "quarantine:", "report:"):
        assert line in printed
    assert str(run / "report" / "index.html") in printed


def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("someone's work")
    with pytest.raises(UsageError, match="not empty"):
        demo.run_demo(tmp_path, quick=True)
    assert (tmp_path / "notes.txt").read_text() == "someone's work"


def test_demo_replaces_only_its_own_outputs(tmp_path):
    demo.prepare_out(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old").write_text("x")
    (tmp_path / "mine.txt").write_text("kept")
    demo.prepare_out(tmp_path)
    assert not (tmp_path / "run").exists() and (tmp_path / "mine.txt").is_file()


def test_demo_out_under_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match=r"cannot use --out .*afile/sub: Not a directory"):
        demo.prepare_out(tmp_path / "afile" / "sub")


def test_generated_data_when_fashion_mnist_is_missing(tmp_path, monkeypatch):
    """Without the Debian package the demo still has a dataset, poisoned and labelled as planned."""
    from sanitizer.redteam import datasets

    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path / "absent")
    plan = demo.QUICK
    data = demo.load_data(plan)
    assert data.labels is None and data.source == "generated images"
    split = demo.split_data(data, plan, target=0)
    parts = [split.shadow, split.probe, split.decoder, split.dataset, split.reference]
    assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts)  # disjoint
    poisoned = demo.write_dataset(data, split, plan, tmp_path / "shards", target=0)
    labels = [
        decode_label(s) for ref in expand_shards(str(tmp_path / "shards")) for s in iter_samples(ref.url)
    ]
    assert len(labels) == plan.dataset and sum(labels) == poisoned == round(plan.poison_rate * plan.dataset)
