"""quality: score every record by the spec's checks; a record failing a gated check leaves the pool as a reject.

Runs after dedup and before extract and rebalance, on every round's pool, so only passing records count toward a
quota and short cells are refilled by top-up rounds. Six kinds (spec.quality):
- fluency: the mean per-token log-probability of a text under the build's model (`engine.sequence_logprobs`, batched,
  after one fixed neutral request, so the score is about the text and not about the prompt that asked for it); passes
  at or above `threshold`, or at or above the `quantile` of this pass's scores;
- prose: Gopher's rules for text that reads as prose and a repetition bound (stages.quality_prose);
- math_answer: the problem solved again several times, the majority answer (math-verify) must be the author's
  (stages.quality_math; the solve rate is cached beside the score and published as `_solve_rate`);
- judge: a chat model grades the record by a rubric, answering JSON under a schema (stages.quality_judge); the build's
  engine, or the check's own model's engine;
- expression: a formula in the record, evaluated safely, equal to the value it claims (stages.quality_expression);
- python: a user function in worker processes with a per-record timeout (stages.quality_python).
Every check's score becomes the column `_quality_<name>` (null where the record could not be scored) and `_quality`
says whether the record passed every check, gated or not (rebalancing prefers those). Scores are cached per (check,
record id) in `known`: later rounds and a resumed run only score new records; pass or fail is decided again on each
pass (a quantile moves as the pool grows). The checks that spend engine time per record (math_answer, judge) skip a
record an earlier gate failed for good (not a quantile gate): list the cheap checks first.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from polyculture.engines.base import EngineError
from polyculture.spec import (
    SOLVE_RATE_COLUMN,
    ExpressionCheck,
    FluencyCheck,
    JudgeCheck,
    MathAnswerCheck,
    ProseCheck,
    PythonCheck,
    QualityCheck,
)
from polyculture.stages.quality_expression import check_expression
from polyculture.stages.quality_judge import judge_outcomes
from polyculture.stages.quality_math import Solved, math_outcomes
from polyculture.stages.quality_prose import prose_outcome
from polyculture.stages.quality_python import Outcome, run_python_check
from polyculture.stages.rejects import reject, rejects_frame

if TYPE_CHECKING:
    from collections.abc import Mapping

    from polyculture.engines.base import Conversation, Engine

STAGE = "quality"
PASSED_COLUMN = "_quality"
# Scored after this request: any neutral one does; it only has to stay fixed so scores compare across records.
FLUENCY_CONVERSATION: Conversation = [{"role": "user", "content": "Write a short text."}]
# Longer texts are scored on their start (the model's context and memory are bounded; a text's start shows its fluency).
FLUENCY_MAX_CHARS = 4000
# Texts per engine call: count x longest text in characters stays under this, so the logits of one call stay small
# (CPU memory: 8000 characters are ~2000 tokens x 49k vocabulary x 4 bytes = 400 MB on SmolLM2).
FLUENCY_BATCH_CHARS = 8000
SCORES_SCHEMA = {"record_id": pl.String, "check": pl.String, "score": pl.Float64, "passed": pl.Boolean, "note": pl.String}
CACHE_SCHEMA = {"check": pl.String, "record_id": pl.String, "score": pl.Float64, "verdict": pl.Boolean, "note": pl.String}

# (check name, record id) -> (score, verdict, note): what scoring found, before any threshold.
ScoreCache = dict[tuple[str, str], Outcome]


@dataclass(frozen=True)
class CheckCounts:
    """One check over one pass: records scored, passing, failing (rejected when gated), unscorable, and the threshold
    used (a fluency quantile resolved to its log-prob; None for bool verdicts)."""

    name: str
    kind: str
    gate: bool
    checked: int
    passed: int
    failed: int
    unscored: int
    threshold: float | None
    tokens: int = 0  # engine tokens this pass spent scoring (math_answer solutions: generated + prompts)
    seconds: float = 0.0  # engine seconds this pass spent scoring (math_answer solutions)


@dataclass(frozen=True)
class QualityResult:
    """The records that passed the gated checks (with `_quality_<name>` score columns and `_quality`), their
    embeddings, the rest as rejects (stage quality, reason failed_check, the checks and scores in the detail), every
    record's score per check (`scores`: record_id, check, score, passed, note) and per-check counts."""

    records: pl.DataFrame
    embeddings: np.ndarray
    rejects: pl.DataFrame
    scores: pl.DataFrame
    counts: tuple[CheckCounts, ...]
    solve_rates: dict[str, float | None] = field(default_factory=dict)  # a math_answer check's, by record id


