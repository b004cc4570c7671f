"""judge checks: a chat model grades each record by the check's rubric, its answer constrained to JSON.

The rubric (a Jinja2 template over the record's fields) is followed by one fixed instruction giving the score range;
the engine decodes under a JSON Schema {reason: string, score: integer in [min_score, max_score]}, reason first so the
model states its grounds before the number it commits to. One engine call per chunk of records (`samples` verdicts
each; greedy when 1), seeded from the check and the chunk's record ids, so scoring the same records again gives the
same verdicts. A verdict the engine cut short or that does not parse is left out of the mean; a record with no usable
verdict fails with that reason and no score.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jinja2

from polyculture.engines.base import SamplingParams
from polyculture.index.text import names_seed
from polyculture.spec import JudgeCheck
from polyculture.stages.quality_python import Outcome

if TYPE_CHECKING:
    from polyculture.engines.base import Completion, Conversation, Engine

# Records per engine call: large enough to keep the engine busy, small enough that progress and memory stay bounded.
JUDGE_CHUNK = 32
REASON_MAX_CHARS = 300
INSTRUCTION = (
    '\n\nAnswer with a JSON object only: "reason" (one short sentence) and "score" (an integer from {low} to '
    "{high}, higher is better)."
)


def verdict_schema(check: JudgeCheck) -> dict[str, Any]:
    """The JSON Schema the judge's answer is decoded under."""
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
            "score": {"type": "integer", "minimum": check.min_score, "maximum": check.max_score},
        },
        "required": ["reason", "score"],
        "additionalProperties": False,
    }


def judge_conversation(check: JudgeCheck, record: dict[str, Any]) -> Conversation:
    """The one user turn that asks for a record's verdict (a field the record lacks renders empty: the judge sees
    what is there; preflight already refused rubric names outside the record schema)."""
    template = jinja2.Environment(undefined=jinja2.ChainableUndefined).from_string(check.rubric)
    text = template.render(**record) + INSTRUCTION.format(low=check.min_score, high=check.max_score)
    return [{"role": "user", "content": text}]


def judge_outcomes(
    records: list[dict[str, Any]], record_ids: list[str], check: JudgeCheck, engine: Engine
) -> list[Outcome]:
    """Each record's mean score over its usable verdicts, with the first verdict's reason as the note."""
    outcomes: list[Outcome] = []
    params_base = {
        "temperature": 0.0 if check.samples == 1 else check.temperature,
        "max_tokens": check.max_tokens,
        "n": check.samples,
    }
    schema = verdict_schema(check)
    for start in range(0, len(records), JUDGE_CHUNK):
        chunk = records[start : start + JUDGE_CHUNK]
        ids = record_ids[start : start + JUDGE_CHUNK]
        params = SamplingParams(**params_base, seed=_seed(check.name, ids))
        completions = engine.generate([judge_conversation(check, r) for r in chunk], params, json_schema=schema)
        outcomes += [_outcome(check, samples) for samples in completions]
    return outcomes


def _outcome(check: JudgeCheck, samples: list[Completion]) -> Outcome:
    scores: list[int] = []
    reasons: list[str] = []
    problems: list[str] = []
    for completion in samples:
        parsed = parse_verdict(completion.text, check)
        if isinstance(parsed, str):
            problems.append("cut short at max_tokens" if completion.finish_reason == "length" else parsed)
        else:
            scores.append(parsed[0])
            reasons.append(parsed[1])
    if not scores:
        return None, False, f"the judge gave no usable verdict ({problems[0]})"
    mean = sum(scores) / len(scores)
    note = reasons[0][:REASON_MAX_CHARS] if len(scores) == 1 else f"scores {scores}; {reasons[0][:REASON_MAX_CHARS]}"
    return mean, None, note


def parse_verdict(text: str, check: JudgeCheck) -> tuple[int, str] | str:
    """(score, reason) from one answer, or why it cannot be used (the grammar normally makes it parse; an engine
    without structured decoding, or a cut, may not)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc.msg}"
    if not isinstance(value, dict):
        return "not a JSON object"
    score = value.get("score")
    if isinstance(score, bool) or not isinstance(score, int):
        return f"score is not an integer: {score!r}"[:200]
    if not check.min_score <= score <= check.max_score:
        return f"score {score} outside [{check.min_score}, {check.max_score}]"
    reason = value.get("reason")
    return score, reason.strip() if isinstance(reason, str) else ""


def _seed(check_name: str, record_ids: list[str]) -> int:
    return names_seed(check_name, *record_ids)
