"""The tuning commands: probe a model's mode collapse on enumerable tasks, and diffuse-tune a LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from polyculture.cli.display import RichReporter, progress_bar, stdout, write_json
from polyculture.cli.errors import fail
from polyculture.cli.options import JsonOpt, QuietOpt


def _family_table(title: str, probes: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in (
        "family",
        "options",
        "norm. entropy (exact)",
        "top option (exact)",
        "KL bits (exact)",
        "valid mass",
        "norm. entropy (sampled)",
        "coverage (sampled)",
        "invalid (sampled)",
    ):
        table.add_column(column, justify="left" if column.startswith(("family", "top")) else "right")
    from polyculture.tuning.report import fmt, headline

    for probe in probes:
        h = headline(probe)
        table.add_row(
            h["family"],
            str(h["options"]),
            fmt(h["exact_normalized_entropy"]),
            f"{h['exact_top_option']} ({fmt(h['exact_top_share'], '.0%')})",
            fmt(h["exact_kl_bits"]),
            fmt(h["valid_mass"], ".2e"),
            fmt(h["sampled_normalized_entropy"]),
            "-" if h["sampled_coverage_count"] is None else f"{h['sampled_coverage_count']}/{h['options']}",
            fmt(h["sampled_invalid_rate"], ".0%"),
        )
    return table


def probe(
    tasks: Annotated[
        list[str],
        typer.Argument(help="Task families: names from configs/tuning/families (e.g. numbers_1_10) or YAML paths."),
    ],
    model: Annotated[str, typer.Option(help="Embedded model name or local HF folder (or a tuned adapter folder).")] = (
        "smollm2-135m-instruct"
    ),
    adapter: Annotated[Path | None, typer.Option(help="A LoRA adapter folder (from `polyculture tune`).")] = None,
    engine: Annotated[str, typer.Option(help="transformers or vllm.")] = "transformers",
    samples: Annotated[int, typer.Option(min=0, help="Samples per prompt phrasing (0: exact figures only).")] = 100,
    temperature: Annotated[float, typer.Option(min=0.01, max=5.0, help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Engine seed.")] = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure a model's mode collapse on enumerable tasks: the exact distribution over every valid answer (sequence
    log-probs of whole answers, end-of-turn included) and the sampled one (N samples per phrasing): entropy,
    normalised entropy, coverage, KL to the target, top option's share, invalid-output rate."""
    from pydantic import ValidationError

    from polyculture.engines.factory import create_engine
    from polyculture.preflight import adapter_problem
    from polyculture.spec import ModelSpec
    from polyculture.tuning.families import resolve_family
    from polyculture.tuning.probe import answer_token_cap, engine_tokenizer, probe_family

    if engine not in ("transformers", "vllm"):
        fail(f"--engine '{engine}' is not allowed; allowed: transformers, vllm")
    families = [resolve_family(t) for t in tasks]
    try:
        model_spec = ModelSpec(name=model, engine=engine, adapter=str(adapter) if adapter else None)
    except ValidationError as exc:
        fail("; ".join(f"--{'.'.join(str(p) for p in e['loc']) or 'model'}: {e['msg']}" for e in exc.errors()))
    problem = adapter_problem(model_spec, Path("."))
    if problem is not None:  # worded as a validation error of the option, as ModelSpec's own are above
        fail(f"--adapter: Value error, {problem}")
    bar = progress_bar(quiet, label_width=10, transient=True)
    results = []
    with bar:
        loading = bar.add_task("load", total=1, note=f"{engine}: {model}")
        eng = create_engine(model_spec, seed=seed, base_dir=Path.cwd())
        bar.update(loading, completed=1)
        probing = bar.add_task("probe", total=len(families), note="")
        tokenizer = engine_tokenizer(eng)
        for family in families:
            bar.update(probing, note=family.name)
            cap = answer_token_cap(tokenizer, family) if tokenizer is not None else None
            results.append(probe_family(eng, family, samples=samples, temperature=temperature, answer_tokens=cap))
            bar.advance(probing)
        eng.close()
    if as_json:
        payload = {"model": model, "adapter": str(adapter) if adapter else None, "engine": engine, "results": results}
        write_json(payload)
        return
    name = model + (f" + {adapter}" if adapter else "")
    stdout().print(_family_table(f"{name} ({engine}, {samples} samples per phrasing, T={temperature})", results))