def quality(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    checks: list[QualityCheck],
    *,
    engine: Engine | None = None,
    judge_engines: Mapping[str, Engine] | None = None,
    base_dir: Path | str = ".",
    known: ScoreCache | None = None,
) -> QualityResult:
    """Score `records` by `checks` (the spec's quality section); `engine` (the build's) scores fluency and the judges
    without a model of their own, `judge_engines` holds the others' by check name, `base_dir` is where a python check's
    module is found (the spec's folder), `known` the scores of earlier passes (filled in place)."""
    embeddings = np.asarray(embeddings)
    if embeddings.shape[0] != records.height:
        raise ValueError(f"records and embeddings are misaligned: {records.height} records, {embeddings.shape[0]} rows")
    if not checks:
        return QualityResult(records, embeddings, rejects_frame([]), pl.DataFrame(schema=SCORES_SCHEMA), ())
    known = {} if known is None else known
    record_ids = records["record_id"].cast(pl.String).to_list()
    parsed: list[dict[str, Any]] | None = None
    columns: dict[str, list[float | None]] = {}
    passed_all = [True] * records.height
    failures: dict[int, list[str]] = {}
    score_rows: list[dict[str, Any]] = []
    counts = []
    spent: dict[str, tuple[int, float]] = {}  # check name -> (tokens, engine seconds) of this pass
    solve_rates: dict[str, float | None] = {}
    settled = [False] * records.height  # failed a gate whose verdict no later pass can change
    for check in checks:
        # The engine-costly checks skip records an earlier gate has already failed for good: no solving or judging
        # is spent on a record that cannot pass (it gets no score row for the check).
        eligible = [i for i in range(records.height) if not (_costly(check) and settled[i])]
        todo = [i for i in eligible if (check.name, record_ids[i]) not in known]
        if todo:
            if parsed is None and not (isinstance(check, FluencyCheck | ProseCheck) and check.field is None):
                parsed = [_parse(raw) for raw in records["record_json"].to_list()]
            scorer = (judge_engines or {}).get(check.name, engine)
            if isinstance(check, MathAnswerCheck):
                solved = _solve(check, records, parsed, todo, scorer)
                found, spent[check.name] = solved.outcomes, (solved.tokens, solved.seconds)
                for i, rate in zip(todo, solved.solve_rates, strict=True):
                    known[(solve_rate_key(check.name), record_ids[i])] = (rate, None, None)
            else:
                found = _score(check, records, parsed, todo, scorer, Path(base_dir))
            for i, outcome in zip(todo, found, strict=True):
                known[(check.name, record_ids[i])] = outcome
        outcomes = [known[(check.name, record_ids[i])] for i in eligible]
        threshold = _threshold(check, outcomes)
        verdicts = [_judge(check, outcome, threshold) for outcome in outcomes]
        score_of = {i: outcome[0] for i, outcome in zip(eligible, outcomes, strict=True)}
        columns[check.score_column] = [score_of.get(i) for i in range(records.height)]
        if isinstance(check, MathAnswerCheck):
            rates = [known.get((solve_rate_key(check.name), record_ids[i]), (None,))[0] for i in eligible]
            solve_rates = {record_ids[i]: rate for i, rate in zip(eligible, rates, strict=True)}
            columns[SOLVE_RATE_COLUMN] = [solve_rates.get(rid) for rid in record_ids]
        for i, outcome, (ok, why) in zip(eligible, outcomes, verdicts, strict=True):
            score = outcome[0]
            note = why if not ok else outcome[2]  # a pass keeps what the check said (a judge's reason)
            score_rows.append({"record_id": record_ids[i], "check": check.name, "score": score, "passed": ok, "note": note})
            if not ok:
                passed_all[i] = False
                if check.gate:
                    settled[i] = settled[i] or not _moving_threshold(check)
                    shown = "no score" if score is None else f"score {score:.4g}"
                    failures.setdefault(i, []).append(f"{check.name}: {why} ({shown})")
        counts.append(
            CheckCounts(
                name=check.name, kind=check.kind, gate=check.gate, checked=len(outcomes),
                passed=sum(ok for ok, _ in verdicts), failed=sum(not ok for ok, _ in verdicts),
                unscored=sum(o[0] is None for o in outcomes), threshold=threshold,
                tokens=spent.get(check.name, (0, 0.0))[0], seconds=round(spent.get(check.name, (0, 0.0))[1], 3),
            )
        )  # fmt: skip
    scored = records.with_columns(
        [pl.Series(name, values, dtype=pl.Float64) for name, values in columns.items()]
        + [pl.Series(PASSED_COLUMN, passed_all, dtype=pl.Boolean)]
    )
    keep = np.array([i not in failures for i in range(records.height)], dtype=bool)
    call_ids = records["call_id"].cast(pl.String).to_list()
    rejects = [
        reject(record_ids[i], call_ids[i], STAGE, "failed_check", "; ".join(why)) for i, why in sorted(failures.items())
    ]
    return QualityResult(
        records=scored.filter(pl.Series(keep)),
        embeddings=np.ascontiguousarray(embeddings[keep], dtype=np.float32),
        rejects=rejects_frame(rejects),
        scores=pl.DataFrame(score_rows, schema=SCORES_SCHEMA),
        counts=tuple(counts),
        solve_rates=solve_rates,
    )


