"""The generations loop's steps, as plain functions: folders and markers, a generation's chat examples, the training
mix by regime, and the drift figures of one generation's published data.

Layout: <output_dir>/<loop>/<arm>/gen-<g>/ holds the build's run folder (<dataset>/build/), spec.yaml (the arm's
resolved spec for that generation), train.parquet (the mix the next adapter learnt), adapter/ and metrics.json. A step
is finished when its marker exists; markers are written atomically and last, so a killed loop re-runs the first
unfinished step and reuses everything before it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import polars as pl

from polyculture.index.sources import read_table, source_files
from polyculture.index.text import normalize_text
from polyculture.metrics.lexical import tokenize
from polyculture.runs.files import jsonable, write_text_atomic
from polyculture.spec import BuildSpec
from polyculture.tuning.drift_report import PROBE_PREFIX
from polyculture.tuning.generations_config import GenerationsConfig, TailSettings

BUILD_DONE = "build.done"  # the build's result (BuildResult as JSON)
TUNE_DONE = "tune.done"  # the adapter's training figures
METRICS = "metrics.json"  # the generation's drift figures (its own marker)
EXAMPLE_COLUMNS = ["system", "user", "answer", "generation"]


def gen_dir(root: Path, arm: str, generation: int) -> Path:
    return root / arm / f"gen-{generation}"


def replicate_dir(root: Path, arm: str) -> Path:
    """Generation 0 built again with the next seed: the noise floor of every figure."""
    return root / arm / "gen-0-replicate"


def read_marker(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_marker(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(jsonable(payload), indent=2) + "\n")


def published_records(spec: BuildSpec, build: dict[str, Any]) -> pl.DataFrame:
    """The published records joined to the run's validated frame: record_id, record_json, text, the attributes."""
    from polyculture.stages.publish import DATA_FILE

    published = pl.read_parquet(Path(build["dataset_dir"]) / DATA_FILE, columns=["_record_id"])
    validated = pl.read_parquet(Path(build["run_dir"]) / "validated.parquet")
    columns = ["record_id", "record_json", "text", *[a.name for a in spec.attributes]]
    frame = validated.select([c for c in columns if c in validated.columns]).unique("record_id")
    joined = published.rename({"_record_id": "record_id"}).join(frame, on="record_id", how="left")
    return joined.filter(pl.col("record_json").is_not_null())


def chat_examples(spec: BuildSpec, records: pl.DataFrame, generation: int) -> pl.DataFrame:
    """One chat example per record: the build's prompt for the record's attribute values -> the record's JSON."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    user = env.from_string(spec.prompt.template)
    system = env.from_string(spec.prompt.system) if spec.prompt.system else None
    names = [a.name for a in spec.prompt_attributes]
    rows = []
    for record in records.iter_rows(named=True):
        # k=1: the example teaches one record per request, whatever the arm's method asks for.
        variables = {name: record.get(name) for name in names} | {"k": 1, "index": 0}
        rows.append(
            {
                "system": system.render(variables).strip() if system else None,
                "user": user.render(variables).strip(),
                "answer": record["record_json"],
                "generation": generation,
            }
        )
    return pl.DataFrame(
        rows, schema={"system": pl.String, "user": pl.String, "answer": pl.String, "generation": pl.Int64}
    )


def fresh_examples(spec: BuildSpec, source: Path, text_column: str, count: int, seed: int) -> pl.DataFrame:
    """`count` rows of real data drawn (seeded) from `source`; each answers the build's prompt for the row's attribute
    values where the source has them, else for values drawn by the attributes' weights."""
    table = pl.concat([read_table(f) for f in source_files(source)], how="diagonal_relaxed")
    table = table.filter(pl.col(text_column).is_not_null())
    if table.height == 0 or count <= 0:
        return pl.DataFrame(schema={c: pl.Int64 if c == "generation" else pl.String for c in EXAMPLE_COLUMNS})
    rng = random.Random(seed)
    picked = [table.row(rng.randrange(table.height), named=True) for _ in range(count)]
    records = []
    for row in picked:
        values = {}
        for attr in spec.prompt_attributes:
            value = row.get(attr.name)
            values[attr.name] = value if value is not None else rng.choices(attr.values, attr.weights)[0]
        records.append(values | {"record_json": str(row[text_column])})
    frame = pl.DataFrame(records)
    return chat_examples(spec, frame, -1)  # generation -1: fresh data


