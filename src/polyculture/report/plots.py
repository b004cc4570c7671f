"""plots: the report's figures, drawn with a matplotlib Figure on an Agg canvas (no pyplot global state: safe in
worker threads and without a display) and saved as PNG under the run's plots/ folder.

- attribute_<name>.png: target share vs the share among validated, deduplicated and final records, per value.
- similarity.png: histogram of each record's nearest-neighbour cosine similarity, per stage (and the reference).
- quality_<check>.png: histogram of a quality check's scores over the records it checked and over the final records,
  with the threshold it used.
- embedding_map.png: a 2-D PCA or t-SNE map of the validated records, coloured by what happened to each (dropped by
  dedup, cut by rebalancing, kept), and the kept records coloured by the first attribute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from polyculture.report.model import AttributeFigures

STAGE_COLOURS = {"validated": "#c8553d", "after dedup": "#e0a030", "final": "#2f6f9f", "reference": "#8d99a6"}
FATE_COLOURS = {
    "dropped by dedup": "#c8553d",
    "cut by rebalancing": "#e0a030",
    "not kept": "#c8553d",
    "kept": "#2f6f9f",
}
REFERENCE_COLOUR = "#c3cad2"
TARGET_COLOUR = "#9aa5b1"
ATTRIBUTE_COLOURS = ["#2f6f9f", "#c8553d", "#5a9e6f", "#e0a030", "#8e6bb0", "#3aa6b9", "#d47fa6", "#7f7f3f", "#a0522d"]
MAX_MAP_VALUES = len(ATTRIBUTE_COLOURS)  # more values than colours: the rarest share one "(other)" colour
DPI = 120


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, plots_dir: Path, filename: str) -> str:
    plots_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(plots_dir / filename, dpi=DPI)
    return f"plots/{filename}"


def plot_attribute(name: str, entry: AttributeFigures, plots_dir: Path, *, pool_label: str = "after dedup") -> str:
    """Grouped bars per value: target, validated, after dedup and final shares (plus "(other)" when seen).

    `pool_label` names the middle stage ("before rebalancing" when the report was given no deduplicated pool)."""
    stages = [
        ("validated", entry.before, STAGE_COLOURS["validated"]),
        (pool_label, entry.before_rebalance, STAGE_COLOURS["after dedup"]),
        ("final", entry.after, STAGE_COLOURS["final"]),
    ]
    labels = list(entry.after.target_share)
    series = [("target", [entry.after.target_share[v] for v in labels], TARGET_COLOUR)]
    series += [(f"{label} (n={s.n})", [s.observed_share[v] for v in labels], colour) for label, s, colour in stages]
    if any(s.other for _, s, _ in stages):
        labels.append("(other)")
        series[0][1].append(0.0)
        for (_, values, _), (_, s, _) in zip(series[1:], stages, strict=True):
            values.append(s.other_share)

    width = max(6.5, 1.5 * len(labels) + 2.0)
    fig = _figure(width, 4.2)
    ax = fig.subplots()
    x = np.arange(len(labels))
    bar = 0.8 / len(series)
    for i, (label, values, colour) in enumerate(series):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * bar, values, bar, label=label, color=colour)
        if label.startswith(("target", "final")):  # labelling every bar would be unreadable
            ax.bar_label(bars, labels=[f"{v:.0%}" if v else "" for v in bars.datavalues], fontsize=7, padding=1)
    long_labels = len(labels) > 6 or max((len(label) for label in labels), default=0) > 10
    ax.set_xticks(x, labels, rotation=30 if long_labels else 0, ha="right" if long_labels else "center")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    top = max([v for _, values, _ in series for v in values] + [0.01])
    ax.set_ylim(0, top * 1.35)  # headroom for the legend above the bars
    ax.set_ylabel("share of records")
    ax.set_xlabel(name)
    ax.set_title(f"{name}: target vs final share")
    ax.legend(frameon=False, fontsize=8, ncols=2)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, plots_dir, f"attribute_{name}.png")


def plot_similarity(by_stage: dict[str, np.ndarray], plots_dir: Path, *, threshold: float | None = None) -> str | None:
    """Overlaid histograms of nearest-neighbour cosine similarity, one per stage; None when no stage has 2 rows."""
    shown = {label: values for label, values in by_stage.items() if len(values)}
    if not shown:
        return None
    fig = _figure(8.0, 3.8)
    ax = fig.subplots()
    # Bins from just below the lowest value seen: the interesting part (near duplicates) is the right end.
    low = max(-1.0, np.floor(min(float(np.min(v)) for v in shown.values()) * 20) / 20 - 0.05)
    bins = np.linspace(low, 1.0, 41)
    for label, values in shown.items():
        colour = STAGE_COLOURS.get(label, "#555555")
        weights = np.full(len(values), 1.0 / len(values))  # shares, so stages of different sizes compare
        ax.hist(values, bins=bins, weights=weights, histtype="step", linewidth=1.8, color=colour,
                label=f"{label} (n={len(values)})")  # fmt: skip
        ax.hist(values, bins=bins, weights=weights, histtype="stepfilled", alpha=0.12, color=colour)
    if threshold is not None:
        ax.axvline(threshold, color="#333333", linestyle="--", linewidth=1)
        ax.annotate(f"dedup threshold {threshold:g}", (threshold, 0.97), xycoords=("data", "axes fraction"),
                    ha="right", va="top", fontsize=8, xytext=(-4, 0), textcoords="offset points")  # fmt: skip
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("cosine similarity to the nearest other record (higher = closer to a duplicate)")
    ax.set_ylabel("share of records")
    ax.set_title("Nearest-neighbour similarity")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, plots_dir, "similarity.png")


def plot_quality_scores(
    name: str, checked: Sequence[float], final: Sequence[float], threshold: float | None, plots_dir: Path
) -> str | None:
    """Score histograms of one check: the records it checked and the final ones (shares, so both compare), with its
    threshold; None when nothing was scored."""
    if not checked:
        return None
    fig = _figure(7.0, 3.6)
    ax = fig.subplots()
    values = [float(v) for v in checked] + [float(v) for v in final]
    low, high = min(values), max(values)
    bins = np.linspace(low, high, 31) if high > low else np.array([low - 0.5, low + 0.5])
    sides = (("scored", checked, STAGE_COLOURS["validated"]), ("final", final, STAGE_COLOURS["final"]))
    for label, scores, colour in sides:
        if len(scores):
            weights = np.full(len(scores), 1.0 / len(scores))
            ax.hist(scores, bins=bins, weights=weights, histtype="step", linewidth=1.8, color=colour,
                    label=f"{label} (n={len(scores)})")  # fmt: skip
            ax.hist(scores, bins=bins, weights=weights, histtype="stepfilled", alpha=0.12, color=colour)
    if threshold is not None:
        ax.axvline(threshold, color="#333333", linestyle="--", linewidth=1)
        ax.annotate(f"threshold {threshold:.3g}", (threshold, 0.97), xycoords=("data", "axes fraction"),
                    ha="right", va="top", fontsize=8, xytext=(-4, 0), textcoords="offset points")  # fmt: skip
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel(f"score of quality check '{name}' (higher passes)")
    ax.set_ylabel("share of records")
    ax.set_title(f"Quality scores: {name}")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, plots_dir, f"quality_{name}.png")


def project_2d(vectors: np.ndarray, method: str, seed: int) -> np.ndarray | None:
    """2-D coordinates by PCA or t-SNE (scikit-learn); None for fewer than 3 rows or 2 dimensions."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 2:
        return None
    if method == "tsne" and x.shape[0] >= 5:
        from sklearn.manifold import TSNE

        # Perplexity must stay below the number of points; 30 is the usual value for larger sets.
        perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
        return TSNE(
            n_components=2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed
        ).fit_transform(x)
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(x)


