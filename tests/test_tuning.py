"""Task families, tuning configs, the diffuse loss, the trainer and the probe, on the real embedded model."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from polyculture.engines.chat_tokens import answer_logprobs, answer_tokens
from polyculture.tuning.config import TuneConfigError, config_families, load_tune_config
from polyculture.tuning.families import (
    FamilyError,
    TaskFamily,
    available_families,
    load_family,
    normalize_answer,
    resolve_family,
)
from polyculture.tuning.loss import diffuse_loss

PROJECT = Path(__file__).resolve().parent.parent
FAMILIES = PROJECT / "configs" / "tuning" / "families"
EXPECTED = {
    "numbers_1_10", "numbers_1_100", "numbers_even", "numbers_odd", "primes_to_50", "days_of_week", "fruits",
    "occupations", "countries_south_america", "countries_africa", "first_names",
}  # fmt: skip


def small_family(**overrides) -> TaskFamily:
    raw = {
        "name": "colours",
        "exhaustive": True,
        "options": ["red", "green", "blue"],
        "prompts": ["Name a colour. Answer with the colour only.", "Pick red, green or blue. Just the word."],
    }
    return TaskFamily.model_validate(raw | overrides)


# ---- families ---------------------------------------------------------------------------------------------------------


def test_every_shipped_family_loads_with_several_phrasings():
    found = available_families(FAMILIES)
    assert EXPECTED <= set(found)
    for name in EXPECTED:
        family = resolve_family(name)
        assert family.name == name
        assert len(family.prompts) >= 4
        assert math.isclose(sum(family.target), 1.0)
        # Uniform targets unless weights are given: H(w) = log(number of options).
        assert family.weights is None and math.isclose(family.target_entropy, math.log(len(family.answers)))
    assert resolve_family("numbers_1_100").answers == [str(i) for i in range(1, 101)]
    assert resolve_family("numbers_even").answers == [str(i) for i in range(2, 21, 2)]
    assert resolve_family("primes_to_50").answers[-1] == "47" and len(resolve_family("primes_to_50").answers) == 15
    assert resolve_family("days_of_week").exhaustive and not resolve_family("fruits").exhaustive


def test_answers_match_ignoring_case_quotes_and_a_full_stop_but_not_sentences():
    fruits = resolve_family("fruits")
    assert fruits.match(' "passion Fruit". ') == "Passion fruit"
    assert fruits.match("BANANA") == "Banana"
    assert fruits.match("**Mango**") == "Mango"
    assert fruits.match("I pick Banana") is None
    assert fruits.match("") is None
    assert normalize_answer("  Ｍａｎｇｏ ") == "mango"  # full-width letters fold (NFKC)


def test_weights_give_the_target_and_its_entropy():
    family = small_family(weights=[2, 1, 1])
    assert family.target == [0.5, 0.25, 0.25]
    assert math.isclose(family.target_entropy, -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"options": ["red", "Red "]}, "distinct"),
        ({"options": ["red"]}, "at least 2"),
        ({"weights": [1, 2]}, "weights has 2 entries but there are 3 options"),
        ({"weights": [1, -1, 1]}, "weights must be finite"),
        ({"prompts": []}, "prompts"),
        ({"prompts": ["  "]}, "prompts must not be empty"),
        ({"name": "bad name"}, "not a family name"),
        ({"options": {"range": {"start": 5, "stop": 1}}}, "below start"),
        ({"colour": "x"}, "colour"),
    ],
)
def test_bad_families_are_refused_naming_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_family(**overrides)


def test_family_files_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nexhaustive: true\noptions: [a, b]\n")
    with pytest.raises(FamilyError, match=r"bad.yaml: prompts: Field required"):
        load_family(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(FamilyError, match="not valid YAML"):
        load_family(bad)
    with pytest.raises(FamilyError, match="unknown task family 'nope'; known: .*numbers_1_10"):
        resolve_family("nope")
    with pytest.raises(FamilyError, match="does not exist"):
        resolve_family(str(tmp_path / "missing.yaml"))


# ---- configs ----------------------------------------------------------------------------------------------------------


def test_shipped_config_trains_on_every_family_but_the_held_out_one():
    config = load_tune_config(PROJECT / "configs" / "tuning" / "diffuse.yaml")
    training, held_out = config_families(config, PROJECT / "configs" / "tuning")
    assert [f.name for f in held_out] == ["fruits"]
    assert {f.name for f in training} == EXPECTED - {"fruits"}
    assert config.lora.r == 4 and config.lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip
    assert config.training.gamma == 0.2


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"families": ["numbers_1_10"], "held_out": ["numbers_1_10"]}))
    with pytest.raises(TuneConfigError, match="overlap on \\['numbers_1_10'\\]"):
        load_tune_config(path)
    path.write_text(yaml.safe_dump({"training": {"learning_rat": 0.1}}))
    with pytest.raises(TuneConfigError, match="training.learning_rat: Extra inputs are not permitted"):
        load_tune_config(path)
    path.write_text(yaml.safe_dump({"held_out": ["no_such_family"]}))
    with pytest.raises(TuneConfigError, match="held_out: unknown task family 'no_such_family'"):
        config_families(load_tune_config(path), tmp_path)
    path.write_text(yaml.safe_dump({"training": {"max_steps": 0}}))
    with pytest.raises(TuneConfigError, match="training.max_steps"):
        load_tune_config(path)


def test_overrides_merge_into_nested_settings(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"training": {"learning_rate": 0.01, "max_steps": 7}}))
    config = load_tune_config(path, {"training": {"max_steps": 3}})
    assert config.training.max_steps == 3 and config.training.learning_rate == 0.01


# ---- the loss on the real model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    """The embedded model in float32 and its tokenizer, loaded once; tests that train work on a deep copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polyculture.engines.model_files import resolve_chat_model

    path = str(resolve_chat_model("smollm2-135m-instruct").path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(path)
    torch.set_num_threads(threads)


def test_prefix_shared_logprobs_equal_whole_sequence_scores(base):
    """The shared-prompt computation against the plain one: each full sequence through the model on its own."""
    from polyculture.engines.transformers_engine import TransformersEngine

    model, tokenizer = base
    family = resolve_family("numbers_1_100")
    conversation = family.conversations()[0]
    answers = ["7", "42", "100", "Seven", "Sao Paulo"]  # one to four tokens, so padding is exercised
    tokens = answer_tokens(tokenizer, conversation, answers)
    whole = []
    with torch.no_grad():
        shared = answer_logprobs(model, tokens, tokenizer.pad_token_id or 0)
        for ids in tokens.answer_ids:
            sequence = torch.tensor([tokens.prompt_ids + ids])
            logp = torch.log_softmax(model(input_ids=sequence).logits[0, :-1].float(), dim=-1)
            positions = range(len(tokens.prompt_ids) - 1, sequence.shape[1] - 1)
            whole.append(sum(float(logp[pos, sequence[0, pos + 1]]) for pos in positions))
    assert torch.allclose(shared, torch.tensor(whole), atol=1e-3), (shared, whole)
    assert (shared < 0).all()
    # The engine scores the same way, in chunks that each re-run the prompt.
    engine = TransformersEngine.from_loaded(model, tokenizer, name="smollm2", seed=0, logprob_batch=2)
    assert torch.allclose(torch.tensor(engine.sequence_logprobs(conversation, answers)), shared, atol=1e-4)


def test_the_loss_is_the_cross_entropy_and_its_minimum_is_the_targets_entropy():
    target = torch.tensor([0.5, 0.25, 0.25])
    assert math.isclose(float(diffuse_loss(target.log(), target)), -(target * target.log()).sum().item(), rel_tol=1e-6)
    skewed = torch.tensor([0.8, 0.1, 0.1]).log()
    assert float(diffuse_loss(skewed, target)) > float(diffuse_loss(target.log(), target))


def test_training_moves_only_lora_weights_and_lowers_the_loss(base):
    from polyculture.tuning.config import LoraSettings, TrainingSettings
    from polyculture.tuning.train import attach_lora, family_losses, train_diffuse, training_items

    model, tokenizer = base
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "layers.0.self_attn.q_proj" in k}
    peft_model = attach_lora(copy.deepcopy(model), LoraSettings(), seed=0)
    families = [small_family()]
    items = training_items(tokenizer, families)
    before = family_losses(peft_model, items, tokenizer.pad_token_id)["colours"]
    settings = TrainingSettings(learning_rate=3e-3, prompts_per_step=2, max_steps=8, converged_ratio=1.0)
    result = train_diffuse(peft_model, tokenizer, families, settings, seed=0)
    assert result.steps == 8 and result.stop_reason == "max_steps"
    assert result.final_loss["colours"] < before
    assert result.final_ratio["colours"] == pytest.approx(result.final_loss["colours"] / math.log(3), abs=1e-3)
    assert len(result.history) == 8 and all(row["grad_norm"] >= 0 for row in result.history)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # The base weights are untouched (the copy was trained, and only its LoRA matrices).
    for key, value in model.state_dict().items():
        if key in frozen_before:
            assert torch.equal(value, frozen_before[key])


