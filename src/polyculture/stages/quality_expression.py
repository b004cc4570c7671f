"""expression checks: a formula a record holds, evaluated safely, against the value the record claims for it.

Evaluation is simpleeval's (no attribute access, no imports, no calls but a small table of math functions) with
bounds of our own, so an expression from a model can cost one record but never the build: a length limit before
parsing; a power, product or shift whose integer result would be wider than `max_bits` is refused before it is
computed (`9**9**9`); every node checks the deadline, and with the size bounds no single node can run long.
Booleans and integers must match exactly; where a float is involved, `tolerance` is both relative and absolute.
"""

from __future__ import annotations

import ast
import math
import numbers
import time
from typing import Any

import simpleeval

from polyculture.spec import ExpressionCheck

# Deterministic functions only (simpleeval's defaults include rand/randint); no pow(): it would skip the ** bound.
FUNCTIONS = {
    "abs": abs, "round": round, "min": min, "max": max, "int": int, "float": float,
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "floor": math.floor, "ceil": math.ceil,
}  # fmt: skip
NAMES = {"pi": math.pi, "e": math.e, "True": True, "False": False}


class ExpressionFailed(ValueError):
    """The expression could not be evaluated within the bounds; the message is the reject's reason."""


class _Bounded(simpleeval.SimpleEval):
    def __init__(self, max_bits: int, timeout_s: float) -> None:
        operators = dict(simpleeval.DEFAULT_OPERATORS)
        operators[ast.Pow] = self._power
        super().__init__(operators=operators, functions=dict(FUNCTIONS), names=dict(NAMES))
        self._max_bits = max_bits
        self._timeout_s = timeout_s
        self._deadline = math.inf

    def eval(self, expr: str, previously_parsed: Any = None) -> Any:
        self._deadline = time.monotonic() + self._timeout_s
        return super().eval(expr, previously_parsed)

    def _eval(self, node: ast.AST) -> Any:
        if time.monotonic() > self._deadline:
            raise ExpressionFailed(f"timed out after {self._timeout_s} s")
        value = super()._eval(node)
        # A product or shift of two bounded integers is at most twice as wide: cheap to compute, refused here.
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > self._max_bits:
            raise ExpressionFailed(f"an intermediate integer has {value.bit_length()} bits (max_bits {self._max_bits})")
        return value

    def _power(self, base: Any, exponent: Any) -> Any:
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
            bits = exponent * math.log2(abs(base))
            if bits > self._max_bits:
                raise ExpressionFailed(f"{base} ** {exponent} would have about {bits:.3g} bits (max_bits {self._max_bits})")
        return base**exponent


def evaluate(expression: str, *, max_length: int = 500, max_bits: int = 4096, timeout_s: float = 1.0) -> Any:
    """The value of `expression`; ExpressionFailed (with the reason) for anything it cannot be."""
    if len(expression) > max_length:
        raise ExpressionFailed(f"expression has {len(expression)} characters (max_length {max_length})")
    try:
        return _Bounded(max_bits, timeout_s).eval(expression)
    except ExpressionFailed:
        raise
    except SyntaxError as exc:
        raise ExpressionFailed(f"does not parse: {exc.msg}") from None
    except Exception as exc:  # anything the expression does wrong (names, types, overflow, recursion) is its own fault
        raise ExpressionFailed(f"{type(exc).__name__}: {str(exc)[:200]}") from None


def check_expression(record: dict[str, Any], check: ExpressionCheck) -> tuple[bool, str | None]:
    """(passed, why not): the record's expression evaluated and compared with its claimed value."""
    expression = record.get(check.expression_field)
    if not isinstance(expression, str) or not expression.strip():
        return False, f"{check.expression_field} holds no expression ({type(expression).__name__})"
    claimed = record.get(check.value_field)
    if claimed is None:
        return False, f"{check.value_field} is missing"
    try:
        value = evaluate(expression, max_length=check.max_length, max_bits=check.max_bits, timeout_s=check.timeout_s)
    except ExpressionFailed as exc:
        return False, str(exc)
    return compare(value, claimed, check.tolerance)


def compare(value: Any, claimed: Any, tolerance: float) -> tuple[bool, str | None]:
    """Booleans and integers exactly; floats within `tolerance` (relative and absolute); other types never."""
    shown = f"{_short(value)} != claimed {_short(claimed)}"
    if isinstance(value, bool) or isinstance(claimed, bool):
        if not (isinstance(value, bool) and isinstance(claimed, bool)):
            return False, f"type mismatch: {type(value).__name__} result, {type(claimed).__name__} claimed"
        return (True, None) if value == claimed else (False, shown)
    for what, x in (("result", value), ("claimed value", claimed)):
        if not isinstance(x, numbers.Real):
            return False, f"the {what} is a {type(x).__name__}, not a number or a boolean"
    if isinstance(value, numbers.Integral) and isinstance(claimed, numbers.Integral):
        return (True, None) if int(value) == int(claimed) else (False, shown)
    try:
        close = math.isclose(float(value), float(claimed), rel_tol=tolerance, abs_tol=tolerance)
    except OverflowError:
        return False, "the result is too large for a float comparison"
    return (True, None) if close else (False, f"{shown} (tolerance {tolerance:g})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
