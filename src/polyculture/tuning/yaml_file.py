"""Reading a YAML file into a pydantic model, every problem reported with the file and the field's dotted path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def load_validated(path: Path, model: type[Model], error: type[ValueError], what: str, overrides: Any = None) -> Model:
    """`what` describes the expected mapping for the message when the file holds something else; `overrides`, if
    given, is a function applied to the raw mapping before validation."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise error(f"{path}: expected {what}")
    if overrides is not None:
        raw = overrides(raw)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise error(f"{path}: {problems}") from None
