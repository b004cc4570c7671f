"""report: diversity at each stage (validated -> after dedup -> final), attribute targets vs what was kept, a reference
dataset's dispersion (monoculture), rejects and short cells.

Writes report.json (strict JSON: no NaN/inf), report.md (for people, embedded in the dataset card), report.html (the
same, self-contained: inline CSS, figures as data URIs, nothing fetched) and PNG figures under plots/
(stages/report_plots). Metric definitions live in polyculture.metrics.*; the README's "Diversity report" lists them.

Per stage (`diversity.before` = validated, `diversity.after_dedup` = the deduplicated pool rebalancing chose from,
null when no pool is given, `diversity.after` = final):
- rows; distinct_1 / distinct_2 (metrics.lexical) over every record; compression_ratio over every record up to
  100,000 (a seeded sample beyond);
- self_bleu (metrics.self_bleu) and vendi_score (metrics.vendi) over a seeded sample of `report.sample` records;
- semantic_diversity and mean_pairwise_similarity (metrics.semantic, over at most 2,000 records, as before);
- mean_nearest_neighbour_similarity and near_duplicate_share (share of sampled records whose nearest other record is
  at or above dedup.threshold) over the same sample;
- conceptual (metrics.conceptual): internal vs population variability, prompts as individuals;
- calibration (metrics.calibration, VS methods only, else null): keyed by the first field attribute's value (matched
  to its allowed values) or by the normalised text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from polyculture.index.text import clip
from polyculture.metrics.attribute import attribute_summary
from polyculture.metrics.calibration import calibration
from polyculture.metrics.conceptual import conceptual_diversity, individual_key
from polyculture.metrics.lexical import compression_ratio, distinct_n
from polyculture.metrics.monoculture import compare_dispersion, value_dispersion
from polyculture.metrics.self_bleu import self_bleu
from polyculture.metrics.semantic import mean_pairwise_similarity, nearest_neighbour_similarity, semantic_diversity
from polyculture.metrics.vendi import vendi_score
from polyculture.report.format import md_cell
from polyculture.report.plots import plot_attribute, plot_embedding_map, plot_similarity, project_2d
from polyculture.runs.files import jsonable, write_text_atomic
from polyculture.spec import Attribute, BuildSpec
from polyculture.stages.plan import largest_remainder

REJECT_EXAMPLES = 3
EXAMPLE_CHARS = 200  # reject details can hold whole completions; the report only needs a glimpse
CALIBRATION_VALUES = 20  # per-value calibration rows kept in the report (totals use every value)
# gzip of a larger set takes minutes; a seeded sample this size gives about the same figure.
COMPRESSION_MAX_TEXTS = 100_000
STAGES = (("before", "validated"), ("after_dedup", "after dedup"), ("after", "final"))


def write_report(
    spec: BuildSpec,
    *,
    run_id: str,
    counts: dict[str, int],
    validated: pl.DataFrame,
    validated_embeddings: np.ndarray,
    final: pl.DataFrame,
    final_embeddings: np.ndarray,
    rejects: pl.DataFrame,
    cells: pl.DataFrame,
    usage: dict[str, float],
    out_dir: Path,
    pool: pl.DataFrame | None = None,
    pool_embeddings: np.ndarray | None = None,
    marginals: pl.DataFrame | None = None,
    rounds: list[dict[str, Any]] | None = None,
    stop_reason: str | None = None,
    reference: pl.DataFrame | None = None,
    reference_embeddings: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compute the report; write report.json, report.md, report.html and plots/*.png under out_dir; return it.

    `reference` is `stages.report_reference.load_report_reference(spec)` (a `text` column plus attribute columns) and
    `reference_embeddings` its texts embedded with the build's embedder (rows aligned); both optional.
    """
    out_dir = Path(out_dir)
    frames: dict[str, tuple[pl.DataFrame, np.ndarray | None]] = {"before": (validated, validated_embeddings)}
    if pool is not None:
        frames["after_dedup"] = (pool, pool_embeddings)
    frames["after"] = (final, final_embeddings)
    diversity: dict[str, Any] = {"before": None, "after_dedup": None, "after": None}
    nearest: dict[str, np.ndarray] = {}
    for key, label in STAGES:
        if key in frames:
            diversity[key], nearest[label] = _diversity(spec, *frames[key], label)
    before, after = diversity["before"], diversity["after"]

    # The pool is what rebalancing chose from: validated, deduplicated, attributes extracted.
    pool = validated if pool is None else pool
    attributes: dict[str, Any] = {}
    for attr in spec.attributes:
        target_counts = _target_counts(attr, cells, spec.target_size)
        total = sum(target_counts.values())
        # A joint table sets the marginals itself; otherwise they are the attribute's own weights.
        from_table = spec.rebalance.targets == "table" and total
        target = {v: c / total for v, c in target_counts.items()} if from_table else attr.target_distribution()
        # An extracted attribute does not exist before extraction: its "validated" column is the pool's.
        before_frame = pool if attr.source == "extract" else validated
        attributes[attr.name] = {
            "source": attr.source,
            "field": attr.record_field if attr.source != "extract" else None,
            "target_counts": target_counts,
            "before": attribute_summary(_column(before_frame, attr.name, "validated"), target),
            "before_rebalance": attribute_summary(_column(pool, attr.name, "pool"), target),
            "after": attribute_summary(_column(final, attr.name, "final"), target),
        }

    monoculture, reference_nearest = _monoculture(spec, frames, diversity, reference, reference_embeddings)
    if reference_nearest is not None:
        nearest["reference"] = reference_nearest

    rejects = _rejects_or_empty(rejects)
    reject_groups = _reject_groups(rejects)
    short = _short_cells(cells)
    # Calls whose whole answer could not be read (as opposed to single bad items inside a readable answer).
    failed_calls = rejects.filter((pl.col("stage") == "parse") & pl.col("record_id").is_null()).height
    completions = int(counts.get("completions", 0))
    plots_dir = out_dir / "plots"
    pool_label = "after dedup" if diversity["after_dedup"] is not None else "before rebalancing"
    plots = {name: plot_attribute(name, entry, plots_dir, pool_label=pool_label) for name, entry in attributes.items()}
    figures = {
        "similarity": plot_similarity(nearest, plots_dir, threshold=spec.dedup.threshold),
        "embedding_map": _embedding_map(spec, frames, reference, reference_embeddings, plots_dir),
    }

    report: dict[str, Any] = {
        "dataset": spec.name,
        "run_id": run_id,
        "spec_fingerprint": spec.fingerprint(),
        "generation": {
            "model": spec.model.label,
            "engine": spec.model.engine,
            "method": spec.method.model_dump(mode="json"),
            "sampling": spec.sampling.model_dump(mode="json"),
            "dedup": spec.dedup.model_dump(mode="json"),
            "seed": spec.seed,
        },
        "headline": {
            "records": final.height,
            "target_size": spec.target_size,
            "semantic_diversity_before": before["semantic_diversity"],
            "semantic_diversity_after": after["semantic_diversity"],
            "distinct_2_before": before["distinct_2"],
            "distinct_2_after": after["distinct_2"],
            "vendi_score_before": before["vendi_score"],
            "vendi_score_after": after["vendi_score"],
            "self_bleu_before": before["self_bleu"],
            "self_bleu_after": after["self_bleu"],
            "rejects": int(rejects.height),
            "short_cells": len(short),
            "parse_failure_rate": failed_calls / completions if completions else 0.0,
        },
        "counts": {str(k): int(v) for k, v in counts.items()},
        "diversity": diversity,
        "sample": {"records": spec.report.sample, "map": spec.report.map, "seed": spec.seed},
        "attributes": attributes,
        "monoculture": monoculture,
        "rejects": {"total": int(rejects.height), "by_reason": reject_groups},
        "short_cells": short,
        "rebalance": {
            "targets": spec.rebalance.targets,
            "surplus": spec.rebalance.surplus,
            "rounds": list(rounds or []),
            "stop_reason": stop_reason,
            "cells": int(cells.height),
            "cells_on_target": int(cells.filter(pl.col("deficit") == 0).height) if "deficit" in cells.columns else 0,
            "marginals": marginals.to_dicts() if marginals is not None else [],
        },
        "usage": dict(usage),
        "plots": plots,
        "figures": figures,
    }
    report = jsonable(report)

    from polyculture.report.html import render_html  # the template engine is only needed here

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    write_text_atomic(out_dir / "report.html", render_html(report, out_dir))
    return report