def test_a_non_exhaustive_family_stops_early_at_one_plus_gamma_times_its_entropy(base):
    from polyculture.tuning.config import LoraSettings, TrainingSettings
    from polyculture.tuning.train import attach_lora, train_diffuse

    model, tokenizer = base
    peft_model = attach_lora(copy.deepcopy(model), LoraSettings(), seed=0)
    sample_of_many = small_family(exhaustive=False)
    # gamma so large that the first full measurement already satisfies it: stops once both phrasings were seen.
    settings = TrainingSettings(prompts_per_step=1, max_steps=50, gamma=100.0)
    result = train_diffuse(peft_model, tokenizer, [sample_of_many], settings, seed=0)
    assert result.stop_reason == "all families done"
    assert result.steps == 2 and result.stopped_at == {"colours": 2}
    assert result.history[-1]["left_training"] == ["colours"]


# ---- the probe --------------------------------------------------------------------------------------------------------


def test_probe_measures_the_embedded_models_collapse(base):
    from polyculture.engines.transformers_engine import TransformersEngine
    from polyculture.tuning.probe import answer_token_cap, probe_family

    model, tokenizer = base
    engine = TransformersEngine.from_loaded(model, tokenizer, name="smollm2", seed=0)
    family = resolve_family("numbers_1_10")
    cap = answer_token_cap(tokenizer, family)
    assert cap == 3 + 2  # "10" is two digit tokens + end-of-turn, plus slack
    result = probe_family(engine, family, samples=12, answer_tokens=cap)
    exact, sampled = result["exact"], result["sampled"]
    assert math.isclose(sum(exact["distribution"].values()), 1.0, rel_tol=1e-6)
    assert 0 < exact["valid_mass"] < 1
    assert 0 <= exact["normalized_entropy"] <= 1 and exact["kl_bits"] >= 0
    assert exact["top_option"] in family.answers
    # Collapsed: far from uniform, and the top answer holds well over the uniform 10%.
    assert exact["normalized_entropy"] < 0.9 and exact["top_share"] > 0.3
    assert len(result["per_prompt"]) == len(family.prompts)
    assert all(row["sampled"]["n"] == 12 for row in result["per_prompt"])
    assert sum(result["sampled"]["pooled_counts"].values()) + round(
        result["sampled"]["pooled_invalid_rate"] * 12 * len(family.prompts)
    ) == 12 * len(family.prompts)
    assert 0 <= sampled["invalid_rate"] <= 1 and 0 <= sampled["coverage"] <= 1
