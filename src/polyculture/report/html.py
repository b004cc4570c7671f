"""report.html: the report as one self-contained page (templates/report.html.j2).

Self-contained means it opens offline and fetches nothing: the CSS is inline, the figures are PNG data URIs, there is no
script and no external link. Text that came from a model or a user (reject details, attribute values) could hold a URL;
it is shown with a zero-width space after the scheme so that no "http://" string survives in the page.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyculture.report.jinja import render
from polyculture.report.model import DIVERSITY_ROWS, Report, StageFigures

# Metrics where a lower value means more diverse; every other diversity row reads "higher is more diverse".
LOWER_IS_MORE_DIVERSE = {
    "mean_pairwise_similarity",
    "mean_nearest_neighbour_similarity",
    "near_duplicate_share",
    "compression_ratio",
    "self_bleu",
}
ZERO_WIDTH_SPACE = "\u200b"


def render_html(report: Report, out_dir: Path) -> str:
    """The page for `report`; its figures are read from out_dir/plots and inlined."""
    stages = report.diversity.measured()
    checks = report.quality.checks if report.quality else ()
    return render(
        "report.html.j2",
        html=True,
        finalize=_defang,
        report=report,
        stages=stages,
        diversity_rows=_diversity_rows(stages),
        attribute_images={name: _data_uri(out_dir, path) for name, path in report.plots.items()},
        quality_images={c.name: _data_uri(out_dir, c.histogram) for c in checks},
        math_image=_data_uri(out_dir, report.math.solve_rate_histogram) if report.math else None,
        figures={
            "similarity": _data_uri(out_dir, report.figures.similarity),
            "embedding_map": _data_uri(out_dir, report.figures.embedding_map),
        },
        counts=_funnel(report.funnel()),
        pool_label="after dedup" if report.diversity.after_dedup else "before rebalancing",
        has_calibration=any(figures.calibration for _, _, figures in stages),
    )


def _diversity_rows(stages: list[tuple[str, str, StageFigures]]) -> list[dict[str, Any]]:
    """One row per metric: its values per stage and the change from validated to final, marked better or worse."""
    rows = []
    for key, label, digits in DIVERSITY_ROWS:
        values = [getattr(figures, key) for _, _, figures in stages]
        first, last = values[0], values[-1]
        trend = ""
        if key != "rows" and isinstance(first, int | float) and isinstance(last, int | float) and first != last:
            more_diverse = (last < first) if key in LOWER_IS_MORE_DIVERSE else (last > first)
            trend = "better" if more_diverse else "worse"
        change = last - first if isinstance(first, int | float) and isinstance(last, int | float) else None
        rows.append({"key": key, "label": label, "digits": digits, "values": values, "change": change, "trend": trend})
    return rows


def _funnel(counts: Mapping[str, int]) -> list[dict[str, Any]]:
    """Stage counts with their width relative to the largest (for the CSS bars)."""
    largest = max(counts.values(), default=0) or 1
    return [{"stage": stage.replace("_", " "), "count": n, "width": 100.0 * n / largest} for stage, n in counts.items()]


def _data_uri(out_dir: Path, relative: str | None) -> str | None:
    if not relative:
        return None
    path = Path(out_dir) / relative
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _defang(value: Any) -> Any:
    """Every printed string: "scheme://" broken with a zero-width space, so the page holds no URL (see above)."""
    if isinstance(value, str) and "://" in value and not value.startswith("data:image/png;base64,"):
        return value.replace("://", ":/" + ZERO_WIDTH_SPACE + "/")
    return value
