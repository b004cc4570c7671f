"""Which run folder `report.previous` names: `auto` is the newest finished run of the same dataset, a path must be a
finished run folder (result.json and report.json). Here, below preflight, so `polyculture check` refuses a bad path
naming the field before any model time; report.previous reads the folder.
"""

from __future__ import annotations

from pathlib import Path

from polyculture.runs.folders import RESULT_FILE
from polyculture.spec import BuildSpec, SpecError

FIELD = "report.previous"


def locate_previous_run(spec: BuildSpec, dataset_root: Path, current: Path | None = None) -> Path | None:
    """The run folder `report.previous` names (None: not set, or `auto` with no finished run yet)."""
    wanted = spec.report.previous
    if wanted is None:
        return None
    if wanted == "auto":
        if not dataset_root.is_dir():
            return None
        finished = [
            run
            for run in dataset_root.iterdir()
            if _finished(run) and (current is None or run.resolve() != current.resolve())
        ]
        return max(finished, key=lambda run: run.name) if finished else None
    try:
        return previous_run_folder(wanted, spec.base_dir)
    except ValueError as exc:
        raise SpecError(f"{FIELD}: {exc}") from None


def previous_run_folder(wanted: str, base_dir: Path) -> Path:
    """The finished run folder a path names (beside the spec first, then the working folder); ValueError if none."""
    given = Path(wanted).expanduser()
    options = [given] if given.is_absolute() else [base_dir / given, Path.cwd() / given]
    for option in options:
        if _finished(option):
            return option.resolve()
    raise ValueError(
        f"'{wanted}' is not a finished run folder (expected {RESULT_FILE} and report.json in it; looked beside the "
        "spec and in the working folder); use 'auto' for the newest finished run of this dataset"
    )


def _finished(run: Path) -> bool:
    return (run / RESULT_FILE).is_file() and (run / "report.json").is_file()
