"""The HTML page: its sections in order (SECTIONS), each a heading, a few sentences, a figure and a
table, in one static file with its CSS inline and every value from the data escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sanitizer.collapse import unlike_holdout
from sanitizer.data.tario import printable
from sanitizer.errors import visible
from sanitizer.report.figures import (
    plot_clusters,
    plot_embeddings,
    plot_joint,
    plot_localisation,
    plot_roc,
    plot_samples,
    plot_scores,
    plot_shards,
)
from sanitizer.report.scan import CLUSTER_POOL, Cluster, Histograms, JointPoints, RunScan
from sanitizer.report.verdict import (
    flag_count_text,
    neighbours_threshold,
    p_text,
    run_threshold,
    shift_text,
    threshold_text,
)
from sanitizer.report.views import Views
from sanitizer.stats import roc_auc
from sanitizer.wording import counted

# id: (heading, its link in the navigation bar), in the order the page shows them
SECTIONS = {
    "summary": ("Totals", "Totals"),
    "verdict": ("Verdict on the encoder", "Verdict"),
    "scores": ("Score distribution", "Scores"),
    "joint": ("Score and collapse", "Score and collapse"),
    "shards": ("Flag rate per shard", "Shards"),
    "samples": ("Most flagged samples", "Flagged samples"),
    "clusters": ("Collapse clusters", "Clusters"),
    "localisation": ("Where the trigger sits", "Trigger location"),
    "embeddings": ("Embeddings", "Embeddings"),
    "roc": ("Detection against ground truth", "ROC"),
}


@dataclass
class Section:
    id: str  # a key of SECTIONS
    body: str  # HTML, every value from the data already escaped

    @property
    def title(self) -> str:
        return SECTIONS[self.id][0]

    @property
    def nav(self) -> str:
        return SECTIONS[self.id][1]


SHOWN_CHARS = 120  # of a key or a caption in a table: a 3,000-character key would fill the screen


def esc(value: object) -> str:
    """Keys, captions and shard names come from scraped data: never let them become markup, nor hide
    or reorder the text around them (`visible`). A path that is not UTF-8 (RUN_DIR's, resolved from a
    working directory so named) holds surrogates, which UTF-8 cannot write: each shows as U+FFFD."""
    return html.escape(visible(printable(str(value))), quote=True)


def cut(text: str | None, limit: int = SHOWN_CHARS) -> str:
    """The start of a long key or caption, and "..." to say there is more (the manifest has it all)."""
    text = text or ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _img(name: str, alt: str) -> str:
    return f'<img src="{esc(name)}" alt="{esc(alt)}" loading="lazy">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _table(header: list[str], rows: list[list[object]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{esc(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tile(value: str, label: str, tone: str = "") -> str:
    return (
        f'<div class="tile {tone}"><div class="value">{esc(value)}</div>'
        f'<div class="label">{esc(label)}</div></div>'
    )


def summary_section(info: dict, scan: RunScan, meta: dict | None) -> Section:
    """Totals as tiles, the run's settings as a table, then what could not be scored and why."""
    statuses = sorted(((k, v) for k, v in scan.statuses.items() if k != "ok"), key=lambda kv: -kv[1])
    body = f'<div class="tiles">{"".join(summary_tiles(info, scan))}</div>'
    body += _table(["", ""], summary_rows(info, scan, meta))
    if statuses:
        body += "<h3>Samples that could not be scored</h3>" + _table(["status", "samples"], statuses, {1})
    if info.get("failed_shards"):
        body += "<h3>Shards that failed</h3>" + _table(
            ["shard", "error"], [[f["stem"], f["error"]] for f in info["failed_shards"]]
        )
    return Section("summary", body)


def summary_tiles(info: dict, scan: RunScan) -> list[str]:
    """Samples, scored, flagged, not scored, shards done and, with run.json's record of clean, kept and
    quarantined."""
    ok, flagged = scan.ok, scan.flagged
    failures = sum(v for k, v in scan.statuses.items() if k != "ok")
    clean = info.get("clean") or {}
    total_shards = len(info["identity"]["shards"])
    tiles = [
        _tile(f"{sum(scan.statuses.values()):,}", "samples"),
        _tile(f"{ok:,}", "scored (ok)"),
        _tile(
            f"{flagged:,}",
            f"flagged ({flagged / ok:.2%} of ok)" if ok else "flagged",
            "bad" if flagged else "",
        ),
        _tile(f"{failures:,}", "could not be scored", "warn" if failures else ""),
        _tile(
            f"{len(scan.shards)}/{total_shards}",
            "shards done",
            "" if len(scan.shards) == total_shards else "warn",
        ),
    ]
    if clean:
        tiles.append(_tile(f"{clean.get('kept', 0):,}", "kept in clean/"))
        tiles.append(_tile(f"{clean.get('quarantined', 0):,}", "in quarantine/"))
    return tiles


