"""report_html: report.json rendered as one self-contained HTML page (templates/report.html.j2, Jinja2).

Self-contained means it opens offline and fetches nothing: the CSS is inline, the figures are PNG data URIs, there is no
script and no external link. Text that came from a model or a user (reject details, attribute values) could hold a URL;
it is shown with a zero-width space after the scheme so that no "http://" string survives in the page.
"""

from __future__ import annotations

import base64
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from polyculture.report.figures import DIVERSITY_ROWS, STAGES

# Metrics where a lower value means more diverse; every other diversity row reads "higher is more diverse".
LOWER_IS_MORE_DIVERSE = {
    "mean_pairwise_similarity",
    "mean_nearest_neighbour_similarity",
    "near_duplicate_share",
    "compression_ratio",
    "self_bleu",
}
ZERO_WIDTH_SPACE = "\u200b"


def render_html(report: dict[str, Any], out_dir: Path) -> str:
    """The page for `report` (as write_report returns it); figures are read from out_dir/plots and inlined."""
    env = jinja2.Environment(
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_defang,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fixed=_fixed, pct=_pct, ratio=_ratio, signed=_signed)
    template = env.from_string(resources.files("polyculture").joinpath("templates/report.html.j2").read_text("utf-8"))
    return template.render(
        report=report,
        stages=_stage_columns(report),
        diversity_rows=_diversity_rows(report),
        attribute_images={name: _data_uri(out_dir, path) for name, path in report["plots"].items()},
        figures={name: _data_uri(out_dir, path) for name, path in (report.get("figures") or {}).items()},
        counts=_funnel(report["counts"]),
        stage_labels=dict(STAGES),
        pool_label="after dedup" if report["diversity"].get("after_dedup") else "before rebalancing",
        has_calibration=any(stage.get("calibration") for _, _, stage in _stage_columns(report)),
    )


def _stage_columns(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, label, figures) of each stage that was measured, in pipeline order."""
    return [(key, label, report["diversity"][key]) for key, label in STAGES if report["diversity"].get(key)]


def _diversity_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: its values per stage and the change from validated to final, marked better or worse."""
    stages = _stage_columns(report)
    rows = []
    for key, label, digits in DIVERSITY_ROWS:
        values = [stage.get(key) for _, _, stage in stages]
        first, last = values[0], values[-1]
        trend = ""
        if key != "rows" and isinstance(first, int | float) and isinstance(last, int | float) and first != last:
            more_diverse = (last < first) if key in LOWER_IS_MORE_DIVERSE else (last > first)
            trend = "better" if more_diverse else "worse"
        change = last - first if isinstance(first, int | float) and isinstance(last, int | float) else None
        rows.append({"key": key, "label": label, "digits": digits, "values": values, "change": change, "trend": trend})
    return rows


def _funnel(counts: dict[str, int]) -> list[dict[str, Any]]:
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


def _fixed(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    return f"{value:,.{digits}f}"


def _pct(value: Any, digits: int = 0) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    return f"{value:.{digits}%}"


def _ratio(value: Any) -> str:
    return "n/a" if value is None or not isinstance(value, int | float) else f"{value:.2f}\u00d7"


def _signed(value: Any, digits: int = 3) -> str:
    if value is None or not isinstance(value, int | float):
        return ""
    return f"{value:+,.{digits}f}"
