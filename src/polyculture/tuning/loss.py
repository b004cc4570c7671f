"""The diffuse loss: target-weighted negative log-likelihood of whole answers (end-of-turn included).

For one prompt x and target w over valid answers y: L = sum_y w(y) * -log p(y | x). Its minimum is the entropy H(w),
reached when the model's distribution over whole answers is w itself (Zhang et al. 2024). The log-probabilities come
from polyculture.engines.chat_tokens.answer_logprobs.
"""

from __future__ import annotations

import torch


def diffuse_loss(logprobs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_y w(y) * -log p(y | x) for one prompt; `target` sums to 1 over the same answers as `logprobs`."""
    return -(target.to(logprobs.device) * logprobs).sum()  # targets are built on the CPU; the model may be on a GPU
