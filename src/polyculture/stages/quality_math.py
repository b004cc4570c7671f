"""math_answer checks: each problem is solved again `solves` times and keeps its place only when the majority of the
solutions agrees with the author's answer.

Two steps, each testable alone:
- `solve`: the solutions come from the engine in batched calls (a fresh conversation holding only the problem,
  seeded from the check and the chunk's record ids, so scoring the same records again gives the same solutions);
  their tokens and engine seconds are counted;
- `compare_solutions`: answers parsed and compared with math-verify. A solution's answer is what math-verify reads in
  it (its \\boxed{} first, else a "final answer" phrase or its last expression); solutions are grouped by equivalence
  (never by string equality), the majority group's size over `solves` is the agreement, and the author's answer must
  be equivalent to the majority's. math-verify is asymmetric (`verify(gold, target)`): the author's answer, or a
  group's first member, is always the gold. Its own timeouts need SIGALRM in the main thread, so parsing and comparing
  run in spawned worker processes (stages.quality_python's pool: a hung parse or comparison costs that record, never
  the build), with math-verify's timeouts off and the pool's per-record timer on.
Markdown bold around an answer (`**73**`) is unwrapped before parsing; a Python power (`2**3 + 2**2`) is left alone.
The author's answer is read as LaTeX (in $...$: an equation stays an equation); a number followed by a unit word
("12 dollars") is read as the number.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from polyculture.engines.base import SamplingParams
from polyculture.index.text import names_seed
from polyculture.spec import MathAnswerCheck, PythonCheck
from polyculture.stages.quality_python import Outcome, run_python_check

if TYPE_CHECKING:
    from polyculture.engines.base import Conversation, Engine

SOLVE_CHUNK = 16  # problems per engine call (x solves sequences)
COMPARE_FUNCTION = "polyculture.stages.quality_math:compare_answers"
_OVERLINE = "\\overline"  # a repeating decimal: math-verify 0.9.0 drops the bar, so 1.\overline{72} equals 1
# Markdown bold: `**` that opens after no word character or closing bracket and closes before none, around no space at
# either edge. `**73**` and `**x = 3**` are bold; `2**3 + 2**2` (a power, which a looser pattern read as `23 + 22`) and
# `2 ** 3 ** 2` are not.
_BOLD = re.compile(r"(?<![\w)\]}])\*\*(?=[^\s*])([^*\n]*?[^\s*])\*\*(?![\w(\[{])")
# An author's answer that is a number and a unit word ("12 dollars", "12 cm^2", "1,000 people"): in $...$ LaTeX reads
# the word as a product of symbols (12*a*do*l*l*r*s), never equal to a solution's 12; the number alone is compared.
_NUMBER_AND_UNIT = re.compile(r"^\$?(-?\d[\d,]*(?:\.\d+)?)\s+(?!(?:and|or)\b)[A-Za-z]{2,}[A-Za-z\s/^\d.]*$")


@dataclass(frozen=True)
class Solved:
    """What one math_answer pass over some records found: per record (agreement, passed, why) and the solve rate,
    and what the solutions cost (generated + prompt tokens, engine seconds)."""

    outcomes: list[Outcome]
    solve_rates: list[float | None]
    tokens: int
    seconds: float


def math_outcomes(
    records: list[dict[str, Any]], record_ids: list[str], check: MathAnswerCheck, engine: Engine
) -> Solved:
    """Solve each record's problem again and compare the answers with the author's."""
    problems = [r.get(check.problem_field) for r in records]
    askable = [i for i, p in enumerate(problems) if isinstance(p, str) and p.strip()]
    solutions, tokens, seconds = solve([problems[i] for i in askable], [record_ids[i] for i in askable], check, engine)
    compared = compare_solutions([records[i].get(check.answer_field) for i in askable], solutions, check)
    by_index = dict(zip(askable, compared, strict=True))
    outcomes: list[Outcome] = []
    rates: list[float | None] = []
    for i in range(len(records)):
        outcome, rate = by_index.get(i, ((None, False, f"{check.problem_field} is empty or not text"), None))
        outcomes.append(outcome)
        rates.append(rate)
    return Solved(outcomes, rates, tokens, seconds)


def solve_conversation(problem: str, check: MathAnswerCheck) -> Conversation:
    """The one user turn that asks for a solution (str.replace: a template's `\\boxed{}` is not a format field)."""
    return [{"role": "user", "content": check.solve_template.replace("{problem}", problem.strip())}]


def solve(
    problems: list[str], record_ids: list[str], check: MathAnswerCheck, engine: Engine
) -> tuple[list[list[str]], int, float]:
    """`solves` solutions per problem, in engine calls of SOLVE_CHUNK problems, each call seeded from the check and
    its record ids; with the tokens (generated, and each prompt once) and engine seconds spent."""
    solutions: list[list[str]] = []
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(problems), SOLVE_CHUNK):
        chunk = range(start, min(start + SOLVE_CHUNK, len(problems)))
        params = SamplingParams(
            temperature=check.temperature, max_tokens=check.max_tokens, n=check.solves,
            seed=solve_seed(check.name, [record_ids[i] for i in chunk]),
        )  # fmt: skip
        done = engine.generate([solve_conversation(problems[i], check) for i in chunk], params)
        for samples in done:
            solutions.append([c.text for c in samples])
            tokens += sum(c.completion_tokens for c in samples) + (samples[0].prompt_tokens if samples else 0)
    return solutions, tokens, time.perf_counter() - started


