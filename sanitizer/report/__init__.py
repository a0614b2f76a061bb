"""`sanitizer report RUN_DIR`: one HTML page that shows a person what was removed and why.

RUN_DIR/report/index.html plus PNG files beside it, nothing fetched from elsewhere: the score
histogram against the threshold and the decoder's calibration, after the collapse pass each
sample's score against its collapse, the flag rate per shard, the most flagged samples next to
typical clean ones (what the decoder saw, what it rebuilt, the original), where in the image the
reconstruction fails (a patch trigger shows up as a bright square), the embeddings in two dimensions,
the ROC curve when the shards carry ground truth, an encoder-level verdict, and, after the collapse
pass, the groups of samples that pass flagged, side by side.

Memory and time stay bounded whatever the run's size: each manifest is read once, a shard at a time,
with only the columns the page needs, and what is kept of it is small (scan); only a bounded sample of
images is read again and run through the encoder and decoder (the typical ones from at most
MAX_SHARDS_READ shards, the most flagged and the collapse groups' from the shards they are in).

This module puts the page together (write_report); the parts, in the order it uses them:
  verdict  the encoder-level verdict (encoder_verdict, also `sanitizer score`'s last line)
  scan     what the page needs from the manifests: counts, histograms, samples, collapse groups
  views    the sampled images read again and rebuilt with the run's encoder and decoder
  figures  the PNG plots
  page     the sections' HTML (SECTIONS: their ids and headings, in order) and the page around them
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sanitizer.atomic import atomic_path, remove_stale_temps
from sanitizer.data.shards import ShardRef
from sanitizer.decoder_meta import ScoreSettings
from sanitizer.errors import SanitizerError, UsageError
from sanitizer.records import RecordError
from sanitizer.report.figures import pca_2d
from sanitizer.report.page import (
    SECTIONS,
    Section,
    clusters_section,
    embeddings_section,
    joint_section,
    localisation_section,
    note,
    render_page,
    roc_section,
    samples_section,
    scores_section,
    shards_section,
    summary_section,
    unscored_section,
    verdict_section,
)
from sanitizer.report.scan import (
    GRID_ROWS,
    SEED,
    RunScan,
    collapse_clusters,
    histograms,
    joint_points,
    sample_rows,
    scan_run,
)
from sanitizer.report.verdict import (
    ALPHA,
    ManifestChecks,
    decoder_calibration,
    encoder_verdict,
    expected_flag_rate,
    flag_count_p_value,
    neighbours_threshold,
    other_threshold_text,
    run_threshold,
    run_verdict,
    share_above_median,
    shared_threshold,
)
from sanitizer.report.views import load_scorer, read_images, render_views, typical
from sanitizer.rundir import CLEAN_RECORD_FIELDS, STALE_CLEAN, RunDir, check_record, locked_run

__all__ = [
    "ALPHA", "FIGURES", "SECTIONS", "SEED", "encoder_verdict", "expected_flag_rate", "flag_count_p_value",
    "image_sections", "pca_2d", "share_above_median", "write_report",
]  # fmt: skip

FIGURES = (
    "scores.png", "joint.png", "shards.png", "samples.png", "clusters.png", "localisation.png",
    "embeddings.png", "roc.png",
)  # fmt: skip


# What the page reads from run.json besides what clean reads, and the type each must have when present:
# its tiles show the record of clean, its footer the versions, its notes the collapse pass's shift, and
# its images need the encoder weights the run was scored with.
REPORT_FIELDS = CLEAN_RECORD_FIELDS | {
    "versions": dict, "collapse.above_holdout_median": (int, float), "config.encoder_weights": str,
}  # fmt: skip


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report/index.html and its PNGs; the page is written last, atomically."""
    refuse_read_only(run_dir)
    with locked_run(run_dir, REPORT_FIELDS) as (run, info, shards):
        check_record(run, info, check_report_record)
        out = report_dir(run)
        remove_stale_temps(out)
        for name in FIGURES:  # a figure this run does not produce must not linger from an older report
            (out / name).unlink(missing_ok=True)
        done = run.done(shards)
        calibration, meta = decoder_calibration(info)
        if done:
            sections = scored_sections(out, run, info, shards, done, calibration, meta)
        else:  # every shard failed, or none has finished yet: what is known, and why no more
            sections = [unscored_section(info, meta)]
        if run.stale_clean(info):  # the kept/quarantined tiles are gone: say why, not only by their absence
            sections[0].body = note(STALE_CLEAN) + sections[0].body
        page = out / "index.html"
        with atomic_path(page) as tmp:
            tmp.write_text(render_page(run.root, sections, info.get("versions") or {}), encoding="utf-8")
    return page


