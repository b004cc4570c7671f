"""How a categorical attribute is spread, compared with its target distribution."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

OTHER_EXAMPLES = 5  # most common off-target values listed, so a report can say what the model wrote instead


def attribute_summary(values: Sequence[str | None] | pl.Series, target: dict[str, float]) -> dict[str, Any]:
    """Counts, shares, entropy, KL, total variation and coverage of `values` against `target`.

    `target` maps each allowed value to its weight (normalised here). Values outside the allowed set, and nulls, are
    counted as "other". Shares are of all records (so a reader sees "30% doctors" of the whole set) and
    `other_share` holds the rest.
    - entropy_bits / normalized_entropy: of the distribution over the allowed values only; normalised by log2 of the
      number of allowed values (1.0 when there is a single allowed value and it was seen).
    - kl_bits: KL(observed || target) in bits over the allowed values. It is infinite when some value has observed
      mass but target 0; JSON has no infinity, so that case is kl_bits=None with kl_infinite=True. None (flag False)
      when no allowed value was observed at all.
    - total_variation: half the L1 distance between the shares and the target over all records, with "other" as one
      more category whose target is 0 (so off-target records count against it). None when there are no records.
    - js_bits: Jensen-Shannon divergence (bits, in [0, 1]) between the shares and the target over the same categories
      as total_variation (scipy.spatial.distance.jensenshannon, squared). Unlike KL it stays finite when a value the
      target gives 0 is seen. None when there are no records.
    - coverage: allowed values seen at least once / number of allowed values.
    """
    if not target:
        raise ValueError("target must name at least one allowed value")
    weights = np.array([float(w) for w in target.values()])
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"target weights must be finite, >= 0 and not all 0; got {list(target.values())}")
    allowed = list(target)
    target_share = weights / weights.sum()

    # A polars column is counted by polars (a million values in milliseconds); nulls count as None either way.
    tally = Counter(dict(values.value_counts().iter_rows())) if isinstance(values, pl.Series) else Counter(values)
    counts = np.array([tally.get(v, 0) for v in allowed], dtype=np.int64)
    off_target = Counter({v: c for v, c in tally.items() if v not in target})
    n = int(sum(tally.values()))
    other = int(sum(off_target.values()))
    in_set = int(counts.sum())

    shares = counts / n if n else np.zeros(len(allowed))
    k = len(allowed)
    if in_set:
        entropy_bits = float(entropy(counts, base=2))
        normalized = entropy_bits / math.log2(k) if k > 1 else 1.0
        kl = float(entropy(counts, target_share, base=2))
        kl_infinite = math.isinf(kl)
        kl_bits: float | None = None if kl_infinite else max(0.0, kl)
    else:
        entropy_bits, normalized, kl_bits, kl_infinite = 0.0, 0.0, None, False
    tvd = 0.5 * (float(np.abs(shares - target_share).sum()) + other / n) if n else None
    js_bits = None
    if n:
        observed_all = np.append(shares, other / n)
        target_all = np.append(target_share, 0.0)
        js_bits = max(0.0, float(jensenshannon(observed_all, target_all, base=2) ** 2))

    return {
        "n": n,
        "counts": {v: int(c) for v, c in zip(allowed, counts, strict=True)},
        "other": other,
        "other_examples": [
            {"value": v, "count": int(c)} for v, c in sorted(off_target.items(), key=lambda vc: (-vc[1], str(vc[0])))
        ][:OTHER_EXAMPLES],
        "observed_share": {v: float(s) for v, s in zip(allowed, shares, strict=True)},
        "other_share": other / n if n else 0.0,
        "target_share": {v: float(s) for v, s in zip(allowed, target_share, strict=True)},
        "entropy_bits": entropy_bits,
        "normalized_entropy": normalized,
        "kl_bits": kl_bits,
        "kl_infinite": kl_infinite,
        "total_variation": tvd,
        "js_bits": js_bits,
        "coverage": int((counts > 0).sum()) / k,
    }
