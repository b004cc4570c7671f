"""extract: read a categorical attribute that is not a record field from the record's text.

Two extractors, one result type:
- `extract_by_embedding`: the label whose embedding (optionally rendered through a template such as
  "a biography of a {label}") is nearest to the text's, by cosine. Fast, deterministic, no chat model needed.
- `extract_by_engine`: the chat model is asked which label applies, and its output is constrained to the labels with
  a JSON Schema (`{"<attribute>": {"enum": labels}}`) under greedy decoding (temperature 0).

Nothing the model writes raises: an empty text or an output that is not one of the labels is a reject with its
reason. Bad arguments (no labels, duplicates, ...) raise ValueError; engine failures propagate.

`extract_attributes` applies a build spec's `source: extract` attributes to a records frame; a record whose label
cannot be read leaves the pool as a reject (stage "extract").
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import polars as pl

from polyculture.engines.base import Completion, SamplingParams
from polyculture.spec import BuildSpec, ExtractorSpec
from polyculture.stages.embed import load_embedder
from polyculture.stages.rejects import reject, rejects_frame

if TYPE_CHECKING:
    from polyculture.engines.base import Conversation, Engine

STAGE = "extract"
EMPTY_TEXT = "empty text"
LABEL_PLACEHOLDER = "{label}"
# A system message, the text alone as the user turn: on SmolLM2-135M this scored 11/12 on obvious occupations where
# "Text: ... Which occupation does this text describe?" in one user turn scored 4/12 (it answered the first label).
DEFAULT_INSTRUCTION = "You classify texts. Answer with the {attribute} the text describes, one of: {labels}."


class TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows aligned with `texts` (stages.embed.Embedder)."""
        ...


@dataclass(frozen=True)
class Extraction:
    """Per input text: the label read (None when rejected), its score and the reason for a reject.

    `scores` is the cosine to the chosen label for the embedding extractor; for the engine extractor the model's
    probability of the chosen label renormalised over all labels when asked for (`probabilities=True`), else None.
    """

    labels: list[str | None]
    scores: list[float | None]
    rejects: list[str | None]

    def __post_init__(self) -> None:
        if not len(self.labels) == len(self.scores) == len(self.rejects):
            raise ValueError("labels, scores and rejects must have one entry per text")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_rejected(self) -> int:
        return sum(reason is not None for reason in self.rejects)


def extract_by_embedding(
    texts: Sequence[str | None],
    labels: Sequence[str],
    embedder: TextEncoder,
    *,
    label_template: str = LABEL_PLACEHOLDER,
    min_score: float | None = None,
) -> Extraction:
    """The label nearest to each text by cosine of embeddings; labels are embedded as `label_template` rendered.

    With `min_score`, a text whose best cosine is below it is rejected rather than given a label.
    """
    label_list = _check_labels(labels)
    text_list = _check_texts(texts)
    if LABEL_PLACEHOLDER not in label_template:
        raise ValueError(f"label_template must contain {LABEL_PLACEHOLDER}, got {label_template!r}")
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise ValueError(f"min_score is a cosine between -1 and 1, got {min_score}")

    out_labels: list[str | None] = [None] * len(text_list)
    scores: list[float | None] = [None] * len(text_list)
    rejects: list[str | None] = [None] * len(text_list)
    todo: list[int] = []
    for i, text in enumerate(text_list):
        reason = _text_problem(text)
        if reason is None:
            todo.append(i)
        else:
            rejects[i] = reason
    if not todo:
        return Extraction(out_labels, scores, rejects)

    label_vectors = np.asarray(embedder.encode([label_template.replace(LABEL_PLACEHOLDER, x) for x in label_list]))
    text_vectors = np.asarray(embedder.encode([text_list[i] for i in todo]))  # type: ignore[misc]
    similarity = text_vectors @ label_vectors.T  # rows are L2-normalised: dot product is cosine
    best = similarity.argmax(axis=1)
    for row, i in enumerate(todo):
        score = float(similarity[row, best[row]])
        label = label_list[int(best[row])]
        if min_score is not None and score < min_score:
            rejects[i] = f"no label close enough: best '{label}' at cosine {score:.3f} < min_score {min_score}"
        else:
            out_labels[i], scores[i] = label, score
    return Extraction(out_labels, scores, rejects)