def summary_rows(info: dict, scan: RunScan, meta: dict | None) -> list[list[str]]:
    """The thresholds (the collapse pass's with what each test flagged), the encoder, decoder, input,
    scoring settings and state."""
    rows = [
        ["threshold", threshold_text(*run_threshold(info))],
        *(
            [["score evidence threshold, with the neighbours'", f"{value:.6g}"]]
            if (value := neighbours_threshold(info)) is not None
            else []
        ),
        ["decoder", info["config"].get("decoder_dir", "?")],
        ["input", info["config"].get("data", "?")],
        ["scoring", ", ".join(f"{k}={v}" for k, v in info["identity"]["scoring"].items())],
        ["state", info.get("state", "?")],
    ]
    collapse = info.get("collapse") or {}
    if collapse.get("rule"):  # the collapse pass ran: the second test, and what each flagged (as the tiles)
        by_score, by_collapse = (
            sum(getattr(s, by) for s in scan.shards) for by in ("by_score", "by_collapse")
        )
        counts = f"; flagged by score {by_score:,}, by collapse {by_collapse:,}"
        rows.insert(
            1,
            [
                "collapse evidence threshold",
                threshold_text(collapse.get("value"), collapse.get("rule")) + counts,
            ],
        )
    if meta is not None:
        rows.insert(
            1, ["encoder", meta["encoder"]["spec"] + f" (weights {meta['encoder']['weights_sha256'][:12]})"]
        )
    return rows


def unscored_section(info: dict, meta: dict | None) -> Section:
    """The totals of a run with no finished shard, saying why the page stops there: a run whose every
    shard failed is still worth a page, its failed shards being what there is to review."""
    total = len(info["identity"]["shards"])
    failed = len(info.get("failed_shards") or [])
    why = (
        f"No shard was scored: {failed} of {total} failed (listed below)" if failed else "No shard was scored"
    )
    if failed < total:
        why += f"; {total - failed} not finished yet: run `sanitizer score` again to finish them"
    section = summary_section(info, RunScan(), meta)
    section.body = note(why + ". There are no scores to plot and no verdict on the encoder.") + section.body
    return section


def _shift_note(share: float | None) -> str:
    return "" if share is None else f" {shift_text(share)}."


def verdict_section(verdict: dict) -> Section:
    tone = {True: "bad", False: "good", None: "unknown"}[verdict["backdoored"]]
    headline = {
        True: "This encoder behaves as backdoored on this data",
        False: "No evidence of a backdoor",
        None: "No verdict",
    }[verdict["backdoored"]]
    detail = verdict["text"]
    if verdict["backdoored"] is not None:
        detail = f"p-value {p_text(verdict['p_value'])} · " + flag_count_text(
            verdict["flagged"], verdict["ok"], verdict["expected_rate"]
        )
    body = f'<div class="verdict {tone}"><strong>{esc(headline)}</strong><span>{esc(detail)}</span></div>'

    if verdict["p_value"] is not None:
        calib = verdict["calibration_n"]
        body += (
            f"<p>{verdict['test'].capitalize()} test: with the threshold set for a false-positive rate of "
            f"<b>{verdict['expected_rate']:.2%}</b>, clean data like the decoder's calibration would have "
            "about "
            f"{verdict['expected_rate'] * verdict['ok']:.0f} of these "
            f"{counted(verdict['ok'], 'sample', spec=',')} flagged; "
            f"<b>{verdict['flagged']:,}</b> were. One-sided p-value {p_text(verdict['p_value'])}, "
            f"significance level {verdict['alpha']:g}.</p>"
            "<p class=note>The test assumes that clean samples of this data are rebuilt as well as the "
            f"calibration images ({calib if calib is not None else 'unknown number of'} held-out images)"
            + (
                ", and allows for how well that many images pin the rate down"
                if verdict["test"] == "beta-binomial"
                else "; without them it cannot allow for how well they pin the rate down"
            )
            + ". "
            "Data very unlike the decoder's training data also raises the flag rate: look at the flagged "
            "samples and the heat map before concluding."
            + _shift_note(verdict["above_calibration_median"])
            + "</p>"
        )
    return Section("verdict", body)


