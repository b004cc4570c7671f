"""Prompting methods: how to ask for candidates, what output format to constrain, how to parse it, and how a
VS answer's responses become records (selection)."""

from polyculture.methods.base import Method, ParsedItem, ParseResult
from polyculture.methods.registry import get_method
from polyculture.methods.selection import Dropped, Selection

__all__ = ["Dropped", "Method", "ParsedItem", "ParseResult", "Selection", "get_method"]
