"""compare-methods with quality checks, on hand-made frames: the real quality stage judges each method from a score
cache (no model), a quantile is resolved once over every method's scores, and the metrics and table show pass rates
and unique valid passing records per 1k tokens."""

from __future__ import annotations

import json

import pytest
from test_compare import NUMBERS, _frames

from polyculture.compare.metrics import comparison_report, method_metrics
from polyculture.compare.quality import check_entries, shared_checks
from polyculture.compare.render import write_comparison
from polyculture.preflight import load_spec
from polyculture.spec import FluencyCheck
from polyculture.stages.quality import quality

CHECKS = [
    FluencyCheck.model_validate({"name": "fluent", "kind": "fluency", "quantile": 0.5}),
    FluencyCheck.model_validate({"name": "clear", "kind": "fluency", "threshold": -2.5, "gate": False}),
]
# Per method, (fluent, clear) of its 5 valid records (texts 7, 3, 7, 2, 7); both methods use the same record ids,
# as two compare runs do. None: not scorable.
SCORES = {
    "vs_standard": [(-1.0, -1.0), (-2.0, -3.0), (-3.0, -1.0), (-4.0, -1.0), (-5.0, -3.0)],
    "direct": [(-6.0, -1.0), (-7.0, -1.0), (-8.0, -1.0), (-9.0, -1.0), (None, -1.0)],
}


def caches(records):
    ids = records["record_id"].to_list()
    out = {}
    for method, rows in SCORES.items():
        known = {}
        for record_id, (fluent, clear) in zip(ids, rows, strict=True):
            known[("fluent", record_id)] = (fluent, None, None) if fluent is not None else (None, False, "text is empty")
            known[("clear", record_id)] = (clear, None, None)
        out[method] = known
    return out


def test_quantile_resolved_once_over_all_methods():
    spec = load_spec(NUMBERS)
    _, records, _, embeddings = _frames(spec)
    known = caches(records)
    judged = shared_checks(CHECKS, list(known.values()))
    # the median of the 9 scores -1..-9; the absolute check is left as it is
    assert judged[0].threshold == -5.0 and judged[0].quantile is None and judged[1] == CHECKS[1]
    assert check_entries(CHECKS, judged)[0] == {
        "name": "fluent", "kind": "fluency", "gate": True, "quantile": 0.5, "threshold": -5.0,
    }  # fmt: skip
    passed = {}
    for method, cache in known.items():
        alone = quality(records, embeddings, CHECKS, known=dict(cache)).counts[0]
        shared = quality(records, embeddings, judged, known=cache).counts[0]
        passed[method] = (alone.passed, shared.passed)
    # Judged alone, each method's own median passes about half of it; one threshold shows what differs.
    assert passed == {"vs_standard": (3, 5), "direct": (2, 0)}
    assert shared_checks(CHECKS, [{}])[0] == CHECKS[0]  # nothing scored: nothing to resolve


def test_method_metrics_quality_columns(tmp_path):
    spec = load_spec(NUMBERS)
    completions, records, rejects, embeddings = _frames(spec)
    known = caches(records)
    judged = shared_checks(CHECKS, list(known.values()))
    results = []
    for method in ("vs_standard", "direct"):
        scores = quality(records, embeddings, judged, known=known[method]).scores
        results.append(
            method_metrics(
                spec, method=method, completions=completions, records=records, rejects=rejects,
                embeddings=embeddings, budget_tokens=200, quality_scores=scores,
            )  # fmt: skip
        )
    vs, direct = results
    assert vs["quality"]["fluent"] == {"checked": 5, "scored": 5, "passed": 5, "pass_rate": 1.0, "mean_score": -3.0}
    assert vs["quality"]["clear"]["passed"] == 3 and vs["quality"]["clear"]["pass_rate"] == pytest.approx(0.6)
    assert direct["quality"]["fluent"]["scored"] == 4 and direct["quality"]["fluent"]["pass_rate"] == 0.0
    # vs_standard: records 0, 2, 3 pass both (texts 7, 7, 2): 2 unique over 250 tokens; direct: none passes
    assert (vs["counts"]["passing"], vs["counts"]["unique_valid_passing"]) == (3, 2)
    assert vs["passing_rate"] == pytest.approx(0.6)
    assert vs["unique_valid_passing_per_1k_tokens"] == pytest.approx(8.0)
    assert vs["unique_valid_per_1k_tokens"] == pytest.approx(12.0)  # what quality cost: 3 unique valid before
    assert direct["counts"]["passing"] == 0 and direct["unique_valid_passing_per_1k_tokens"] == 0.0

    report = comparison_report(
        spec, results, run_id="q", budget_tokens=200, quality_checks=check_entries(CHECKS, judged)
    )
    write_comparison(report, tmp_path)
    loaded = json.loads((tmp_path / "comparison.json").read_text())
    assert [c["threshold"] for c in loaded["quality_checks"]] == [-5.0, -2.5]
    md = (tmp_path / "comparison.md").read_text()
    assert "| fluent: pass rate | 100% | 0% |" in md and "| clear: pass rate | 60% | 100% |" in md
    assert "| passing records | 3 | 0 |" in md and "| unique valid passing / 1k tok | 8.0 | 0.0 |" in md
    assert "fluent: fluency, quantile 0.5 of all methods' scores = -5.000" in md
    assert "clear: fluency, score >= -2.5" in md


def test_no_checks_no_quality_figures_and_foreign_scores_refused(tmp_path):
    spec = load_spec(NUMBERS)
    completions, records, rejects, embeddings = _frames(spec)
    plain = method_metrics(
        spec, method="direct", completions=completions, records=records, rejects=rejects,
        embeddings=embeddings, budget_tokens=200,
    )  # fmt: skip
    assert "quality" not in plain and "passing" not in plain["counts"]
    report = comparison_report(spec, [plain], run_id="p", budget_tokens=200)
    write_comparison(report, tmp_path)
    assert "quality_checks" not in report and "pass rate" not in (tmp_path / "comparison.md").read_text()
    foreign = quality(records, embeddings, CHECKS[1:], known=caches(records)["direct"]).scores
    with pytest.raises(ValueError, match="quality_scores: record ids not among the valid records"):
        method_metrics(
            spec, method="direct", completions=completions, records=records.head(2), rejects=rejects,
            embeddings=embeddings[:2], budget_tokens=200, quality_scores=foreign,
        )  # fmt: skip