def tune(
    config_path: Annotated[Path, typer.Argument(help="Tuning config (YAML), e.g. configs/tuning/diffuse.yaml.")],
    hold_out: Annotated[
        list[str] | None, typer.Option("--hold-out", help="Family to hold out (repeatable); replaces held_out.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override training.max_steps.")] = None,
    max_minutes: Annotated[float | None, typer.Option(min=0.01, help="Override training.max_minutes.")] = None,
    samples: Annotated[int | None, typer.Option(min=0, help="Override probe.samples (per phrasing).")] = None,
    leave_one_out: Annotated[
        bool, typer.Option("--leave-one-out", help="One run per family, each holding that family out (slow).")
    ] = False,
    run_id: Annotated[str | None, typer.Option(help="Run folder name (default: time + config hash).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Diffuse fine-tuning: train a LoRA adapter so the model's answers follow each family's target distribution,
    probe trained and held-out families before and after, and save the adapter with its metadata (usable as
    `model.adapter` in a build spec)."""
    from polyculture import progress
    from polyculture.tuning.config import config_families, load_tune_config
    from polyculture.tuning.report import fmt

    overrides: dict[str, Any] = {}
    if hold_out is not None:
        overrides["held_out"] = hold_out
        listed = load_tune_config(config_path).families  # a family named here leaves the training list too
        if listed is not None:
            overrides["families"] = [f for f in listed if f not in hold_out]
    training = {k: v for k, v in {"max_steps": max_steps, "max_minutes": max_minutes}.items() if v is not None}
    if training:
        overrides["training"] = training
    if samples is not None:
        overrides["probe"] = {"samples": samples}
    # refuse a bad config before any model loads
    config = load_tune_config(config_path, overrides)
    config_families(config, config_path.resolve().parent)
    from polyculture.flows.diffuse_tune import diffuse_tune, diffuse_tune_leave_one_out

    bar = progress_bar(quiet, label_width=13)
    with bar, progress.reporting(RichReporter(bar)):
        if leave_one_out:
            result = diffuse_tune_leave_one_out(str(config_path), overrides=overrides)
        else:
            result = diffuse_tune(str(config_path), run_id=run_id, overrides=overrides)
    if as_json:
        write_json(result)
        return
    if leave_one_out:
        stdout().print(f"leave-one-out summary: {result['summary_dir']}/leave_one_out.md")
        return
    table = Table(
        title=f"{config.name}: {result['steps']} steps in {result['seconds']:.0f} s ({result['stop_reason']})"
    )
    for column in (
        "family",
        "role",
        "norm. entropy (exact)",
        "top option (exact)",
        "coverage (sampled)",
        "invalid (sampled)",
        "loss / H(w)",
    ):
        table.add_column(column)
    for row in result["before_after"]:
        b, a = row["before"], row["after"]
        ratio = result["final_loss_over_entropy"].get(row["family"])
        table.add_row(
            row["family"],
            row["role"],
            f"{b['exact_normalized_entropy']:.3f} -> {a['exact_normalized_entropy']:.3f}",
            f"{b['exact_top_option']} {b['exact_top_share']:.0%} -> {a['exact_top_option']} {a['exact_top_share']:.0%}",
            f"{b['sampled_coverage_count']} -> {a['sampled_coverage_count']} of {b['options']}",
            fmt(b["sampled_invalid_rate"], ".0%") + " -> " + fmt(a["sampled_invalid_rate"], ".0%"),
            "-" if ratio is None else f"{ratio:.3f}",
        )
    stdout().print(table)
    stdout().print(f"adapter: {result['adapter_dir']}\nreport:  {result['report_md']}")
