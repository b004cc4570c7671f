"""math_answer's comparison, run in the check's worker processes (stages.quality_python's pool): the author's answer
and a problem's solutions parsed and grouped with math-verify. math-verify (and sympy under it) is imported at module
level, so a worker pays that import when it starts, not inside the first record's timer; the build's own process
never imports this module.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from math_verify import parse, verify

_OVERLINE = "\\overline"  # a repeating decimal: math-verify 0.9.0 drops the bar, so 1.\overline{72} equals 1
# Markdown bold: `**` that opens after no word character or closing bracket and closes before none, around no space at
# either edge. `**73**` and `**x = 3**` are bold; `2**3 + 2**2` (a power, which a looser pattern read as `23 + 22`) and
# `2 ** 3 ** 2` are not.
_BOLD = re.compile(r"(?<![\w)\]}])\*\*(?=[^\s*])([^*\n]*?[^\s*])\*\*(?![\w(\[{])")
# An author's answer that is a number and a unit word ("12 dollars", "12 cm^2", "1,000 people"): in $...$ LaTeX reads
# the word as a product of symbols (12*a*do*l*l*r*s), never equal to a solution's 12; the number alone is compared.
_NUMBER_AND_UNIT = re.compile(r"^\$?(-?\d[\d,]*(?:\.\d+)?)\s+(?!(?:and|or)\b)[A-Za-z]{2,}[A-Za-z\s/^\d.]*$")


def unbold(text: str) -> str:
    """`text` with Markdown bold unwrapped (`**73**` -> `73`), powers (`2**3`) kept."""
    return _BOLD.sub(r"\1", text)


def compare_answers(record: dict[str, Any]) -> tuple[float, str]:
    """Runs in a worker: (agreement, JSON of what was found) for one problem's author answer and solutions."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the pool's timer is the limit

    def parsed(text: str) -> list[Any]:
        if _OVERLINE in text:  # math-verify 0.9.0 drops \overline: 1.\overline{72} would equal 1
            return []
        return parse(unbold(text), parsing_timeout=None)  # type: ignore[arg-type]

    def same(gold: list[Any], target: list[Any]) -> bool:
        return bool(verify(gold, target, timeout_seconds=None))

    answer = record.get("answer")
    solves = int(record["solves"])
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    found: dict[str, Any] = {"author": answer, "majority": None, "solve_rate": 0.0, "author_is_majority": False}
    if not isinstance(answer, str) or not answer.strip():
        found["problem"] = "the author's answer is empty or not text"
        return 0.0, json.dumps(found)
    if _OVERLINE in answer:
        found["problem"] = (
            f"the author's answer {answer!r} uses \\overline, which math-verify drops (1.\\overline{{72}} = 1)"
        )
        return 0.0, json.dumps(found)
    unit = _NUMBER_AND_UNIT.match(answer.strip())
    bare = unit.group(1) if unit else answer.strip().strip("$")
    gold = parsed(f"${bare}$") or parsed(answer)
    if not gold:
        found["problem"] = f"the author's answer {answer!r} does not parse as math"
        return 0.0, json.dumps(found)
    answers = [parsed(text) for text in record["solutions"]]
    groups: list[list[int]] = []  # indices of equivalent answers; the first member is the group's gold
    for i, target in enumerate(answers):
        if not target:
            continue
        home = next((g for g in groups if same(answers[g[0]], target)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    solved = sum(1 for target in answers if target and same(gold, target))
    found["solve_rate"] = solved / solves
    found["unparsed"] = sum(1 for target in answers if not target)
    if not groups:
        found["problem"] = f"no solution gave an answer math-verify reads (none boxed or parseable; {solves} tried)"
        return 0.0, json.dumps(found)
    majority = max(groups, key=len)  # the first of the largest: a tie goes to the answer given first
    found["majority"] = str(answers[majority[0]][-1])
    found["author_is_majority"] = same(gold, answers[majority[0]])
    return len(majority) / solves, json.dumps(found)
