"""Token ids of whole assistant answers after a chat prompt: the one definition shared by every engine's
sequence log-probs, the model probe and diffuse fine-tuning, so all three score exactly the same tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Conversation = list[dict[str, str]]


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