# ---- computations -------------------------------------------------------------------------------------------------


def _diversity(
    spec: BuildSpec, frame: pl.DataFrame, embeddings: np.ndarray | None, label: str
) -> tuple[dict[str, Any], np.ndarray]:
    """One stage's figures (see the module docstring) and its sampled nearest-neighbour similarities (for the plot)."""
    if frame.height and "text" not in frame.columns:
        raise ValueError(f"the {label} records frame has no 'text' column (columns: {frame.columns})")
    x = _embedding_rows(frame, embeddings, label)
    texts = [t or "" for t in frame["text"].to_list()] if frame.height else []
    sample, seed = spec.report.sample, spec.seed
    has_rows = x.shape[0] > 0
    nearest = nearest_neighbour_similarity(x, max_rows=sample, seed=seed) if has_rows else np.zeros(0)
    return {
        "rows": frame.height,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "compression_ratio": compression_ratio(texts, max_texts=COMPRESSION_MAX_TEXTS, seed=seed),
        "self_bleu": self_bleu(texts, max_texts=sample, seed=seed),
        "semantic_diversity": semantic_diversity(x, seed=seed) if has_rows else 0.0,
        "mean_pairwise_similarity": mean_pairwise_similarity(x, seed=seed) if has_rows else 0.0,
        "vendi_score": vendi_score(x, max_rows=sample, seed=seed) if has_rows else None,
        "mean_nearest_neighbour_similarity": float(nearest.mean()) if len(nearest) else None,
        "near_duplicate_share": float((nearest >= spec.dedup.threshold).mean()) if len(nearest) else None,
        "conceptual": _conceptual(frame, x, sample, seed),
        "calibration": _calibration(spec, frame, texts),
    }, nearest


