"""probe_model: probe a model (optionally with a LoRA adapter) on task families and write probe.json + probe.md.

For scheduled or remote runs through Prefect; `polyculture probe` calls the same probe directly (no server start).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from polyculture import progress
from polyculture.engines.factory import create_engine
from polyculture.runs.files import jsonable, write_text_atomic
from polyculture.spec import ModelSpec
from polyculture.tuning.families import resolve_family
from polyculture.tuning.probe import answer_token_cap, engine_tokenizer, probe_family
from polyculture.tuning.report import probe_markdown


@task(name="probe family", cache_policy=NONE)
def probe_family_task(engine: Any, family_ref: str, samples: int, temperature: float) -> dict[str, Any]:
    family = resolve_family(family_ref)
    tokenizer = engine_tokenizer(engine)
    cap = answer_token_cap(tokenizer, family) if tokenizer is not None else None
    return probe_family(engine, family, samples=samples, temperature=temperature, answer_tokens=cap)


@flow(name="probe_model", log_prints=False)
def probe_model(
    families: list[str],
    model: str = "smollm2-135m-instruct",
    adapter: str | None = None,
    engine: str = "transformers",
    samples: int = 100,
    temperature: float = 1.0,
    seed: int = 0,
    output_dir: str = "outputs/probes",
) -> dict[str, Any]:
    """Probe figures per family; written to <output_dir>/<UTC time>/probe.{json,md}."""
    model_spec = ModelSpec(name=model, engine=engine, adapter=adapter)
    for ref in families:  # refuse a bad family before the model loads
        resolve_family(ref)
    progress.report("load model", 0, 1, f"{engine}: {model}")
    loaded = create_engine(model_spec, seed=seed, base_dir=Path.cwd())
    progress.report("load model", 1, 1, "")
    try:
        results = []
        for done, ref in enumerate(families):
            progress.report("probe", done, len(families), ref)
            results.append(probe_family_task(loaded, ref, samples, temperature))
        progress.report("probe", len(families), len(families), "")
    finally:
        loaded.close()
    out = Path(output_dir) / f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model, "adapter": adapter, "engine": engine, "seed": seed, "results": results}
    write_text_atomic(out / "probe.json", json.dumps(jsonable(payload), indent=2) + "\n")
    title = f"# Probe: {model}" + (f" + {adapter}" if adapter else "") + f" ({engine}, {samples} samples, T={temperature})"
    write_text_atomic(out / "probe.md", f"{title}\n\n{probe_markdown(results)}")
    return {"output_dir": str(out), "results": results}