def plot_embedding_map(
    coords: np.ndarray,
    fates: Sequence[str],
    values: Sequence[str | None] | None,
    plots_dir: Path,
    *,
    method: str,
    attribute: str | None,
) -> str:
    """Two panels over the same coordinates: every point by fate (reference rows grey), kept points by attribute."""
    fates = list(fates)
    panels = 2 if values is not None and attribute else 1
    fig = _figure(6.2 * panels, 5.4)
    axes = np.atleast_1d(fig.subplots(1, panels))
    fate_array = np.array(fates, dtype=object)

    ax = axes[0]
    reference = fate_array == "reference"
    if reference.any():
        ax.scatter(coords[reference, 0], coords[reference, 1], s=16, c=REFERENCE_COLOUR, alpha=0.6, linewidths=0,
                   label=f"reference (n={int(reference.sum())})")  # fmt: skip
    # Kept first, removed on top: a dropped duplicate sits on its kept twin, so it is drawn as a cross over it.
    for fate in ("kept", "cut by rebalancing", "not kept", "dropped by dedup"):
        mask = fate_array == fate
        if not mask.any():
            continue
        cross = fate == "dropped by dedup"
        ax.scatter(coords[mask, 0], coords[mask, 1], s=30 if cross else 22, c=FATE_COLOURS[fate], alpha=0.9,
                   marker="x" if cross else "o", linewidths=1.3 if cross else 0, label=f"{fate} (n={int(mask.sum())})")  # fmt: skip
    ax.set_title("Validated records: what happened to each")
    ax.legend(frameon=False, fontsize=8, loc="best", markerscale=1.5)

    if panels == 2 and values is not None:
        ax = axes[1]
        kept = fate_array == "kept"
        ax.scatter(coords[~kept, 0], coords[~kept, 1], s=12, c="#e3e7eb", linewidths=0)
        kept_values = ["(missing)" if values[i] is None else str(values[i]) for i in np.flatnonzero(kept)]
        common = [v for v, _ in Counter(kept_values).most_common(MAX_MAP_VALUES - 1)]
        if len(set(kept_values)) > MAX_MAP_VALUES:
            labels = [v if v in common else "(other)" for v in kept_values]
        else:
            labels, common = kept_values, sorted(set(kept_values))
        label_array = np.array(labels, dtype=object)
        kept_coords = coords[kept]
        for i, value in enumerate([*common, "(other)"]):
            mask = label_array == value
            if mask.any():
                ax.scatter(kept_coords[mask, 0], kept_coords[mask, 1], s=22, alpha=0.85, linewidths=0,
                           c=ATTRIBUTE_COLOURS[i % len(ATTRIBUTE_COLOURS)], label=f"{value} ({int(mask.sum())})")  # fmt: skip
        ax.set_title(f"Final records by {attribute}")
        ax.legend(frameon=False, fontsize=8, loc="best", markerscale=1.5)

    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlabel(f"{method.upper() if method == 'pca' else 't-SNE'} 1")
        ax.set_ylabel(f"{method.upper() if method == 'pca' else 't-SNE'} 2")
    return _save(fig, plots_dir, "embedding_map.png")