def _embedding_rows(frame: pl.DataFrame, embeddings: np.ndarray | None, label: str) -> np.ndarray:
    """The stage's embeddings as a rows x dims array (0 rows when the frame is empty or none were given)."""
    if embeddings is None:
        if frame.height:
            raise ValueError(f"{label}: {frame.height} records but no embeddings")
        return np.zeros((0, 1))
    x = np.asarray(embeddings)
    if frame.height and (x.ndim != 2 or x.shape[0] != frame.height):
        # Misaligned rows would silently measure the wrong records.
        raise ValueError(f"{label}: {frame.height} records but embeddings of shape {x.shape}")
    return x if x.ndim == 2 and frame.height else np.zeros((0, x.shape[1] if x.ndim == 2 else 1))


def _conceptual(frame: pl.DataFrame, x: np.ndarray, sample: int, seed: int) -> dict[str, Any]:
    if frame.height and "call_id" not in frame.columns:
        return {"internal_variability": None, "population_variability": None, "ratio": None, "homogeneous": None,
                "reason": "the records have no call_id, so records cannot be grouped by prompt"}  # fmt: skip
    keys = [individual_key(c) for c in frame["call_id"].to_list()] if frame.height else []
    return conceptual_diversity(keys, x, max_rows=sample, seed=seed)


