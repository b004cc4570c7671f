"""Attribute extraction from record text: the real MiniLM embedder and the real SmolLM2 through the transformers engine."""

from __future__ import annotations

import jsonschema
import numpy as np
import polars as pl
import pytest

from polyculture.engines.base import Completion
from polyculture.engines.factory import create_engine
from polyculture.spec import ModelSpec
from polyculture.stages.extract import (
    EMPTY_TEXT,
    Extraction,
    answer_schema,
    extract_by_embedding,
    extract_by_engine,
    extraction_frame,
    parse_answer,
)

LABELS = ["doctor", "farmer", "musician"]
DOCTOR = "Dr. Maria Lopez works long shifts at the hospital, diagnosing patients and prescribing medicine."
FARMER = "John grows wheat and corn on his family farm and milks the cows every morning before sunrise."
MUSICIAN = "Aiko plays the violin in the city orchestra and composes songs for her band."
OBVIOUS = [DOCTOR, FARMER, MUSICIAN]


@pytest.fixture(scope="module")
def engine():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_torch_thread fixture, but for the whole module (2 shared cores)
    engine = create_engine(ModelSpec(name="smollm2-135m-instruct", engine="transformers"), seed=0)
    yield engine
    engine.close()
    torch.set_num_threads(before)


# -- embedding ---------------------------------------------------------------------------------------------------------


def test_embedding_reads_obvious_cases_with_cosine_scores(embedder, private_cache):
    result = extract_by_embedding(OBVIOUS, LABELS, embedder)
    assert result.labels == LABELS
    assert result.rejects == [None, None, None] and result.n_rejected == 0 and len(result) == 3
    # The score is the cosine between the text and the chosen label, as the embedder sees them.
    cosines = embedder.encode(OBVIOUS) @ embedder.encode(LABELS).T
    assert result.scores == pytest.approx(np.diag(cosines).tolist(), abs=1e-5)
    assert all(0 < s <= 1 for s in result.scores)


def test_embedding_renders_labels_through_the_template(embedder, private_cache):
    template = "a biography of a {label}"
    result = extract_by_embedding(OBVIOUS, LABELS, embedder, label_template=template)
    assert result.labels == LABELS
    rendered = embedder.encode([template.replace("{label}", x) for x in LABELS])
    expected = np.diag(embedder.encode(OBVIOUS) @ rendered.T)
    assert result.scores == pytest.approx(expected.tolist(), abs=1e-5)
    plain = extract_by_embedding(OBVIOUS, LABELS, embedder)
    assert result.scores != pytest.approx(plain.scores, abs=1e-3)  # the template changed what was compared


