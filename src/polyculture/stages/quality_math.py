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
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from polyculture.engines.base import SamplingParams
from polyculture.index.text import names_seed
from polyculture.spec import MathAnswerCheck, PythonCheck
from polyculture.stages.quality_python import Outcome, run_python_check

if TYPE_CHECKING:
    from polyculture.engines.base import Conversation, Engine

SOLVE_CHUNK = 16  # problems per engine call (x solves sequences)
# In its own module so the workers import math-verify (seconds) at start-up, before any record is timed.
COMPARE_FUNCTION = "polyculture.stages.quality_math_compare:compare_answers"
# A number as a problem writes it: 12, -3, 1,000, 2.5, 3/4 (a fraction only when no space splits it).
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


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
    answers = [r.get(check.answer_field) for r in records]
    stated = {
        i for i, (p, a) in enumerate(zip(problems, answers, strict=True))
        if not check.answer_in_problem and isinstance(p, str) and states_answer(p, a)
    }  # fmt: skip
    askable = [i for i, p in enumerate(problems) if isinstance(p, str) and p.strip() and i not in stated]
    solutions, tokens, seconds = solve([problems[i] for i in askable], [record_ids[i] for i in askable], check, engine)
    compared = compare_solutions([records[i].get(check.answer_field) for i in askable], solutions, check)
    by_index = dict(zip(askable, compared, strict=True))
    outcomes: list[Outcome] = []
    rates: list[float | None] = []
    for i in range(len(records)):
        unasked = (
            f"the problem states its own answer {str(answers[i]).strip()!r} (answer_in_problem: false)"
            if i in stated
            else f"{check.problem_field} is empty or not text"
        )
        outcome, rate = by_index.get(i, ((None, False, unasked), None))
        outcomes.append(outcome)
        rates.append(rate)
    return Solved(outcomes, rates, tokens, seconds)


def states_answer(problem: str, answer: Any) -> bool:
    """Whether `problem` holds a number equal to the author's `answer` (8.00 and 8, 3/4 and 0.75 are equal); an
    answer written as one digit is not looked for (it occurs in problems by chance), nor one that is not a number."""
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or re.fullmatch(r"\s*\$?-?\d\$?\s*", answer):
        return False
    value = _number(answer.strip().strip("$").replace(",", ""))
    return value is not None and any(_number(t.replace(",", "")) == value for t in _NUMBER.findall(problem))


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


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


def solve_seed(check_name: str, record_ids: list[str]) -> int:
    """The seed of one engine call: the same check and records give the same solutions."""
    return names_seed("math", check_name, *record_ids)
