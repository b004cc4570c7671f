"""Diffuse fine-tuning: LoRA on a chat model so its distribution over each family's answers approaches the target.

One optimiser step takes `prompts_per_step` (family, phrasing) pairs from the families still in training, sums the
diffuse loss of each, clips the gradient and steps AdamW. A family leaves training when its loss (mean over its
phrasings, as last measured) reaches (1+gamma) H(w) if it is not exhaustive (the paper's early stop, so a sample list
of fruits is not forced) or converged_ratio * H(w) if it is. Families that left are re-measured every recheck_every
steps and rejoin if training on the others pushed them back above; the run ends when a re-measurement of every family
finds none above its threshold, or at max_steps, or at the time budget.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from polyculture import progress
from polyculture.engines.chat_tokens import AnswerTokens, answer_logprobs, answer_tokens
from polyculture.tuning.config import LoraSettings, TrainingSettings
from polyculture.tuning.families import TaskFamily
from polyculture.tuning.loss import diffuse_loss


@dataclass(frozen=True)
class TrainingItem:
    family: str
    prompt_index: int
    tokens: AnswerTokens
    target: torch.Tensor
    entropy: float  # H(w) in nats


@dataclass
class TrainResult:
    steps: int
    seconds: float
    stop_reason: str  # "all families done" | "max_steps" | "max_minutes"
    final_loss: dict[str, float]  # family -> mean loss over its phrasings (nats), measured after training
    final_ratio: dict[str, float]  # family -> final loss / H(w) (1.0 is the optimum)
    stopped_at: dict[str, int | None]  # family -> step at which it last left training (None: trained to the end)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attach_lora(model: torch.nn.Module, settings: LoraSettings, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are random: the same seed gives the same adapter
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target module the architecture does not have
        raise ValueError(f"lora.target_modules: {exc}") from None


def training_items(tokenizer: Any, families: list[TaskFamily]) -> list[TrainingItem]:
    items = []
    for family in families:
        target = torch.tensor(family.target, dtype=torch.float32)
        for index, conversation in enumerate(family.conversations()):
            tokens = answer_tokens(tokenizer, conversation, family.answers)
            items.append(TrainingItem(family.name, index, tokens, target, family.target_entropy))
    return items


def family_losses(model: torch.nn.Module, items: list[TrainingItem], pad_id: int) -> dict[str, float]:
    """Mean diffuse loss per family over all its phrasings (no gradient)."""
    per_family: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for item in items:
            loss = diffuse_loss(answer_logprobs(model, item.tokens, pad_id), item.target)
            per_family.setdefault(item.family, []).append(float(loss))
    model.train(was_training)
    return {name: sum(v) / len(v) for name, v in per_family.items()}


def train_diffuse(
    model: torch.nn.Module,
    tokenizer: Any,
    families: list[TaskFamily],
    settings: TrainingSettings,
    *,
    seed: int = 0,
) -> TrainResult:
    """Train the LoRA parameters of `model` (already peft-wrapped) in place."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = training_items(tokenizer, families)
    by_family = {f.name: f for f in families}
    stop_ratio = {f.name: settings.converged_ratio if f.exhaustive else 1.0 + settings.gamma for f in families}
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach a LoRA adapter first")
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    rng = random.Random(seed)
    # Last measured loss of each phrasing; a family's loss is the mean over its phrasings seen so far.
    latest: dict[tuple[str, int], float] = {}
    stopped_at: dict[str, int | None] = {f.name: None for f in families}
    history: list[dict[str, Any]] = []
    order: list[TrainingItem] = []
    started = time.perf_counter()
    stop_reason = "max_steps"
    model.train()
    step = 0
    progress.report("tune", 0, settings.max_steps, f"{len(families)} families, {len(items)} prompts")

    def recheck(names: list[str]) -> list[str]:
        """Re-measure families that left: training on the others can undo them (numbers_even pushes "10" up in
        numbers_1_10), so any that drifted back above their threshold rejoin training."""
        losses = family_losses(model, [i for i in items if i.family in names], pad_id)
        back = sorted(n for n, v in losses.items() if v > stop_ratio[n] * by_family[n].target_entropy)
        for name in back:
            stopped_at[name] = None
            for key in [k for k in latest if k[0] == name]:
                del latest[key]
        return back

    while step < settings.max_steps:
        left = [name for name, at in stopped_at.items() if at is not None]
        if left and (not any(at is None for at in stopped_at.values()) or step % settings.recheck_every == 0):
            rejoined = recheck(left)
            if history and rejoined:
                history[-1]["rejoined_training"] = rejoined
        active = [i for i in items if stopped_at[i.family] is None]
        if not active:
            stop_reason = "all families done"
            break
        if (time.perf_counter() - started) / 60 >= settings.max_minutes:
            stop_reason = "max_minutes"
            break
        batch = []
        while len(batch) < min(settings.prompts_per_step, len(active)):
            # Epochs over the active prompts in a seeded shuffled order: every phrasing is seen equally often.
            order = [i for i in order if stopped_at[i.family] is None]
            if not order:
                order = rng.sample(active, len(active))
            batch.append(order.pop())
        optimizer.zero_grad(set_to_none=True)
        step_losses: dict[str, list[float]] = {}
        for item in batch:
            loss = diffuse_loss(answer_logprobs(model, item.tokens, pad_id), item.target)
            (loss / len(batch)).backward()
            value = loss.item()
            latest[(item.family, item.prompt_index)] = value
            step_losses.setdefault(item.family, []).append(value / item.entropy)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
        optimizer.step()
        step += 1
        done_now = []
        for name in {i.family for i in batch}:
            seen = [v for (fam, _), v in latest.items() if fam == name]
            prompts = len(by_family[name].prompts)
            # Decide only once every phrasing has a measurement, so one easy phrasing cannot stop a family.
            if len(seen) == prompts and sum(seen) / prompts <= stop_ratio[name] * by_family[name].target_entropy:
                stopped_at[name] = step
                done_now.append(name)
        history.append(
            {
                "step": step,
                "seconds": round(time.perf_counter() - started, 2),
                "loss_ratio": {k: round(sum(v) / len(v), 4) for k, v in step_losses.items()},
                "grad_norm": round(grad_norm, 4),
                "left_training": done_now,
            }
        )
        mean_ratio = sum(sum(v) for v in step_losses.values()) / sum(len(v) for v in step_losses.values())
        active_left = sum(1 for v in stopped_at.values() if v is None)
        progress.report("tune", step, settings.max_steps, f"loss/H {mean_ratio:.3f}, {active_left} families left")
    seconds = time.perf_counter() - started
    final = family_losses(model, items, pad_id)
    model.eval()
    return TrainResult(
        steps=step,
        seconds=round(seconds, 2),
        stop_reason=stop_reason,
        final_loss={k: round(v, 4) for k, v in final.items()},
        final_ratio={k: round(v / by_family[k].target_entropy, 4) for k, v in final.items()},
        stopped_at=stopped_at,
        history=history,
    )