def check_report_record(info: dict) -> None:
    """A RecordError if what the page reads beyond REPORT_FIELDS is not as `score` writes it: each
    failed shard (the page lists them) a stem and an error, identity.scoring settings that score could
    have used (the images are rebuilt with them). Edited by hand, they stopped it with a traceback."""
    for entry in info.get("failed_shards") or []:
        if not (isinstance(entry, dict) and {type(entry.get(k)) for k in ("stem", "error")} == {str}):
            raise RecordError(f"failed_shards holds {entry!r}, not a stem and an error")
    try:
        ScoreSettings.from_dict(info["identity"]["scoring"])
    except (TypeError, UsageError) as e:
        raise RecordError(f"identity.scoring is not the scoring settings ({e})") from None


def refuse_read_only(run_dir: Path) -> None:
    """A run on a read-only filesystem (an archived copy, a read-only mount) cannot take the report,
    nor the lock: say so, and what to do, rather than only that RUN_DIR cannot be used."""
    if (run_dir / "run.json").is_file() and os.statvfs(run_dir).f_flag & os.ST_RDONLY:
        raise UsageError(
            f"{run_dir} is on a read-only filesystem, and the report is written into it ({run_dir}/report); "
            "copy its run.json, manifest/ and stats/ to a writable directory and report on the copy"
        )


def report_dir(run: RunDir) -> Path:
    """RUN_DIR/report, made if missing. Anything else under that name is the user's (a file saved
    there by hand): it is neither replaced nor written into."""
    out = run.root / "report"
    if not out.is_dir() and (out.exists() or out.is_symlink()):
        raise UsageError(f"{out} is not a directory; move or remove it, then run `sanitizer report` again")
    out.mkdir(exist_ok=True)
    return out


def scored_sections(
    out: Path,
    run: RunDir,
    info: dict,
    shards: list[ShardRef],
    done: list[str],
    calibration: np.ndarray | None,
    meta: dict | None,
) -> list[Section]:
    """The page's sections for a run with finished shards (`done`), writing their figures to `out`."""
    threshold, rule = run_threshold(info)
    collapse = info.get("collapse") or {}
    collapsed, shift = collapse.get("value") is not None, collapse.get("above_holdout_median")
    shared = shared_threshold(info)  # None where the pass set each row's own
    checks = ManifestChecks(calibration, shared)
    scan = scan_run(run, done, collapsed, also=(checks,))
    verdict = run_verdict(run, info, shards, calibration, checks.result())
    hist = histograms(scan, calibration, threshold) if scan.ok else None
    summary = summary_section(info, scan, meta)
    if verdict["other_threshold_shards"]:  # the tiles count flags at mixed thresholds: say so first
        summary.body = (
            note(other_threshold_text(verdict["other_threshold_shards"], threshold, rule)) + summary.body
        )
    return [
        summary,
        verdict_section(verdict),
        scores_section(out, hist, threshold, rule, neighbours_threshold(info)),
        *([joint_section(out, joint_points(scan.joint), shared, shift)] if scan.joint is not None else []),
        shards_section(out, scan, verdict["expected_rate"], collapsed),
        *image_sections(out, info, shards, scan),
        roc_section(out, scan, shared),
    ]


def image_sections(out: Path, info: dict, shards: list[ShardRef], scan: RunScan) -> list[Section]:
    """Grid, clusters (after the collapse pass), heat map and projection: the only part that reads
    images and runs the models."""
    pool = scan.clusters
    ids = ["samples", *(["clusters"] if pool is not None else []), "localisation", "embeddings"]
    if not scan.ok:  # every sample failed: there is no image to show, and none was unreadable
        return [Section(i, note("no sample could be scored: no image to show")) for i in ids]
    try:
        scorer, size = load_scorer(info)
    except SanitizerError as e:
        why = note(f"the run's encoder or decoder cannot be loaded ({e}); images are not shown")
        return [Section(i, why) for i in ids]
    flagged_sample, clean_sample = sample_rows(scan)
    clusters = collapse_clusters(pool) if pool is not None else []
    urls = {s.stem: s.url for s in shards}
    in_clusters = [p for c in clusters for p in c.picks]
    images, notes = read_images(urls, scan.top + flagged_sample + clean_sample + in_clusters, size)
    top = render_views(scorer, scan.top, images, size)
    flagged = render_views(scorer, flagged_sample, images, size)
    clean = render_views(scorer, clean_sample, images, size)
    sections = [
        samples_section(out, top, typical(clean, GRID_ROWS)),
        *([clusters_section(out, clusters, pool.total, pool.unsketched, images)] if pool is not None else []),
        localisation_section(out, flagged, clean),
        embeddings_section(out, flagged, clean),
    ]
    if notes:
        sections[0].body += "".join(note(n) for n in notes[:10])
    return sections
