"""What every spec section shares: refusing unknown keys, the error type, and how validation errors read."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

# Lists of tagged unions: pydantic puts the tag in an error's location (quality.0.python.function); the author
# wrote quality.0.function.
TAGGED_LISTS = {"quality": ("fluency", "prose", "judge", "math_answer", "expression", "python")}


class SpecError(ValueError):
    """A build spec that cannot be used; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def error_lines(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """Each error of `exc` as (location, message), the message as a spec's author reads it."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if len(loc) > 2 and loc[0] in TAGGED_LISTS and loc[2] in TAGGED_LISTS[str(loc[0])]:
            loc = loc[:2] + loc[3:]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # the tag field is the one at fault
            loc = (*loc, str(err.get("ctx", {}).get("discriminator", "kind")).strip("'"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        elif err["type"] == "literal_error":
            msg = f"{msg}; got {err.get('input')!r}"
        lines.append((loc, msg))
    return lines


def spec_error_message(lines: list[tuple[tuple[str | int, ...], str]]) -> str:
    """The SpecError text for (location, message) pairs: one line each, "(spec)" for the spec as a whole."""
    shown = [f"{'.'.join(str(p) for p in loc) or '(spec)'}: {msg}" for loc, msg in lines]
    return "invalid build spec:\n  " + "\n  ".join(shown)


def format_validation_error(exc: ValidationError) -> str:
    return spec_error_message(error_lines(exc))