def extract_by_engine(
    texts: Sequence[str | None],
    labels: Sequence[str],
    engine: Engine,
    *,
    attribute: str,
    instruction: str | None = None,
    batch_size: int = 32,
    max_text_chars: int | None = 4000,
    probabilities: bool = False,
) -> Extraction:
    """Ask the chat model which label applies to each text; its answer is constrained to the labels.

    The prompt is `instruction` (default `DEFAULT_INSTRUCTION`) as the system message and the text as the user turn;
    "{attribute}" and "{labels}" in the instruction are replaced by the attribute name and the comma-separated labels. Decoding is greedy (temperature 0,
    supported by the transformers, vLLM and OpenAI-compatible engines) under the JSON Schema of `answer_schema`.
    Texts longer than `max_text_chars` are cut to that length (a prompt beyond the model's context is an engine error).
    Identical texts are asked once.

    With `probabilities=True`, each chosen label is scored by the model's probability of it renormalised over all
    labels (`engine.sequence_logprobs`; one extra scoring pass per text; not available on the OpenAI engine). It can
    be low: constrained greedy decoding commits token by token, so it may land on a label the model rates unlikely as
    a whole (measured: a pianist text read as 'farmer' at p=0.02), which makes the score a useful confidence signal.
    """
    label_list = _check_labels(labels)
    text_list = _check_texts(texts)
    if not isinstance(attribute, str) or not attribute.strip():
        raise ValueError("attribute must be a non-empty name, e.g. 'occupation'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_text_chars is not None and max_text_chars < 1:
        raise ValueError(f"max_text_chars must be at least 1 (or None for no limit), got {max_text_chars}")
    question = (DEFAULT_INSTRUCTION if instruction is None else instruction).replace("{attribute}", attribute)
    question = question.replace("{labels}", ", ".join(label_list))
    if not question.strip():
        raise ValueError("instruction must not be empty")

    out_labels: list[str | None] = [None] * len(text_list)
    scores: list[float | None] = [None] * len(text_list)
    rejects: list[str | None] = [None] * len(text_list)
    unique: dict[str, list[int]] = {}  # text -> the positions that hold it
    for i, text in enumerate(text_list):
        reason = _text_problem(text)
        if reason is None:
            unique.setdefault(text, []).append(i)  # type: ignore[arg-type]
        else:
            rejects[i] = reason
    if not unique:
        return Extraction(out_labels, scores, rejects)

    schema = answer_schema(attribute, label_list)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=_answer_token_bound(attribute, label_list), n=1)
    distinct = list(unique)
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        conversations = [_conversation(text, question, max_text_chars) for text in chunk]
        outputs = engine.generate(conversations, params, json_schema=schema)
        if len(outputs) != len(chunk):
            raise RuntimeError(f"engine {engine.name} returned {len(outputs)} results for {len(chunk)} prompts")
        for text, conversation, row in zip(chunk, conversations, outputs, strict=True):
            label, reason = parse_answer(row[0] if row else None, attribute, label_list)
            score = None
            if label is not None and probabilities:
                score = _label_probability(engine, conversation, attribute, label_list, label)
            for i in unique[text]:
                out_labels[i], scores[i], rejects[i] = label, score, reason
    return Extraction(out_labels, scores, rejects)


def answer_schema(attribute: str, labels: Sequence[str]) -> dict[str, Any]:
    """The JSON Schema the engine's answer is constrained to: one required key whose value is one of the labels.

    Accepted by xgrammar (transformers engine, vLLM structured outputs) and strict OpenAI structured outputs
    (every property required, no additional properties).
    """
    return {
        "type": "object",
        "properties": {attribute: {"type": "string", "enum": list(labels)}},
        "required": [attribute],
        "additionalProperties": False,
    }


def parse_answer(completion: Completion | None, attribute: str, labels: Sequence[str]) -> tuple[str | None, str | None]:
    """(label, None) for a valid answer, else (None, the reason); never raises."""
    if completion is None:
        return None, "engine returned no completion"
    text = completion.text
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        cut = " (cut at max_tokens)" if completion.finish_reason == "length" else ""
        return None, f"unparseable output{cut}: {text[:120]!r}"
    if not isinstance(value, dict) or attribute not in value:
        return None, f"no '{attribute}' key in output: {text[:120]!r}"
    label = value[attribute]
    if not isinstance(label, str) or label not in labels:
        return None, f"{label!r} is not one of the labels"
    return label, None


def extraction_frame(extraction: Extraction, attribute: str) -> pl.DataFrame:
    """Columns `<attribute>` (label or null), `<attribute>_score` and `<attribute>_reject`, one row per text."""
    return pl.DataFrame(
        {
            attribute: pl.Series(extraction.labels, dtype=pl.String),
            f"{attribute}_score": pl.Series(extraction.scores, dtype=pl.Float64),
            f"{attribute}_reject": pl.Series(extraction.rejects, dtype=pl.String),
        }
    )


# -- helpers ---------------------------------------------------------------------------------------------------------


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of labels, not the single string {labels!r}")
    label_list = list(labels)
    if not label_list:
        raise ValueError("labels must not be empty: give the values the attribute can take")
    for label in label_list:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"every label must be a non-empty string, got {label!r}")
    duplicates = sorted(label for label, count in Counter(label_list).items() if count > 1)
    if duplicates:
        raise ValueError(f"labels must be distinct; repeated: {duplicates}")
    return label_list


def _check_texts(texts: Sequence[str | None]) -> list[str | None]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of texts, not a single string")
    return list(texts)


