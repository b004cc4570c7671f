"""A fault injector for build subprocesses: copied as `sitecustomize.py` into a folder put first on PYTHONPATH, it
makes the process SIGKILL itself at one call of one function, so a test can stop a real build at an exact point.

POLYCULTURE_TEST_KILL_AT = "package.module:function[@after][#n]": the n-th call (default the first) of that function
kills the process before it runs (or, with @after, once it returned). POLYCULTURE_TEST_KILL_IF: count only calls
whose positional arguments, as text, contain this string. POLYCULTURE_TEST_KILL_NOTE: a file written just before
the kill, naming the point, so the test knows the kill happened there and not somewhere else.

The module is imported and patched here, at interpreter start, before the flows import the function by name (a
`from x import f` binds whatever x.f is then). The variables are removed from this process's environment, so the
processes it starts (Prefect's server, workers) run unpatched.
"""

from __future__ import annotations

import os

_AT = os.environ.pop("POLYCULTURE_TEST_KILL_AT", "")
_IF = os.environ.pop("POLYCULTURE_TEST_KILL_IF", "")
_NOTE = os.environ.pop("POLYCULTURE_TEST_KILL_NOTE", "")


def _install(point: str) -> None:
    import functools
    import importlib
    import signal

    target, _, nth = point.partition("#")
    target, _, when = target.partition("@")
    module_name, _, name = target.partition(":")
    when, wanted = when or "before", int(nth or 1)
    if when not in ("before", "after") or not module_name or not name:
        raise SystemExit(f"POLYCULTURE_TEST_KILL_AT={point!r}: expected module:function[@before|@after][#n]")
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = [0]

    def die() -> None:
        if _NOTE:
            with open(_NOTE, "w") as note:
                note.write(point)
        os.kill(os.getpid(), signal.SIGKILL)

    @functools.wraps(original)
    def killing(*args, **kwargs):
        counted = not _IF or _IF in " ".join(str(a) for a in args)
        if counted:
            calls[0] += 1
        if counted and calls[0] == wanted and when == "before":
            die()
        result = original(*args, **kwargs)
        if counted and calls[0] == wanted and when == "after":
            die()
        return result

    setattr(module, name, killing)


if _AT:
    _install(_AT)
