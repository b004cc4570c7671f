"""A tiny progress hook: stages and flows report steps; the CLI decides how (or whether) to show them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Iterator

# (stage, done, total, note) -> None
Reporter = Callable[[str, int, int, str], None]


def _silent(stage: str, done: int, total: int, note: str) -> None:
    return None


_reporter: Reporter = _silent


def report(stage: str, done: int, total: int, note: str = "") -> None:
    _reporter(stage, done, total, note)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    global _reporter
    previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = previous