def _calibration(spec: BuildSpec, frame: pl.DataFrame, texts: list[str]) -> dict[str, Any] | None:
    """Verbalized vs observed shares (VS methods); None for other methods or records without probabilities."""
    if not spec.method.name.startswith("vs_") or not frame.height:
        return None
    if "call_id" not in frame.columns or "verbalized_probability" not in frame.columns:
        return None
    from polyculture.index.text import normalize_text
    from polyculture.metrics.answers import canonical_answers  # the same keys as compare-methods uses

    field_attrs = [a for a in spec.field_attributes if a.name in frame.columns]
    if field_attrs:
        attr = field_attrs[0]
        keys = canonical_answers(frame[attr.name].cast(pl.String).to_list(), attr.values)
    else:
        keys = [normalize_text(t) for t in texts]
    result = calibration(
        frame["call_id"].to_list(),
        ["(missing)" if k is None else k for k in keys],
        frame["verbalized_probability"].to_list(),
        max_values=CALIBRATION_VALUES,
    )
    if result is not None:
        result["keyed_by"] = field_attrs[0].name if field_attrs else "text"
    return result


def _monoculture(
    spec: BuildSpec,
    frames: dict[str, tuple[pl.DataFrame, np.ndarray | None]],
    diversity: dict[str, Any],
    reference: pl.DataFrame | None,
    reference_embeddings: np.ndarray | None,
) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """Each stage's dispersion against the reference's: text (embeddings) and the attributes the reference names.
    A stage's text figures are the ones its diversity table already holds (same sample, same seed)."""
    if reference is None:
        return None, None
    if reference.height and "text" not in reference.columns:
        raise ValueError(f"the reference frame has no 'text' column (columns: {reference.columns})")
    sample, seed = spec.report.sample, spec.seed
    ref_x = _embedding_rows(reference, reference_embeddings, "reference") if reference_embeddings is not None else None
    names = [a.name for a in spec.attributes if a.name in reference.columns]
    ref_text = _text_dispersion(ref_x, sample, seed) if ref_x is not None else None
    ref_nearest = None
    if ref_x is not None and len(ref_x):
        ref_nearest = nearest_neighbour_similarity(ref_x, max_rows=sample, seed=seed)
    stages: dict[str, Any] = {}
    for key, label in STAGES:
        if key not in frames:
            stages[key] = None
            continue
        frame, embeddings = frames[key]
        x = _embedding_rows(frame, embeddings, label)
        if ref_x is not None and len(x) and len(ref_x) and x.shape[1] != ref_x.shape[1]:
            raise ValueError(f"reference embeddings have {ref_x.shape[1]} dims but the {label} ones {x.shape[1]}")
        text = _stage_dispersion(diversity[key]) if ref_text is not None else None
        if text is not None and ref_text is not None:
            gen_div, ref_div = text["semantic_diversity"], ref_text["semantic_diversity"]
            both = gen_div is not None and ref_div is not None
            text["semantic_diversity_ratio"] = gen_div / ref_div if both and ref_div else None
            text["narrower"] = bool(gen_div < ref_div) if both else None
        stages[key] = {
            "text": text,
            "attributes": {
                name: compare_dispersion(
                    frame[name].cast(pl.String).to_list() if name in frame.columns else [],
                    reference[name].to_list(),
                )
                for name in names
            },
        }
    reference_block = {
        "path": spec.report.reference.path if spec.report.reference else None,
        "rows": reference.height,
        "text": ref_text,
        "attributes": {name: value_dispersion(reference[name].to_list()) for name in names},
    }
    return {"reference": reference_block, "stages": stages}, ref_nearest


def _stage_dispersion(figures: dict[str, Any]) -> dict[str, Any]:
    """A stage's semantic spread, taken from its diversity figures (None below 2 records, as for the reference)."""
    keys = ("semantic_diversity", "mean_pairwise_similarity", "vendi_score")
    return {"rows": figures["rows"], **{k: figures[k] if figures["rows"] >= 2 else None for k in keys}}


def _text_dispersion(x: np.ndarray, sample: int, seed: int) -> dict[str, Any]:
    """The reference's semantic spread, computed as a stage's diversity figures are (same sample size and seed)."""
    if x.shape[0] < 2:
        return {
            "rows": int(x.shape[0]),
            "semantic_diversity": None,
            "mean_pairwise_similarity": None,
            "vendi_score": None,
        }
    return {
        "rows": int(x.shape[0]),
        "semantic_diversity": semantic_diversity(x, seed=seed),
        "mean_pairwise_similarity": mean_pairwise_similarity(x, seed=seed),
        "vendi_score": vendi_score(x, max_rows=sample, seed=seed),
    }


