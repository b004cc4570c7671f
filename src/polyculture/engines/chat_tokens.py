"""Whole assistant answers after a chat prompt: their token ids (the one definition shared by every engine's
sequence log-probs, the model probe and diffuse fine-tuning, so all three score exactly the same tokens) and their
log-probabilities under a Hugging Face causal LM, with the prompt computed once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polyculture.engines.base import Conversation


class TokenizationMismatch(ValueError):
    """The chat template tokenises the prompt differently once an answer follows it."""


@dataclass(frozen=True)
class AnswerTokens:
    prompt_ids: list[int]  # the chat prompt up to and including the assistant header
    answer_ids: list[list[int]]  # per answer: its tokens followed by the end-of-turn token


def answer_tokens(tokenizer: Any, conversation: Conversation, answers: list[str]) -> AnswerTokens:
    """Tokenise `conversation` + each whole answer + end-of-turn.

    The full sequence is tokenised as one string and split at the prompt's length, so token merges across the
    boundary are the ones the model would have produced; a template whose prompt tokens change is refused.
    """
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    eot = tokenizer.eos_token
    answer_ids: list[list[int]] = []
    for answer in answers:
        ids = tokenizer(prompt + answer + eot, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise TokenizationMismatch(
                f"the chat template tokenises the prompt differently when the answer {answer!r} follows it"
            )
        answer_ids.append(ids[len(prompt_ids) :])
    return AnswerTokens(prompt_ids=prompt_ids, answer_ids=answer_ids)


def answer_logprobs(model: torch.nn.Module, tokens: AnswerTokens, pad_id: int) -> torch.Tensor:
    """log p(answer + end-of-turn | prompt) for every answer, differentiable, shape [n_answers].

    The prompt is run once and its key/value cache is shared by all answers (repeated along the batch): the cost is
    one prompt plus a few tokens per answer, instead of n_answers full sequences. Answers are right-padded; under
    causal attention a pad after an answer's last token cannot change that answer's log-probs, so no mask is needed.
    """
    device = next(model.parameters()).device
    prompt = torch.tensor([tokens.prompt_ids], device=device)
    head = model(input_ids=prompt, use_cache=True)
    first = torch.log_softmax(head.logits[0, -1].float(), dim=-1)  # predicts every answer's first token
    cache = head.past_key_values
    n = len(tokens.answer_ids)
    cache.batch_repeat_interleave(n)
    width = max(len(ids) for ids in tokens.answer_ids)
    ids = torch.tensor([a + [pad_id] * (width - len(a)) for a in tokens.answer_ids], device=device)
    lengths = torch.tensor([len(a) for a in tokens.answer_ids], device=device)
    total = first[ids[:, 0]]
    if width > 1:
        tail = model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=False).logits.float()
        logp = torch.log_softmax(tail, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        valid = torch.arange(1, width, device=device)[None, :] < lengths[:, None]
        total = total + (logp * valid).sum(dim=1)
    return total