def _score(
    check: QualityCheck,
    records: pl.DataFrame,
    parsed: list[dict[str, Any]] | None,
    todo: list[int],
    engine: Engine | None,
    base_dir: Path,
) -> list[Outcome]:
    if isinstance(check, FluencyCheck):
        if engine is None:
            raise ValueError(f"quality check '{check.name}' (fluency) needs the build's engine")
        if check.field is None:
            texts: list[Any] = [records["text"][i] for i in todo]
        else:
            texts = [parsed[i].get(check.field) for i in todo]  # type: ignore[index]
        return fluency_outcomes(texts, engine, field=check.field or "text")
    if isinstance(check, ProseCheck):
        field = check.field or "text"
        values = [records["text"][i] if check.field is None else parsed[i].get(check.field) for i in todo]  # type: ignore[index]
        return [prose_outcome(value, check, field=field) for value in values]
    assert parsed is not None
    if isinstance(check, JudgeCheck):
        if engine is None:
            raise ValueError(f"quality check '{check.name}' (judge) needs an engine")
        ids = records["record_id"].cast(pl.String).to_list()
        return judge_outcomes([parsed[i] for i in todo], [ids[i] for i in todo], check, engine)
    if isinstance(check, ExpressionCheck):
        results = [check_expression(parsed[i], check) for i in todo]
        return [(1.0 if ok else 0.0, ok, why) for ok, why in results]
    assert isinstance(check, PythonCheck)
    return run_python_check([parsed[i] for i in todo], check, base_dir)


def solve_rate_key(check_name: str) -> str:
    """The score cache's key for a math_answer check's solve rates (cached beside its agreement scores)."""
    return f"{check_name}{SOLVE_RATE_COLUMN}"


def _solve(
    check: MathAnswerCheck, records: pl.DataFrame, parsed: list[dict[str, Any]] | None, todo: list[int],
    engine: Engine | None,
) -> Solved:  # fmt: skip
    if engine is None:
        raise ValueError(f"quality check '{check.name}' (math_answer) needs the build's engine")
    assert parsed is not None
    ids = records["record_id"].cast(pl.String).to_list()
    return math_outcomes([parsed[i] for i in todo], [ids[i] for i in todo], check, engine)


def fluency_outcomes(texts: list[Any], engine: Engine, *, field: str = "text") -> list[Outcome]:
    """Each text's mean token log-prob (verdict None: the threshold decides); an empty or non-text value fails, and so
    does a text the engine cannot score on its own (its reason kept) while others score."""
    outcomes: list[Outcome] = [(None, False, f"{field} is empty")] * len(texts)
    usable = []
    for i, text in enumerate(texts):
        if isinstance(text, str) and text.strip():
            usable.append(i)
        elif text is not None and not isinstance(text, str):
            outcomes[i] = (None, False, f"{field} is a {type(text).__name__}, not text")
    scores = fluency_scores([texts[i] for i in usable], engine)
    for i, score in zip(usable, scores, strict=True):
        if isinstance(score, str):
            outcomes[i] = (None, False, f"the model could not score it: {score[:200]}")
        else:
            outcomes[i] = (score, None, None) if math.isfinite(score) else (None, False, "the model gave no finite score")
    return outcomes


