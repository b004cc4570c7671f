"""validate: parse every completion into records, set conditioned attributes, check the record JSON Schema, then
apply the method's selection (VS: keep all, sample one by verbalized weight, or threshold).

Every completion is an answer of its own (each turn of a multi-turn method too). Nothing the model writes raises
here: each failure becomes a row in `rejects` with a reason, and so does every record that selection drops (stage
"select"), so all candidates are counted.

An answer cut short (JSON that stops mid-way, e.g. at the token limit) keeps the responses completed before the cut
(list methods: sequence and the VS methods); they go through the schema check and selection like any other. The lost
remainder is still a reject row of the answer (stage "parse", record_id null, the detail saying how many responses
were salvaged), so the answer is counted among those that failed to parse; `salvaged_records` counts what was kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
import polars as pl

from polyculture.index.text import clip
from polyculture.methods.base import Method
from polyculture.spec import BuildSpec
from polyculture.stages.rejects import reject, rejects_frame


@dataclass(frozen=True)
class ValidationResult:
    records: pl.DataFrame
    rejects: pl.DataFrame


def records_schema(spec: BuildSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "record_id": pl.String, "call_id": pl.String, "cell_id": pl.Int64, "cell_key": pl.String,
        "item_index": pl.Int64, "turn": pl.Int64, "method": pl.String, "model": pl.String,
        "verbalized_probability": pl.Float64,
        "record_json": pl.String, "text": pl.String,
    }  # fmt: skip
    return schema | {a.name: pl.String for a in spec.attributes}


def validate(completions: pl.DataFrame, spec: BuildSpec, method: Method) -> ValidationResult:
    """Every completion parsed by `method` into records checked against the spec's record schema; the rest rejects."""
    validator_cls = jsonschema.validators.validator_for(spec.record_schema)
    validator = validator_cls(spec.record_schema, format_checker=validator_cls.FORMAT_CHECKER)
    field_order = list(spec.record_schema["properties"])
    records: list[dict[str, Any]] = []
    rejects: list[dict[str, str | None]] = []
    for row in completions.iter_rows(named=True):
        call_id = row["call_id"]
        parsed = method.parse(row["completion"] or "")
        reason = "truncated" if row["finish_reason"] == "length" else "unparseable"  # of an answer-level reject
        if parsed.error is not None:
            rejects.append(reject(None, call_id, "parse", reason, f"{parsed.error}: {clip(row['completion'], 200)}"))
            continue
        if parsed.truncated:
            n = len(parsed.items)
            detail = f"JSON cut short after {n} complete response{'' if n == 1 else 's'} (salvaged); lost: "
            rejects.append(reject(None, call_id, "parse", reason, detail + _tail(row["completion"], 120)))
        candidates: list[dict[str, Any]] = []
        for item_index, item in enumerate(parsed.items):
            record_id = f"{call_id}-{item_index}"
            if item.error is not None or item.fields is None:
                rejects.append(reject(record_id, call_id, "parse", "malformed_item", item.error or "no fields"))
                continue
            fields = _clean(item.fields)
            for attr in spec.prompt_attributes:
                # A conditioned attribute is the pipeline's to set, not the model's to echo.
                fields[attr.record_field] = row[attr.name]
            errors = sorted(validator.iter_errors(fields), key=lambda e: list(e.absolute_path))
            if errors:
                detail = "; ".join(_schema_message(e) for e in errors[:3])
                rejects.append(reject(record_id, call_id, "schema", "schema_violation", detail))
                continue
            ordered = {k: fields[k] for k in field_order if k in fields} | {
                k: v for k, v in fields.items() if k not in field_order
            }
            text_value = ordered.get(spec.record.text_field) if spec.record.text_field else None
            candidates.append(
                {
                    "record_id": record_id,
                    "call_id": call_id,
                    "cell_id": row["cell_id"],
                    "cell_key": row["cell_key"],
                    "item_index": item_index,
                    "turn": row.get("turn") or 0,
                    "method": row["method"],
                    "model": row["model"],
                    "verbalized_probability": item.probability,
                    "record_json": json.dumps(ordered, ensure_ascii=False),
                    # An optional text field left out falls back to the whole record, so nothing is embedded empty.
                    "text": str(text_value) if text_value is not None else json.dumps(ordered, ensure_ascii=False),
                    **{a.name: _attribute_value(ordered.get(a.record_field)) for a in spec.attributes},
                }
            )
        # Selection runs over this answer's valid records only: a response that fails the schema is never chosen.
        verdicts = method.selection.apply(
            [c["verbalized_probability"] for c in candidates], seed=spec.seed, call_id=call_id
        )
        for candidate, dropped in zip(candidates, verdicts, strict=True):
            if dropped is None:
                records.append(candidate)
            else:
                rejects.append(reject(candidate["record_id"], call_id, "select", dropped.reason, dropped.detail))
    return ValidationResult(
        records=pl.DataFrame(records, schema=records_schema(spec)),
        rejects=rejects_frame(rejects),
    )


def salvaged_records(result: ValidationResult) -> int:
    """Records kept from answers cut short: records whose answer also has an answer-level parse reject (only a
    salvaged answer has both)."""
    answer_rejects = result.rejects.filter((pl.col("stage") == "parse") & pl.col("record_id").is_null())
    return result.records.filter(pl.col("call_id").is_in(answer_rejects["call_id"].to_list())).height


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v.strip() if isinstance(v, str) else v for k, v in fields.items()}


def _attribute_value(value: Any) -> str | None:
    return None if value is None else str(value)


def _schema_message(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(record)"
    return f"{where}: {clip(error.message, 160)}"

