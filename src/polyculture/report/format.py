"""How numbers and text appear in the Markdown, HTML and card renderings (registered as Jinja filters by
report.jinja; plain functions for any other table writer).

Every formatter takes any value: a figure that could not be computed (None, or not a number) prints as "n/a" (or
nothing, for `signed`), so a template never has to test for it. bool is not a number here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from polyculture.index.text import clip

MISSING = "n/a"
TIMES = "x"  # the Markdown ratio mark; the HTML page passes "\u00d7"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def fixed(value: Any, digits: int = 3, *, grouping: bool = True) -> str:
    """`digits` decimals (thousands separated unless `grouping` is False): 1,234.500."""
    if not is_number(value):
        return MISSING
    return f"{value:,.{digits}f}" if grouping else f"{value:.{digits}f}"


def pct(value: Any, digits: int = 0) -> str:
    """A share as a percentage with `digits` decimals: 0.125 -> 12.5% (digits=1)."""
    return f"{value:.{digits}%}" if is_number(value) else MISSING


def ratio(value: Any, digits: int = 2, times: str = TIMES) -> str:
    """A ratio with its mark: 0.46x."""
    return f"{value:.{digits}f}{times}" if is_number(value) else MISSING


def signed(value: Any, digits: int = 3) -> str:
    """A change with its sign (+0.125, -1,200.000); empty when there is none."""
    return f"{value:+,.{digits}f}" if isinstance(value, int | float) else ""


def num(value: Any) -> str:
    """A measure of any size: whole numbers grouped (1,234), others with 3 decimals (0.125), or none from 1,000 on;
    text as a table cell."""
    if value is None:
        return MISSING
    if not is_number(value):
        return md_cell(str(value))
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"


def plain(value: Any, digits: int = 3) -> str:
    """A float with `digits` decimals, ungrouped (41.250); anything else as it prints; None as "n/a"."""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return MISSING if value is None else str(value)


def blank(value: Any) -> str:
    """The value as it prints; nothing for None."""
    return "" if value is None else str(value)


def md_cell(value: Any, limit: int | None = None) -> str:
    """Table-safe text: one line, pipes escaped, clipped to `limit` characters."""
    text = "" if value is None else " ".join(str(value).split())
    if limit is not None:
        text = clip(text, limit)
    return text.replace("|", "\\|")


# The filters every report template can use: {{ x | fixed(1) }}, {{ share | pct }}, {{ text | cell(120) }}.
FILTERS: dict[str, Callable[..., str]] = {
    "fixed": fixed,
    "pct": pct,
    "ratio": ratio,
    "signed": signed,
    "num": num,
    "plain": plain,
    "blank": blank,
    "cell": md_cell,
}