def _embedding_map(
    spec: BuildSpec,
    frames: dict[str, tuple[pl.DataFrame, np.ndarray | None]],
    reference: pl.DataFrame | None,
    reference_embeddings: np.ndarray | None,
    plots_dir: Path,
) -> str | None:
    """A 2-D map of a seeded sample of the validated records (and of the reference), by fate and first attribute."""
    validated, embeddings = frames["before"]
    x = _embedding_rows(validated, embeddings, "validated")
    if x.shape[0] < 3 or "record_id" not in validated.columns:
        return None
    sample, seed = spec.report.sample, spec.seed
    rng = np.random.default_rng(seed)
    rows = np.arange(x.shape[0])
    if len(rows) > sample:
        rows = np.sort(rng.choice(len(rows), size=sample, replace=False))
    ids = validated["record_id"].to_list()
    pool_ids = _ids(frames["after_dedup"][0]) if "after_dedup" in frames else None
    final_ids = _ids(frames["after"][0])
    fates = []
    for i in rows:
        if ids[i] in final_ids:
            fates.append("kept")
        elif pool_ids is None:
            fates.append("not kept")  # without the pool, dedup and rebalancing cannot be told apart
        elif ids[i] not in pool_ids:
            fates.append("dropped by dedup")
        else:
            fates.append("cut by rebalancing")
    vectors = [x[rows]]
    if reference is not None and reference_embeddings is not None and reference.height:
        ref_x = _embedding_rows(reference, reference_embeddings, "reference")
        ref_rows = np.arange(ref_x.shape[0])
        if len(ref_rows) > sample:
            ref_rows = np.sort(rng.choice(len(ref_rows), size=sample, replace=False))
        if ref_x.shape[1] == x.shape[1]:
            vectors.append(ref_x[ref_rows])
            fates += ["reference"] * len(ref_rows)
    coords = project_2d(np.vstack(vectors), spec.report.map, seed)
    if coords is None:
        return None
    # The right panel colours the kept records by the first attribute, as the final frame has it (an extracted
    # attribute does not exist in the validated frame).
    attribute = spec.attributes[0].name if spec.attributes else None
    final = frames["after"][0]
    values = None
    if attribute is not None and attribute in final.columns and "record_id" in final.columns:
        by_id = dict(zip(final["record_id"].to_list(), final[attribute].cast(pl.String).to_list(), strict=True))
        values = [by_id.get(ids[i]) for i in rows] + [None] * (len(fates) - len(rows))
    return plot_embedding_map(coords, fates, values, plots_dir, method=spec.report.map, attribute=attribute)


def _ids(frame: pl.DataFrame) -> set[str]:
    return set(frame["record_id"].to_list()) if "record_id" in frame.columns else set()


def _column(frame: pl.DataFrame, name: str, label: str) -> list[str | None]:
    if name not in frame.columns:
        if frame.height == 0:
            return []  # an empty stage has no columns to speak of
        raise ValueError(f"the {label} records frame has no column for attribute '{name}' (columns: {frame.columns})")
    return frame[name].cast(pl.String).to_list()


def _rejects_or_empty(rejects: pl.DataFrame) -> pl.DataFrame:
    """The rejects frame, or an empty one with the contract's columns when none (or a column-less frame) is given."""
    wanted = ("record_id", "call_id", "stage", "reason", "detail")
    if rejects.height == 0 and not set(wanted) <= set(rejects.columns):
        return pl.DataFrame(schema={c: pl.String for c in wanted})
    return rejects


def _target_counts(attr: Attribute, cells: pl.DataFrame, target_size: int) -> dict[str, int]:
    """Exact target counts per value: the rebalance cells' targets summed (prompt attributes), else the marginal."""
    if attr.name in cells.columns and "target" in cells.columns and cells.height:
        sums = cells.group_by(attr.name).agg(pl.col("target").sum())
        by_value = dict(zip(sums[attr.name].to_list(), sums["target"].to_list(), strict=True))
        return {v: int(by_value.get(v) or 0) for v in attr.values}
    weights = attr.weights or [1.0] * len(attr.values)
    return dict(zip(attr.values, largest_remainder(target_size, weights), strict=True))


