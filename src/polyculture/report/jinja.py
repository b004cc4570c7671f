"""The one template engine of the report: Jinja2 over report/templates/, with the number filters of report.format.

Markdown templates (report.md.j2, card.md.j2) render without escaping; the HTML page (report.html.j2) autoescapes and
passes every printed value through the page's `finalize`. Control lines ({% ... %} alone on a line) leave no blank
line behind (trim_blocks, lstrip_blocks), so a Markdown template reads line for line like its output.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import jinja2

from polyculture.report.format import FILTERS


@cache
def environment(*, html: bool = False, finalize: Callable[[Any], Any] | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("polyculture.report", "templates"),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        finalize=finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=not html,
    )
    env.filters.update(FILTERS)
    return env


def render(name: str, *, html: bool = False, finalize: Callable[[Any], Any] | None = None, **context: Any) -> str:
    """Template `name` (a file of report/templates/) rendered with `context`."""
    return environment(html=html, finalize=finalize).get_template(name).render(**context)