def scores_section(
    out: Path, hist: Histograms | None, threshold: float | None, rule: str | None, neighbours: float | None
) -> Section:
    """`neighbours`: run.json's threshold on the score evidence plus the neighbours', if the collapse
    pass set each row's score threshold."""
    if hist is None:
        return Section("scores", note("no sample could be scored: nothing to plot"))
    plot_scores(out / "scores.png", hist, threshold, rule)
    where = (
        "Samples to the right of the threshold are flagged."
        if neighbours is None
        else "The collapse pass moved each sample's own threshold from this one by its neighbours' scores "
        "(each flagged when -ln p_score plus its 5 nearest samples' mean is above "
        f"{neighbours:.4g}), so some flagged samples sit left of the line and some kept ones right."
    )
    text = (
        "<p>Each sample's score is how badly the decoder rebuilds it from the encoder's embedding when "
        f"almost every patch is hidden. {where} The grey outline "
        "is the decoder's calibration (held-out clean images), scaled to this run's size: a bump far right "
        "of it is what a backdoor looks like.</p>"
    )
    return Section("scores", text + _img("scores.png", "score histogram"))


def joint_section(
    out: Path, points: JointPoints | None, threshold: float | None, shift: float | None
) -> Section:
    """`shift`: the share of the run's evidence above the held-out images' median (run.json);
    `threshold`: the score's, None where each row has its own."""
    if points is None:
        return Section("joint", note("no sample has a collapse value: nothing to plot"))
    unlike = unlike_holdout(shift)
    unlike = "" if unlike is None else note(unlike[0].upper() + unlike[1:] + ".")
    apart = unsketched_text(points.unsketched, points.unsketched_flagged)
    if not len(points.score):
        return Section("joint", unlike + note(f"{apart}; no sample has a cosine collapse: nothing to plot"))
    plot_joint(out / "joint.png", points, threshold)
    apart = f"<p>{apart}: they are not drawn.</p>" if points.unsketched else ""
    text = (
        f"<p>{counted(len(points.score), 'sample', spec=',')} with a cosine collapse (a seeded sample): "
        "how badly each is "
        "rebuilt, against how nearly its embedding coincides with its 5 nearest in the run. The collapse "
        "pass weighs the two together, each as a p-value against the decoder's held-out images, so a "
        "sample is flagged above the black line, which is lower the rarer its score; "
        + (
            "samples right of the dashed line are flagged by their score alone. "
            if threshold is not None
            else "the score's own test set each sample's threshold from its neighbours' scores, so no "
            "one line marks it. "
        )
        + "A trigger's images sit top left when the decoder rebuilds them well, top right when it does "
        "not.</p>"
    )
    return Section("joint", unlike + text + apart + _img("joint.png", "score against collapse"))


# Rows without a sketch have no cosine to draw or group by: the page counts them apart
NO_SKETCH_TEXT = "no sketch (their embedding sits on fewer than 2 features: collapse 2 or more)"


def unsketched_text(count: int, flagged: int) -> str:
    have = counted(count, "sample has", "samples have", ",")
    return f"{have} {NO_SKETCH_TEXT}, {flagged:,} of them flagged by the collapse pass"


def shards_section(out: Path, scan: RunScan, expected: float | None, collapsed: bool) -> Section:
    """`collapsed`: the collapse pass ran, so a shard's flags can be more than the plot counts."""
    plot_shards(out / "shards.png", scan.shards, expected)
    on_top = "; the collapse pass's come on top" if collapsed else ""
    worst = sorted(scan.shards, key=lambda s: (-s.flagged, s.stem))[:15]
    rows = [
        [s.stem, s.count, s.ok, s.flagged, s.by_score, f"{s.by_score / s.ok:.2%}" if s.ok else "-"]
        for s in worst
    ]
    table = _table(["shard", "samples", "ok", "flagged", "by score", "score rate"], rows, {1, 2, 3, 4, 5})
    return Section(
        "shards",
        "<p>Poison often arrives together (one crawl, one source): a shard far above the dashed line is "
        "worth a look. The line is the score test's rate on clean data, so the plot counts that test's "
        f"flags{on_top}.</p>"
        + _img("shards.png", "flag rate per shard")
        + "<h3>Shards with the most flags</h3>"
        + table,
    )