def fluency_scores(texts: list[str], engine: Engine) -> list[float | str]:
    """Mean per-token log-probability of each text under `engine`'s model, in calls sized by FLUENCY_BATCH_CHARS
    (texts of similar length together, so little is padding). Texts are stripped: an answer never starts with
    whitespace, and a leading space would merge with the chat template's last token. A call the engine refuses (its
    EngineError: a text its chat template tokenises across the prompt's edge) is tried text by text; a text refused
    alone gets the error's message instead of a score. Other errors (the engine broken) propagate."""
    cut = [t.strip()[:FLUENCY_MAX_CHARS] for t in texts]
    order = sorted(range(len(cut)), key=lambda i: len(cut[i]))
    scores: list[float | str] = [math.nan] * len(cut)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(cut[order[end]]) <= FLUENCY_BATCH_CHARS:
            end += 1
        batch = order[start:end]
        try:
            got: list[float | str] = list(
                engine.sequence_logprobs(FLUENCY_CONVERSATION, [cut[i] for i in batch], mean_per_token=True)
            )
        except EngineError:
            got = [_score_alone(engine, cut[i]) for i in batch]
        for i, score in zip(batch, got, strict=True):
            scores[i] = score if isinstance(score, str) else float(score)
        start = end
    return scores


def _score_alone(engine: Engine, text: str) -> float | str:
    try:
        return float(engine.sequence_logprobs(FLUENCY_CONVERSATION, [text], mean_per_token=True)[0])
    except EngineError as exc:
        return str(exc)


def _costly(check: QualityCheck) -> bool:
    """Checks that spend engine time per record (solutions, verdicts)."""
    return isinstance(check, MathAnswerCheck | JudgeCheck)


def _moving_threshold(check: QualityCheck) -> bool:
    """A quantile threshold is resolved anew each pass over a growing pool: a record it fails now may pass later."""
    return isinstance(check, FluencyCheck) and check.quantile is not None


def _threshold(check: QualityCheck, outcomes: list[Outcome]) -> float | None:
    if isinstance(check, FluencyCheck) and check.quantile is not None:
        scores = [s for s, verdict, _ in outcomes if s is not None and verdict is None]
        return float(np.quantile(scores, check.quantile)) if scores else None
    if isinstance(check, FluencyCheck | JudgeCheck | PythonCheck):
        return check.threshold
    return None


def _judge(check: QualityCheck, outcome: Outcome, threshold: float | None) -> tuple[bool, str | None]:
    """(passed, why not) for one record: its own verdict where it has one, else its score against the threshold."""
    score, verdict, note = outcome
    if verdict is not None:
        return verdict, None if verdict else (note or "failed")
    if score is None:
        return False, note or "no score"
    if threshold is None:
        return False, f"returned a number but quality check '{check.name}' has no threshold"
    if score >= threshold:
        return True, None
    if isinstance(check, FluencyCheck):
        where = f"the {check.quantile:g} quantile of this pass" if check.quantile is not None else "threshold"
        return False, f"mean token log-prob {score:.3f} < {threshold:.3f} ({where})"
    return False, f"score {score:.4g} < threshold {threshold:g}" + (f": {note}" if note else "")


def _parse(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def quality_checks_frame(counts: tuple[CheckCounts, ...]) -> pl.DataFrame:
    """One row per check (CheckCounts' fields), for the run folder (quality_checks.parquet)."""
    schema = {"name": pl.String, "kind": pl.String, "gate": pl.Boolean, "checked": pl.Int64, "passed": pl.Int64,
              "failed": pl.Int64, "unscored": pl.Int64, "threshold": pl.Float64, "tokens": pl.Int64,
              "seconds": pl.Float64}  # fmt: skip
    return pl.DataFrame([asdict(c) for c in counts], schema=schema)


def cache_frame(known: ScoreCache) -> pl.DataFrame:
    """The score cache as rows, for the run folder (quality_scores.parquet)."""
    rows = [
        {"check": name, "record_id": rid, "score": score, "verdict": verdict, "note": note}
        for (name, rid), (score, verdict, note) in sorted(known.items())
    ]
    return pl.DataFrame(rows, schema=CACHE_SCHEMA)


def cache_from_frame(frame: pl.DataFrame) -> ScoreCache:
    """The score cache a run folder kept (cache_frame's rows)."""
    return {(r["check"], r["record_id"]): (r["score"], r["verdict"], r["note"]) for r in frame.iter_rows(named=True)}
