"""The audit report: produced from a real small run, every image valid, the verdict's statistics right."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import tarfile
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sanitizer import cli
from sanitizer.checkpoint import FORMAT, META
from sanitizer.clean import clean_run
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.errors import UsageError
from sanitizer.manifest import SCHEMA_VERSION, read_manifest, to_table, write_manifest
from sanitizer.pipeline.job import ScoreJob, run_score_job
from sanitizer.report import SEED, encoder_verdict, expected_flag_rate, pca_2d, write_report
from sanitizer.stats import SHIFT_LIMIT, beta_binomial_sf, binomial_sf, log_betainc, roc_auc, roc_curve

from .conftest import killed_rethreshold

SECTIONS = (
    "summary", "verdict", "scores", "joint", "shards", "samples", "clusters", "localisation",
    "embeddings", "roc",
)  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE_CAPTION = '<script>alert("x")</script> $\\frac{1}{0}$ & photo '


class PageParser(HTMLParser):
    """Section ids, image sources and visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        self.text.append(data)


def parse(page: Path) -> PageParser:
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def white_square(pixels: np.ndarray) -> np.ndarray:
    """A BadEncoder-style patch, so the flagged samples have somewhere to be rebuilt badly."""
    out = pixels.copy()
    out[:, 21:31, 21:31] = 255
    return out


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, tiny_decoder_dir) -> Path:
    """2 shards x 30 image-text samples, 6 with a white patch and json "poisoned": true; scored."""
    root = tmp_path_factory.mktemp("report_run")
    pixels = synthetic_images(60, 32, seed=11)
    poisoned = np.zeros(60, bool)
    poisoned[::10] = True
    pixels[poisoned] = white_square(pixels[poisoned])
    captions = [HOSTILE_CAPTION + str(i) for i in range(60)]  # scraped captions: any text at all
    write_image_shards(root / "data", pixels, captions=captions, labels=poisoned.tolist(), per_shard=30)
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(root / "data"), out=root / "run", workers=0)
    run_score_job(job, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def page(labelled_run) -> Path:
    return write_report(labelled_run)


def test_report_has_every_section(page, labelled_run):
    assert page == labelled_run / "report" / "index.html"
    parsed = parse(page)
    assert parsed.ids == list(SECTIONS)
    text = " ".join(parsed.text)
    assert "AUC" in text and "p-value" in text
    assert parsed.scripts == 0  # a static page: nothing to run


def test_every_image_the_page_references_is_a_valid_png(page):
    images = parse(page).images
    assert {
        "scores.png",
        "shards.png",
        "samples.png",
        "localisation.png",
        "embeddings.png",
        "roc.png",
    } <= set(images)
    for src in images:
        path = page.parent / src
        assert path.parent == page.parent and path.is_file(), src  # beside the page: self-contained
        assert path.read_bytes()[:8] == PNG_SIGNATURE, src
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100


def test_captions_and_keys_are_escaped(page):
    html = page.read_text(encoding="utf-8")
    assert "<script>" not in html
    assert "&lt;script&gt;" in html  # the hostile caption is shown, as text


def test_report_is_rewritten_without_leftovers(labelled_run, page):
    stale = page.parent / ".scores.png.tmp-1-deadbeef"
    stale.write_bytes(b"partial")
    again = write_report(labelled_run)
    assert not stale.exists()
    assert parse(again).ids == list(SECTIONS)


def test_report_without_ground_truth_or_decoder(labelled_run, tmp_path):
    """Labels absent: no ROC; decoder moved: no images; the rest of the page is still written."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns("report", ".lock"))
    info = json.loads((run / "run.json").read_text())
    info["config"]["decoder_dir"] = str(tmp_path / "moved-away")
    (run / "run.json").write_text(json.dumps(info))
    for path in (run / "manifest").glob("*.parquet"):
        table = read_manifest(path)
        column = table.schema.get_field_index("label")
        table = table.set_column(column, table.schema.field("label"), pa.nulls(table.num_rows, pa.bool_()))
        write_manifest(path, table)
    page = write_report(run)
    parsed = parse(page)
    assert parsed.ids == list(SECTIONS)
    assert set(parsed.images) == {"scores.png", "shards.png", "joint.png"}  # the decoder draws the rest
    text = " ".join(parsed.text)
    assert "carry no ground truth" in text and "cannot be loaded" in text
    # quantile:Q needs no calibration file: the verdict still stands
    assert encoder_verdict(run)["p_value"] is not None


def test_report_loads_the_encoder_weights_the_run_was_scored_with(tmp_path, tiny_encoder):
    """Weights moved after training and given to `score --encoder-weights`: the report finds them too."""
    from safetensors.torch import save_file

    from sanitizer.train import TrainSettings, train_decoder

    from .conftest import TINY_MODEL

    write_image_shards(tmp_path / "data", synthetic_images(40, 32, seed=5), per_shard=20)
    save_file(tiny_encoder.module.state_dict(), str(tmp_path / "w.safetensors"))
    train_decoder(
        tiny_encoder, str(tmp_path / "data"), tmp_path / "dec", TrainSettings(epochs=1, batch_size=16),
        model_overrides=TINY_MODEL, encoder_weights=str(tmp_path / "w.safetensors"), progress=False,
    )  # fmt: skip
    moved = tmp_path / "elsewhere.safetensors"
    (tmp_path / "w.safetensors").rename(moved)
    job = ScoreJob(
        tmp_path / "dec", str(tmp_path / "data"), tmp_path / "run", workers=0, encoder_weights=str(moved)
    )
    run_score_job(job, progress=False)
    assert json.loads((tmp_path / "run/run.json").read_text())["config"]["encoder_weights"] == str(moved)
    parsed = parse(write_report(tmp_path / "run"))
    assert "cannot be loaded" not in " ".join(parsed.text)
    assert {"samples.png", "embeddings.png"} <= set(parsed.images)


def test_report_on_hostile_input(tmp_path, tiny_decoder_dir):
    """Truncated tars, non-images, bombs, empty shards: the page lists them and still renders."""
    from sanitizer.data.hostile import write_hostile_corpus

    write_hostile_corpus(tmp_path / "hostile")
    job = ScoreJob(
        decoder_dir=tiny_decoder_dir, data=str(tmp_path / "hostile"), out=tmp_path / "run", workers=0
    )
    run_score_job(job, progress=False)
    page = write_report(tmp_path / "run")
    parsed = parse(page)
    assert parsed.ids == list(SECTIONS)
    text = " ".join(parsed.text)
    assert "Samples that could not be scored" in text and "not_an_image" in text
    assert "Shards that failed" in text
    for src in parsed.images:
        assert (page.parent / src).read_bytes()[:8] == PNG_SIGNATURE


def test_report_of_a_run_that_flags_nothing_renders(tmp_path, tiny_decoder_dir, tiny_shards):
    """No flagged sample: the embedding plot shows the kept ones alone, and the page still renders."""
    job = ScoreJob(
        decoder_dir=tiny_decoder_dir, data=str(tiny_shards), out=tmp_path / "run", workers=0,
        threshold="value:1000", collapse="value:1000",
    )  # fmt: skip
    assert run_score_job(job, progress=False).flagged == 0
    page = write_report(tmp_path / "run")
    assert parse(page).ids == list(SECTIONS)
    assert (page.parent / "embeddings.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_run_scored_without_the_collapse_pass_is_reported_without_it(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch
):
    """--no-collapse: no collapse sections, and the shard plot's note does not speak of the pass's flags
    coming on top of the plotted ones (it did, though there were none); each manifest is read once,
    without the collapse pass's columns."""
    job = ScoreJob(
        decoder_dir=tiny_decoder_dir, data=str(tiny_shards), out=tmp_path / "run", workers=0, collapse=None
    )
    run_score_job(job, progress=False)
    reads = manifest_reads(monkeypatch)
    parsed = parse(write_report(tmp_path / "run"))
    assert len(reads) == 3 and not {"sketch", "collapse", "thumbnail"} & {c for r in reads for c in r}
    assert parsed.ids == [s for s in SECTIONS if s not in ("joint", "clusters")]
    text = " ".join(parsed.text)
    assert "so the plot counts that test's flags." in text and "collapse pass" not in text


def test_a_run_whose_every_shard_failed(tmp_path, tiny_decoder_dir, capsys):
    """No input is a tar: score and clean name no directory they did not make, and the report shows
    the failed shards, with no scores and no verdict, and says why."""
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "a.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    (data / "b.tar").write_text("not a tar\n")
    score = ["score", "--decoder", str(tiny_decoder_dir), "--data", str(data), "--out", str(run)]
    assert cli.main([*score, "--workers", "0", "--threshold", "mad:3"]) == 1  # a rule that finds no scores
    assert "\nmanifest: none (no shard was scored)\n" in capsys.readouterr().out
    assert cli.main(["clean", str(run)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "no shard was scored: nothing to clean",
        *(f"skipped shard {s}: it was not scored (see run.json)" for s in "ab"),
    ]
    assert not (run / "manifest").exists() and not (run / "quarantine").exists()
    assert cli.main(["report", str(run)]) == 0
    parsed = parse(run / "report/index.html")
    assert parsed.ids == ["summary"] and not parsed.images
    text = " ".join(parsed.text)
    assert "No shard was scored: 2 of 2 failed" in text and "no verdict" in text
    assert "Shards that failed" in text and "invalid header" in text


def test_the_report_says_when_clean_no_longer_matches_the_flags(labelled_run, tmp_path, tiny_decoder_dir):
    """A `score` re-run at another threshold than clean's drops run.json's record of clean: the page's
    kept and quarantined tiles go, and it says why and what to do (it said nothing) as verify does."""
    stale = "run.json has no record of clean, but clean/ exists (a `score` re-run since changed the flags"
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    clean_run(run, "value:0.5")
    text = " ".join(parse(write_report(run)).text)
    assert "kept in clean/" in text and stale not in text
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(labelled_run.parent / "data"), out=run, workers=0)
    run_score_job(job, progress=False)
    text = " ".join(parse(write_report(run)).text)
    assert "kept in clean/" not in text and stale in text


def test_no_verdict_while_shards_are_flagged_at_another_threshold(labelled_run, tmp_path, monkeypatch):
    """A `clean --threshold` killed while it re-flags the manifests leaves some at the old threshold
    (each row's own, as the collapse pass set them) and run.json at the new (it is written first). The
    verdict tested the mixed count against run.json's rate; it is withheld now, the page says why and
    what to do, and `clean` mends it."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    stems = sorted(p.stem for p in (run / "manifest").glob("*.parquet"))
    killed_rethreshold(run, "value:0.0", monkeypatch)  # re-flagged the first shard only
    verdict = encoder_verdict(run)
    assert verdict["backdoored"] is None and verdict["p_value"] is None
    assert verdict["other_threshold_shards"] == stems[1:] == [stems[1]]
    why = (
        f"1 shard ({stems[1]}) was flagged at another threshold than run.json's 0 (value:0) (a `sanitizer "
        "clean --threshold` did not finish), so the flag counts mix thresholds: run `sanitizer clean "
        "RUN_DIR` to flag every shard at run.json's"
    )
    assert verdict["text"] == "no verdict: " + why
    text = parse(write_report(run)).text
    assert text.count(why) == 1 and text.count("no verdict: " + why) == 1  # on the totals and the verdict
    clean_run(run)
    verdict = encoder_verdict(run)
    assert verdict["other_threshold_shards"] == [] and verdict["p_value"] is not None


def test_the_verdict_reads_each_manifest_once(labelled_run, tmp_path, monkeypatch):
    """The verdict's share above the calibration's median and its check of each shard's threshold read
    the manifests in one pass: two passes read a run of thousands of small shards twice. (A run whose
    rows have their own thresholds from the collapse pass has no one threshold to check them
    against.)"""
    reads = manifest_reads(monkeypatch)
    verdict = encoder_verdict(labelled_run)
    assert verdict["above_calibration_median"] is not None and verdict["other_threshold_shards"] == []
    assert reads == [["status", "score"]] * 2  # its 2 shards
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    clean_run(run, "quantile:0.97")  # one threshold for every row
    reads.clear()
    assert encoder_verdict(run)["other_threshold_shards"] == []
    assert reads == [["status", "score", "threshold"]] * 2


def manifest_reads(monkeypatch) -> list[list[str]]:
    """The columns of each manifest read from now on (read_manifest reads through pq.read_table)."""
    import pyarrow.parquet as pq

    reads, read_table = [], pq.read_table
    monkeypatch.setattr(
        pq, "read_table", lambda *a, **kw: reads.append(kw.get("columns")) or read_table(*a, **kw)
    )
    return reads


def test_the_report_reads_each_manifest_once(labelled_run, tmp_path, monkeypatch):
    """Each section of the page read every manifest again (5 reads a manifest, more for the shards its
    images came from): the page now reads each once, with the columns its sections need (the sketches,
    as the collapse pass ran), never the thumbnails."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    reads = manifest_reads(monkeypatch)
    write_report(run)
    assert len(reads) == len(list((run / "manifest").glob("*.parquet"))) == 2
    assert all("sketch" in columns and "thumbnail" not in columns for columns in reads)


def test_the_totals_count_each_tests_flags_in_the_shards_they_count(labelled_run, tmp_path):
    """With a shard not done (its stats marker gone), the totals counted its flags by score and by
    collapse from run.json, beside tiles that leave it out: both now count the finished shards."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    stems = sorted(p.stem for p in (run / "manifest").glob("*.parquet"))
    (run / "stats" / f"{stems[0]}_stats.json").unlink()
    reasons = read_manifest(run / "manifest" / f"{stems[1]}.parquet").column("flag_reason").to_pylist()
    by_score = sum(r in ("score", "score+collapse") for r in reasons)
    by_collapse = sum(r in ("collapse", "score+collapse") for r in reasons)
    totals = json.loads((run / "run.json").read_text())["totals"]["flagged_by"]
    assert (by_score, by_collapse) != (totals["score"], totals["collapse"])
    text = " ".join(parse(write_report(run)).text)
    assert f"; flagged by score {by_score:,}, by collapse {by_collapse:,}" in text


def test_image_sample_is_bounded(labelled_run, monkeypatch):
    """However big the run, only SAMPLE_PER_GROUP rows per group, from MAX_SHARDS_READ shards."""
    from sanitizer.report import scan as report_scan
    from sanitizer.rundir import RunDir

    monkeypatch.setattr(report_scan, "SAMPLE_PER_GROUP", 3)
    monkeypatch.setattr(report_scan, "MAX_SHARDS_READ", 1)
    run = RunDir(labelled_run)
    stems = sorted(p.stem for p in (labelled_run / "manifest").glob("*.parquet"))
    scan = report_scan.scan_run(run, stems)
    flagged, clean = report_scan.sample_rows(scan)
    assert 0 < len(clean) <= 3 and len(flagged) <= 3
    assert len({p.stem for p in flagged + clean}) == 1
    assert all(p.flagged for p in flagged) and not any(p.flagged for p in clean)
    assert len(scan.top) <= report_scan.GRID_ROWS and scan.top == sorted(scan.top, reverse=True)


def test_the_shard_plot_counts_the_score_tests_flags_the_expected_rate_is_for(labelled_run):
    """The dashed line is the score test's clean-data rate: each shard's bar counts that test's flags,
    which add up to what the verdict tests, not every flag (the collapse pass's come on top)."""
    from sanitizer.report.scan import scan_run
    from sanitizer.rundir import RunDir

    stems = sorted(p.stem for p in (labelled_run / "manifest").glob("*.parquet"))
    scan = scan_run(RunDir(labelled_run), stems)
    for line in scan.shards:
        reasons = read_manifest(labelled_run / "manifest" / f"{line.stem}.parquet").column("flag_reason")
        assert line.by_score == sum(r in ("score", "score+collapse") for r in reasons.to_pylist())
    assert sum(line.by_score for line in scan.shards) == encoder_verdict(labelled_run)["flagged"]


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(UsageError, match="not a RUN_DIR"):
        write_report(tmp_path)


def test_a_run_that_lost_its_run_json_is_a_damaged_run(labelled_run, tmp_path, capsys):
    """It was 'not a RUN_DIR (no run.json); run `sanitizer score` first', and score refuses a
    directory holding other files and no run.json: the advice led nowhere."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    (run / "run.json").unlink()
    assert cli.main(["report", str(run)]) == 2
    why = "is damaged: it is missing; restore it, or score into a new RUN_DIR"
    assert capsys.readouterr().err == f"sanitizer: error: {run}/run.json {why}\n"
    assert not (run / "report").exists() and not (run / ".lock").exists()


@pytest.mark.parametrize("rule", ["mad:abc", 5])
def test_a_run_json_whose_rule_is_not_one_is_a_damaged_run(labelled_run, tmp_path, capsys, rule):
    """A hand-edited threshold rule was shown as it was, or, with the decoder gone, stopped the report
    with "threshold 'mad:abc' is not ..." as if the user had mistyped an option."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    info = json.loads((run / "run.json").read_text())
    info["collapse"]["rule"] = rule
    (run / "run.json").write_text(json.dumps(info))
    assert cli.main(["report", str(run)]) == 2
    why = (
        "collapse.rule: threshold 'mad:abc' is not quantile:Q, mad:K, value:X, paper or a number"
        if isinstance(rule, str)
        else "collapse.rule is int, not str"
    )
    assert capsys.readouterr().err == (
        f"sanitizer: error: {run}/run.json is damaged: {why}; restore it, or score into a new RUN_DIR\n"
    )


def test_cli_report(labelled_run, capsys):
    assert cli.main(["report", str(labelled_run)]) == 0
    assert "index.html" in capsys.readouterr().out


# -- the verdict on a run built by hand, where the answer is known ---------------------------------
def exact_sf(k: int, n: int, p: float, terms: int = 1000) -> float:
    """P(X >= k) in exact integer arithmetic (p as a small fraction); later terms are below 1e-300."""
    f = Fraction(p).limit_denominator(1_000_000)
    a, b = f.numerator, f.denominator
    top = min(n, k + terms)
    return float(Fraction(sum(math.comb(n, j) * a**j * (b - a) ** (n - j) for j in range(k, top + 1)), b**n))


def fake_run(root: Path, rule: str, value: float, shards: list[tuple[int, int]], calibration=None) -> Path:
    """run.json and stats markers (the flag counts encoder_verdict reads), plus a decoder.json if
    calibrated; no manifests, so no share of scores above the calibration's median."""
    scoring = {"test_mask_ratio": 0.99, "num_masks": 4, "aggregate": "mean"}
    decoder = root / "decoder"
    if calibration is not None:
        decoder.mkdir(parents=True)
        meta = {
            "format": FORMAT, "decoder_sha256": "0" * 64, "model": {"image_size": 32, "embed_dim": 8},
            "encoder": {"spec": "timm:test_resnet", "weights_sha256": "0" * 64,
                        "preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}},
            "scoring": scoring, "calibration": {"scores": list(calibration)},
        }  # fmt: skip
        (decoder / META).write_text(json.dumps(meta))
    refs = [{"url": f"/data/s{i}.tar", "stem": f"s{i}"} for i in range(len(shards))]
    (root / "stats").mkdir(parents=True)
    for ref, (ok, flagged) in zip(refs, shards, strict=True):
        stats = {
            "shard": ref["stem"],
            "count": ok,
            "ok": ok,
            "flagged": flagged,
            "flagged_by": {"score": flagged, "collapse": 0},
            "status_counts": {"ok": ok},
        }
        (root / "stats" / f"{ref['stem']}_stats.json").write_text(json.dumps(stats))
    run = {
        "identity": {
            "shards": refs,
            "scoring": scoring,
            "decoder_sha256": "0" * 64,
            "manifest": SCHEMA_VERSION,
        },
        "config": {"decoder_dir": str(decoder)},
        "threshold": {"rule": rule, "value": value},
    }
    (root / "run.json").write_text(json.dumps(run))
    return root


def test_verdict_p_value_for_a_quantile_rule(tmp_path):
    # 1000 ok samples, quantile:0.95 -> 5% expected; 80 flagged is far above 50.
    run = fake_run(tmp_path / "a", "quantile:0.95", 1.0, [(600, 50), (400, 30)])
    v = encoder_verdict(run)
    assert v["ok"] == 1000 and v["flagged"] == 80
    assert v["expected_rate"] == pytest.approx(0.05)
    assert v["p_value"] == pytest.approx(exact_sf(80, 1000, 0.05), rel=1e-9)
    assert v["backdoored"] is True and v["text"].startswith("this encoder behaves as backdoored")
    assert v["text"].endswith("80 of 1000 samples flagged by score, 5.00% expected")  # the pass's aside
    # 55 flagged is within chance
    v = encoder_verdict(fake_run(tmp_path / "b", "quantile:0.95", 1.0, [(1000, 55)]))
    assert v["p_value"] == pytest.approx(exact_sf(55, 1000, 0.05), rel=1e-9)
    assert v["backdoored"] is False and v["text"].startswith("no evidence of a backdoor")


def exact_beta_binomial_sf(k: int, n: int, a: float, b: float) -> float:
    """P(X >= k), X ~ BetaBinomial(n, a, b), summed term by term: C(n, x) B(x + a, n - x + b) / B(a, b)."""
    log_beta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    return sum(
        math.exp(math.log(math.comb(n, x)) + log_beta(x + a, n - x + b) - log_beta(a, b))
        for x in range(k, n + 1)
    )


def test_verdict_rate_for_other_rules_comes_from_the_calibration(tmp_path):
    calibration = np.linspace(0.0, 1.0, 99)  # 9 of 99 above 0.9
    run = fake_run(tmp_path / "c", "value:0.9", 0.9, [(200, 30)], calibration.tolist())
    v = encoder_verdict(run)
    above = int((calibration.astype(np.float32) > np.float32(0.9)).sum())
    assert v["expected_rate"] == pytest.approx((above + 1) / 100)
    # the rate is Beta(above + 1, 99 - above): the count is beta-binomial
    assert v["test"] == "beta-binomial"
    assert v["p_value"] == pytest.approx(exact_beta_binomial_sf(30, 200, above + 1, 99 - above), rel=1e-6)
    assert v["calibration_n"] == 99


def test_verdict_allows_for_the_calibrations_own_uncertainty(tmp_path):
    """1000 calibration scores pin a 3% rate down to about +-0.5%: a million clean samples flagged at
    3.3% is chance of the calibration (the plain binomial test would call it p ~ 1e-67), 6% is not."""
    calibration = np.arange(1000) / 1000  # quantile:0.97 -> threshold 0.97: 29 scores above
    for flagged, backdoored in ((33_000, False), (60_000, True)):
        run = fake_run(tmp_path / str(flagged), "quantile:0.97", 0.97, [(1_000_000, flagged)], calibration)
        v = encoder_verdict(run)
        assert v["test"] == "beta-binomial" and v["backdoored"] is backdoored, v
    assert binomial_sf(33_000, 1_000_000, 0.03) < 1e-60
    assert encoder_verdict(tmp_path / "33000")["p_value"] > 0.1


def test_no_verdict_without_a_rate(tmp_path):
    v = encoder_verdict(fake_run(tmp_path / "d", "mad:3", 0.5, [(100, 10)]))  # no decoder.json
    assert v["p_value"] is None and v["backdoored"] is None and v["text"].startswith("no verdict")


def test_expected_flag_rate_never_claims_zero():
    assert expected_flag_rate("quantile:0.97", 1.0, None) == pytest.approx(0.03)
    assert expected_flag_rate("value:10", 10.0, np.array([1.0, 2.0, 3.0])) == pytest.approx(1 / 4)
    assert expected_flag_rate("paper", 2.0, None) is None


# -- statistics ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "n", "p"), [(0, 10, 0.3), (3, 10, 0.3), (8, 10, 0.3), (10, 10, 0.3), (1, 1, 0.5), (5, 100, 0.03)]
)
def test_binomial_sf_matches_the_exact_sum(k, n, p):
    assert binomial_sf(k, n, p) == pytest.approx(exact_sf(k, n, p), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize(
    ("k", "n", "a", "b"),
    [
        (5, 20, 2, 30),
        (30, 200, 3, 97),
        (80, 1000, 51, 950),
        (150, 1000, 31, 970),
        (10, 10, 2, 5),
        (2, 50, 1, 1),
    ],
)
def test_beta_binomial_sf_matches_the_exact_sum(k, n, a, b):
    assert beta_binomial_sf(k, n, a, b) == pytest.approx(exact_beta_binomial_sf(k, n, a, b), rel=1e-6)


def test_beta_binomial_sf_edges_and_limits():
    assert beta_binomial_sf(0, 10, 2, 3) == 1.0 and beta_binomial_sf(11, 10, 2, 3) == 0.0
    assert beta_binomial_sf(1, 10, 2, 0) == 1.0  # every calibration score above: P = 1
    # a rate pinned down by a huge calibration: the binomial tail
    assert beta_binomial_sf(40, 1000, 3e6 + 1, 97e6) == pytest.approx(binomial_sf(40, 1000, 0.03), rel=1e-3)
    # a huge run: the Beta tail of the rate, P(Beta(30, 971) > 0.05) by the incomplete beta function
    assert beta_binomial_sf(50_000_000, 10**9, 30, 971) == pytest.approx(
        math.exp(log_betainc(np.array([0.95]), 971, 30)[0]), rel=1e-3
    )
    with pytest.raises(ValueError, match="beta_binomial_sf needs"):
        beta_binomial_sf(1, 10, 0, 1)


def test_binomial_sf_edges_and_far_tails():
    assert binomial_sf(0, 0, 0.5) == 1.0
    assert binomial_sf(11, 10, 0.5) == 0.0
    assert binomial_sf(1, 10, 0.0) == 0.0 and binomial_sf(10, 10, 1.0) == 1.0
    tiny = binomial_sf(900, 1000, 0.03)  # far beyond double's 1 - x: summed in the small tail
    assert 0 < tiny < 1e-300 or tiny == 0.0
    assert binomial_sf(400, 10_000, 0.03) == pytest.approx(exact_sf(400, 10_000, 0.03), rel=1e-8)
    # a billion samples costs no more than a thousand
    assert binomial_sf(10_100_000, 1_000_000_000, 0.01) < 1e-100
    with pytest.raises(ValueError):
        binomial_sf(-1, 10, 0.5)


def test_roc_auc_is_the_pairwise_probability_with_half_ties():
    rng = np.random.default_rng(SEED)
    scores = np.round(rng.random(300), 1)  # many ties
    labels = rng.random(300) < scores
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert roc_auc(scores, labels) == pytest.approx(pairs, abs=1e-12)
    fpr, tpr, _ = roc_curve(scores, labels)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    with pytest.raises(ValueError):
        roc_auc(scores, np.ones(300, bool))


def test_pca_2d_finds_the_main_axis():
    rng = np.random.default_rng(SEED)
    x = np.outer(rng.normal(size=200), [3.0, 4.0, 0.0]) + rng.normal(scale=0.01, size=(200, 3))
    coords, share = pca_2d(x)
    assert coords.shape == (200, 2) and share[0] > 0.99
    assert pca_2d(np.ones((1, 1)))[0].shape == (1, 2)


# -- in a real browser -----------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
def test_page_loads_in_headless_chromium(page, tmp_path):
    """Chromium parses the page as a browser does; every section is in the DOM it builds."""
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = parse_dom(result.stdout)
    assert dom.ids == list(SECTIONS)
    assert set(dom.images) == set(parse(page).images)
    assert "Backdoor audit report" in " ".join(dom.text)


def parse_dom(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


def run_with_scores(root: Path, scores: np.ndarray, calibration: np.ndarray) -> Path:
    """A one-shard run whose manifest holds `scores` (flagged above quantile:0.97 of the calibration)."""
    threshold = float(np.float32(np.quantile(calibration, 0.97)))
    flagged = scores > threshold
    run = fake_run(
        root, "quantile:0.97", threshold, [(len(scores), int(flagged.sum()))], calibration.tolist()
    )
    n = len(scores)
    unset = (
        "error",
        "score_std",
        "embedding_norm",
        "caption",
        "width",
        "height",
        "sketch",
        "axis",
        "thumbnail",
        "flag_reason",
    )
    columns = {c: [None] * n for c in (*unset, "collapse", "collapse_threshold")}
    columns |= {"sha256": [None] * n, "label": [None] * n, "flagged": flagged, "threshold": [threshold] * n}
    columns |= {"key": [f"k{i}" for i in range(n)], "shard": ["s0"] * n, "index": np.arange(n)}
    columns |= {"status": ["ok"] * n, "score": scores.astype(np.float32)}
    (root / "manifest").mkdir()
    write_manifest(root / "manifest" / "s0.parquet", to_table(columns))
    return run


def test_no_verdict_when_the_data_as_a_whole_rebuilds_worse_than_the_calibration(tmp_path):
    """100 of 1000 flagged where 3% are expected is a backdoor only if the rest looks like the
    calibration data: with half the scores below its median it does; with 95% above, the data moved."""
    calibration = np.arange(1000) / 1000  # median 0.4995, quantile:0.97 0.969
    flagged, above, below = np.full(100, 0.99), np.full(400, 0.6), np.full(500, 0.2)
    v = encoder_verdict(run_with_scores(tmp_path / "backdoor", np.r_[flagged, above, below], calibration))
    assert v["above_calibration_median"] == pytest.approx(0.5)
    assert v["backdoored"] is True and v["text"].startswith("this encoder behaves as backdoored")

    moved = np.r_[flagged, np.full(850, 0.6), np.full(50, 0.2)]
    v = encoder_verdict(run_with_scores(tmp_path / "moved", moved, calibration))
    assert v["above_calibration_median"] == pytest.approx(0.95)
    assert v["p_value"] < v["alpha"] and v["backdoored"] is None  # the count test alone would fire
    assert v["text"].startswith("no verdict: 95% of the scores are above the median")
    assert "100 of 1000 flagged" in v["text"] and "train a decoder on a sample of this data" in v["text"]

    # the limit itself still gives a verdict: a backdoor may move up to 2 * SHIFT_LIMIT - 1 of the data
    at_limit = np.r_[flagged, np.full(round(SHIFT_LIMIT * 1000) - 100, 0.6)]
    at_limit = np.r_[at_limit, np.full(1000 - len(at_limit), 0.2)]
    v = encoder_verdict(run_with_scores(tmp_path / "limit", at_limit, calibration))
    assert v["above_calibration_median"] == pytest.approx(SHIFT_LIMIT) and v["backdoored"] is True


def test_share_above_the_calibration_median_of_a_real_run(labelled_run, tiny_decoder_dir):
    calibration = json.loads((Path(tiny_decoder_dir) / META).read_text())["calibration"]["scores"]
    median = np.float32(np.median(np.asarray(calibration, np.float32)))
    scores = np.concatenate(
        [
            read_manifest(p).column("score").to_numpy()
            for p in sorted((labelled_run / "manifest").glob("*.parquet"))
        ]
    )
    v = encoder_verdict(labelled_run)
    assert v["above_calibration_median"] == pytest.approx(float((scores > median).mean()))
    assert v["backdoored"] is not None  # synthetic data like the decoder's own: the verdict stands


def test_no_verdict_on_data_unlike_the_decoders(tmp_path, tiny_decoder_dir):
    """A real run on vertical stripes, which the tiny decoder (trained on smooth synthetic images)
    rebuilds worse than most calibration images: whatever the flag count, no verdict either way."""
    stripes = ((np.arange(32) // 4 % 2) * 255).astype(np.uint8)
    write_image_shards(tmp_path / "data", np.tile(stripes[None, None, :, None], (40, 32, 1, 3)), per_shard=20)
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(tmp_path / "data"), out=tmp_path / "run", workers=0)
    run_score_job(job, progress=False)
    v = encoder_verdict(tmp_path / "run")
    assert v["above_calibration_median"] == 1.0 and v["p_value"] is not None, v
    assert v["backdoored"] is None and v["text"].startswith("no verdict: 100% of the scores")
    assert "No verdict" in " ".join(parse(write_report(tmp_path / "run")).text)


@pytest.mark.parametrize("kind", ["file", "dangling symlink"])
def test_a_report_path_that_is_not_a_directory_is_one_line(labelled_run, tmp_path, capsys, kind):
    """It was `sanitizer: error: File exists: RUN/report`, exit 1: no word on what to do."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    if kind == "file":
        (run / "report").write_text("notes")
    else:
        (run / "report").symlink_to(tmp_path / "nowhere")
    assert cli.main(["report", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: {run}/report is not a directory; move or remove it, then run "
        "`sanitizer report` again\n"
    )
    assert (run / "report").is_symlink() or (run / "report").read_text() == "notes"
    assert not (tmp_path / "nowhere").exists()


def table_rows(page: Path, headers: list[str]) -> list[list[str]]:
    """The body rows of the page's table whose header row starts with `headers`, cell by cell, as the
    HTML holds them (escaped)."""
    text = page.read_text(encoding="utf-8")
    start = text.index("<tr>" + "".join(f"<th>{h}</th>" for h in headers))
    body = text[text.index("<tbody>", start) : text.index("</tbody>", start)]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in body.split("</tr>")[:-1]]


def test_what_the_dataset_names_cannot_hide_or_reorder_the_page(tmp_path, tiny_decoder_dir):
    """Keys and captions are shown as text: markup escaped (it was), and now control characters, line
    breaks and the right-to-left override as their escapes (they reached the page raw: an escape sequence
    for whoever cats the file, U+202E showing the text after it reversed), long ones cut with "..."."""
    keys = ["<script>alert(1)</script>", "line\nbreak", "esc\x1b[2Jx", "rtl\u202etxt", "k" * 300]
    captions = ['"onerror=alert(2)', "\x1b[31mred\x1b[0m", "a|b\tc", "\u202eevil", "x" * 5000]
    write_image_shards(tmp_path / "data", synthetic_images(5, 32, seed=3), keys=keys, captions=captions)
    job = ScoreJob(
        decoder_dir=tiny_decoder_dir, data=str(tmp_path / "data"), out=tmp_path / "run", workers=0,
        threshold="value:0", collapse=None,
    )  # fmt: skip
    run_score_job(job, progress=False)
    rows = table_rows(write_report(tmp_path / "run"), ["", "key"])
    assert sorted((r[1], r[6]) for r in rows) == sorted(
        [
            ("&lt;script&gt;alert(1)&lt;/script&gt;", "&quot;onerror=alert(2)"),
            ("line\\nbreak", "\\x1b[31mred\\x1b[0m"),
            ("esc\\x1b[2Jx", "a|b\\tc"),
            ("rtl\\u202etxt", "\\u202eevil"),
            ("k" * 117 + "...", "x" * 117 + "..."),
        ]
    )
    html = (tmp_path / "run/report/index.html").read_text(encoding="utf-8")
    assert not {"\x1b", "\u202e", "\t"} & set(html)


def test_a_collapse_that_is_not_a_number_is_left_out_of_the_plot(labelled_run, tmp_path):
    """The pass writes null where a row has no collapse; a NaN there (a damaged manifest) stopped the
    report with a traceback from the plot's axis limits. It is left out, as a null is."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    path = sorted((run / "manifest").glob("*.parquet"))[0]
    table = read_manifest(path)
    collapse = table.column("collapse").to_numpy(zero_copy_only=False).copy()
    collapse[0] = np.nan
    index = table.schema.get_field_index("collapse")
    table = table.set_column(index, table.schema.field(index), pa.array(collapse, pa.float32()))
    write_manifest(path, table)
    page = write_report(run)
    assert parse(page).ids == list(SECTIONS)
    assert (page.parent / "joint.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_run_dir_whose_path_is_not_utf8_is_shown_with_a_replacement_character(tmp_path, monkeypatch):
    """`report run` from a working directory whose name is not UTF-8 (the CLI refuses such arguments,
    not such a directory): the page's header shows the resolved path, whose surrogate UTF-8 cannot
    write. It stopped with a UnicodeEncodeError traceback after writing the figures; the byte now shows
    as U+FFFD, as a key's does."""
    parent = tmp_path / os.fsdecode(b"par\xffent")
    fake_run(parent / "run", "quantile:0.97", 1.0, [])
    monkeypatch.chdir(parent)
    page = write_report(Path("run"))
    assert f"<p>{tmp_path}/par\ufffdent/run</p>" in page.read_text(encoding="utf-8")


def test_the_page_title_names_the_run_given_as_a_relative_path(tmp_path, monkeypatch):
    """`sanitizer report .` from inside RUN_DIR titled the page "Sanitizer audit: " (the name of
    `.` is empty): it names the directory, as `report RUN_DIR` does."""
    fake_run(tmp_path / "today", "quantile:0.97", 1.0, [])
    monkeypatch.chdir(tmp_path / "today")
    for given in (".", "../today/"):
        page = write_report(Path(given))
        assert "<title>Sanitizer audit: today</title>" in page.read_text(encoding="utf-8")


def test_a_run_whose_shards_moved_says_they_could_not_be_read_not_that_it_lacks_flags(labelled_run, tmp_path):
    """The heat map needs flagged and kept samples read again from the input shards. With the shards
    gone its note said "this run has not both" of a run that flagged 6 of 60; it now says how many of
    each could be read, and the notes under the grid say why."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    info = json.loads((run / "run.json").read_text())
    for shard in info["identity"]["shards"]:
        shard["url"] = str(tmp_path / "gone" / Path(shard["url"]).name)
    (run / "run.json").write_text(json.dumps(info))
    page = write_report(run)
    text = page.read_text(encoding="utf-8")
    assert (
        '<section id="localisation"><h2>Where the trigger sits</h2><p class="note">needs both flagged and '
        "kept samples; of those sampled, 0 flagged and 0 kept could be read again</p></section>"
    ) in text
    assert f"cannot read {tmp_path}/gone/shard-000000.tar again: cannot open: FileNotFoundError" in text


def test_a_run_without_an_ok_sample_shows_no_images_and_says_why(tmp_path, tiny_decoder_dir):
    """Shards read to the end, none of their samples an image: the image sections said "no sample
    could be read again to show it" and "too few samples could be read to project", as if the shards
    had become unreadable, after loading the encoder and decoder for nothing. They now say that no
    sample could be scored, as the score histogram's does."""
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "a.tar", "w") as tar:
        for name, data in (("x.txt", b"a caption"), ("y.png", b"not a png")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    job = ScoreJob(decoder_dir=tiny_decoder_dir, data=str(tmp_path / "data"), out=tmp_path / "run", workers=0)
    run_score_job(job, progress=False)
    page = write_report(tmp_path / "run")
    text = page.read_text(encoding="utf-8")
    notes = re.findall(r'<section id="(\w+)"><h2>[^<]*</h2><p class="note">([^<]*)</p></section>', text)
    assert notes == [
        ("scores", "no sample could be scored: nothing to plot"),
        ("samples", "no sample could be scored: no image to show"),
        ("localisation", "no sample could be scored: no image to show"),
        ("embeddings", "no sample could be scored: no image to show"),
        ("roc", "the shards carry no ground truth (json &quot;poisoned&quot;)"),
    ]
    assert sorted(p.name for p in page.parent.iterdir()) == ["index.html", "shards.png"]


def test_a_run_on_a_read_only_filesystem_is_refused_saying_what_to_do(tmp_path, monkeypatch, capsys):
    """An archived run on a read-only mount: the report (and its lock) cannot be written there. It
    said `cannot use RUN_DIR as RUN_DIR: Read-only file system`; it now says why and what to do."""
    run = fake_run(tmp_path / "run", "quantile:0.97", 1.0, [])
    statvfs = os.statvfs
    read_only = lambda path: SimpleNamespace(f_flag=os.ST_RDONLY) if Path(path) == run else statvfs(path)  # noqa: E731
    monkeypatch.setattr(os, "statvfs", read_only)
    assert cli.main(["report", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: {run} is on a read-only filesystem, and the report is written into it "
        f"({run}/report); copy its run.json, manifest/ and stats/ to a writable directory and report on "
        "the copy\n"
    )
    assert sorted(p.name for p in run.iterdir()) == ["run.json", "stats"]  # no report/, no .lock


@pytest.mark.parametrize("entry", ["x", {"stem": "a"}, {"stem": 5, "error": None}])
def test_a_failed_shards_entry_that_is_not_one_is_a_damaged_run(tmp_path, capsys, entry):
    """The report lists run.json's failed shards; an entry edited by hand stopped it with a TypeError
    or KeyError traceback (exit 1). It is a damaged run.json, as a malformed identity.shards is."""
    run = fake_run(tmp_path / "run", "quantile:0.97", 1.0, [])
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(info | {"failed_shards": [entry]}))
    assert cli.main(["report", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: {run}/run.json is damaged: failed_shards holds {entry!r}, not a stem and an "
        "error; restore it, or score into a new RUN_DIR\n"
    )
    assert not (run / "report").exists()


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("versions", [1], "versions is list, not dict"),
        ("collapse", {"above_holdout_median": "x"}, "collapse.above_holdout_median is str, not int or float"),
        ("config", {"encoder_weights": 5}, "config.encoder_weights is int, not str"),
    ],
)
def test_a_run_json_field_only_the_report_reads_that_is_damaged_is_one_line(
    tmp_path, capsys, field, value, why
):
    """The footer's versions, the collapse pass's shift and the encoder weights' path, edited into
    another type, stopped the report of a scored run with an AttributeError or TypeError traceback
    (exit 1), where the page's parts used them. They are checked with the rest of run.json as it is
    opened: a damaged run, exit 2 (a run without scores, as here, is enough to show it)."""
    run = fake_run(tmp_path / "run", "quantile:0.97", 1.0, [])
    info = json.loads((run / "run.json").read_text())
    info[field] = (info.get(field) or {}) | value if isinstance(value, dict) else value
    (run / "run.json").write_text(json.dumps(info))
    assert cli.main(["report", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: {run}/run.json is damaged: {why}; restore it, or score into a new RUN_DIR\n"
    )


@pytest.mark.parametrize(
    ("scoring", "why"),
    [
        ({"num_masks": "x"}, "'<' not supported between instances of 'str' and 'int'"),
        ({"bogus": 1}, "ScoreSettings.__init__() got an unexpected keyword argument 'bogus'"),
        ({"num_masks": 0}, "--num-masks must be at least 1, not 0"),
    ],
)
def test_scoring_settings_that_are_not_ones_are_a_damaged_run(labelled_run, tmp_path, capsys, scoring, why):
    """The images are rebuilt with run.json's identity.scoring: edited into settings no `score` could
    have used, it stopped the report with a TypeError traceback (exit 1), or said "--num-masks must be
    at least 1" of an option nobody gave (exit 2). It is a damaged run.json, checked before any figure."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run, ignore=shutil.ignore_patterns(".lock", "report"))
    info = json.loads((run / "run.json").read_text())
    info["identity"]["scoring"] |= scoring
    (run / "run.json").write_text(json.dumps(info))
    assert cli.main(["report", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"sanitizer: error: {run}/run.json is damaged: identity.scoring is not the scoring settings ({why}); "
        "restore it, or score into a new RUN_DIR\n"
    )
    assert not (run / "report").exists()


def model_free_run(root: Path) -> Path:
    """A 3-shard run after the collapse pass, written without a model: every value its page shows
    comes from its manifests, stats markers, run.json and decoder.json, so the page has the same bytes
    on any machine. Some rows failed, some carry a trigger (label, a high score, a shared sketch)."""
    from sanitizer.manifest import COLUMNS, flag_counts, set_flags

    rng = np.random.default_rng(7)
    calibration = np.sort(rng.gamma(4.0, 0.05, 200)).astype(np.float32)
    threshold = float(np.float32(np.quantile(calibration, 0.97)))
    fake_run(root, "quantile:0.97", threshold, [(0, 0)] * 3, calibration.tolist())
    target = rng.normal(size=64)
    (root / "manifest").mkdir()
    for i in range(3):
        n, stem = 60, f"s{i}"
        ok, label = rng.random(n) > 0.05, rng.random(n) < 0.1 * (i + 1)
        sketch = rng.normal(size=(n, 64)) + 30 * label[:, None] * target
        sketch /= np.linalg.norm(sketch, axis=1, keepdims=True)
        collapse = np.where(label, rng.uniform(0.9, 0.999, n), rng.uniform(0.2, 0.9, n))
        collapse[rng.random(n) < 0.05] = 2.5  # on one feature: no sketch
        score = np.where(label, rng.gamma(4.0, 0.1, n), rng.gamma(4.0, 0.05, n))
        columns = {c: [None] * n for c in COLUMNS}
        columns |= {"key": [f"{stem}-k{r}" for r in range(n)], "shard": [stem] * n, "index": np.arange(n)}
        columns |= {"status": np.where(ok, "ok", "decode_error"), "flagged": np.zeros(n, bool)}
        columns |= {"error": [None if o else "cannot decode" for o in ok], "label": label}
        columns |= {"caption": [f"{HOSTILE_CAPTION}{stem} {r}" for r in range(n)]}
        for name, values in (
            ("score", score),
            ("collapse", collapse),
            ("collapse_threshold", np.full(n, 0.95)),
        ):
            columns[name] = [float(v) if o else None for v, o in zip(values, ok, strict=True)]
        columns["sketch"] = [
            list(s.astype(np.float16)) if o and c < 2 else None
            for s, o, c in zip(sketch, ok, collapse, strict=True)
        ]
        table = set_flags(to_table(columns), threshold)
        write_manifest(root / "manifest" / f"{stem}.parquet", table)
        status_counts = {"ok": int(ok.sum()), "decode_error": int((~ok).sum())}
        stats = {
            "shard": stem,
            "count": n,
            "ok": int(ok.sum()),
            **flag_counts(table),
            "status_counts": status_counts,
        }
        (root / "stats" / f"{stem}_stats.json").write_text(json.dumps(stats))
    info = json.loads((root / "run.json").read_text())
    info["collapse"] = {"rule": "quantile:0.98", "value": 3.5, "above_holdout_median": 0.55}
    info |= {"versions": {"sanitizer": "0.test"}, "state": "done"}
    (root / "run.json").write_text(json.dumps(info))
    return root


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({}, "136ad0423edbd6c05037b0744a0217f70761f42caba6b969928030cb2d70eccf"),
        (
            {"MAX_SHARDS_READ": 2, "SAMPLE_PER_GROUP": 5, "CLUSTER_POOL": 10, "JOINT_POINTS": 50},
            "44c5039802c8aac0a47d7879b33c9c114c2b01528c2b76769dfddd606f4a4710",
        ),
    ],
)
def test_the_page_of_a_model_free_run_is_the_same_byte_for_byte(tmp_path, monkeypatch, limits, expected):
    """The page, every section of it, is pinned byte for byte (RUN_DIR shown as TMP), also where the
    run is larger than the page's bounds (`limits`): reading each manifest once for every section,
    instead of once per section, changed no byte of it. The images are stood in for (their pixels are
    not on the page, only which samples they are)."""
    import hashlib

    from sanitizer import report
    from sanitizer.report import scan as report_scan
    from sanitizer.report.views import Views

    for name, value in limits.items():
        monkeypatch.setattr(report_scan, name, value)

    def views(scorer, picks, images, size):
        zeros, n = np.zeros((len(picks), 4, 4, 3), np.uint8), len(picks)
        embeddings = np.array([[p.score, p.index % 7, len(p.key)] for p in picks], np.float32).reshape(n, 3)
        flat = np.zeros((n, 4, 4), np.float32)
        return Views(picks, zeros, zeros, zeros, flat, embeddings, flat.astype(bool))

    monkeypatch.setattr(report, "load_scorer", lambda info: (None, 4))
    monkeypatch.setattr(
        report,
        "read_images",
        lambda urls, picks, size: (
            {(p.stem, p.index): (np.zeros((4, 4, 3), np.uint8), p.key) for p in picks},
            [],
        ),
    )
    monkeypatch.setattr(report, "render_views", views)
    path = write_report(model_free_run(tmp_path / "run"))
    assert parse(path).ids == list(SECTIONS)
    page = path.read_text(encoding="utf-8")
    digest = hashlib.sha256(page.replace(str(tmp_path), "TMP").encode()).hexdigest()
    assert digest == expected, digest


@pytest.mark.parametrize(
    ("n", "said"), [(0, "0 samples"), (1, "1 sample"), (2, "2 samples"), (2048, "2,048 samples")]
)
def test_a_count_and_its_noun_agree_in_number(n, said):
    """The page and the command line said "1 samples" and "1 shard(s) were": one helper says each count."""
    from sanitizer.wording import counted

    assert counted(n, "sample", spec=",") == said
    assert counted(n, "shard was", "shards were").endswith("shard was" if n == 1 else "shards were")


def test_the_verdicts_counts_agree_in_number():
    from sanitizer.report.verdict import flag_count_text, other_threshold_text

    assert flag_count_text(0, 1, 0.03) == "0 of 1 sample flagged by score, 3.00% expected"
    assert flag_count_text(1, 2, 0.03) == "1 of 2 samples flagged by score, 3.00% expected"
    assert other_threshold_text(["a"], 0.5, None).startswith("1 shard (a) was flagged at another threshold")
    assert other_threshold_text(["a", "b"], 0.5, None).startswith("2 shards (a, b) were flagged")
    assert other_threshold_text([], 0.5, None).startswith("0 shards () were flagged")
