"""The page's figures, drawn with matplotlib's object API (no pyplot: no global state, no GUI) and
written as PNG files beside the page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sanitizer.atomic import atomic_path
from sanitizer.report.scan import CLUSTER_TILES, Cluster, Histograms, JointPoints, ShardLine
from sanitizer.report.verdict import threshold_text
from sanitizer.report.views import Views
from sanitizer.stats import roc_curve

FLAG_COLOUR, CLEAN_COLOUR, CALIBRATION_COLOUR = "#d62728", "#4c78a8", "#444444"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, Agg canvas

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor="white")


def _legend_above(ax) -> None:
    """One row of legend entries above the axes: never on top of the data, and no slow 'best' search."""
    ax.legend(frameon=False, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.01), ncols=4, borderaxespad=0)


def plot_scores(path: Path, h: Histograms, threshold: float | None, rule: str | None) -> None:
    """Log-count histogram: kept and flagged samples, the calibration (scaled to the run), threshold."""
    fig = _figure(8.5, 3.8)
    ax = fig.add_subplot()
    widths = np.diff(h.edges)
    ax.bar(h.edges[:-1], h.clean, widths, align="edge", color=CLEAN_COLOUR, label="kept", linewidth=0)
    ax.bar(
        h.edges[:-1],
        h.flagged,
        widths,
        bottom=h.clean,
        align="edge",
        color=FLAG_COLOUR,
        label="flagged",
        linewidth=0,
    )
    total = int(h.clean.sum() + h.flagged.sum())
    if h.calibration is not None and h.calibration.sum():
        scaled = h.calibration * total / h.calibration.sum()
        ax.stairs(
            scaled,
            h.edges,
            color=CALIBRATION_COLOUR,
            linewidth=1.6,
            label="calibration (held-out clean, scaled)",
        )
    if threshold is not None:
        ax.axvline(
            threshold,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"threshold {threshold_text(threshold, rule, digits=4)}",
        )
    ax.set_yscale("log")
    if h.log_x:
        ax.set_xscale("log")
    ax.set_ylim(bottom=0.7)
    ax.set_xlabel("reconstruction error (score)")
    ax.set_ylabel("samples (log scale)")
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


def plot_joint(path: Path, points: JointPoints, threshold: float | None) -> None:
    """Score against collapse, each row coloured by what flagged it, the pass's boundary (the collapse
    a row needs at each score) and the score's threshold. The collapse is drawn as 1 - cosine on a log
    scale, upside down, so that the crowd just below 1 spreads out and nearer is higher."""
    fig = _figure(8.5, 4.4)
    ax = fig.add_subplot()
    distance = 1 - points.collapse
    floor = max(float(distance[distance > 0].min()) / 2 if (distance > 0).any() else 1e-6, 1e-7)
    top = max(float(distance.max()) * 1.5, floor * 10)
    distance = np.clip(distance, floor, top)
    colours = {"": CLEAN_COLOUR, "score": "#ff7f0e", "collapse": FLAG_COLOUR, "score+collapse": "#7b1fa2"}
    for reason, colour in colours.items():
        chosen = points.reason == reason
        if chosen.any():
            name = f"by {reason}" if reason else "kept"
            ax.scatter(
                points.score[chosen], distance[chosen], s=5, color=colour, alpha=0.5, linewidths=0,
                label=f"{name} ({int(chosen.sum()):,})",
            )  # fmt: skip
    if points.truth is not None and points.truth.any():
        t = points.truth
        ax.scatter(
            points.score[t], distance[t], s=16, facecolors="none", edgecolors="black", linewidths=0.4,
            label="poisoned (truth)",
        )  # fmt: skip
    order = np.argsort(points.score, kind="stable")
    boundary = np.clip(1 - points.needed[order], floor, top)  # +inf needed: off the top of the plot
    ax.plot(points.score[order], boundary, color="black", linewidth=1.2, label="collapse needed")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="score threshold")
    if (points.score > 0).all() and points.score.max() > 100 * points.score.min():
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top, floor)
    ax.set_xlabel("reconstruction error (score)")
    ax.set_ylabel("1 - collapse (up: nearer its 5 nearest)")
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


def plot_shards(path: Path, shards: list[ShardLine], expected: float | None) -> None:
    """The score test's flag rate per shard, against the rate it has on clean data: bars with names
    for a few shards, dots in input order for many."""
    fig = _figure(8.5, 3.2)
    ax = fig.add_subplot()
    rates = np.array([s.by_score / s.ok if s.ok else 0.0 for s in shards]) * 100
    x = np.arange(len(shards))
    if len(shards) <= 40:
        ax.bar(x, rates, color=[FLAG_COLOUR if r > 0 else CLEAN_COLOUR for r in rates], width=0.7)
        ax.set_xticks(x, [s.stem for s in shards], rotation=60, ha="right", fontsize=7)
    else:
        ax.scatter(x, rates, s=6, color=FLAG_COLOUR)
        ax.set_xlabel("shard (input order)")
    if expected is not None:
        ax.axhline(
            expected * 100, color="black", linestyle="--", linewidth=1, label=f"expected {expected:.1%}"
        )
        _legend_above(ax)
    ax.set_ylabel("flagged by score (% of ok)")
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


def plot_samples(path: Path, flagged: Views, clean: Views) -> None:
    """Two blocks of rows: masked input | reconstruction | original, most flagged left, clean right."""
    rows = max(len(flagged.picks), len(clean.picks), 1)
    fig = _figure(8.5, 1.15 * rows + 0.6)
    grid = fig.add_gridspec(rows, 7, width_ratios=[1, 1, 1, 0.25, 1, 1, 1])
    nothing_seen = all(v.hidden.all() for v in (flagged, clean))
    titles = ("seen: embedding only" if nothing_seen else "seen by decoder", "rebuilt", "original")
    for block, (views, start, name) in enumerate(((flagged, 0, "flagged"), (clean, 4, "clean"))):
        for r in range(rows):
            for c, images in enumerate((views.masked, views.rebuilt, views.original)):
                ax = fig.add_subplot(grid[r, start + c])
                ax.set_xticks([])
                ax.set_yticks([])
                if r >= len(views.picks):
                    ax.set_axis_off()
                    continue
                ax.imshow(images[r], interpolation="nearest")
                if r == 0:
                    ax.set_title(titles[c], fontsize=8)
                if c == 0:
                    tag = "F" if block == 0 else "C"
                    ax.set_ylabel(f"{tag}{r + 1}  {views.picks[r].score:.3g}", fontsize=8, parse_math=False)
                for spine in ax.spines.values():
                    spine.set_color(FLAG_COLOUR if name == "flagged" else CLEAN_COLOUR)
                    spine.set_linewidth(1.5)
    save_png(fig, path)


def plot_clusters(path: Path, clusters: list[Cluster], images: dict) -> None:
    """One row of originals per cluster, highest collapse first."""
    fig = _figure(8.5, 1.15 * len(clusters) + 0.3)
    axes = fig.subplots(len(clusters), CLUSTER_TILES, squeeze=False)
    for r, cluster in enumerate(clusters):
        shown = [p for p in cluster.picks if (p.stem, p.index) in images]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(shown):
                ax.set_axis_off()
                continue
            ax.imshow(images[(shown[c].stem, shown[c].index)][0], interpolation="nearest")
            if c == 0:
                ax.set_ylabel(f"{r + 1}: {cluster.size:,}", fontsize=8)
    save_png(fig, path)


def plot_localisation(path: Path, flagged: Views, clean: Views) -> None:
    """Mean residual of flagged samples, of clean ones, and their difference: where rebuilding fails."""
    fig = _figure(8.5, 3.0)
    axes = fig.subplots(1, 3)
    f_mean, c_mean = flagged.residual.mean(0), clean.residual.mean(0)
    top = float(max(f_mean.max(), c_mean.max(), 1e-6))
    for ax, img, title in ((axes[0], f_mean, "flagged"), (axes[1], c_mean, "clean")):
        im = ax.imshow(img, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(
            f"mean |residual|, {title} (n={len(flagged.picks if title == 'flagged' else clean.picks)})",
            fontsize=8,
        )
        fig.colorbar(im, ax=ax, shrink=0.8)
    diff = f_mean - c_mean
    lim = float(max(np.abs(diff).max(), 1e-6))
    im = axes[2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[2].set_title("flagged minus clean", fontsize=8)
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    save_png(fig, path)


def pca_2d(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) coordinates on the two main axes, and the share of variance each explains."""
    centred = embeddings.astype(np.float64) - embeddings.mean(0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    variance = singular**2
    share = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    if coords.shape[1] < 2:  # one sample or a 1-d embedding
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        share = np.pad(share, (0, 2 - len(share)))
    return coords, share


def plot_embeddings(path: Path, flagged: Views, clean: Views) -> None:
    """PCA of the victim's embeddings: triggered samples of a backdoor sit together, away from the rest."""
    fig = _figure(6.0, 4.6)
    ax = fig.add_subplot()
    both = np.concatenate([v.embeddings for v in (clean, flagged) if v.picks])  # either may be empty
    coords, share = pca_2d(both)
    n_clean = len(clean.picks)
    truth = np.array([p.label is True for p in clean.picks + flagged.picks])
    for rows, colour, name in (
        (slice(0, n_clean), CLEAN_COLOUR, "kept"),
        (slice(n_clean, None), FLAG_COLOUR, "flagged"),
    ):
        ax.scatter(coords[rows, 0], coords[rows, 1], s=14, color=colour, alpha=0.7, label=name, linewidths=0)
    if truth.any():
        ax.scatter(
            coords[truth, 0], coords[truth, 1], s=40, facecolors="none", edgecolors="black",
            linewidths=0.8, label="poisoned (ground truth)",
        )  # fmt: skip
    ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)")
    _legend_above(ax)
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


def plot_roc(path: Path, scores: np.ndarray, truth: np.ndarray, auc: float, threshold: float | None) -> None:
    fig = _figure(4.8, 4.4)
    ax = fig.add_subplot()
    fpr, tpr, _ = roc_curve(scores, truth)
    if len(fpr) > 4000:  # a curve of millions of points draws slowly and looks the same thinned
        keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, 4000).astype(int), len(fpr) - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    ax.plot(fpr, tpr, color=FLAG_COLOUR, linewidth=2, label=f"DeDe score (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="chance")
    if threshold is not None:
        flagged = scores > threshold
        point = (flagged[~truth].mean() if (~truth).any() else 0.0, flagged[truth].mean())
        ax.scatter(
            *point, color="black", zorder=3, s=30, label=f"threshold: TPR {point[1]:.0%}, FPR {point[0]:.1%}"
        )
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)
