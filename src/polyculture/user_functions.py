"""A user's function named 'package.module:function' in a spec, imported with the spec's folder on the path.

Preflight imports it once to refuse a bad path before any model time; quality's worker processes import it again
(spawned processes share no module with the build). Kept at the bottom layer with nothing heavy imported, so a
worker starts in a fraction of a second.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class FunctionUnavailable(ValueError):
    """The named module does not import or has no such callable; the message says which and why."""


def load_function(path: str, base_dir: Path | str) -> Callable[..., Any]:
    """The callable `path` ('module:function') names; modules beside the spec (`base_dir`) are found first."""
    module_name, _, function_name = path.partition(":")
    folder = str(Path(base_dir).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # stays: the function may import its own neighbours later
    importlib.invalidate_caches()  # a module written since the folder was last listed is still found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise FunctionUnavailable(
                f"module '{module_name}' not found (looked beside the spec, in {folder}, and on the Python path)"
            ) from None
        raise FunctionUnavailable(f"module '{module_name}' failed to import: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise FunctionUnavailable(f"module '{module_name}' failed to import: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise FunctionUnavailable(f"module '{module_name}' has no '{function_name}'")
    if not callable(function):
        raise FunctionUnavailable(f"'{path}' is a {type(function).__name__}, not a function")
    return function
