"""Both real engines on the embedded SmolLM2 model: sampling, n, token counts, JSON-constrained output, log-probs."""

from __future__ import annotations

import json

import jsonschema
import pytest

from polyculture.engines.base import Engine, SamplingParams, create_engine
from polyculture.engines.models import ModelUnavailable, resolve_chat_model
from polyculture.spec import ModelSpec

NUMBER_SCHEMA = {
    "type": "object",
    "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 10}, "word": {"type": "string", "maxLength": 12}},
    "required": ["number", "word"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Pick a random number from 1 to 10 and a random word. Reply in JSON."}]
OPTIONS = [str(i) for i in range(1, 11)]
NUMBER_ONLY = [{"role": "user", "content": "Pick a number from 1 to 10. Answer with the number only."}]


@pytest.fixture(scope="module")
def tf_engine():
    engine = create_engine(ModelSpec(engine="transformers"), seed=11)
    yield engine
    engine.close()


def _check_constrained(engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=40, n=3)
    out = engine.generate([ASK, ASK], params, json_schema=NUMBER_SCHEMA)
    assert len(out) == 2 and all(len(row) == 3 for row in out)
    for row in out:
        for completion in row:
            value = json.loads(completion.text)  # constrained: always JSON ...
            jsonschema.validate(value, NUMBER_SCHEMA)  # ... that satisfies the schema, bounds included
            assert completion.finish_reason == "stop" and 0 < completion.completion_tokens <= 40
            assert completion.prompt_tokens > 10


def test_embedded_model_is_converted_once_and_cached():
    first = resolve_chat_model("smollm2-135m-instruct")
    assert (first.path / "config.json").is_file() and (first.path / "tokenizer.json").is_file()
    assert resolve_chat_model("smollm2-135m-instruct").path == first.path


def test_hub_id_not_cached_fails_saying_so():
    with pytest.raises(ModelUnavailable, match="not in the local Hugging Face cache"):
        resolve_chat_model("someone/model-that-is-not-here")
    with pytest.raises(ModelUnavailable, match="unknown model"):
        resolve_chat_model("not-a-model")


def test_transformers_sampling_n_and_tokens(tf_engine):
    out = tf_engine.generate([NUMBER_ONLY], SamplingParams(temperature=1.0, max_tokens=8, n=4))
    assert len(out) == 1 and len(out[0]) == 4
    for completion in out[0]:
        assert 1 <= completion.completion_tokens <= 8
        assert completion.finish_reason in {"stop", "length"}
        assert completion.finish_reason == "stop" or completion.completion_tokens == 8
    greedy = tf_engine.generate([NUMBER_ONLY, NUMBER_ONLY], SamplingParams(temperature=0.0, max_tokens=8, n=1))
    assert greedy[0][0].text == greedy[1][0].text  # greedy is deterministic, also under left padding


def test_transformers_constrained_json(tf_engine):
    _check_constrained(tf_engine)


def test_transformers_same_seed_same_samples():
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2)
    a = create_engine(ModelSpec(engine="transformers"), seed=5).generate([NUMBER_ONLY], params)
    b = create_engine(ModelSpec(engine="transformers"), seed=5).generate([NUMBER_ONLY], params)
    assert [c.text for c in a[0]] == [c.text for c in b[0]]


def _check_call_seed(engine: Engine) -> None:
    """A call's own seed gives the same samples whatever ran before it, and leaves the engine's stream alone."""
    seeded = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=1234)
    first = [c.text for c in engine.generate([NUMBER_ONLY, ASK], seeded)[0]]
    engine.generate([NUMBER_ONLY], SamplingParams(temperature=1.0, max_tokens=12, n=2))  # moves the engine's stream
    again = [c.text for c in engine.generate([NUMBER_ONLY, ASK], seeded)[0]]
    assert again == first
    other = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=4321)
    samples = {tuple(c.text for c in engine.generate([NUMBER_ONLY, ASK], other)[0]) for _ in range(2)}
    assert len(samples) == 1 and samples != {tuple(first)}  # another seed, other samples (3 of them at T=1)


def test_transformers_call_seed(tf_engine):
    _check_call_seed(tf_engine)


def test_transformers_sequence_logprobs(tf_engine):
    scores = tf_engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
    assert len(scores) == 10 and all(s < 0 for s in scores)
    # the greedy answer is the most likely whole continuation among itself and a far-fetched one
    greedy = tf_engine.generate([NUMBER_ONLY], SamplingParams(temperature=0.0, max_tokens=8))[0][0].text
    best, odd = tf_engine.sequence_logprobs(NUMBER_ONLY, [greedy, "Purple elephants dance at noon."])
    assert best > odd
    # scoring in batches of any size gives the same numbers
    tf_engine._logprob_batch = 3
    assert tf_engine.sequence_logprobs(NUMBER_ONLY, OPTIONS) == pytest.approx(scores, abs=1e-3)
    tf_engine._logprob_batch = 32


@pytest.mark.slow
def test_vllm_engine(tf_engine):
    """One vLLM start (~1-1.5 min on 2 cores) covers sampling, constrained JSON and log-probs."""
    engine = create_engine(ModelSpec(engine="vllm"), seed=11)
    try:
        out = engine.generate([NUMBER_ONLY] * 3, SamplingParams(temperature=1.0, max_tokens=8, n=2))
        assert [len(row) for row in out] == [2, 2, 2]
        assert all(1 <= c.completion_tokens <= 8 for row in out for c in row)
        _check_constrained(engine)
        _check_call_seed(engine)
        # the two engines are independent implementations of the same quantity: bf16 vs fp32 agree closely
        vllm_scores = engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
        tf_scores = tf_engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
        assert vllm_scores == pytest.approx(tf_scores, abs=0.35)
    finally:
        engine.close()