def test_embedding_rejects_empty_text_and_low_scores(embedder, private_cache):
    result = extract_by_embedding(["", None, "   \n", FARMER], LABELS, embedder)
    assert result.labels == [None, None, None, "farmer"]
    assert result.rejects == [EMPTY_TEXT, EMPTY_TEXT, EMPTY_TEXT, None]
    assert result.scores[:3] == [None, None, None] and result.scores[3] > 0
    assert extract_by_embedding([None, ""], LABELS, embedder).rejects == [EMPTY_TEXT, EMPTY_TEXT]
    assert extract_by_embedding([], LABELS, embedder) == Extraction([], [], [])

    strict = extract_by_embedding([FARMER], LABELS, embedder, min_score=0.99)
    assert strict.labels == [None] and strict.scores == [None]
    assert "best 'farmer'" in strict.rejects[0] and "min_score 0.99" in strict.rejects[0]


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "labels must not be empty"),
        (["doctor", "farmer", "doctor"], {}, ValueError, r"distinct; repeated: \['doctor'\]"),
        (["doctor", " "], {}, ValueError, "non-empty string"),
        (["doctor", 3], {}, ValueError, "non-empty string"),
        ("doctor", {}, TypeError, "not the single string"),
        (LABELS, {"label_template": "a biography of a {occupation}"}, ValueError, r"must contain \{label\}"),
        (LABELS, {"min_score": 2.0}, ValueError, "min_score"),
    ],
)
def test_embedding_refuses_bad_arguments(embedder, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        extract_by_embedding(OBVIOUS, labels, embedder, **kwargs)
    with pytest.raises(TypeError, match="not a single string"):
        extract_by_embedding(DOCTOR, LABELS, embedder)


# -- engine ------------------------------------------------------------------------------------------------------------


def test_engine_answers_only_allowed_labels(engine):
    texts = [
        DOCTOR,
        "",
        FARMER,
        MUSICIAN,
        "The weather was grey all week.",  # no label fits: still one of the labels, never free text
        FARMER,  # asked once, answered for both positions
        None,
    ]
    result = extract_by_engine(texts, LABELS, engine, attribute="occupation", batch_size=2)
    assert len(result) == len(texts)
    assert result.rejects[1] == EMPTY_TEXT and result.rejects[6] == EMPTY_TEXT
    assert result.labels[1] is None and result.labels[6] is None
    for i in (0, 2, 3, 4, 5):
        assert result.rejects[i] is None and result.labels[i] in LABELS
    assert result.labels[2] == result.labels[5]
    assert result.scores == [None] * len(texts)  # probabilities were not asked for
    # The 135M model is weak (it leans to the first label); these two obvious ones it reads right.
    assert result.labels[2] == "farmer" and result.labels[3] == "musician"


def test_engine_constraint_holds_for_awkward_labels(engine):
    labels = ['rock "n" roll', "música clásica", "hip-hop\\rap"]  # quotes, non-ASCII, a backslash: JSON escapes
    texts = ["She sings opera with the national symphony.", "He raps over beats at night.", DOCTOR]
    result = extract_by_engine(texts, labels, engine, attribute="music genre")
    assert result.rejects == [None, None, None]
    assert all(label in labels for label in result.labels)
    jsonschema.Draft202012Validator.check_schema(answer_schema("music genre", labels))


def test_engine_probabilities_are_renormalised_over_labels(engine):
    result = extract_by_engine([FARMER, ""], LABELS, engine, attribute="occupation", probabilities=True)
    assert result.labels == ["farmer", None] and result.rejects == [None, EMPTY_TEXT]
    assert 1 / len(LABELS) < result.scores[0] <= 1 and result.scores[1] is None


def test_engine_refuses_bad_arguments(engine):
    with pytest.raises(ValueError, match="attribute must be a non-empty name"):
        extract_by_engine(OBVIOUS, LABELS, engine, attribute=" ")
    with pytest.raises(ValueError, match="batch_size"):
        extract_by_engine(OBVIOUS, LABELS, engine, attribute="occupation", batch_size=0)
    with pytest.raises(ValueError, match="distinct"):
        extract_by_engine(OBVIOUS, ["doctor", "doctor"], engine, attribute="occupation")
    with pytest.raises(ValueError, match="labels must not be empty"):
        extract_by_engine(OBVIOUS, [], engine, attribute="occupation")
    with pytest.raises(ValueError, match="instruction must not be empty"):
        extract_by_engine(OBVIOUS, LABELS, engine, attribute="occupation", instruction="")


def _completion(text: str, finish_reason: str = "stop") -> Completion:
    return Completion(text=text, prompt_tokens=10, completion_tokens=5, finish_reason=finish_reason)


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        (_completion('{"occupation": "doctor"}'), None),
        (_completion('{"occupation": "pilot"}'), "'pilot' is not one of the labels"),
        (_completion('{"occupation": 3}'), "3 is not one of the labels"),
        (_completion('{"job": "doctor"}'), "no 'occupation' key"),
        (_completion('["doctor"]'), "no 'occupation' key"),
        (_completion("The occupation is doctor."), "unparseable output: 'The occupation"),
        (_completion('{"occupation": "doc', "length"), "unparseable output (cut at max_tokens)"),
        (None, "engine returned no completion"),
    ],
)
def test_unusable_answers_are_rejects_with_reasons(completion, reason):
    label, why = parse_answer(completion, "occupation", LABELS)
    if reason is None:
        assert (label, why) == ("doctor", None)
    else:
        assert label is None and why.startswith(reason)


def test_extraction_frame():
    frame = extraction_frame(Extraction(["doctor", None], [0.5, None], [None, EMPTY_TEXT]), "occupation")
    assert frame.columns == ["occupation", "occupation_score", "occupation_reject"]
    assert frame.dtypes == [pl.String, pl.Float64, pl.String]
    assert frame.rows() == [("doctor", 0.5, None), (None, None, EMPTY_TEXT)]
    empty = extraction_frame(Extraction([], [], []), "occupation")
    assert empty.height == 0 and empty.dtypes == [pl.String, pl.Float64, pl.String]
    with pytest.raises(ValueError, match="one entry per text"):
        Extraction(["doctor"], [], [None])
