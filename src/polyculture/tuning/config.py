"""TuneConfig: the declarative description of one diffuse fine-tuning run (configs/tuning/*.yaml)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polyculture.embedded import EMBEDDED_CHAT_MODELS
from polyculture.tuning.families import FamilyError, TaskFamily, available_families, resolve_family
from polyculture.tuning.yaml_file import load_validated

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TuneConfigError(ValueError):
    """A tuning config that cannot be used; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    r: int = Field(default=4, ge=1, le=256, description="LoRA rank (the paper uses 4).")
    alpha: float = Field(default=8.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default=LORA_MODULES, min_length=1)


class TrainingSettings(_Strict):
    learning_rate: float = Field(
        default=1e-3,
        gt=0,
        le=1,
        description="AdamW learning rate. The paper's 5e-5 is for 7B models on GPUs; on the 135M embedded model "
        "with r=4 LoRA it needs ~20x more steps than a CPU budget allows (see the README).",
    )
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping (total L2 norm).")
    prompts_per_step: int = Field(
        default=4, ge=1, le=256, description="Prompts (family x phrasing) per optimiser step."
    )
    max_steps: int = Field(default=300, ge=1)
    max_minutes: float = Field(default=12.0, gt=0, description="Wall-clock budget for the training loop.")
    gamma: float = Field(
        default=0.2,
        ge=0,
        description="Early stop for non-exhaustive families: a family leaves training once its loss <= (1+gamma) H(w).",
    )
    recheck_every: int = Field(
        default=10,
        ge=1,
        description="Steps between re-measurements of families that left training (they rejoin if "
        "training on the others pushed their loss back above the threshold).",
    )
    converged_ratio: float = Field(
        default=1.02,
        ge=1,
        description="An exhaustive family counts as converged (and leaves training) at loss <= converged_ratio H(w).",
    )


class ProbeSettings(_Strict):
    samples: int = Field(default=50, ge=0, le=10_000, description="Samples per prompt phrasing (0: exact only).")
    temperature: float = Field(default=1.0, gt=0, le=5)


class TuneConfig(_Strict):
    name: str = Field(default="diffuse", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
    model: str = Field(
        default="smollm2-135m-instruct",
        description=f"Base model: an embedded model ({', '.join(EMBEDDED_CHAT_MODELS)}) or a local HF folder.",
    )
    families: list[str] | None = Field(
        default=None,
        description="Families to train on (names or YAML paths); default: every family in the config's own "
        "families/ folder if it has one, else in configs/tuning/families, except the held-out ones.",
    )
    held_out: list[str] = Field(default_factory=list, description="Families never trained on, probed before/after.")
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    probe: ProbeSettings = ProbeSettings()
    output_dir: str = Field(default="outputs/tuning", description="Runs go to <output_dir>/<name>/<run-id>/.")
    seed: int = 0

    @model_validator(mode="after")
    def _disjoint(self) -> TuneConfig:
        overlap = sorted(set(self.families or []) & set(self.held_out))
        if overlap:
            raise ValueError(f"families and held_out overlap on {overlap}; a held-out family must not be trained on")
        return self


def load_tune_config(path: Path | str, overrides: dict | None = None) -> TuneConfig:
    return load_validated(
        Path(path),
        TuneConfig,
        TuneConfigError,
        "a tuning config: a mapping with name, model, families, held_out, ...",
        overrides=lambda raw: merged(raw, overrides or {}),
    )


def merged(base: dict, overrides: dict) -> dict:
    """`overrides` on top of `base`, nested mappings merged key by key (so training.max_steps alone can change)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def config_families(config: TuneConfig, base_dir: Path) -> tuple[list[TaskFamily], list[TaskFamily]]:
    """(training families, held-out families), loaded and checked; every problem names the field."""
    family_dir = base_dir / "families" if (base_dir / "families").is_dir() else None

    def load(field: str, names: list[str]) -> list[TaskFamily]:
        loaded = []
        for name in names:
            ref = str(base_dir / name) if name.endswith((".yaml", ".yml")) else name
            try:
                loaded.append(resolve_family(ref, family_dir))
            except FamilyError as exc:
                raise TuneConfigError(f"{field}: {exc}") from None
        return loaded

    held_out = load("held_out", config.held_out)
    held_names = {f.name for f in held_out}
    if config.families is None:
        # A config folder with its own families/ trains on those; otherwise on the shipped ones.
        names = [n for n in available_families(family_dir, only=True) if n not in held_names]
    else:
        names = config.families
    training = load("families", names)
    overlap = sorted({f.name for f in training} & held_names)
    if overlap:
        raise TuneConfigError(f"families and held_out overlap on {overlap}; a held-out family must not be trained on")
    if not training:
        raise TuneConfigError("families: nothing to train on (every family is held out or none was found)")
    seen: set[str] = set()
    for family in training + held_out:
        if family.name in seen:
            raise TuneConfigError(f"family '{family.name}' is listed twice")
        seen.add(family.name)
    return training, held_out
