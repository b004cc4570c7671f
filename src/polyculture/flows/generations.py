"""generations: the self-consuming loop, as a Prefect flow that only wires the steps of tuning.generations.

Per arm, generation 0 builds with the base model; then for g = 0..G-1: collect the training mix (by regime) from
generation g, tune adapter g from the base model, and build generation g+1 with it (`model.adapter`). Every step
leaves a marker written last (build.done, tune.done, metrics.json); a re-run skips finished steps and resumes an
unfinished build in its own run folder. With `probe.families`, each generation's model is probed too (probe.json).
Generation 0 is also built a second time with the next seed (`replicate`): its figures' distance from generation
0's is the sampling noise any drift is read against. The drift report is written at the end from every metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow, task
from prefect.cache_policies import NONE

from polyculture import progress
from polyculture.embedded import EMBEDDED_CHAT_MODELS
from polyculture.flows.build_dataset import build_dataset
from polyculture.runs.folders import RESULT_FILE
from polyculture.spec import BuildSpec
from polyculture.tuning import generations as steps
from polyculture.tuning.drift_report import write_drift_report
from polyculture.tuning.generations_config import (
    GenerationsConfig,
    arm_mapping,
    base_spec,
    fresh_source,
    load_generations_config,
    probe_family_ref,
    resolved_arm_yaml,
)

BUILD_RUN_ID = "build"  # one build per generation folder: a fixed run id makes a re-run resume that build


def build_step(spec: BuildSpec, data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Not a task: the build is a flow of its own (a subflow run here)."""
    marker = folder / steps.BUILD_DONE
    done = steps.read_marker(marker)
    if done is not None:
        return done
    finished = folder / spec.name / BUILD_RUN_ID / RESULT_FILE  # killed after the build, before the marker
    if finished.is_file():
        result = json.loads(finished.read_text(encoding="utf-8"))
        steps.write_marker(marker, result)
        return result
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "spec.yaml"
    spec_file.write_text(resolved_arm_yaml(spec, data), encoding="utf-8")
    result = build_dataset(str(spec_file), run_id=BUILD_RUN_ID, output_root=str(folder))
    steps.write_marker(marker, result)
    return result


@task(name="tune generation", cache_policy=NONE)
def tune_step(config: GenerationsConfig, spec: BuildSpec, mix: pl.DataFrame, folder: Path) -> dict[str, Any]:
    from polyculture.engines.model_files import resolve_chat_model
    from polyculture.tuning.sft import train_sft

    marker = folder / steps.TUNE_DONE
    done = steps.read_marker(marker)
    if done is not None:
        return done
    adapter = folder / "adapter"
    if adapter.exists():  # saved, but killed before the marker: the adapter is whole (saved atomically)
        from polyculture.tuning.adapter import read_adapter_metadata

        result = (read_adapter_metadata(adapter) or {}).get("training", {})
    else:
        mix.write_parquet(folder / "train.parquet")
        base = resolve_chat_model(spec.model.name, spec.base_dir)
        # An embedded model is named as such; any other base by its absolute folder, so the adapter resolves anywhere.
        base_name = spec.model.name if spec.model.name in EMBEDDED_CHAT_MODELS else str(base.path)
        metadata = {"base_model": base_name, "loop": config.name, "examples": mix.height,
                    "tuning": config.tuning.model_dump(by_alias=True)}  # fmt: skip
        result = train_sft(base.path, steps.as_messages(mix), config.tuning, adapter, metadata).to_dict()
    steps.write_marker(marker, result)
    return result


@task(name="probe generation", cache_policy=NONE)
def probe_step(config: GenerationsConfig, config_dir: Path, spec: BuildSpec, adapter: Path | None,
               folder: Path) -> dict[str, Any]:  # fmt: skip
    marker = folder / steps.PROBE
    done = steps.read_marker(marker)
    if done is None:
        families = [probe_family_ref(ref, config_dir) for ref in config.probe.families]
        done = steps.model_probe(spec, adapter, families, config.probe.samples, config.tuning.seed)
        steps.write_marker(marker, done)
    return done["figures"]


