"""The diffuse loss: target-weighted negative log-likelihood of whole answers (end-of-turn included).

For one prompt x and target w over valid answers y: L = sum_y w(y) * -log p(y | x). Its minimum is the entropy H(w),
reached when the model's distribution over whole answers is w itself (Zhang et al. 2024).
"""

from __future__ import annotations

import torch

from polyculture.engines.chat_tokens import AnswerTokens


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


def diffuse_loss(logprobs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_y w(y) * -log p(y | x) for one prompt; `target` sums to 1 over the same answers as `logprobs`."""
    return -(target * logprobs).sum()