def training_mix(
    config: GenerationsConfig, spec: BuildSpec, by_generation: list[pl.DataFrame], fresh_source: Path | None
) -> pl.DataFrame:
    """What the next adapter learns from: replace: the newest generation's examples; accumulate: every generation's
    so far; fresh: the newest generation's plus fresh data making up `fresh.share` of the mix."""
    newest = by_generation[-1]
    if config.regime == "accumulate":
        return pl.concat(by_generation)
    if config.regime == "fresh":
        assert config.fresh is not None and fresh_source is not None
        share = config.fresh.share
        count = round(newest.height * share / (1 - share))
        seed = config.tuning.seed * 1000 + len(by_generation)
        return pl.concat([newest, fresh_examples(spec, fresh_source, config.fresh.text_column, count, seed)])
    return newest


def as_messages(examples: pl.DataFrame) -> list[list[dict[str, str]]]:
    out = []
    for row in examples.iter_rows(named=True):
        system = [{"role": "system", "content": row["system"]}] if row["system"] else []
        out.append([*system, {"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["answer"]}])
    return out


# ---- drift figures -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tail:
    """Generation 0's rare values (per field) and rare word n-grams, which later generations are checked for."""

    values: dict[str, list[str]]
    ngrams: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "ngrams": self.ngrams}


def _field_values(records: pl.DataFrame, field: str) -> list[str]:
    out = []
    for raw in records["record_json"].to_list():
        value = json.loads(raw).get(field) if raw else None
        if value is not None:
            out.append(normalize_text(str(value)))
    return out


def _tail_fields(spec: BuildSpec, settings: TailSettings) -> list[str]:
    return list(dict.fromkeys([*(a.field or a.name for a in spec.field_attributes), *settings.fields]))


def _ngrams(text: str, n: int) -> set[str]:
    words = tokenize(text)
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def rare_tail(spec: BuildSpec, records: pl.DataFrame, settings: TailSettings) -> Tail:
    values = {}
    for field in _tail_fields(spec, settings):
        counts = Counter(_field_values(records, field))
        if not counts:
            continue
        ordered = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))
        cut = ordered[max(0, round(len(ordered) * settings.rare_share) - 1)][1]  # count at the rare_share quantile
        values[field] = sorted(v for v, c in counts.items() if c <= cut)
    per_record = Counter(g for text in records["text"].to_list() for g in _ngrams(text or "", settings.ngram))
    return Tail(values=values, ngrams=sorted(g for g, c in per_record.items() if c == 1))


def tail_coverage(spec: BuildSpec, records: pl.DataFrame, tail: Tail, settings: TailSettings) -> dict[str, Any]:
    """Share of generation 0's rare values (all fields together) and rare n-grams present in `records`."""
    present = sum(len(set(vals) & set(_field_values(records, f))) for f, vals in tail.values.items())
    rare = sum(len(vals) for vals in tail.values.values())
    grams = set().union(*(_ngrams(t or "", settings.ngram) for t in records["text"].to_list()))
    return {
        "tail_value_coverage": present / rare if rare else None,
        "tail_ngram_coverage": len(set(tail.ngrams) & grams) / len(tail.ngrams) if tail.ngrams else None,
        "rare_values": rare,
        "rare_ngrams": len(tail.ngrams),
    }