def _reject_groups(rejects: pl.DataFrame) -> list[dict[str, Any]]:
    if rejects.height == 0:
        return []
    grouped = (
        rejects.group_by("stage", "reason", maintain_order=True)
        .agg(
            pl.len().alias("count"),
            pl.col("detail").drop_nulls().unique(maintain_order=True).head(REJECT_EXAMPLES).alias("examples"),
        )
        .sort(["count", "stage", "reason"], descending=[True, False, False])
    )
    return [
        {
            "stage": row["stage"],
            "reason": row["reason"],
            "count": int(row["count"]),
            "examples": [clip(d, EXAMPLE_CHARS) for d in row["examples"]],
        }
        for row in grouped.iter_rows(named=True)
    ]


def _short_cells(cells: pl.DataFrame) -> list[dict[str, Any]]:
    if cells.height == 0 or "deficit" not in cells.columns:
        return []
    wanted = [c for c in ("cell_key", "target", "available", "kept", "deficit", "reason") if c in cells.columns]
    short = cells.filter(pl.col("deficit") > 0).sort(["deficit", "cell_key"], descending=[True, False])
    return short.select(wanted).to_dicts()


# ---- markdown -----------------------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown; image links are relative to the folder holding report.md."""
    lines = [f"# Diversity report: {report['dataset']}", ""]
    gen = report["generation"]
    lines += [
        (
            f"Run `{report['run_id']}`: {report['headline']['records']} records (target {report['headline']['target_size']}),"
            f" model `{gen['model']}` on {gen['engine']}, method `{gen['method']['name']}`;"
            f" {report['headline']['parse_failure_rate']:.1%} of calls gave an answer that could not be parsed."
        ),
        "",
        "## Records after each stage",
        "",
        "| stage | records | vs previous stage |",
        "|---|---:|---:|",
    ]
    previous: int | None = None
    for stage, count in report["counts"].items():
        change = f"{count / previous:.0%}" if previous else ""
        lines.append(f"| {md_cell(stage)} | {count} | {change} |")
        previous = count

    stages = [(label, report["diversity"].get(key)) for key, label in STAGES]
    stages = [(label, stage) for label, stage in stages if stage is not None]
    lines += [
        "",
        "## Diversity",
        "",
        "| metric | " + " | ".join(label for label, _ in stages) + " |",
        "|---|" + "---:|" * len(stages),
    ]
    for key, label, digits in DIVERSITY_ROWS:
        lines.append(f"| {label} | " + " | ".join(_fixed(stage.get(key), digits) for _, stage in stages) + " |")
    lines += ["", f"Pairwise figures use a seeded sample of at most {report['sample']['records']} records per stage."]

    final = report["diversity"]["after"]
    conceptual = final.get("conceptual") or {}
    lines += ["", "### Conceptual diversity (prompts as individuals)", ""]
    if conceptual.get("internal_variability") is None:
        lines.append(f"Not computed: {conceptual.get('reason') or 'no records'}.")
    else:
        lines += ["| stage | prompts | internal variability | population variability | ratio | homogeneous |",
                  "|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for label, stage in stages:
            c = stage.get("conceptual") or {}
            if c.get("internal_variability") is None:
                lines.append(f"| {label} | {c.get('individuals', 0)} | n/a | n/a | n/a | {md_cell(c.get('reason'))} |")
                continue
            lines.append(
                f"| {label} | {c['individuals']} | {c['internal_variability']:.3f} | {c['population_variability']:.3f}"
                f" | {_fixed(c['ratio'], 2)} | {'yes' if c['homogeneous'] else 'no'} |"
            )

    if any(stage.get("calibration") for _, stage in stages):
        lines += [
            "",
            "### Verbalized probability calibration",
            "",
            "| stage | calls | items | keyed by | TVD verbalized vs observed | Spearman | mean raw sum | sums to 1 |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for label, stage in stages:
            c = stage.get("calibration")
            if c:
                lines.append(
                    f"| {label} | {c['calls']} | {c['items']} | {md_cell(c.get('keyed_by'))} | {c['total_variation']:.3f}"
                    f" | {_fixed(c['spearman'], 2)} | {c['raw_sum']['mean']:.2f} | {c['raw_sum']['share_summing_to_1']:.0%} |"
                )

    mono = report.get("monoculture")
    if mono:
        ref = mono["reference"]
        lines += ["", "## Against the reference dataset (monoculture)", "",
                  f"Reference `{md_cell(ref.get('path'))}`: {ref['rows']} rows."]  # fmt: skip
        if ref.get("text"):
            rt = ref["text"]
            lines += [
                "",
                "| side | semantic diversity | mean pairwise similarity | Vendi | vs reference |",
                "|---|---:|---:|---:|---:|",
                f"| reference | {_fixed(rt['semantic_diversity'], 1)} | {_fixed(rt['mean_pairwise_similarity'], 3)}"
                + f" | {_fixed(rt['vendi_score'], 1)} | |",
            ]
            for key, label in STAGES:
                text = ((mono["stages"].get(key) or {}).get("text")) or None
                if text:
                    lines.append(
                        f"| {label} | {_fixed(text['semantic_diversity'], 1)} | {_fixed(text['mean_pairwise_similarity'], 3)}"
                        f" | {_fixed(text['vendi_score'], 1)} | {_ratio(text.get('semantic_diversity_ratio'))} |"
                    )
        for name, ref_attr in ref["attributes"].items():
            lines += [
                "",
                f"Attribute `{name}`: reference entropy {_fixed(ref_attr['entropy_bits'], 2)} bits over"
                + f" {ref_attr['distinct']} values.",
                "",
                "| stage | entropy (bits) | distinct | top value | entropy vs reference | JS divergence |",
                "|---|---:|---:|---|---:|---:|",
            ]
            for key, label in STAGES:
                stage = mono["stages"].get(key)
                if not stage or name not in stage["attributes"]:
                    continue
                cmp = stage["attributes"][name]
                gen = cmp["generated"]
                top = f"{md_cell(gen['top_value'])} ({gen['top_share']:.0%})" if gen["top_value"] is not None else ""
                lines.append(
                    f"| {label} | {_fixed(gen['entropy_bits'], 2)} | {gen['distinct']} | {top}"
                    f" | {_ratio(cmp['entropy_ratio'])} | {_fixed(cmp['js_divergence_bits'], 3)} |"
                )

    figures = report.get("figures") or {}
    if figures.get("similarity"):
        lines += ["", f"![nearest-neighbour similarity per stage]({figures['similarity']})"]
    if figures.get("embedding_map"):
        lines += ["", f"![embedding map]({figures['embedding_map']})"]

    for name, entry in report["attributes"].items():
        b, a = entry["before"], entry["after"]
        lines += [
            "",
            f"## Attribute `{name}` ({entry['source']})",
            "",
            "| value | target share | target count | validated | before rebalancing | final | final share |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        p = entry.get("before_rebalance", b)
        for value, share in a["target_share"].items():
            lines.append(
                f"| {md_cell(value)} | {share:.1%} | {entry['target_counts'].get(value, 0)} | {b['counts'][value]}"
                f" | {p['counts'][value]} | {a['counts'][value]} | {a['observed_share'][value]:.1%} |"
            )
        if a["other"] or b["other"] or p["other"]:
            lines.append(
                f"| (other) | 0.0% | 0 | {b['other']} | {p['other']} | {a['other']} | {a['other_share']:.1%} |"
            )
        kl = "infinite (mass where the target is 0)" if a["kl_infinite"] else _num(a["kl_bits"])
        lines += [
            "",
            (
                f"Final: entropy {_num(a['entropy_bits'])} bits (normalised {_num(a['normalized_entropy'])}),"
                f" KL to target {kl} bits, JS divergence {_num(a.get('js_bits'))} bits,"
                f" total variation {_num(a['total_variation'])}, coverage {a['coverage']:.0%}."
            ),
        ]
        if a["other_examples"]:
            seen = ", ".join(
                f"{'(missing)' if e['value'] is None else md_cell(e['value'])} ({e['count']})"
                for e in a["other_examples"]
            )
            lines.append(f"Off-target values in the final set: {seen}.")
        if name in report["plots"]:
            lines += ["", f"![{name}: target vs final share]({report['plots'][name]})"]

    lines += ["", "## Rejects", ""]
    groups = report["rejects"]["by_reason"]
    if groups:
        lines += [
            f"{report['rejects']['total']} rejected in all.",
            "",
            "| stage | reason | count | example |",
            "|---|---|---:|---|",
        ]
        for g in groups:
            example = md_cell(g["examples"][0], 120) if g["examples"] else ""
            lines.append(f"| {md_cell(g['stage'])} | {md_cell(g['reason'])} | {g['count']} | {example} |")
    else:
        lines.append("None.")

    rb = report.get("rebalance") or {}
    if rb.get("rounds"):
        lines += [
            "",
            "## Rebalancing",
            "",
            (
                f"Targets: {rb['targets']}; surplus cut by {rb['surplus'].replace('_', ' ')}. "
                f"{rb['cells_on_target']} of {rb['cells']} cells on target. {(rb.get('stop_reason') or '').capitalize()}."
            ),
            "",
            "| round | cells asked | prompts | completions | generated tokens | unique valid | final | cells short | missing |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rb["rounds"]:
            lines.append(
                f"| {r['round']} | {r['cells']} | {r['prompts']} | {r['completions']} | {r['generated_tokens']:,}"
                f" | {r['unique_valid']} | {r['final']} | {r['short_cells']} | {r['missing']} |"
            )
        short_marginals = [m for m in rb.get("marginals", []) if m["deficit"]]
        if short_marginals:
            lines += [
                "",
                "| attribute | value | target | available | kept | deficit |",
                "|---|---|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {md_cell(m['attribute'])} | {md_cell(m['value'])} | {m['target']} | {m['available']} | {m['kept']}"
                f" | {m['deficit']} |"
                for m in short_marginals
            ]

    lines += ["", "## Cells short of target", ""]
    if report["short_cells"]:
        lines += ["| cell | target | available | kept | deficit | reason |", "|---|---:|---:|---:|---:|---|"]
        for c in report["short_cells"]:
            lines.append(
                f"| {md_cell(c.get('cell_key'))} | {c.get('target', '')} | {c.get('available', '')} | {c.get('kept', '')}"
                f" | {c.get('deficit', '')} | {md_cell(c.get('reason'))} |"
            )
    else:
        lines.append("None: every cell met its target.")

    if report["usage"]:
        lines += ["", "## Usage", "", "| measure | value |", "|---|---:|"]
        lines += [f"| {md_cell(k)} | {_num(v)} |" for k, v in report["usage"].items()]
    return "\n".join(lines) + "\n"


# (key, label, decimals) of the per-stage diversity table, in both report.md and report.html.
DIVERSITY_ROWS: tuple[tuple[str, str, int], ...] = (
    ("rows", "records", 0),
    ("semantic_diversity", "semantic diversity (0-100, higher is more diverse)", 1),
    ("vendi_score", "Vendi score (effective number of distinct records in the sample)", 1),
    ("mean_pairwise_similarity", "mean pairwise cosine similarity", 3),
    ("mean_nearest_neighbour_similarity", "mean nearest-neighbour similarity", 3),
    ("near_duplicate_share", "share with a neighbour at or above the dedup threshold", 3),
    ("distinct_1", "distinct-1", 3),
    ("distinct_2", "distinct-2", 3),
    ("compression_ratio", "gzip compression ratio (lower is more diverse)", 2),
    ("self_bleu", "self-BLEU (lower is more diverse)", 3),
)


def _fixed(value: Any, digits: int) -> str:
    """A number with `digits` decimals (thousands separated), or "n/a"."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return md_cell(str(value))
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
