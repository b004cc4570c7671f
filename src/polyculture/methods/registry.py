"""The method registry: a spec's `method.name` -> the method object that prompts and parses for it."""

from __future__ import annotations

from typing import Any

from polyculture.methods.base import Method
from polyculture.methods.cot import CoT
from polyculture.methods.direct import Direct
from polyculture.methods.multi_turn import MultiTurn
from polyculture.methods.selection import Selection
from polyculture.methods.sequence import SequenceMethod
from polyculture.methods.vs_cot import VSCoT
from polyculture.methods.vs_multi import VSMulti
from polyculture.methods.vs_standard import VSStandard
from polyculture.spec import MethodSpec


def get_method(spec: MethodSpec | str, **options: Any) -> Method:
    """The method a spec's `method:` section describes (or a name plus MethodSpec fields, for tests and benches)."""
    if isinstance(spec, str):
        try:
            spec = MethodSpec(name=spec, **options)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"unknown method '{spec}' or bad options {options}: {exc}") from None
    if spec.name == "direct":
        return Direct()
    if spec.name == "cot":
        return CoT()
    if spec.name == "sequence":
        return SequenceMethod(k=spec.k)
    if spec.name == "multi_turn":
        return MultiTurn(k=spec.k)
    vs_options: dict[str, Any] = {
        "k": spec.k,
        "probability_definition": spec.probability_definition,
        "probability_threshold": spec.probability_threshold,
        "selection": Selection.from_spec(spec),
    }
    if spec.name == "vs_standard":
        return VSStandard(**vs_options)
    if spec.name == "vs_cot":
        return VSCoT(**vs_options)
    if spec.name == "vs_multi":
        return VSMulti(turns=spec.turns, **vs_options)
    raise ValueError(f"method '{spec.name}' is not implemented")
