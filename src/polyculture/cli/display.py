"""What the commands show: the stderr console, stdout sized for tables, JSON on stdout, and the progress display."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

err = Console(stderr=True)


def stdout() -> Console:
    # Piped or redirected output gets room for whole tables instead of rich's 80-column default.
    return Console() if sys.stdout.isatty() else Console(width=200)


def write_json(data: Any, *, ensure_ascii: bool = True) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=ensure_ascii) + "\n")


def progress_bar(quiet: bool, *, label_width: int, transient: bool = False) -> Progress:
    """The progress display every long command uses: stage label, bar, count, elapsed time, a note."""
    columns = [SpinnerColumn(), TextColumn(f"{{task.description:<{label_width}}}"), BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
    return Progress(*columns, console=err, disable=quiet, transient=transient)


class RichReporter:
    """Live bars on a terminal; elsewhere (a log file, CI) one plain line per stage start, end and every
    LOG_EVERY_S seconds, since a redirected live display only shows up when the command ends."""

    LOG_EVERY_S = 30.0

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.lines = not err.is_terminal and not progress.disable
        self.last_line: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int, note: str) -> None:
        if self.lines:
            self._line(stage, done, total, note)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=max(total, 1), note=note)
        self.progress.update(self.tasks[stage], completed=done, total=max(total, 1), note=note)

    def _line(self, stage: str, done: int, total: int, note: str) -> None:
        now = time.monotonic()
        first = stage not in self.last_line
        if first or done >= total or now - self.last_line[stage] >= self.LOG_EVERY_S:
            self.last_line[stage] = now
            line = f"{time.strftime('%H:%M:%S')} {stage}: {done}/{total} {note}".rstrip()
            err.print(line, highlight=False, markup=False, soft_wrap=True)  # one line, however long, taken as written
