"""python checks: a user function over each record, in spawned worker processes, each record under a timeout.

What a record costs when its check misbehaves is that record, never the build:
- the function raises, or returns something that is not a bool, a number or (score, reason): a failed record with
  the reason;
- it runs past `timeout_s`: the worker's own timer (SIGALRM) interrupts it, a failed record;
- it ignores that interruption (catches it, or sits in C code): past `timeout_s` + HARD_GRACE_S the parent kills the
  pool and starts a fresh one; the other records in flight are sent again, their clocks restarted;
- it kills its worker (os._exit, a crash): the records that were in flight are retried one at a time, and the one that
  breaks a pool alone fails.
A pool is ready when every worker has imported the function (a barrier), so import time never counts as check time.
Workers are spawned, never forked: the build process holds a model and threads that a fork would copy.
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from polyculture.spec import PythonCheck
from polyculture.user_functions import load_function

# A check that swallows its own timeout is killed this long after it (the pool goes with it).
HARD_GRACE_S = 5.0
STARTUP_TIMEOUT_S = 120.0
# (score, verdict, note): verdict None means the score is judged against the check's threshold.
Outcome = tuple[float | None, bool | None, str | None]

_function: Any = None


class CheckUnavailable(RuntimeError):
    """The check's worker processes could not start (not a record's fault)."""


class _Hung(BaseException):  # BaseException: a check's `except Exception` must not swallow its own timeout
    pass


def _start_worker(function_path: str, base_dir: str, ready: Any) -> None:
    global _function
    _function = load_function(function_path, base_dir)
    ready.wait(STARTUP_TIMEOUT_S)  # every worker imported the function before any record is timed


def _ready() -> bool:
    return True


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hung


def _check_one(record: dict[str, Any], timeout_s: float) -> Outcome:
    """Runs in a worker: the function on one record, interrupted after `timeout_s`; only plain values go back."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        value = _function(record)
    except _Hung:
        return None, False, f"timed out after {timeout_s:g} s"
    except BaseException as exc:  # SystemExit and KeyboardInterrupt from a check are the record's failure too
        return None, False, f"raised {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return normalise(value)


def normalise(value: Any) -> Outcome:
    """What a check returned as (score, verdict, note): a bool is its own verdict (score 1.0 or 0.0); a number is a
    score for the threshold; (score, reason) adds the reason; anything else is a failure saying what came back."""
    reason: str | None = None
    if isinstance(value, tuple):
        if len(value) != 2 or not (value[1] is None or isinstance(value[1], str)):
            return None, False, "returned a tuple that is not (score, reason: str)"
        value, reason = value
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's bool is not a bool
        return (1.0 if value else 0.0), bool(value), reason
    if isinstance(value, numbers.Real):
        score = float(value)
        if not math.isfinite(score):
            return None, False, f"returned a score that is not finite ({score})"
        return score, None, reason
    return None, False, f"returned {type(value).__name__}; expected a bool, a number or (score, reason)"


class _Pool:
    """A spawned ProcessPoolExecutor whose workers have all imported the function."""

    def __init__(self, check: PythonCheck, base_dir: Path, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker,
            initargs=(check.function, str(base_dir), context.Barrier(workers)),
        )  # fmt: skip
        # One task per worker starts every worker (they spawn on demand); the barrier holds them until all imported.
        warm_up = [self.executor.submit(_ready) for _ in range(workers)]
        try:
            for future in warm_up:
                future.result(timeout=STARTUP_TIMEOUT_S + 10)
        except Exception as exc:
            self.kill()
            raise CheckUnavailable(f"the worker processes of check '{check.name}' did not start: {exc!r}") from None

    def kill(self) -> None:
        kill_workers = getattr(self.executor, "kill_workers", None)  # Python 3.14+
        if callable(kill_workers):
            kill_workers()
        else:
            for process in list((getattr(self.executor, "_processes", None) or {}).values()):
                process.kill()
        self.executor.shutdown(wait=False, cancel_futures=True)


def run_python_check(records: list[dict[str, Any]], check: PythonCheck, base_dir: Path | str) -> list[Outcome]:
    """One outcome per record, in order."""
    outcomes: list[Outcome | None] = [None] * len(records)
    if not records:
        return []
    workers = min(check.workers, len(records))
    pending = deque(range(len(records)))
    suspects: deque[int] = deque()  # in flight when a worker died: retried one at a time
    in_flight: dict[Future[Outcome], tuple[int, float]] = {}
    pool = _Pool(check, Path(base_dir), workers)
    try:
        while pending or suspects or in_flight:
            source, window = (suspects, 1) if suspects else (pending, workers)
            while source and len(in_flight) < window:
                i = source.popleft()
                in_flight[pool.executor.submit(_check_one, records[i], check.timeout_s)] = (i, time.monotonic())
            limit = check.timeout_s + HARD_GRACE_S
            first_deadline = min(started for _, started in in_flight.values()) + limit
            done, _ = wait(in_flight, timeout=max(0.01, first_deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                i, _started = in_flight.pop(future)
                try:
                    outcomes[i] = future.result()
                except (Exception, _Hung) as exc:  # a timer firing as the worker returned: still this record's
                    if not isinstance(exc, BrokenProcessPool):
                        outcomes[i] = (None, False, f"the check's worker failed: {type(exc).__name__}")
                        continue
                    broken = True
                    if window == 1:
                        outcomes[i] = (None, False, "the check's worker process died on this record")
                    else:
                        suspects.append(i)
            now = time.monotonic()
            hung = [f for f, (_, started) in in_flight.items() if now - started > limit]
            for future in hung:
                i, _started = in_flight.pop(future)
                outcomes[i] = (None, False, f"hung past timeout_s {check.timeout_s:g} s; its worker was killed")
            if broken or hung:
                requeue = [i for i, _ in in_flight.values()]
                in_flight.clear()
                (suspects if broken and window > 1 else pending).extendleft(reversed(requeue))
                pool.kill()
                pool = _Pool(check, Path(base_dir), workers)
    finally:
        if in_flight:  # the parent was interrupted: nothing of the pool may outlive it
            pool.kill()
        else:
            pool.executor.shutdown(wait=True)
    return [o if o is not None else (None, False, "not checked") for o in outcomes]