def compare_solutions(
    answers: list[Any], solutions: list[list[str]], check: MathAnswerCheck
) -> list[tuple[Outcome, float | None]]:
    """Per problem: (agreement, passed, why) and its solve rate, from the author's answer and the solutions, compared
    in the check's worker processes; a problem whose comparison times out or kills its worker fails alone."""
    items = [
        {"answer": answer, "solutions": texts, "solves": check.solves}
        for answer, texts in zip(answers, solutions, strict=True)
    ]  # fmt: skip
    if not items:
        return []
    worker = PythonCheck(
        name=check.name, kind="python", function=COMPARE_FUNCTION, timeout_s=check.timeout_s, workers=check.workers
    )
    results: list[tuple[Outcome, float | None]] = []
    for agreement, _, note in run_python_check(items, worker, "."):
        found = _read_note(note)
        if agreement is None or found is None:  # the worker timed out, died or the record could not be compared
            results.append(((None, False, note or "answers could not be compared"), None))
            continue
        rate = found["solve_rate"]
        results.append(((agreement, *_verdict(check, agreement, rate, found)), rate))
    return results


def _verdict(check: MathAnswerCheck, agreement: float, rate: float, found: dict[str, Any]) -> tuple[bool, str | None]:
    n = check.solves
    agreeing = round(agreement * n)
    shown = (
        f"majority answer {found['majority']!r} ({agreeing}/{n} solutions), solve rate {rate:.2f}"
        if agreeing > 1
        else f"no two of the {n} solutions agree (first answer {found['majority']!r}), solve rate {rate:.2f}"
    )
    if found.get("problem"):
        return False, found["problem"]
    if not found["author_is_majority"]:
        return False, f"the author's answer {found['author']!r} is not the {shown}"
    if agreement < check.min_agreement:
        return False, f"agreement {agreement:.2f} < min_agreement {check.min_agreement:g}: {shown}"
    if check.solve_rate is not None and not check.solve_rate[0] <= rate <= check.solve_rate[1]:
        low, high = check.solve_rate
        return False, f"solve rate {rate:.2f} outside [{low:g}, {high:g}]: {shown}"
    return True, shown


def _read_note(note: str | None) -> dict[str, Any] | None:
    try:
        found = json.loads(note) if note else None
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


def unbold(text: str) -> str:
    """`text` with Markdown bold unwrapped (`**73**` -> `73`), powers (`2**3`) kept."""
    return _BOLD.sub(r"\1", text)


def compare_answers(record: dict[str, Any]) -> tuple[float, str]:
    """Runs in a worker: (agreement, JSON of what was found) for one problem's author answer and solutions."""
    from math_verify import parse, verify

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


def solve_seed(check_name: str, record_ids: list[str]) -> int:
    """The seed of one engine call: the same check and records give the same solutions."""
    return names_seed("math", check_name, *record_ids)
