"""Prompting methods: how to ask for candidates, what output format to constrain, and how to parse it."""

from polyculture.methods.base import Method, ParsedItem, ParseResult, get_method

__all__ = ["Method", "ParsedItem", "ParseResult", "get_method"]
