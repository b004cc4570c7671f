"""A peft LoRA adapter as the model of a build: spec checks, resolution, both engines, in-memory probing.

The adapter is real: random (init_lora_weights=False) LoRA weights on every linear layer of the embedded SmolLM2, saved
with save_pretrained, so it moves the log-probs by whole nats and a wrong merge or a dropped adapter shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from conftest import small_spec_dict

from polyculture.engines.base import SamplingParams
from polyculture.engines.chat_tokens import answer_tokens
from polyculture.engines.factory import create_engine
from polyculture.engines.model_files import ModelUnavailable, resolve_chat_model
from polyculture.engines.transformers_engine import TransformersEngine
from polyculture.preflight import parse_spec
from polyculture.spec import ModelSpec, SpecError

BASE = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUMBER_ONLY = [{"role": "user", "content": "Pick a number from 1 to 10. Answer with the number only."}]
OPTIONS = ["1", "3", "7", "10", "seven"]
TINY_SCHEMA = {
    "type": "object",
    "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["number"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_chat_model(BASE).path))


@pytest.fixture(scope="module")
def peft_model() -> Any:
    """SmolLM2 (fp32) wrapped with a random rank-4 LoRA on all its linear layers, unmerged, in memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(resolve_chat_model(BASE).path), dtype=torch.float32)
    # alpha 2 (scale 0.5): moves the answers' log-probs by ~0.5-2 nats, far beyond bf16 noise yet not so far that
    # bf16 rounding inside vLLM grows past the engines' agreement tolerance.
    config = LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    with torch.random.fork_rng():  # a reproducible adapter that leaves the session's RNG alone
        torch.manual_seed(0)
        model = get_peft_model(base, config)
    return model.eval()


