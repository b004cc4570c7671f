"""Base of the report's typed values (report.model): numbers cleaned as a value is built, conversion to and from
plain JSON data.

Numbers are cleaned when a value is built: numpy scalars become Python ones, NaN/inf become None and lists become
tuples, so a renderer shows what report.json says ("n/a" for a figure that could not be computed). A field whose
metadata is OMIT_NONE is left out of the JSON while it is None (a figure only some inputs carry).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import numpy as np

OMIT_NONE = {"omit_none": True}


class Model:
    """Base of the report's values: cleaned numbers, conversion from and to plain JSON data."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _clean(getattr(self, f.name)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, partial: bool = False) -> Self:
        """The value `data` (as `to_dict` writes it) describes. Unknown keys are refused; a missing key too, unless
        `partial` (a hand-made or older report.json): then a missing figure is None and a missing table empty."""
        return _build(cls, data, partial, cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        """The value as plain JSON data (dicts in field order, lists, numbers, strings, None)."""
        return _dump(self)


def _clean(value: Any) -> Any:
    """Plain immutable-ish Python values: numpy scalars as Python ones, NaN/inf as None, lists and arrays as tuples."""
    if isinstance(value, Model):
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_clean(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(_clean(v) for v in value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _dump(value: Any) -> Any:
    if isinstance(value, Model):
        return {
            f.name: _dump(getattr(value, f.name))
            for f in dataclasses.fields(value)  # type: ignore[arg-type]
            if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)
        }
    if isinstance(value, Mapping):
        return {str(k): _dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    return value


def _build(hint: Any, data: Any, partial: bool, where: str) -> Any:
    """`data` converted to the type `hint` names (a Model class, X | None, tuple[X, ...], dict[str, X] or a leaf)."""
    if isinstance(hint, type) and issubclass(hint, Model):
        if isinstance(data, hint):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object, got {data!r}")
        hints = typing.get_type_hints(hint)
        fields = {f.name: f for f in dataclasses.fields(hint)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            if name in data:
                values[name] = _build(hints[name], data[name], partial, f"{where}.{name}")
            elif partial and f.default is dataclasses.MISSING:
                values[name] = _blank(hints[name], where)
            elif f.default is dataclasses.MISSING:
                raise ValueError(f"{where}: missing key '{name}'")
        return hint(**values)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if data is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _build(options[0], data, partial, where) if len(options) == 1 else data
    if origin is tuple:
        return tuple(_build(args[0], v, partial, f"{where}[{i}]") for i, v in enumerate(data))
    if origin in (dict, Mapping):
        return {str(k): _build(args[1], v, partial, f"{where}.{k}") for k, v in data.items()}
    return data


def _blank(hint: Any, where: str) -> Any:
    """What a partial report holds where a key is missing: an empty table, a value of blank figures, or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        return None
    if isinstance(hint, type) and issubclass(hint, Model):
        return _build(hint, {}, True, where)
    if origin is tuple:
        return ()
    if origin in (dict, Mapping):
        return {}
    return None
