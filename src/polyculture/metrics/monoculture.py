"""Generative monoculture (Wu et al. 2024): is an attribute narrower in the generated data than in a reference dataset?

Values are compared after trimming and case-folding, so "Positive" and "positive " are one value; nulls and empty
strings are left out. For each side:
- distinct: how many values occur; entropy_bits: Shannon entropy (bits) of their distribution; top_value / top_share:
  the most frequent value and its share.
Between the sides:
- entropy_ratio: generated entropy / reference entropy (below 1: the generated data is narrower: monoculture);
  None when the reference entropy is 0.
- js_divergence_bits: Jensen-Shannon divergence (bits, in [0, 1]) between the two value distributions over the union
  of their values (scipy.spatial.distance.jensenshannon, squared); 0 = the same mix, 1 = no value in common.
- narrower: generated entropy < reference entropy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy


def _tally(values: Sequence[Any]) -> Counter[str]:
    return Counter(key for key in (str(v).strip().casefold() for v in values if v is not None) if key)


def value_dispersion(values: Sequence[Any]) -> dict[str, Any]:
    """n (non-empty values), distinct, entropy_bits, top_value and top_share of one side."""
    tally = _tally(values)
    n = sum(tally.values())
    top = min(tally.items(), key=lambda vc: (-vc[1], vc[0]), default=(None, 0))
    return {
        "n": n,
        "distinct": len(tally),
        "entropy_bits": float(entropy(list(tally.values()), base=2)) if n else None,
        "top_value": top[0],
        "top_share": top[1] / n if n else None,
    }


def compare_dispersion(generated: Sequence[Any], reference: Sequence[Any]) -> dict[str, Any]:
    """Both sides' dispersion and how they compare (see the module docstring)."""
    gen_tally, ref_tally = _tally(generated), _tally(reference)
    gen, ref = value_dispersion(generated), value_dispersion(reference)
    js = None
    if gen_tally and ref_tally:
        union = sorted(set(gen_tally) | set(ref_tally))
        p = np.array([gen_tally[v] for v in union], dtype=np.float64)
        q = np.array([ref_tally[v] for v in union], dtype=np.float64)
        js = float(jensenshannon(p / p.sum(), q / q.sum(), base=2) ** 2)
    ratio = None
    if gen["entropy_bits"] is not None and ref["entropy_bits"]:
        ratio = gen["entropy_bits"] / ref["entropy_bits"]
    narrower = None
    if gen["entropy_bits"] is not None and ref["entropy_bits"] is not None:
        narrower = bool(gen["entropy_bits"] < ref["entropy_bits"] - 1e-12)
    return {"generated": gen, "reference": ref, "entropy_ratio": ratio, "js_divergence_bits": js, "narrower": narrower}
