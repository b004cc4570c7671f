"""math_answer checks: each problem is solved again `solves` times and keeps its place only when the majority of the
solutions agrees with the author's answer.

The solutions come from the engine in batched calls (a fresh conversation holding only the problem, seeded from the
check and the chunk's record ids, so scoring the same records again gives the same solutions). Answers are parsed
and compared with math-verify: a solution's answer is its last \\boxed{} (or its last expression), solutions are
grouped by equivalence (never by string equality), the majority group's size over `solves` is the agreement, and the
author's answer must be equivalent to the majority's. math-verify is asymmetric (`verify(gold, target)`): the
author's answer, or a group's first member, is always the gold. Its own timeouts need SIGALRM in the main thread,
so parsing and comparing run in spawned worker processes (stages.quality_python's pool: a hung parse costs that
record, never the build), with math-verify's timeouts off and the pool's per-record timer on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import TYPE_CHECKING, Any

from polyculture.engines.base import SamplingParams
from polyculture.spec import MathAnswerCheck, PythonCheck
from polyculture.stages.quality_python import run_python_check

if TYPE_CHECKING:
    from polyculture.engines.base import Engine

# (score, verdict, note): verdict None means the score is judged against the check's threshold.
Outcome = tuple[float | None, bool | None, str | None]
SOLVE_CHUNK = 16  # problems per engine call (x solves sequences)
COMPARE_FUNCTION = "polyculture.stages.quality_math:compare_answers"
_BOLD = re.compile(r"\*\*(.+?)\*\*")  # Markdown bold around an answer parses as a product with a dangling operator
_OVERLINE = "\\overline"  # a repeating decimal: math-verify 0.9.0 drops the bar, so 1.\overline{72} equals 1


def math_outcomes(
    records: list[dict[str, Any]], record_ids: list[str], check: MathAnswerCheck, engine: Engine
) -> tuple[list[Outcome], list[float | None], int]:
    """Per record: (agreement, passed, why), the solve rate, and the tokens the solutions cost."""
    problems = [r.get(check.problem_field) for r in records]
    answers = [r.get(check.answer_field) for r in records]
    askable = [i for i, p in enumerate(problems) if isinstance(p, str) and p.strip()]
    solutions: dict[int, list[str]] = {}
    tokens = 0
    params = {"temperature": check.temperature, "max_tokens": check.max_tokens, "n": check.solves}
    for start in range(0, len(askable), SOLVE_CHUNK):
        chunk = askable[start : start + SOLVE_CHUNK]
        conversations = [
            [{"role": "user", "content": check.solve_template.replace("{problem}", problems[i].strip())}] for i in chunk
        ]
        seed = _seed(check.name, [record_ids[i] for i in chunk])
        done = engine.generate(conversations, SamplingParams(**params, seed=seed))
        for i, samples in zip(chunk, done, strict=True):
            solutions[i] = [c.text for c in samples]
            tokens += sum(c.completion_tokens for c in samples) + (samples[0].prompt_tokens if samples else 0)
    compare = [
        {"answer": answers[i], "solutions": solutions[i], "solves": check.solves}
        for i in askable
    ]  # fmt: skip
    worker = PythonCheck(
        name=check.name, kind="python", function=COMPARE_FUNCTION, timeout_s=check.timeout_s, workers=check.workers
    )
    compared = dict(zip(askable, run_python_check(compare, worker, "."), strict=True)) if compare else {}
    outcomes: list[Outcome] = []
    rates: list[float | None] = []
    for i in range(len(records)):
        if i not in compared:
            outcomes.append((None, False, f"{check.problem_field} is empty or not text"))
            rates.append(None)
            continue
        agreement, _, note = compared[i]
        found = _read_note(note)
        if agreement is None or found is None:  # the worker timed out, died or the record could not be compared
            outcomes.append((None, False, note or "answers could not be compared"))
            rates.append(None)
            continue
        rate = found["solve_rate"]
        outcomes.append((agreement, *_verdict(check, agreement, rate, found)))
        rates.append(rate)
    return outcomes, rates, tokens


def _verdict(check: MathAnswerCheck, agreement: float, rate: float, found: dict[str, Any]) -> tuple[bool, str | None]:
    n = check.solves
    shown = f"majority answer {found['majority']!r} ({round(agreement * n)}/{n} solutions), solve rate {rate:.2f}"
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


def compare_answers(record: dict[str, Any]) -> tuple[float, str]:
    """Runs in a worker: (agreement, JSON of what was found) for one problem's author answer and solutions."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the pool's timer is the limit

    def parsed(text: str) -> list[Any]:
        if _OVERLINE in text:  # math-verify 0.9.0 drops \overline: 1.\overline{72} would equal 1
            return []
        return parse(_BOLD.sub(r"\1", text), parsing_timeout=None)  # type: ignore[arg-type]

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
    gold = parsed(f"${answer.strip().strip('$')}$") or parsed(answer)
    if _OVERLINE in answer:
        found["problem"] = (
            f"the author's answer {answer!r} uses \\overline, which math-verify drops (1.\\overline{{72}} = 1)"
        )
        return 0.0, json.dumps(found)
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
        found["problem"] = f"no solution gave an answer that parses ({solves} tried)"
        return 0.0, json.dumps(found)
    majority = max(groups, key=len)  # the first of the largest: a tie goes to the answer given first
    found["majority"] = str(answers[majority[0]][-1])
    found["author_is_majority"] = same(gold, answers[majority[0]])
    return len(majority) / solves, json.dumps(found)


def _seed(check_name: str, record_ids: list[str]) -> int:
    digest = hashlib.sha256("\0".join(["math", check_name, *record_ids]).encode()).digest()
    return int.from_bytes(digest[:4], "big")
