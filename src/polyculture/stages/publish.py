"""publish: the final records as a Hugging Face datasets folder with a dataset card and the diversity report.

The card's body is rendered by the report (report.card) and handed in; this stage adds its YAML metadata.

The folder is built in a hidden temporary sibling and renamed into place, so a crash never leaves a half-written dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData

from polyculture.runs.files import disk_full_as
from polyculture.spec import BuildSpec

DATA_FILE = "data/train-00000-of-00001.parquet"
METADATA_COLUMNS = {
    "_record_id": ("record_id", pa.string()),
    "_method": ("method", pa.string()),
    "_model": ("model", pa.string()),
    "_verbalized_probability": ("verbalized_probability", pa.float64()),
}
_SCALAR_TYPES = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(), "string": pa.string()}
# The Hub's size buckets (upper bounds exclusive).
_SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


class PublishError(RuntimeError):
    """The dataset cannot be published as asked (the message says why)."""


def dataset_folder_name(dataset: str, run_id: str) -> str:
    """The published folder's name, unique per run.

    `datasets.load_dataset(folder)` caches a local folder under its basename and the card's config name only
    (datasets 5.2: no hash of the data files), so two runs published as `.../dataset` would load each other's rows.
    """
    return f"{dataset}-{run_id}"


def publish_local(spec: BuildSpec, final: pl.DataFrame, card: str, report_dir: Path, dataset_dir: Path) -> Path:
    """Write dataset_dir: data/*.parquet, README.md (the card's YAML metadata above `card`, the body the report
    renders), report.json, report.md, report.html and plots/ copied from report_dir; return it."""
    dataset_dir, report_dir = Path(dataset_dir), Path(report_dir)
    _refuse_non_empty(dataset_dir)
    missing = [name for name in ("report.json", "report.md") if not (report_dir / name).is_file()]
    if missing:
        raise PublishError(f"report folder '{report_dir}' lacks {missing}; run the report stage before publishing")
    table = records_table(spec, final)

    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.partial-", dir=dataset_dir.parent))
    try:
        with disk_full_as(dataset_dir, _bytes_to_publish(table, report_dir, card)):
            (staging / DATA_FILE).parent.mkdir(parents=True)
            pq.write_table(table, staging / DATA_FILE)
            shutil.copy2(report_dir / "report.json", staging / "report.json")
            shutil.copy2(report_dir / "report.md", staging / "report.md")
            if (report_dir / "report.html").is_file():  # the offline page with its figures inlined
                shutil.copy2(report_dir / "report.html", staging / "report.html")
            if (report_dir / "plots").is_dir():
                shutil.copytree(report_dir / "plots", staging / "plots")
            dataset_card(spec, card, table.num_rows).save(staging / "README.md")
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the published folder should read like any other
        _refuse_non_empty(dataset_dir)  # checked again: someone may have written there while we built
        if dataset_dir.is_dir():
            dataset_dir.rmdir()  # empty (just checked); rename cannot replace it portably
        os.rename(staging, dataset_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataset_dir


def _bytes_to_publish(table: pa.Table, report_dir: Path, card: str) -> int:
    """About what the dataset folder takes: the rows in memory (parquet is smaller), the reports, plots and card."""
    reports = [report_dir / name for name in ("report.json", "report.md", "report.html")]
    files = [p for p in reports if p.is_file()] + [p for p in (report_dir / "plots").glob("*") if p.is_file()]
    return table.nbytes + sum(p.stat().st_size for p in files) + len(card.encode())


def _refuse_non_empty(dataset_dir: Path) -> None:
    if dataset_dir.exists() and (not dataset_dir.is_dir() or any(dataset_dir.iterdir())):
        raise PublishError(
            f"dataset folder '{dataset_dir}' already exists and is not empty; choose another folder or remove it"
        )


# ---- records ------------------------------------------------------------------------------------------------------


def _field_type(prop: Any) -> pa.DataType | None:
    """Arrow type for a JSON Schema property, or None when it is not a scalar or an array of scalars."""
    if not isinstance(prop, dict):
        return None
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and prop.get("enum"):
        enum_kinds = {type(v) for v in prop["enum"] if v is not None}
        kind = "string" if enum_kinds == {str} else None
    if kind in _SCALAR_TYPES:
        return _SCALAR_TYPES[kind]
    if kind == "array":
        inner = _field_type(prop.get("items"))
        return pa.list_(inner) if inner is not None and not pa.types.is_list(inner) else None
    return None


def _coerce(value: Any, kind: pa.DataType | None, where: str) -> Any:
    if value is None:
        return None
    if kind is None:
        # Objects and mixed types: canonical JSON text keeps them loadable in one column.
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    if pa.types.is_list(kind):
        if not isinstance(value, list):
            raise PublishError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, kind.value_type, where) for v in value]
    if pa.types.is_int64(kind):
        if isinstance(value, float) and value.is_integer():
            return int(value)  # JSON Schema's integer accepts 1.0
        if isinstance(value, bool) or not isinstance(value, int):
            raise PublishError(f"{where}: expected an integer, got {value!r}")
    elif pa.types.is_float64(kind):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PublishError(f"{where}: expected a number, got {value!r}")
        return float(value)
    elif pa.types.is_boolean(kind) and not isinstance(value, bool):
        raise PublishError(f"{where}: expected a boolean, got {value!r}")
    elif pa.types.is_string(kind) and not isinstance(value, str):
        raise PublishError(f"{where}: expected a string, got {value!r}")
    return value


def records_table(spec: BuildSpec, final: pl.DataFrame) -> pa.Table:
    """Record fields (schema order, typed from the schema) followed by the metadata columns, then the quality columns."""
    records = _records(final)
    fields = _fields(spec, records)
    record_ids = final["record_id"].to_list()
    columns: dict[str, pa.Array] = {}
    for name, kind in fields:
        values = [_coerce(r.get(name), kind, f"record {rid}, field '{name}'") for rid, r in zip(record_ids, records)]
        columns[name] = pa.array(values, type=kind or pa.string())
    # Extracted attributes are not record fields: they ship as columns of their own, after the record's fields.
    for attr in spec.extract_attributes:
        if attr.name in columns:
            raise PublishError(f"extracted attribute '{attr.name}' clashes with a record field of that name")
        if attr.name not in final.columns:
            raise PublishError(f"the final records frame lacks the extracted attribute column '{attr.name}'")
        columns[attr.name] = pa.array(final[attr.name].cast(pl.String).to_list(), type=pa.string())
    for column, (source, kind) in METADATA_COLUMNS.items():
        columns[column] = pa.array(final[source].to_list(), type=kind)
    # Quality columns last: per check its score, then its extras (math_answer: _solve_rate); floats, null where the
    # check could not score the record.
    for column in quality_columns(spec):
        if column in columns:
            raise PublishError(f"the quality column '{column}' clashes with a record field of that name")
        if column not in final.columns:
            raise PublishError(f"the final records frame lacks the quality column '{column}'")
        columns[column] = pa.array(final[column].cast(pl.Float64).to_list(), type=pa.float64())
    return pa.table(columns)


def quality_columns(spec: BuildSpec) -> list[str]:
    """The columns records_table writes after the metadata ones: per quality check its `_quality_<name>` score, then
    the columns it adds besides (a math_answer check's `_solve_rate`)."""
    return [column for check in spec.quality for column in check.columns]


def record_fields(spec: BuildSpec, final: pl.DataFrame) -> list[str]:
    """The columns records_table writes before the metadata ones: the record's fields, then extracted attributes."""
    return [name for name, _ in _fields(spec, _records(final))] + [a.name for a in spec.extract_attributes]


def _records(final: pl.DataFrame) -> list[dict[str, Any]]:
    """Each final record's JSON object, after checking the frame has the columns publishing reads."""
    needed = ["record_json", *(source for source, _ in METADATA_COLUMNS.values())]
    absent = [c for c in needed if c not in final.columns]
    if absent:
        raise PublishError(f"the final records frame lacks columns {absent} (columns: {final.columns})")
    records: list[dict[str, Any]] = []
    for record_id, text in zip(final["record_id"].to_list(), final["record_json"].to_list(), strict=True):
        try:
            record = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise PublishError(f"record {record_id}: record_json is not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise PublishError(f"record {record_id}: record_json is not a JSON object")
        records.append(record)
    return records


def _fields(spec: BuildSpec, records: list[dict[str, Any]]) -> list[tuple[str, pa.DataType | None]]:
    """(name, Arrow type) of each record field: the schema's in its order, then keys it does not declare (as text)."""
    properties: dict[str, Any] = spec.record_schema.get("properties", {})
    # Keys the schema does not declare (when it allows them) still ship, after the declared ones, as text.
    extra = list(dict.fromkeys(k for r in records for k in r if k not in properties))
    clash = [k for k in [*properties, *extra] if k in METADATA_COLUMNS]
    if clash:
        raise PublishError(f"record fields {clash} clash with the metadata columns {list(METADATA_COLUMNS)}")
    return [(name, _field_type(properties[name])) for name in properties] + [(name, None) for name in extra]


# ---- card ---------------------------------------------------------------------------------------------------------


def size_category(rows: int) -> str:
    return next((label for bound, label in _SIZE_CATEGORIES if rows < bound), "n>1B")


def card_metadata(spec: BuildSpec, rows: int) -> DatasetCardData:
    """The card's YAML: what the Hub indexes (license, language, tasks, size) and what `datasets` reads (configs)."""
    pub = spec.publish
    method_tags = ["verbalized-sampling"] if spec.method.name.startswith("vs_") else []
    tags = list(dict.fromkeys(["synthetic", "polyculture", *method_tags, *pub.tags]))
    languages = list(pub.language)
    multilinguality = None if not languages else "monolingual" if len(languages) == 1 else "multilingual"
    return DatasetCardData(
        pretty_name=spec.name,
        license=pub.license,
        language=languages or None,
        multilinguality=multilinguality,
        annotations_creators=["machine-generated"],
        language_creators=["machine-generated"],
        source_datasets=["original"],
        size_categories=[size_category(rows)],
        task_categories=list(pub.task_categories) or None,
        tags=tags,
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    )


def dataset_card(spec: BuildSpec, body: str, rows: int) -> DatasetCard:
    """README.md: the card's YAML metadata (card_metadata) above `body` (the Markdown report.card renders)."""
    card = DatasetCard.from_template(card_metadata(spec, rows), template_str=CARD_TEMPLATE, body=body)
    # Parsed back the way the Hub and `datasets` will read it: a card whose YAML does not survive is never written.
    if DatasetCard(str(card)).data.to_dict() != card.data.to_dict():
        raise PublishError("the dataset card's YAML metadata does not read back as written")
    return card