def _arm(config: GenerationsConfig, config_dir: Path, root: Path, arm: str, spec: BuildSpec,
         base: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    fresh = fresh_source(config, config_dir) if config.fresh is not None else None
    examples: list[pl.DataFrame] = []
    out: list[dict[str, Any]] = []
    tail: steps.Tail | None = None
    adapter: Path | None = None
    for g in range(config.generations + 1):
        folder = steps.gen_dir(root, arm, g)
        progress.report(f"{arm} gen {g}", 0, 1, "build")
        data = arm_mapping(base, config.arms[arm], adapter)
        build = build_step(_with_adapter(spec, data), data, folder)
        records = steps.published_records(spec, build)
        if tail is None:
            tail = steps.rare_tail(spec, records, config.tail)
            steps.write_marker(root / arm / "tail.json", tail.to_dict())
        metrics = steps.read_marker(folder / steps.METRICS)
        if metrics is None:
            metrics = {
                "arm": arm,
                "generation": g,
                "figures": steps.generation_figures(spec, config, build, records, tail),
            }
        if config.probe.families:  # a loop resumed with a probe added gets the figures for finished generations too
            metrics["figures"].update(probe_step(config, config_dir, spec, adapter, folder))
        examples.append(steps.chat_examples(spec, records, g))
        if g < config.generations:
            mix = steps.training_mix(config, spec, examples, fresh)
            metrics["tuning"] = tune_step(config, spec, mix, folder)
            adapter = folder / "adapter"
        steps.write_marker(folder / steps.METRICS, metrics)
        out.append(metrics)
    return out


def _replicate(
    config: GenerationsConfig, root: Path, arm: str, spec: BuildSpec, base: dict[str, Any]
) -> dict[str, Any]:
    """Generation 0 again with the next seed, measured against generation 0's tail: the figures' noise floor."""
    folder = steps.replicate_dir(root, arm)
    metrics = steps.read_marker(folder / steps.METRICS)
    if metrics is not None:
        return metrics
    progress.report(f"{arm} gen 0 again", 0, 1, "build (seed + 1)")
    data = arm_mapping(base, config.arms[arm]) | {"seed": spec.seed + 1}
    build = build_step(_with_adapter(spec, data), data, folder)
    tail = steps.Tail(**(steps.read_marker(root / arm / "tail.json") or {}))
    figures = steps.generation_figures(spec, config, build, steps.published_records(spec, build), tail)
    metrics = {"arm": arm, "generation": 0, "replicate": True, "seed": spec.seed + 1, "figures": figures}
    steps.write_marker(folder / steps.METRICS, metrics)
    return metrics


def _with_adapter(spec: BuildSpec, data: dict[str, Any]) -> BuildSpec:
    """The arm's spec for this generation, preflighted again when it differs from the arm's (an adapter, or the
    replicate's seed)."""
    from polyculture.preflight import preflight

    if not (data.get("model") or {}).get("adapter") and data.get("seed", spec.seed) == spec.seed:
        return spec
    return preflight(BuildSpec.model_validate(data), spec.base_dir)


@flow(name="generations", log_prints=False)
def generations(config_path: str) -> dict[str, Any]:
    """Run (or resume) the loop a generations config describes; returns where the drift report is, with figures."""
    config, specs = load_generations_config(config_path)
    config_dir = Path(config_path).resolve().parent
    root = (Path(config.output_dir) / config.name).absolute()  # adapters are named by absolute paths
    steps.check_loop_identity(root, steps.loop_identity(config, specs))
    base = base_spec(config, config_dir)[1]
    arms = {arm: _arm(config, config_dir, root, arm, spec, base) for arm, spec in specs.items()}
    replicates = {}
    if config.replicate:
        replicates = {arm: _replicate(config, root, arm, spec, base) for arm, spec in specs.items()}
    loop = {"name": config.name, "regime": config.regime, "generations": config.generations,
            "config": config.model_dump(by_alias=True)}  # fmt: skip
    paths = write_drift_report(root, loop, arms, replicates)
    progress.report("report", 1, 1, str(paths["html"]))
    return {"root": str(root), **{k: str(v) for k, v in paths.items()}, "arms": arms, "replicates": replicates}
