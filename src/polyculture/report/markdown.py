"""report.md: the report as Markdown (templates/report.md.j2); image links are relative to the report's folder."""

from __future__ import annotations

from polyculture.report.jinja import render
from polyculture.report.model import DIVERSITY_ROWS, Report


def render_markdown(report: Report) -> str:
    stages = report.diversity.measured()
    return render(
        "report.md.j2",
        report=report,
        stages=stages,
        diversity_rows=DIVERSITY_ROWS,
        has_calibration=any(figures.calibration for _, _, figures in stages),
    )
