"""diffuse_tune: probe -> LoRA diffuse fine-tuning -> probe again -> save the adapter, as Prefect tasks.

The base model is loaded once (transformers, float32) and probed in memory before and after training; the trained
and the held-out families are both probed, so the report shows what was learnt and what generalised.
`diffuse_tune_leave_one_out` repeats the run holding out each family in turn.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from polyculture import progress
from polyculture.engines.transformers_engine import TransformersEngine
from polyculture.runs.files import jsonable, write_text_atomic
from polyculture.tuning.adapter import save_adapter
from polyculture.tuning.config import ProbeSettings, TuneConfig, config_families, load_tune_config
from polyculture.tuning.families import TaskFamily
from polyculture.tuning.probe import answer_token_cap, probe_family
from polyculture.tuning.report import before_after_rows, headline, leave_one_out_markdown, write_tune_report
from polyculture.tuning.train import attach_lora, train_diffuse


def new_tune_run_id(config: TuneConfig) -> str:
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:8]
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{digest}"


@task(name="load base model", cache_policy=NONE)
def load_base_task(config: TuneConfig, base_dir: Path) -> TransformersEngine:
    from polyculture.engines.model_files import resolve_chat_model

    progress.report("load model", 0, 1, config.model)
    # float32: CPU training in bf16 is slower and loses the small LoRA updates.
    engine = TransformersEngine(resolve_chat_model(config.model, base_dir), seed=config.seed, dtype="float32")
    progress.report("load model", 1, 1, config.model)
    return engine


@task(name="probe", cache_policy=NONE)
def probe_task(
    engine: TransformersEngine, families: list[TaskFamily], settings: ProbeSettings, label: str
) -> dict[str, Any]:
    results = {}
    for done, family in enumerate(families):
        progress.report(f"probe {label}", done, len(families), family.name)
        results[family.name] = probe_family(
            engine,
            family,
            samples=settings.samples,
            temperature=settings.temperature,
            answer_tokens=answer_token_cap(engine.tokenizer, family),
        )
    progress.report(f"probe {label}", len(families), len(families), "")
    return results


@flow(name="diffuse_tune", log_prints=False)
def diffuse_tune(
    config_path: str, run_id: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Tune a LoRA adapter towards each family's target; returns where the adapter and report are, with figures."""
    config = load_tune_config(config_path, overrides)
    base_dir = Path(config_path).resolve().parent
    training, held_out = config_families(config, base_dir)
    run_id = run_id or new_tune_run_id(config)
    run_dir = Path(config.output_dir) / config.name / run_id
    adapter_dir = run_dir / "adapter"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(jsonable(config.model_dump()), indent=2) + "\n")

    engine = load_base_task(config, base_dir)
    everything = training + held_out
    before = probe_task(engine, everything, config.probe, "before")
    model = attach_lora(engine.model, config.lora, config.seed)
    train_result = task(name="train", cache_policy=NONE)(train_diffuse)(
        model, engine.tokenizer, training, config.training, seed=config.seed
    )
    tuned = TransformersEngine.from_loaded(
        model, engine.tokenizer, name=f"{config.model}+{config.name}", seed=config.seed
    )
    after = probe_task(tuned, everything, config.probe, "after")

    roles = {f.name: "trained" for f in training} | {f.name: "held out" for f in held_out}
    rows = before_after_rows(before, after, roles)
    metadata = {
        "base_model": config.model,
        "name": config.name,
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "families": [f.name for f in training],
        "held_out": [f.name for f in held_out],
        "final_loss": train_result.final_loss,
        "final_loss_over_entropy": train_result.final_ratio,
        "steps": train_result.steps,
        "stop_reason": train_result.stop_reason,
        "config": config.model_dump(),
        "probe": {
            "before": {k: headline(v) for k, v in before.items()},
            "after": {k: headline(v) for k, v in after.items()},
        },
    }
    task(name="save adapter", cache_policy=NONE)(save_adapter)(model, adapter_dir, metadata)
    result = {
        "name": config.name,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "adapter_dir": str(adapter_dir),
        "base_model": config.model,
        "families": metadata["families"],
        "held_out": metadata["held_out"],
        "config": config.model_dump(),
        "training": train_result.to_dict(),
        "before_after": rows,
        "probe_before": before,
        "probe_after": after,
    }
    paths = write_tune_report(run_dir, result)
    progress.report("report", 1, 1, str(paths["md"]))
    tuned.close()
    return {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "adapter_dir": str(adapter_dir),
        "report_md": str(paths["md"]),
        "report_json": str(paths["json"]),
        "plot": str(paths["plot"]),
        "steps": train_result.steps,
        "seconds": train_result.seconds,
        "stop_reason": train_result.stop_reason,
        "final_loss_over_entropy": train_result.final_ratio,
        "before_after": rows,
    }


@flow(name="diffuse_tune_leave_one_out", log_prints=False)
def diffuse_tune_leave_one_out(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run per family, each holding that family out; the summary is how each held-out family moved."""
    overrides = dict(overrides or {})
    config = load_tune_config(config_path, overrides)
    base_dir = Path(config_path).resolve().parent
    training, held_out = config_families(config, base_dir)
    names = [f.name for f in training + held_out]
    stamp = new_tune_run_id(config)
    runs = []
    for name in names:
        rotation = overrides | {"families": [n for n in names if n != name], "held_out": [name]}
        result = diffuse_tune(config_path, run_id=f"{stamp}-without-{name}", overrides=rotation)
        row = next(r for r in result["before_after"] if r["family"] == name)
        runs.append({"held_out": name, "run_dir": result["run_dir"], "before": row["before"], "after": row["after"]})
    summary_dir = Path(config.output_dir) / config.name / f"{stamp}-leave-one-out"
    summary_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(summary_dir / "leave_one_out.json", json.dumps(jsonable(runs), indent=2) + "\n")
    write_text_atomic(summary_dir / "leave_one_out.md", leave_one_out_markdown(runs))
    return {"summary_dir": str(summary_dir), "runs": runs}
