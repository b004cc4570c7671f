"""How one VS answer's responses become records: keep all, sample one by the verbalized weights, or threshold.

Selection runs per answer (one completion; each turn of a multi-turn method is its own answer) over the responses
that survived parsing and the record schema. Sampling is seeded by the spec seed and the call id, so it is
deterministic for a given run and independent of the order answers are validated in.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from polyculture.spec import MethodSpec

SelectionKind = Literal["all", "sample", "threshold"]


@dataclass(frozen=True)
class Dropped:
    reason: str  # "not_sampled" | "below_threshold"
    detail: str


@dataclass(frozen=True)
class Selection:
    kind: SelectionKind = "all"
    threshold: float | None = None
    min_keep: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("all", "sample", "threshold"):
            raise ValueError(f"selection '{self.kind}' is unknown; allowed: all, sample, threshold")
        if self.kind == "threshold" and self.threshold is None:
            raise ValueError("selection 'threshold' needs a threshold (a probability in [0, 1])")
        if self.min_keep < 1:
            raise ValueError("min_keep must be >= 1")

    @classmethod
    def from_spec(cls, spec: MethodSpec) -> Selection:
        return cls(kind=spec.selection, threshold=spec.selection_threshold, min_keep=spec.min_keep)

    def records_per_answer(self, responses: int) -> int:
        """Records one answer of `responses` responses yields (an upper bound with threshold)."""
        return min(1, responses) if self.kind == "sample" else responses

    def apply(self, probabilities: list[float | None], *, seed: int, call_id: str) -> list[Dropped | None]:
        """For each response of one answer: None if kept, else why it was dropped. Never raises on the values."""
        n = len(probabilities)
        weights = [_weight(p) for p in probabilities]
        if self.kind == "all" or n == 0:
            return [None] * n
        if self.kind == "sample":
            chosen = _sample(weights, _rng(seed, call_id))
            picked = f"response {chosen} (p={_format_probability(probabilities[chosen])})"
            detail = f"one response of {n} sampled by verbalized weight: {picked}"
            return [None if i == chosen else Dropped("not_sampled", detail) for i in range(n)]
        threshold = float(self.threshold)  # type: ignore[arg-type]
        bound = f"{threshold:g}"
        keep = {i for i, p in enumerate(probabilities) if p is not None and weights[i] >= threshold}
        if len(keep) < self.min_keep:
            by_probability = sorted(range(n), key=lambda i: (-weights[i], i))
            keep = set(by_probability[: self.min_keep])
        return [
            None
            if i in keep
            else Dropped("below_threshold", f"verbalized probability {_format_probability(p)} < threshold {bound}")
            for i, p in enumerate(probabilities)
        ]


def _weight(p: float | None) -> float:
    if p is None or not isinstance(p, (int, float)) or p != p or p < 0:  # None, NaN, negative: no weight
        return 0.0
    return float(p)


def _rng(seed: int, call_id: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{call_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _sample(weights: list[float], rng: random.Random) -> int:
    total = sum(weights)
    if not total > 0 or total == float("inf"):  # no usable weights: uniform
        return rng.randrange(len(weights))
    u = rng.random() * total
    for i, w in enumerate(weights):
        u -= w
        if u < 0:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)  # rounding at the top end


def _format_probability(p: float | None) -> str:
    return "none" if p is None else f"{p:g}"
