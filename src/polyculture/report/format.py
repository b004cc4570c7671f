"""How figures and text appear in the Markdown, HTML and card renderings."""

from __future__ import annotations

from typing import Any

from polyculture.index.text import clip


def md_cell(value: Any, limit: int | None = None) -> str:
    """Table-safe text: one line, pipes escaped, clipped to `limit` characters."""
    text = "" if value is None else " ".join(str(value).split())
    if limit is not None:
        text = clip(text, limit)
    return text.replace("|", "\\|")
