"""Text keys: the normalised form two texts share when they are exact duplicates, its hash, and clipping."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Casefolded NFKC text with whitespace collapsed and punctuation stripped from both ends."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _WHITESPACE.sub(" ", text).strip()
    start, end = 0, len(text)
    while start < end and (_is_punct(text[start]) or text[start].isspace()):
        start += 1
    while end > start and (_is_punct(text[end - 1]) or text[end - 1].isspace()):
        end -= 1
    return text[start:end]


def _is_punct(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


def names_seed(*names: str) -> int:
    """A 32-bit seed from names (a check's, records' ids): the same names always give the same seed."""
    return int.from_bytes(hashlib.sha256("\0".join(names).encode()).digest()[:4], "big")


def clip(text: str | None, limit: int) -> str:
    """At most `limit` characters, with "..." where it was cut."""
    text = text or ""
    return text if len(text) <= limit else text[:limit] + "..."
