"""The merged-weights cache: a real random LoRA on the embedded SmolLM2, merged once into a plain bf16 folder that
scores what base + adapter scores, reused on the next call, renamed when the adapter changes; vLLM on CPU serves it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_adapters import BASE, NUMBER_ONLY, OPTIONS, TARGETS, reference_logprobs

from polyculture.engines import merged_weights
from polyculture.engines.base import SamplingParams
from polyculture.engines.factory import create_engine
from polyculture.engines.model_files import ResolvedModel, resolve_chat_model
from polyculture.engines.transformers_engine import TransformersEngine
from polyculture.spec import ModelSpec


def _lora(seed: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(resolve_chat_model(BASE).path), dtype=torch.float32)
    # random non-zero B (init_lora_weights=False), scale 0.5: moves the answers by whole nats
    config = LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(base, config).eval()


@pytest.fixture(scope="module")
def base_path() -> Path:
    return resolve_chat_model(BASE).path  # the user's conversion cache: a private cache would convert again


@pytest.fixture(scope="module")
def lora_model() -> Any:
    return _lora(seed=0)


@pytest.fixture(scope="module")
def adapter(lora_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("merge") / "numbers-lora"
    lora_model.save_pretrained(folder)
    (folder / "polyculture-adapter.json").write_text(json.dumps({"base_model": BASE}))
    return folder


def test_merged_folder_scores_like_base_plus_adapter(
    base_path: Path, adapter: Path, lora_model: Any, private_cache: Path, one_torch_thread: None
) -> None:
    model = ResolvedModel(f"{BASE}+numbers-lora", base_path, adapter)
    merged = merged_weights.merged_model(model)
    assert merged.adapter is None and merged.name == model.name
    assert merged.path.parent == private_cache / "merged" and (merged.path / "config.json").is_file()
    assert json.loads((merged.path / "config.json").read_text())["dtype"] == "bfloat16"  # like the converted base
    engine = TransformersEngine(merged, seed=3, dtype="float32")
    plain = TransformersEngine(resolve_chat_model(BASE), seed=3, dtype="float32")
    with_adapter = TransformersEngine(model, seed=3, dtype="float32")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        reference = reference_logprobs(lora_model, tokenizer, NUMBER_ONLY, OPTIONS)
        scores = engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
        base_scores = plain.sequence_logprobs(NUMBER_ONLY, OPTIONS)
        # bf16 rounding of the merged weights moves a score by hundredths of a nat; the adapter moves it by > 0.5
        assert scores == pytest.approx(reference, abs=0.15)
        assert max(abs(a - b) for a, b in zip(reference, base_scores, strict=True)) > 0.5
        greedy = SamplingParams(temperature=0.0, max_tokens=12)
        assert (
            engine.generate([NUMBER_ONLY], greedy)[0][0].text == with_adapter.generate([NUMBER_ONLY], greedy)[0][0].text
        )
    finally:
        engine.close()
        plain.close()
        with_adapter.close()


def test_cache_is_reused_and_keyed_on_the_adapter(
    base_path: Path, adapter: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model = ResolvedModel(f"{BASE}+numbers-lora", base_path, adapter)
    first = merged_weights.merged_model(model)

    def no_second_merge(*_: Any) -> None:
        raise AssertionError("merged again although the cache holds this base + adapter")

    monkeypatch.setattr(merged_weights, "_merge", no_second_merge)
    assert merged_weights.merged_model(model).path == first.path
    assert merged_weights.merged_model(ResolvedModel(BASE, base_path)).path == base_path  # no adapter: unchanged
    # the same adapter file names with other weights (a tuner rewriting its output folder) get another folder
    changed = tmp_path / "numbers-lora"
    shutil.copytree(adapter, changed)
    _lora(seed=1).save_pretrained(changed)
    changed_model = ResolvedModel(model.name, base_path, changed)
    assert merged_weights.merge_key(changed_model) != merged_weights.merge_key(model)
    assert merged_weights.merged_folder(changed_model) != first.path
    # an identical copy elsewhere is the same adapter: same key
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    assert merged_weights.merge_key(ResolvedModel(model.name, base_path, copy)) == merged_weights.merge_key(model)


@pytest.mark.slow
def test_vllm_on_cpu_serves_the_merged_folder(
    base_path: Path, adapter: Path, lora_model: Any, private_cache: Path
) -> None:
    """create_engine on a CPU machine: no native LoRA, the merged folder, and the adapter's log-probs."""
    from transformers import AutoTokenizer

    reference = reference_logprobs(lora_model, AutoTokenizer.from_pretrained(str(base_path)), NUMBER_ONLY, OPTIONS)
    # the base named by its folder, so resolution needs no conversion cache (private_cache is empty)
    engine = create_engine(ModelSpec(name=str(base_path), engine="vllm", adapter=str(adapter)), seed=3)
    try:
        assert engine.lora is None
        assert list((private_cache / "merged").glob("*/polyculture-merged.json"))
        assert engine.sequence_logprobs(NUMBER_ONLY, OPTIONS) == pytest.approx(reference, abs=0.35)
    finally:
        engine.close()
