"""The dataset card's body (templates/card.md.j2): how the dataset was made, its headline and per-stage figures, the
quality checks (kind, threshold, pass rates) when the spec has any, its columns, the build spec and the report
itself. stages.publish puts it under the card's YAML metadata."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import yaml

from polyculture.report.jinja import render
from polyculture.report.markdown import render_markdown
from polyculture.report.model import Report
from polyculture.spec import BuildSpec


def render_card(report: Report, spec: BuildSpec, fields: Sequence[str], rows: int, report_md: str | None = None) -> str:
    """The card body for `rows` published records whose record columns are `fields` (stages.publish.record_fields).

    `report_md` is the report as published next to the card (default: rendered from `report`, as report.md is);
    it closes the card with its headings one level down."""
    if report_md is None:
        report_md = render_markdown(report)
    stages = [(key, figures) for key, _, figures in report.diversity.measured()]
    metrics = [
        f.name
        for f in dataclasses.fields(report.diversity.before)
        if any(_is_figure(getattr(figures, f.name)) for _, figures in stages)
    ]
    text = render(
        "card.md.j2",
        report=report,
        spec=spec,
        rows=rows,
        fields=list(fields),
        fingerprint=spec.fingerprint(),
        headline=_headline_rows(report),
        diversity=stages,
        metrics=metrics,
        spec_yaml=_fenced(
            yaml.safe_dump(spec.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True), "yaml"
        ),
        schema_json=_fenced(json.dumps(spec.record_schema, indent=2, ensure_ascii=False), "json"),
        report_md=_demote_headings(report_md).strip(),
    )
    return text.removesuffix("\n")


def _headline_rows(report: Report) -> list[tuple[str, object]]:
    """(name, value) per headline figure: a figure only some builds have is left out when absent, and one given per
    quality check becomes a row per check."""
    rows: list[tuple[str, object]] = []
    for f in dataclasses.fields(report.headline):
        value = getattr(report.headline, f.name)
        if value is None and f.metadata.get("omit_none"):
            continue
        if isinstance(value, dict):
            rows += [(f"{f.name}: {check}", v) for check, v in value.items()]
        else:
            rows.append((f.name, value))
    return rows


def _is_figure(value: object) -> bool:
    return isinstance(value, int | float)


def _fenced(text: str, lang: str) -> str:
    # A fence longer than any backtick run inside (a prompt template may hold one) keeps the block closed.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _demote_headings(markdown: str) -> str:
    # The report's "# title" becomes a section of the card.
    return re.sub(r"^(#+ )", r"#\1", markdown, flags=re.MULTILINE)