def _grid_rows(tag: str, views: Views) -> list[list[object]]:
    rows = []
    for i, p in enumerate(views.picks):
        label = "" if p.label is None else ("poisoned" if p.label else "clean")
        rows.append([f"{tag}{i + 1}", cut(p.key), p.stem, p.index, f"{p.score:.4g}", label, cut(p.caption)])
    return rows


def samples_section(out: Path, top: Views, typical_clean: Views) -> Section:
    if not top.picks and not typical_clean.picks:
        return Section("samples", note("no sample could be read again to show it"))
    plot_samples(out / "samples.png", top, typical_clean)
    rows = _grid_rows("F", top) + _grid_rows("C", typical_clean)
    table = _table(["", "key", "shard", "index", "score", "truth", "caption"], rows, {3, 4})
    text = (
        "<p>Left (red): the most flagged samples; right (blue): typical kept ones. For each, what the "
        "decoder was given (hidden patches grey; often nothing but the embedding), what it rebuilt, and the "
        "original. "
        "A backdoored encoder embeds triggered images like its target, so they are rebuilt as something else."
        "</p>"
    )
    return Section("samples", text + _img("samples.png", "sample grid") + table)


def clusters_section(
    out: Path, clusters: list[Cluster], total: int, unsketched: int, images: dict
) -> Section:
    """`total` flagged by the collapse pass, `unsketched` of them without a sketch (not grouped)."""
    if not total:
        return Section("clusters", note("the collapse pass flagged no sample"))
    apart = (
        ""
        if not unsketched
        else " "
        + counted(
            unsketched, f"of them has {NO_SKETCH_TEXT} and is", f"of them have {NO_SKETCH_TEXT} and are", ","
        )
        + " not grouped."
    )
    if not clusters:
        return Section(
            "clusters", note(f"the collapse pass flagged {counted(total, 'sample', spec=',')}.{apart}")
        )
    plot_clusters(out / "clusters.png", clusters, images)
    rows = [
        [i + 1, c.size, "" if c.poisoned is None else c.poisoned, ", ".join(cut(p.key) for p in c.picks[:3])]
        for i, c in enumerate(clusters)
    ]
    table = _table(["cluster", "samples", "poisoned (truth)", "first keys"], rows, {0, 1, 2})
    pooled = min(total - unsketched, CLUSTER_POOL)
    text = (
        f"<p>The collapse pass flagged {counted(total, 'sample', spec=',')}.{apart} "
        f"Of the {pooled:,} with the highest "
        "collapse, each row groups those whose embedding is as near the row's first as the least "
        "collapsed of them is to its neighbours (the row's label is the group's size). Different images "
        "that share one embedding are what a backdoor's trigger makes: look for what they have in common "
        "(a patch, a tint, a caption). Copies of one photo, re-encoded or resized, are not counted as "
        "each other's neighbours.</p>"
    )
    return Section("clusters", text + _img("clusters.png", "collapse clusters") + table)


def localisation_section(out: Path, flagged: Views, clean: Views) -> Section:
    """The sampled views' residuals, flagged against kept. Without both it says how many of each were
    read, not that the run lacks one kind: a run whose shards moved has both, and none read again."""
    if not flagged.picks or not clean.picks:
        read = f"{len(flagged.picks)} flagged and {len(clean.picks)} kept"
        return Section(
            "localisation",
            note(f"needs both flagged and kept samples; of those sampled, {read} could be read again"),
        )
    plot_localisation(out / "localisation.png", flagged, clean)
    text = (
        f"<p>Mean absolute reconstruction error per pixel (0-255 scale) over {len(flagged.picks)} flagged "
        f"and {counted(len(clean.picks), 'kept sample')}, and their difference. A patch trigger shows "
        "up as a hot square; an invisible or blended trigger as a diffuse difference.</p>"
    )
    return Section("localisation", text + _img("localisation.png", "residual heat map"))


