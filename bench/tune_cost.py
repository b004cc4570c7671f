"""What diffuse fine-tuning costs and how fast it converges, on the embedded model.

1. The diffuse loss's forward+backward per prompt: prefix-shared (the trainer's way: the prompt once, its KV cache
   repeated over the answers) against whole sequences (every answer re-reads the prompt), median of repeats.
2. Convergence at several learning rates: the same steps on the same families from the same seed; prints loss / H(w)
   of numbers_1_10 (1.0 is the optimum) and its exact normalised entropy afterwards.

Usage: .venv/bin/python bench/tune_cost.py [--rates 5e-5,3e-4,1e-3] [--steps 40] [--threads 2]
Prints one JSON line per measurement. Compare figures from one run only: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polyculture.engines.chat_tokens import answer_logprobs, answer_tokens
from polyculture.engines.model_files import resolve_chat_model
from polyculture.tuning.config import LoraSettings, TrainingSettings
from polyculture.tuning.families import resolve_family
from polyculture.tuning.loss import diffuse_loss
from polyculture.tuning.train import attach_lora, train_diffuse

FAMILIES = ["numbers_1_10", "numbers_odd", "days_of_week", "countries_south_america"]


def whole_sequence_logprobs(model: torch.nn.Module, prompt_ids: list[int], answers: list[list[int]], pad: int):
    width = len(prompt_ids) + max(len(a) for a in answers)
    rows = [prompt_ids + a + [pad] * (width - len(prompt_ids) - len(a)) for a in answers]
    ids = torch.tensor(rows)
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    start = len(prompt_ids) - 1
    return torch.stack([logp[i, start : start + len(a)].sum() for i, a in enumerate(answers)])


def time_step(model, tokenizer, family_name: str, shared: bool, repeats: int) -> float:
    family = resolve_family(family_name)
    tokens = answer_tokens(tokenizer, family.conversations()[0], family.answers)
    target = torch.tensor(family.target)
    pad = tokenizer.pad_token_id
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        if shared:
            logprobs = answer_logprobs(model, tokens, pad)
        else:
            logprobs = whole_sequence_logprobs(model, tokens.prompt_ids, tokens.answer_ids, pad)
        diffuse_loss(logprobs, target).backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="5e-5,3e-4,1e-3")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = str(resolve_chat_model("smollm2-135m-instruct").path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    model = attach_lora(copy.deepcopy(base), LoraSettings(), seed=0)
    for family in ("numbers_1_10", "numbers_1_100"):
        shared = time_step(model, tokenizer, family, True, args.repeats)
        whole = time_step(model, tokenizer, family, False, args.repeats)
        print(json.dumps({"measure": "seconds per prompt (forward+backward)", "family": family,
                          "prefix_shared": round(shared, 3), "whole_sequences": round(whole, 3),
                          "speedup": round(whole / shared, 2)}), flush=True)  # fmt: skip

    families = [resolve_family(f) for f in FAMILIES]
    probe = families[0]
    for rate in [float(r) for r in args.rates.split(",")]:
        model = attach_lora(copy.deepcopy(base), LoraSettings(), seed=0)
        settings = TrainingSettings(learning_rate=rate, max_steps=args.steps, converged_ratio=1.0, max_minutes=60)
        result = train_diffuse(model, tokenizer, families, settings, seed=0)
        entropies = []
        with torch.no_grad():
            for conversation in probe.conversations():
                p = torch.softmax(answer_logprobs(model, answer_tokens(tokenizer, conversation, probe.answers), 0), 0)
                entropies.append(float(-(p * p.log()).sum()) / math.log(len(probe.answers)))
        print(json.dumps({"measure": "convergence", "learning_rate": rate, "steps": result.steps,
                          "seconds": result.seconds, "loss_over_entropy": result.final_ratio,
                          "numbers_1_10_normalized_entropy": round(statistics.mean(entropies), 4)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
