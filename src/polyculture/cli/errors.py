"""How a command fails: one table from exception type to exit code, used by every command.

Exit codes: 0 ok; 1 a failure of its own kind (a comparison where every method failed, serve losing its server);
2 a bad spec, config or argument; 3 a model, engine, runner or index not available here; Hub: 4 no token or token
rejected, 5 no write access, 6 unreachable, 7 already published or the repo moved on, 8 any other Hub refusal;
9 out of space (full disk, quota or file size limit: the message names the path; a build resumes once space is freed).

The table names each exception class by the module that defines it, so it imports nothing: a command's own lazy
imports stay lazy (`--help` and `schema` never load Prefect or torch). The most specific class of an exception's MRO
that the table lists decides; an exception the table does not list is a bug and keeps its traceback.

Prefect logs every failed task and flow run with its traceback: a run failing with a listed exception has its records
dropped (the one `error:` line says it); for a failure the command reports itself (a Prefect API that went away) the
traceback is dropped and the log line stays. A Prefect API that went away makes Prefect log the same two lines for
every event it cannot send: the first of each is kept.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import typer
from rich.markup import escape

from polyculture.cli.display import err

EXIT_CODES: dict[str, int] = {
    "polyculture.spec.base.SpecError": 2,
    "polyculture.flows.schedules.ScheduleError": 2,
    "polyculture.runs.folders.RunBusy": 2,
    "polyculture.index.sources.SourceError": 2,
    "polyculture.tuning.families.FamilyError": 2,
    "polyculture.tuning.config.TuneConfigError": 2,
    "polyculture.tuning.generations_config.GenerationsConfigError": 2,
    "polyculture.tuning.generations.LoopChanged": 2,
    "polyculture.engines.model_files.ModelUnavailable": 3,
    "polyculture.engines.base.EngineError": 3,
    "polyculture.flows.runners.RunnerUnavailable": 3,
    "polyculture.preflight.IndexUnavailable": 3,
    "polyculture.hub.push.HubInputError": 2,
    "polyculture.hub.push.HubAuthError": 4,
    "polyculture.hub.push.HubPermissionError": 5,
    "polyculture.hub.push.HubUnreachable": 6,
    "polyculture.hub.push.HubConflict": 7,
    "polyculture.hub.push.HubError": 8,
    "polyculture.runs.files.DiskFull": 9,
}

# Reported by the command that meets them (the build: a Prefect API that went away), not through the table.
REPORTED_BY_COMMAND = {"httpx.HTTPError"}

P = ParamSpec("P")
R = TypeVar("R")


def _class_names(exc: BaseException) -> list[str]:
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__]


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code the table gives `exc` (None: not a failure the commands report, let it raise)."""
    for name in _class_names(exc):
        code = EXIT_CODES.get(name)
        if code is not None:
            return code
    return None


class _ReportedFailureTracebacks(logging.Filter):
    """Drops the traceback of a Prefect run log line whose exception the command reports itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (exit_code_for(exc) is not None or REPORTED_BY_COMMAND & set(_class_names(exc))):
            record.exc_info = None
            record.exc_text = None
        return True


class _FirstOnly(logging.Filter):
    """Lets the first record of a logger through and drops the rest that start like it."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.start):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def quiet_prefect_noise() -> None:
    """Install the filters the module docstring describes (once per process; loggers need not exist yet)."""
    runs = _ReportedFailureTracebacks()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ReportedFailureTracebacks) for f in logger.filters):
            logger.addFilter(runs)
    for name, start in (("prefect.events.clients", "Unable to connect to"),
                        ("prefect._internal.concurrency", "Service 'EventsWorker' failed")):  # fmt: skip
        logger = logging.getLogger(name)
        if not any(isinstance(f, _FirstOnly) for f in logger.filters):
            logger.addFilter(_FirstOnly(start))


def fail(message: str, code: int = 2) -> NoReturn:
    # escaped: a message may hold brackets ("[/path]") that rich would read as markup and fail on
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class _ReportedFailures(logging.Filter):
    """Drops a log record that carries an exception the table reports: Prefect logs a failed task or flow run with
    its traceback, and the command then says the same in its one `error:` line. Unlisted exceptions (bugs) keep
    their records, and their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or exit_code_for(exc) is None


# The loggers Prefect writes task and flow run failures to.
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def exit_codes(command: Callable[P, R]) -> Callable[P, R]:
    """`command` with every exception of the table reported as `error: <message>` and its exit code."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        quiet = _ReportedFailures()  # before quiet_prefect_noise's filters, which strip the exception it reads
        for name in _RUN_LOGGERS:
            logging.getLogger(name).filters.insert(0, quiet)
        quiet_prefect_noise()
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            code = exit_code_for(exc)
            if code is None:
                raise
            fail(str(exc), code)
        finally:
            for name in _RUN_LOGGERS:
                logging.getLogger(name).removeFilter(quiet)

    return run
