"""compare.quality: the spec's quality checks run on every method's valid records, judged by the same thresholds.

The quality stage (stages.quality) scores each method's records with the one engine compare-methods loaded (a score
cache per method: record ids repeat across methods). A relative fluency check (`quantile`) resolved per method would
pass the same share of every method's records, hiding the very difference compared; so it is resolved once, over
the scores of all methods together, into an absolute threshold, and each method is then judged from its cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from polyculture.spec import FluencyCheck, QualityCheck
from polyculture.stages.quality import ScoreCache


def shared_checks(checks: Sequence[QualityCheck], caches: Sequence[ScoreCache]) -> list[QualityCheck]:
    """`checks` with each fluency quantile replaced by its value over every method's scores (`caches`, filled by the
    quality stage); a quantile with no score at all stays (the stage then fails every record: nothing to rank)."""
    out: list[QualityCheck] = []
    for check in checks:
        if isinstance(check, FluencyCheck) and check.quantile is not None:
            # As the stage ranks them: finite scores without a verdict of their own (an empty text has one).
            scores = [o[0] for cache in caches for (name, _), o in cache.items() if name == check.name
                      and o[0] is not None and o[1] is None]  # fmt: skip
            if scores:
                # min: a mean log-prob is <= 0, as the spec requires of a threshold, unless rounding says otherwise
                threshold = min(0.0, float(np.quantile(scores, check.quantile)))
                check = FluencyCheck.model_validate(check.model_dump() | {"quantile": None, "threshold": threshold})
        out.append(check)
    return out


def check_entries(checks: Sequence[QualityCheck], judged: Sequence[QualityCheck]) -> list[dict[str, Any]]:
    """comparison.json's description of each check: the spec's (`checks`) and the threshold it was judged by."""
    return [
        {
            "name": check.name,
            "kind": check.kind,
            "gate": check.gate,
            "quantile": check.quantile if isinstance(check, FluencyCheck) else None,
            "threshold": getattr(used, "threshold", None),
        }
        for check, used in zip(checks, judged, strict=True)
    ]