def generation_figures(
    spec: BuildSpec, config: GenerationsConfig, build: dict[str, Any], records: pl.DataFrame, tail: Tail
) -> dict[str, Any]:
    """One generation's figures over its published records: the build report's final-stage figures (reused, not
    measured again), correctness, tail coverage and unique answers."""
    report = json.loads(Path(build["report_json"]).read_text(encoding="utf-8"))
    after = report["diversity"]["after"]
    checks = (report.get("quality") or {}).get("checks") or []
    pass_rates = {c["name"]: c["stages"]["after"]["pass_rate"] for c in checks}
    answers = (
        _field_values(records, config.answer_field)
        if config.answer_field
        else [normalize_text(t or "") for t in records["text"].to_list()]
    )
    attributes = {
        name: {"normalized_entropy": a["after"]["normalized_entropy"], "coverage": a["after"]["coverage"]}
        for name, a in (report.get("attributes") or {}).items()
    }
    usage = build.get("usage") or {}
    return {
        "records": records.height,
        # The weakest check's pass rate over the published records: an upper bound on passing them all.
        "correctness": min((r for r in pass_rates.values() if r is not None), default=None),
        "pass_rates": pass_rates,
        "distinct_1": after.get("distinct_1"),
        "distinct_2": after.get("distinct_2"),
        "compression_ratio": after.get("compression_ratio"),
        "semantic_diversity": after.get("semantic_diversity"),
        "vendi_score": after.get("vendi_score"),
        "attribute_entropy": _mean([a["normalized_entropy"] for a in attributes.values()]),
        "attribute_coverage": _mean([a["coverage"] for a in attributes.values()]),
        "attributes": attributes,
        "unique_answers": len(set(answers)),
        **tail_coverage(spec, records, tail, config.tail),
        "build_seconds": usage.get("wall_seconds"),
        "generated_tokens": usage.get("generated_tokens"),
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


PROBE = "probe.json"  # the generation's model probe (its own marker)


def probe_key(family: str) -> str:
    """The figures key of a probed family's exact normalised entropy (the drift report lists such keys)."""
    return f"{PROBE_PREFIX}{family}"


def model_probe(spec: BuildSpec, adapter: Path | None, families: list[str], samples: int, seed: int) -> dict[str, Any]:
    """Probe the generation's model (the base model plus its adapter) on enumerable task families: per family, the
    full probe result; the figures keep the exact normalised entropy. The transformers engine, whatever engine
    builds: exact figures need sequence log-probs."""
    from polyculture.engines.factory import create_engine
    from polyculture.spec import ModelSpec
    from polyculture.tuning.families import resolve_family
    from polyculture.tuning.probe import answer_token_cap, probe_family

    model = ModelSpec(name=spec.model.name, engine="transformers", adapter=str(adapter) if adapter else None)
    engine = create_engine(model, seed=seed, base_dir=spec.base_dir)
    try:
        results = []
        for ref in families:
            family = resolve_family(ref)
            cap = answer_token_cap(engine.tokenizer, family)  # type: ignore[attr-defined]
            results.append(probe_family(engine, family, samples=samples, answer_tokens=cap))
    finally:
        engine.close()
    return {
        "adapter": str(adapter) if adapter else None,
        "results": results,
        "figures": {probe_key(r["family"]): r["exact"]["normalized_entropy"] for r in results},
    }


LOOP_FILE = "loop.json"  # what decides a loop folder's finished steps: checked on every re-run


class LoopChanged(ValueError):
    """A loop folder holds steps finished under another config; the message names what changed."""


def loop_identity(config: GenerationsConfig, specs: dict[str, BuildSpec]) -> dict[str, Any]:
    """Everything finished steps depend on: each arm's build spec (by fingerprint) and the loop settings. Not G (a
    loop may be extended), the probe (computed for any generation that lacks it) or where the loop is written."""
    exclude = {"generations", "probe", "replicate", "output_dir", "arms"}
    settings = config.model_dump(mode="json", by_alias=True, exclude=exclude)
    return {"settings": settings, "arms": {arm: spec.fingerprint() for arm, spec in specs.items()}}


def check_loop_identity(root: Path, identity: dict[str, Any]) -> None:
    """Record the identity of a new loop folder; refuse a re-run whose config would reuse steps it did not make."""
    path = root / LOOP_FILE
    recorded = read_marker(path)
    if recorded is None:
        root.mkdir(parents=True, exist_ok=True)
        write_marker(path, identity)
        return
    # An arm the folder has not seen yet starts from nothing: it is recorded, not refused.
    changed = [f"arms.{arm}" for arm in sorted(set(recorded["arms"]) & set(identity["arms"]))
               if recorded["arms"][arm] != identity["arms"][arm]]  # fmt: skip
    old, new = recorded["settings"], identity["settings"]
    changed += [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if changed:
        raise LoopChanged(
            f"{root} holds a loop run under another config (changed: {', '.join(changed)}; an arm changes with its "
            "build spec too): its finished builds and adapters would be reused. Rename the loop (name) or remove "
            "the folder to start over."
        )
    if set(identity["arms"]) - set(recorded["arms"]):
        write_marker(path, {"settings": new, "arms": recorded["arms"] | identity["arms"]})
