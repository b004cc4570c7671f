"""Supervised LoRA fine-tuning on chat examples (prompt -> answer): the generations loop's tuning step.

The loss is the next-token cross-entropy of the assistant's answer only (the prompt's tokens are masked), over seeded
shuffled batches; the adapter is saved with save_adapter, so `model.adapter` finds its base model.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polyculture import progress
from polyculture.accelerator import torch_device
from polyculture.tuning.adapter import save_adapter
from polyculture.tuning.config import LoraSettings
from polyculture.tuning.train import attach_lora

if TYPE_CHECKING:  # a type only: the tuning step runs without the loop's config machinery (polars, sources)
    from polyculture.tuning.generations_config import SftSettings

Messages = list[dict[str, str]]  # chat turns ending with the assistant's answer


@dataclass(frozen=True)
class SftResult:
    examples: int
    steps: int
    seconds: float
    tokens: int  # answer tokens trained on, all steps
    first_loss: float
    last_loss: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode(tokenizer: Any, messages: Messages, max_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) with the prompt masked (-100): only the answer is learnt."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with the answer appended")
    # Tokenized apart, so the prompt/answer boundary is exact (no token spans it).
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    full_ids = prompt_ids + answer_ids
    labels = [-100] * len(prompt_ids) + answer_ids
    return full_ids[:max_tokens], labels[:max_tokens]


def train_sft(
    base_path: Path, examples: list[Messages], settings: SftSettings, adapter_dir: Path, metadata: dict[str, Any]
) -> SftResult:
    """Train one LoRA adapter from the base model at `base_path` and save it (atomically) into `adapter_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ValueError("no training examples: the generation published no records")
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    # float32: CPU training in bf16 is slower and loses the small LoRA updates (as in diffuse tuning).
    device = torch_device()
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).to(device)
    lora = LoraSettings(r=settings.rank, alpha=settings.alpha, target_modules=list(settings.target_modules))
    model = attach_lora(model, lora, settings.seed)
    encoded = [encode(tokenizer, m, settings.max_tokens) for m in examples]
    encoded = [e for e in encoded if any(label != -100 for label in e[1])]
    if not encoded:
        raise ValueError(f"every example's answer lies beyond tuning.max_tokens ({settings.max_tokens})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        batch = []
        while len(batch) < min(settings.batch_size, len(encoded)):
            if not order:  # epochs in a seeded shuffled order: every example is seen equally often
                order = rng.sample(range(len(encoded)), len(encoded))
            batch.append(encoded[order.pop()])
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=device)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        tokens += int((labels != -100).sum())
        progress.report("tune", step + 1, settings.steps, f"loss {losses[-1]:.3f}")
    model.eval()
    result = SftResult(
        examples=len(encoded),
        steps=settings.steps,
        seconds=round(time.perf_counter() - started, 2),
        tokens=tokens,
        first_loss=round(losses[0], 4),
        last_loss=round(sum(losses[-5:]) / len(losses[-5:]), 4),
    )
    save_adapter(model, adapter_dir, metadata | {"training": result.to_dict()})
    return result