@pytest.fixture(scope="module")
def adapter_dir(peft_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters") / "numbers-lora"
    peft_model.save_pretrained(folder)
    (folder / "polyculture-adapter.json").write_text(json.dumps({"base_model": BASE}))
    return folder


@pytest.fixture(scope="module")
def tf_base() -> Any:
    engine = create_engine(ModelSpec(engine="transformers"), seed=3)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tf_adapter(adapter_dir: Path) -> Any:
    engine = create_engine(ModelSpec(engine="transformers", adapter=str(adapter_dir)), seed=3)
    yield engine
    engine.close()


def reference_logprobs(
    model: Any, tokenizer: Any, conversation: list[dict[str, str]], answers: list[str]
) -> list[float]:
    """log p(answer + end-of-turn | prompt), one unpadded forward pass per answer: no engine code involved."""
    tokens = answer_tokens(tokenizer, conversation, answers)
    start = len(tokens.prompt_ids)
    scores = []
    with torch.inference_mode():
        for answer in tokens.answer_ids:
            ids = torch.tensor([tokens.prompt_ids + answer])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            scores.append(float(logp[start - 1 :].gather(-1, ids[0, start:, None]).sum()))
    return scores


def _spec(spec_dir: Path, **model: Any) -> Any:
    return parse_spec(small_spec_dict(model=model), spec_dir)


def test_spec_refuses_bad_adapters(spec_dir: Path, adapter_dir: Path) -> None:
    with pytest.raises(SpecError, match=r"model\.adapter: adapter folder 'nowhere' not found"):
        _spec(spec_dir, adapter="nowhere")
    (spec_dir / "empty").mkdir()
    with pytest.raises(SpecError, match=r"model\.adapter: .*empty' holds no adapter_config\.json"):
        _spec(spec_dir, adapter="empty")
    with pytest.raises(SpecError, match=r"model\.adapter: engine 'openai' cannot apply a local adapter.*model\.name"):
        _spec(spec_dir, engine="openai", base_url="http://127.0.0.1:8000/v1", adapter=str(adapter_dir))
    # an adapter folder as model.name needs to say its base model
    shutil.copytree(adapter_dir, spec_dir / "anonymous")
    (spec_dir / "anonymous" / "polyculture-adapter.json").unlink()
    config = json.loads((spec_dir / "anonymous" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (spec_dir / "anonymous" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=r"model: adapter folder .*anonymous' does not say its base model"):
        _spec(spec_dir, name="anonymous")


def test_relative_adapter_resolves_beside_the_spec(spec_dir: Path, adapter_dir: Path) -> None:
    shutil.copytree(adapter_dir, spec_dir / "lora")
    spec = _spec(spec_dir, adapter="lora")
    assert spec.model.adapter == "lora"  # kept as written: the fingerprint does not depend on where the spec lies
    resolved = resolve_chat_model(spec.model.name, spec.base_dir, adapter=spec.model.adapter)
    assert resolved.adapter == (spec_dir / "lora").resolve()
    assert resolved.path == resolve_chat_model(BASE).path
    assert resolved.name == f"{BASE}+lora"
    with pytest.raises(ModelUnavailable, match="already a LoRA adapter folder"):
        resolve_chat_model(str(adapter_dir), adapter="lora")


def test_adapter_folder_as_model_name(spec_dir: Path, adapter_dir: Path) -> None:
    base = resolve_chat_model(BASE)
    resolved = resolve_chat_model(str(adapter_dir))
    assert (resolved.name, resolved.path, resolved.adapter) == (f"{BASE}+numbers-lora", base.path, adapter_dir)
    assert _spec(spec_dir, name=str(adapter_dir)).model.name == str(adapter_dir)
    # without our tuner's record, peft's base_model_name_or_path (here the converted folder's path) is used
    shutil.copytree(adapter_dir, spec_dir / "plain-peft")
    (spec_dir / "plain-peft" / "polyculture-adapter.json").unlink()
    fallback = resolve_chat_model("plain-peft", spec_dir)
    assert fallback.path == base.path and fallback.adapter == (spec_dir / "plain-peft").resolve()
    assert fallback.name.endswith("+plain-peft")


def test_transformers_engine_applies_the_adapter(
    tf_base: Any, tf_adapter: Any, peft_model: Any, tokenizer: Any, adapter_dir: Path
) -> None:
    assert tf_adapter.model_name == f"{BASE}+numbers-lora"
    with_adapter = tf_adapter.sequence_logprobs(NUMBER_ONLY, OPTIONS)
    without = tf_base.sequence_logprobs(NUMBER_ONLY, OPTIONS)
    assert max(abs(a - b) for a, b in zip(with_adapter, without, strict=True)) > 0.5
    # the merged weights score exactly what the unmerged peft model scores: the merge is right
    assert with_adapter == pytest.approx(reference_logprobs(peft_model, tokenizer, NUMBER_ONLY, OPTIONS), abs=1e-3)
    # naming the adapter folder as the model loads the same thing
    by_name = create_engine(ModelSpec(name=str(adapter_dir), engine="transformers"))
    try:
        assert by_name.model_name == tf_adapter.model_name
        assert by_name.sequence_logprobs(NUMBER_ONLY, OPTIONS) == pytest.approx(with_adapter, abs=1e-4)
    finally:
        by_name.close()


def test_from_loaded_probes_a_peft_model_in_memory(peft_model: Any, tokenizer: Any, tf_adapter: Any) -> None:
    peft_model.train()  # as a tuner would leave it mid-training
    rng_before = torch.get_rng_state()
    probe = TransformersEngine.from_loaded(peft_model, tokenizer, name="probe", seed=3)
    assert probe.model is peft_model and probe.model_name == "probe"
    scores = probe.sequence_logprobs(NUMBER_ONLY, OPTIONS)
    assert scores == pytest.approx(tf_adapter.sequence_logprobs(NUMBER_ONLY, OPTIONS), abs=1e-3)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    assert probe.generate([NUMBER_ONLY], greedy)[0][0].text == tf_adapter.generate([NUMBER_ONLY], greedy)[0][0].text
    sampled = probe.generate([NUMBER_ONLY], SamplingParams(temperature=1.0, max_tokens=6, n=2))
    assert [len(row) for row in sampled] == [2]
    constrained = probe.generate([NUMBER_ONLY], SamplingParams(max_tokens=12), json_schema=TINY_SCHEMA)[0][0]
    jsonschema.validate(json.loads(constrained.text), TINY_SCHEMA)
    # the tuner's model and RNG are as they were: still training, global stream untouched, no gradients kept
    assert peft_model.training and torch.equal(torch.get_rng_state(), rng_before)
    assert all(p.grad is None for p in peft_model.parameters())
    # same seed, same samples: the engine's stream is its own
    again = TransformersEngine.from_loaded(peft_model, tokenizer, name="probe", seed=3)
    resampled = again.generate([NUMBER_ONLY], SamplingParams(temperature=1.0, max_tokens=6, n=2))
    assert [c.text for c in resampled[0]] == [c.text for c in sampled[0]]
    peft_model.eval()


@pytest.mark.slow
def test_vllm_serves_the_adapter(tf_base: Any, tf_adapter: Any, adapter_dir: Path) -> None:
    """One vLLM start with native LoRA: log-probs agree with transformers (bf16 vs fp32), generation works.
    (create_engine serves merged weights on CPU, tests/test_merged_weights.py; native LoRA is what it keeps on CUDA.)"""
    from polyculture.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(resolve_chat_model(BASE, adapter=adapter_dir), seed=3)
    try:
        assert engine.model_name == f"{BASE}+numbers-lora"
        with_adapter = engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
        assert with_adapter == pytest.approx(tf_adapter.sequence_logprobs(NUMBER_ONLY, OPTIONS), abs=0.35)
        # the same engine without the LoRA request is the base model: the adapter is what moved the numbers
        lora, engine.lora = engine.lora, None
        without = engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
        engine.lora = lora
        assert without == pytest.approx(tf_base.sequence_logprobs(NUMBER_ONLY, OPTIONS), abs=0.35)
        assert max(abs(a - b) for a, b in zip(with_adapter, without, strict=True)) > 0.5
        out = engine.generate([NUMBER_ONLY] * 2, SamplingParams(temperature=1.0, max_tokens=8, n=2))
        assert [len(row) for row in out] == [2, 2]
        assert all(1 <= c.completion_tokens <= 8 for row in out for c in row)
        constrained = engine.generate([NUMBER_ONLY], SamplingParams(max_tokens=12), json_schema=TINY_SCHEMA)[0][0]
        jsonschema.validate(json.loads(constrained.text), TINY_SCHEMA)
    finally:
        engine.close()