def embeddings_section(out: Path, flagged: Views, clean: Views) -> Section:
    if len(flagged.picks) + len(clean.picks) < 3:
        return Section("embeddings", note("too few samples could be read to project"))
    plot_embeddings(out / "embeddings.png", flagged, clean)
    text = (
        "<p>The victim encoder's embeddings of the same samples, projected on their two principal axes. "
        "Samples that carry a trigger tend to gather near the attacker's target, away from the rest.</p>"
    )
    return Section("embeddings", text + _img("embeddings.png", "embedding projection"))


def roc_section(out: Path, scan: RunScan, threshold: float | None) -> Section:
    if not scan.labelled_scores:
        return Section("roc", note('the shards carry no ground truth (json "poisoned")'))
    scores = np.concatenate(scan.labelled_scores).astype(np.float64)
    truth = np.concatenate(scan.labelled_truth)
    if truth.all() or not truth.any():
        one_kind = "poisoned" if truth.all() else "clean"
        return Section(
            "roc",
            note(
                counted(len(truth), "labelled sample is", "labelled samples are all")
                + f" {one_kind}: no ROC curve"
            ),
        )
    auc = roc_auc(scores, truth)
    plot_roc(out / "roc.png", scores, truth, auc, threshold)
    text = (
        f'<p class="big">AUC <b>{auc:.3f}</b> over {counted(len(truth), "labelled sample", spec=",")} '
        f"({int(truth.sum()):,} poisoned).</p>"
    )
    return Section("roc", text + _img("roc.png", "ROC curve"))


CSS = """
:root { --bad:#d62728; --good:#2e7d32; --ink:#1d2329; --muted:#5f6b76; --line:#e3e7eb; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--ink);
  background:#f4f6f8; }
header { background:#1d2329; color:#fff; padding:22px 0 18px; }
header .wrap, main, nav .wrap { max-width:1040px; margin:0 auto; padding:0 20px; }
header h1 { margin:0; font-size:24px; font-weight:650; letter-spacing:.2px; }
header p { margin:4px 0 0; color:#b9c2ca; font-size:13px; word-break:break-all; }
nav { background:#fff; border-bottom:1px solid var(--line); position:sticky; top:0; z-index:1; }
nav a { display:inline-block; padding:10px 12px 9px 0; margin-right:10px; color:var(--muted);
  text-decoration:none; font-size:13px; }
nav a:hover { color:var(--ink); }
main { padding-top:18px; padding-bottom:40px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px;
  margin:0 0 18px; }
h2 { margin:0 0 10px; font-size:18px; }
h3 { margin:18px 0 6px; font-size:14px; color:var(--muted); }
img { max-width:100%; height:auto; display:block; margin:8px auto; }
table { border-collapse:collapse; width:100%; font-size:13px; margin-top:8px; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top;
  word-break:break-word; }
th { color:var(--muted); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafbfc; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit,minmax(120px,1fr)); gap:10px;
  margin-bottom:10px; }
.tile { border:1px solid var(--line); border-radius:8px; padding:10px 12px; }
.tile .value { font-size:22px; font-weight:650; font-variant-numeric:tabular-nums; }
.tile .label { font-size:12px; color:var(--muted); }
.tile.bad .value { color:var(--bad); } .tile.warn .value { color:#b26a00; }
.verdict { border-radius:8px; padding:14px 16px; border-left:6px solid; display:flex;
  flex-direction:column; gap:4px; }
.verdict strong { font-size:17px; }
.verdict.bad { background:#fdecea; border-color:var(--bad); } .verdict.bad strong { color:var(--bad); }
.verdict.good { background:#e8f5e9; border-color:var(--good); }
.verdict.good strong { color:var(--good); }
.verdict.unknown { background:#f0f2f4; border-color:#8a959f; }
.note { color:var(--muted); font-size:13px; }
.big { font-size:17px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:0 0 30px; }
"""


def render_page(run_dir: Path, sections: list[Section], versions: dict) -> str:
    """The page around the sections; its title and header name RUN_DIR resolved (`report .` names it)."""
    run_dir = run_dir.resolve()
    nav = "".join(f'<a href="#{s.id}">{esc(s.nav)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    made_with = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Sanitizer audit: {esc(run_dir.name)}</title><style>{CSS}</style></head><body>"
        '<header><div class="wrap"><h1>Backdoor audit report</h1>'
        f"<p>{esc(run_dir)}</p></div></header>"
        f'<nav><div class="wrap">{nav}</div></nav><main>{body}</main>'
        f"<footer>written by sanitizer report · scored with {esc(made_with)}</footer></body></html>\n"
    )
