"""The generations loop's config (configs/generations/*.yaml): a base build spec, G, the regime, the arms, tuning.

Everything that can be refused is refused here, before any model time: G < 1, a regime typo, a fresh-data source
without its text column, and an arm override the build spec does not accept (named `arms.<arm>.<key>`). Each arm's
build spec is the base spec's YAML with the arm's overrides deep-merged on top, validated and preflighted like any
build spec (relative paths still resolve beside the base spec).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polyculture.index.sources import SourceError, source_columns, source_files
from polyculture.preflight import resolve_path
from polyculture.spec import BuildSpec, SpecError, error_lines
from polyculture.tuning.config import LORA_MODULES, merged
from polyculture.tuning.yaml_file import load_validated

ARM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class GenerationsConfigError(ValueError):
    """A loop config that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FreshData(_Strict):
    source: str = Field(description="A parquet / JSON Lines / CSV file of real data (relative: beside this config).")
    text_column: str = Field(default="text", description="Column holding the text a fresh training example answers.")
    share: float = Field(gt=0, lt=1, description="Share of every generation's training mix that is fresh data.")


class SftSettings(_Strict):
    # Each adapter is trained from the base model, never from the previous generation's weights: `model.adapter`
    # applies one adapter to a plain base (an adapter on an adapter is refused), the regime alone then decides what a
    # generation learns from (accumulate carries the history in the data, as Gerstgrasser et al. do), and every
    # generation costs the same. Previous-weights training would need a merged folder per generation first.
    start_from: Literal["base"] = Field(
        default="base", alias="from", description="Each generation's adapter is trained from the base model."
    )
    rank: int = Field(default=8, ge=1, le=256, description="LoRA rank.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    target_modules: list[str] = Field(default=LORA_MODULES, min_length=1)
    steps: int = Field(default=60, ge=1, le=100_000, description="Optimiser steps.")
    batch_size: int = Field(default=8, ge=1, le=512, description="Chat examples per step.")
    learning_rate: float = Field(default=5e-4, gt=0, le=1)
    max_tokens: int = Field(default=512, ge=16, le=8192, description="Examples are cut to this many tokens.")
    seed: int = Field(default=0, ge=0)


class TailSettings(_Strict):
    fields: list[str] = Field(
        default_factory=list,
        description="Record fields whose generation-0 rare values are tracked (attributes read from fields are "
        "always tracked).",
    )
    rare_share: float = Field(
        default=0.2, gt=0, le=1, description="A value is rare when it is among the least frequent rare_share of values."
    )
    ngram: int = Field(default=2, ge=1, le=5, description="Word n-grams of the text; rare: in one gen-0 record only.")


class ModelProbe(_Strict):
    families: list[str] = Field(
        default_factory=list,
        description="Enumerable task families (configs/tuning/families names or YAML paths) on which each "
        "generation's model is probed: the exact normalised entropy of its answer distribution (1 = uniform), "
        "a figure of the model itself beside those of its data. Empty: no probe.",
    )
    samples: int = Field(
        default=0, ge=0, le=1000, description="Sampled answers per phrasing as well (0: the exact figures only)."
    )


class GenerationsConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$", description="Loop name (its output folder).")
    spec: str = Field(description="Base build spec (relative: beside this config).")
    generations: int = Field(ge=1, le=100, description="G: generations after the base model's (generation 0).")
    regime: Literal["replace", "accumulate", "fresh"] = Field(
        description="replace: generation g+1 trains on generation g's records; accumulate: on all generations so far; "
        "fresh: on generation g's records plus a fixed share of fresh real data (the `fresh` section)."
    )
    fresh: FreshData | None = None
    arms: dict[str, dict[str, Any]] = Field(
        min_length=1, description="Arm name -> overrides of the build spec (nested keys merged; lists replaced)."
    )
    tuning: SftSettings = SftSettings()
    tail: TailSettings = TailSettings()
    probe: ModelProbe = ModelProbe()
    replicate: bool = Field(
        default=True,
        description="Build generation 0 a second time with the next seed (seed + 1) and measure it like a generation: "
        "the figures' sampling noise, against which any drift is read (one more build per arm).",
    )
    answer_field: str | None = Field(
        default=None, description="Record field whose distinct values count as unique answers (default: the text)."
    )
    output_dir: str = Field(default="outputs", description="Loops go to <output_dir>/<name>/<arm>/gen-<g>/.")

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import re

        bad = [name for name in arms if not re.match(ARM_NAME, name)]
        if bad:
            raise ValueError(f"arm names must be letters, digits, - or _ ; got {bad}")
        return arms

    @model_validator(mode="after")
    def _fresh(self) -> GenerationsConfig:
        if (self.regime == "fresh") != (self.fresh is not None):
            raise ValueError("fresh: required with regime 'fresh' and only then")
        return self


def load_generations_config(path: Path | str) -> tuple[GenerationsConfig, dict[str, BuildSpec]]:
    """The config and each arm's build spec (validated and preflighted); every refusal names its field."""
    path = Path(path)
    config = load_validated(
        path, GenerationsConfig, GenerationsConfigError, "a generations config: a mapping with name, spec, generations"
    )
    base_dir = path.resolve().parent
    if config.fresh is not None:
        _check_fresh(config.fresh, base_dir)
    _check_probe(config.probe, base_dir)
    spec_path, base = base_spec(config, base_dir)
    if (base.get("model") or {}).get("adapter"):
        raise GenerationsConfigError("spec: model.adapter is set; the loop tunes its own adapters, leave it unset")
    specs = {name: arm_spec(base, name, overrides, spec_path.parent) for name, overrides in config.arms.items()}
    return config, specs


def base_spec(config: GenerationsConfig, config_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The base build spec's file and its YAML mapping."""
    spec_path = resolve_path(config.spec, config_dir)
    if spec_path is None:
        raise GenerationsConfigError(f"spec: build spec '{config.spec}' not found (looked beside the config)")
    try:
        base = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise GenerationsConfigError(f"spec: '{spec_path}' is not valid YAML: {exc}") from None
    if not isinstance(base, dict):
        raise GenerationsConfigError(f"spec: '{spec_path}' does not hold a build spec mapping")
    return spec_path, base


def arm_mapping(base: dict[str, Any], overrides: dict[str, Any], adapter: Path | None = None) -> dict[str, Any]:
    """The base spec's mapping with an arm's overrides on top (and model.adapter when a generation has one)."""
    data = merged(copy.deepcopy(base), overrides)
    if adapter is not None:
        data.setdefault("model", {})["adapter"] = str(adapter)
    return data


def arm_spec(base: dict[str, Any], name: str, overrides: dict[str, Any], base_dir: Path) -> BuildSpec:
    from polyculture.preflight import preflight

    data = arm_mapping(base, overrides)
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as exc:
        lines = [f"arms.{name}.{'.'.join(str(p) for p in loc)}: {msg}" for loc, msg in error_lines(exc)]
        raise GenerationsConfigError("\n".join(lines)) from None
    try:
        return preflight(spec, base_dir)
    except SpecError as exc:
        raise GenerationsConfigError(f"arms.{name}: {exc}") from None


def resolved_arm_yaml(spec: BuildSpec, data: dict[str, Any]) -> str:
    """An arm's spec as a file that builds from any folder: record.schema and every located file made absolute."""
    from polyculture.spec.build import set_dotted

    data = copy.deepcopy(data)
    schema = resolve_path(spec.record.schema_path, spec.base_dir)
    if schema is not None:
        set_dotted(data, "record.schema", str(schema))
    for key, value in spec.located_files.items():
        set_dotted(data, key, value)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _check_fresh(fresh: FreshData, base_dir: Path) -> None:
    source = Path(fresh.source) if Path(fresh.source).is_absolute() else base_dir / fresh.source
    try:
        columns = source_columns(source_files(source)[0])
    except SourceError as exc:
        raise GenerationsConfigError(f"fresh.source: {exc}") from None
    if fresh.text_column not in columns:
        raise GenerationsConfigError(
            f"fresh.text_column: '{fresh.text_column}' is not a column of {source}; columns: {columns}"
        )


def _check_probe(probe: ModelProbe, base_dir: Path) -> None:
    from polyculture.tuning.families import FamilyError, resolve_family

    for index, ref in enumerate(probe.families):
        try:
            resolve_family(probe_family_ref(ref, base_dir))
        except FamilyError as exc:
            raise GenerationsConfigError(f"probe.families[{index}]: {exc}") from None


def probe_family_ref(ref: str, config_dir: Path) -> str:
    """A family name, or a YAML path made absolute (relative paths resolve beside the config)."""
    local = config_dir / ref
    return str(local) if local.is_file() else ref


def fresh_source(config: GenerationsConfig, config_dir: Path) -> Path:
    assert config.fresh is not None
    source = Path(config.fresh.source)
    return source if source.is_absolute() else config_dir / source


def generations_json_schema() -> dict[str, Any]:
    schema = GenerationsConfig.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://polyculture.dev/schemas/generations.schema.json"
    return schema