def _text_problem(text: object) -> str | None:
    if text is None or (isinstance(text, str) and not text.strip()):
        return EMPTY_TEXT
    if not isinstance(text, str):
        return f"not text: {type(text).__name__}"
    return None


def _conversation(text: str, question: str, max_text_chars: int | None) -> Conversation:
    if max_text_chars is not None and len(text) > max_text_chars:
        text = text[:max_text_chars]
    return [{"role": "system", "content": question}, {"role": "user", "content": text.strip()}]


def _answer_json(attribute: str, label: str) -> str:
    # The form xgrammar writes without free whitespace: {"occupation": "doctor"}.
    return json.dumps({attribute: label}, ensure_ascii=False)


def _answer_token_bound(attribute: str, labels: list[str]) -> int:
    # A token covers at least one byte, so the longest answer's byte length (escaped or not) bounds its token count;
    # the slack covers whitespace a server may allow and the end-of-turn token.
    longest = max(
        max(len(_answer_json(attribute, x).encode()), len(json.dumps({attribute: x}, ensure_ascii=True)))
        for x in labels
    )
    return longest + 16


def _label_probability(
    engine: Engine, conversation: Conversation, attribute: str, labels: list[str], chosen: str
) -> float | None:
    """p(chosen) / sum over labels of p(label), from whole-answer log-probs; None where a score is not finite."""
    logprobs = np.asarray(engine.sequence_logprobs(conversation, [_answer_json(attribute, x) for x in labels]))
    if not np.all(np.isfinite(logprobs)):
        return None
    shifted = np.exp(logprobs - logprobs.max())
    probability = float(shifted[labels.index(chosen)] / shifted.sum())
    return probability if math.isfinite(probability) else None


@dataclass(frozen=True)
class ExtractResult:
    """The records whose extract attributes could be read (columns filled), their embeddings, and the rest as rejects."""

    records: pl.DataFrame
    embeddings: np.ndarray
    rejects: pl.DataFrame


def extract_attributes(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    spec: BuildSpec,
    *,
    engine: Engine | None = None,
    embedder: Any = None,
    known: dict[tuple[str, str], tuple[str | None, str | None]] | None = None,
) -> ExtractResult:
    """Fill every `source: extract` attribute's column. `known` maps (attribute, record_id) to (label, reject reason)
    from earlier calls, so top-up rounds only read new records."""
    attributes = spec.extract_attributes
    if not attributes or records.height == 0:
        return ExtractResult(records, embeddings, rejects_frame([]))
    known = {} if known is None else known
    record_ids = records["record_id"].cast(pl.String).to_list()
    call_ids = records["call_id"].cast(pl.String).to_list()
    failed: dict[int, str] = {}
    columns: dict[str, list[str | None]] = {}
    for attr in attributes:
        extractor = attr.extractor or ExtractorSpec()
        texts = _texts(records, extractor.from_field)
        todo = [i for i, rid in enumerate(record_ids) if (attr.name, rid) not in known]
        if todo:
            batch = [texts[i] for i in todo]
            if extractor.method == "engine":
                if engine is None:
                    raise ValueError(f"attributes.{attr.name}: extractor 'engine' needs the build's engine")
                got = extract_by_engine(batch, attr.values, engine, attribute=attr.name, instruction=extractor.instruction)
            else:
                model = embedder or load_embedder(spec.dedup.embedding_model, spec.base_dir)
                got = extract_by_embedding(
                    batch, attr.values, model, label_template=extractor.label_template, min_score=extractor.min_score
                )
            for i, label, why in zip(todo, got.labels, got.rejects, strict=True):
                known[(attr.name, record_ids[i])] = (label, why)
        values = []
        for i, rid in enumerate(record_ids):
            label, why = known[(attr.name, rid)]
            values.append(label)
            if label is None and i not in failed:
                failed[i] = f"{attr.name}: {why or 'no label read'}"
        columns[attr.name] = values
    filled = records.with_columns([pl.Series(name, vals, dtype=pl.String) for name, vals in columns.items()])
    keep = np.array([i not in failed for i in range(records.height)], dtype=bool)
    rejects = [reject(record_ids[i], call_ids[i], STAGE, "unreadable_attribute", why) for i, why in sorted(failed.items())]
    return ExtractResult(
        records=filled.filter(pl.Series(keep)),
        embeddings=np.ascontiguousarray(np.asarray(embeddings)[keep], dtype=np.float32),
        rejects=rejects_frame(rejects),
    )


def _texts(records: pl.DataFrame, from_field: str | None) -> list[str]:
    """The text an extractor reads: a record field, else the record's embedded text."""
    if from_field is None:
        return [t or "" for t in records["text"].to_list()]
    out = []
    for raw in records["record_json"].to_list():
        value = json.loads(raw).get(from_field) if raw else None
        out.append("" if value is None else str(value))
    return out
