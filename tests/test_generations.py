"""The generations loop: refusals before any model time, the training mix per regime, tail coverage, and one real
loop (embedded SmolLM2 through the transformers engine, real LoRA tuning, real MiniLM and FAISS, real Prefect) that
resumes after a simulated kill."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import PROJECT, small_spec_dict

from polyculture.spec import BuildSpec
from polyculture.tuning.generations import Tail, chat_examples, rare_tail, tail_coverage, training_mix
from polyculture.tuning.generations_config import (
    GenerationsConfig,
    GenerationsConfigError,
    TailSettings,
    load_generations_config,
)


def write_loop(spec_dir: Path, **overrides) -> Path:
    (spec_dir / "spec.yaml").write_text(yaml.safe_dump(small_spec_dict(target_size=8)))
    config = {
        "name": "tiny-loop",
        "spec": "spec.yaml",
        "generations": 1,
        "regime": "replace",
        "arms": {"naive": {"dedup": {"threshold": 0.99}, "rebalance": {"top_up_rounds": 0}}, "curated": {}},
        "tuning": {"steps": 3, "batch_size": 4, "rank": 4},
        "output_dir": str(spec_dir / "out"),
    } | overrides
    path = spec_dir / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"generations": 0}, "generations: Input should be greater than or equal to 1"),
        ({"regime": "replcae"}, "regime: Input should be 'replace', 'accumulate' or 'fresh'"),
        ({"arms": {"naive": {"method": {"nmae": "direct"}}}}, "arms.naive.method.nmae: unknown key"),
        ({"arms": {"naive": {"target_size": 0}}}, "arms.naive.target_size: Input should be greater than or equal"),
        ({"regime": "fresh"}, "fresh: required with regime 'fresh'"),
        ({"tuning": {"from": "previous"}}, "tuning.from: Input should be 'base'"),
        ({"probe": {"families": ["numbers_1_11"]}}, "probe.families[0]: unknown task family 'numbers_1_11'"),
    ],
)
def test_bad_loop_configs_are_refused_naming_the_field(spec_dir, overrides, named):
    with pytest.raises(GenerationsConfigError, match=re.escape(named)):
        load_generations_config(write_loop(spec_dir, **overrides))


def test_a_fresh_source_without_its_text_column_is_refused(spec_dir):
    pl.DataFrame({"body": ["a real biography"]}).write_parquet(spec_dir / "real.parquet")
    fresh = {"source": "real.parquet", "text_column": "text", "share": 0.25}
    with pytest.raises(GenerationsConfigError, match=r"fresh.text_column: 'text' is not a column .*\['body'\]"):
        load_generations_config(write_loop(spec_dir, regime="fresh", fresh=fresh))
    fresh["text_column"] = "body"
    config, specs = load_generations_config(write_loop(spec_dir, regime="fresh", fresh=fresh))
    assert config.fresh is not None and config.fresh.share == 0.25 and set(specs) == {"naive", "curated"}


def test_arm_overrides_merge_into_the_build_spec(spec_dir):
    _, specs = load_generations_config(write_loop(spec_dir))
    assert specs["naive"].dedup.threshold == 0.99 and specs["naive"].rebalance.top_up_rounds == 0
    assert specs["curated"].dedup.threshold == BuildSpec.model_fields["dedup"].default.threshold
    assert specs["naive"].sampling.max_tokens == 120  # untouched keys come from the base spec


def test_an_adapter_in_the_base_spec_is_refused(spec_dir):
    path = write_loop(spec_dir)
    data = yaml.safe_load((spec_dir / "spec.yaml").read_text())
    data["model"]["adapter"] = "some/adapter"
    (spec_dir / "spec.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(GenerationsConfigError, match="spec: model.adapter is set"):
        load_generations_config(path)


def _records(values: list[str], texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "record_id": [f"r{i}" for i in range(len(values))],
            "record_json": [
                json.dumps({"name": "A B", "birth_year": 1950, "occupation": v, "bio": t})
                for v, t in zip(values, texts, strict=True)
            ],
            "text": texts,
            "occupation": values,
        }
    )


def test_training_mix_by_regime(spec_dir):
    _, specs = load_generations_config(write_loop(spec_dir))
    spec = specs["naive"]
    gens = [chat_examples(spec, _records(["doctor", "farmer"], ["x y", "y z"]), g) for g in range(3)]
    assert gens[0]["user"].to_list() == [
        "Write a short biography of a fictional doctor.",
        "Write a short biography of a fictional farmer.",
    ]
    assert json.loads(gens[0]["answer"][0])["occupation"] == "doctor"

    def config(regime: str, **extra) -> GenerationsConfig:
        return GenerationsConfig.model_validate(
            {"name": "l", "spec": "s", "generations": 2, "regime": regime, "arms": {"a": {}}} | extra
        )

    assert training_mix(config("replace"), spec, gens, None)["generation"].to_list() == [2, 2]
    assert training_mix(config("accumulate"), spec, gens, None)["generation"].to_list() == [0, 0, 1, 1, 2, 2]
    pl.DataFrame({"body": ["real one", "real two"], "occupation": ["farmer", None]}).write_parquet(
        spec_dir / "real.parquet"
    )
    fresh = config("fresh", fresh={"source": "real.parquet", "text_column": "body", "share": 0.5})
    mix = training_mix(fresh, spec, gens, spec_dir / "real.parquet")
    assert mix["generation"].to_list() == [2, 2, -1, -1]  # half fresh
    assert set(mix.filter(pl.col("generation") == -1)["answer"]) <= {"real one", "real two"}


def test_tail_coverage_counts_generation_zero_rare_values_and_ngrams(spec_dir):
    _, specs = load_generations_config(write_loop(spec_dir))
    settings = TailSettings(fields=["occupation"], rare_share=0.5, ngram=2)
    gen0 = _records(["doctor", "doctor", "doctor", "farmer"], ["red fox", "red fox", "red fox", "blue whale"])
    tail = rare_tail(specs["naive"], gen0, settings)
    assert tail == Tail(values={"occupation": ["farmer"]}, ngrams=["blue whale"])
    collapsed = _records(["doctor", "doctor"], ["red fox", "red fox"])
    figures = tail_coverage(specs["naive"], collapsed, tail, settings)
    assert figures["tail_value_coverage"] == 0.0 and figures["tail_ngram_coverage"] == 0.0
    assert tail_coverage(specs["naive"], gen0, tail, settings)["tail_ngram_coverage"] == 1.0


def test_shipped_loop_configs_load():
    config, specs = load_generations_config(PROJECT / "configs/generations/biographies.yaml")
    assert config.regime == "replace" and set(specs) == {"naive", "polyculture"}
    assert specs["naive"].method.name == "direct" and specs["polyculture"].method.name == "vs_standard"
    if (PROJECT / "configs/logic_expressions.yaml").is_file():  # written by another branch; checked once merged
        config, specs = load_generations_config(PROJECT / "configs/generations/logic.yaml")
        assert config.generations == 5 and specs["polyculture"].quality[0].gate


def test_the_schema_command_writes_the_loop_config_schema(tmp_path):
    from typer.testing import CliRunner

    from polyculture.cli import app

    out = tmp_path / "generations.schema.json"
    result = CliRunner().invoke(app, ["generations", "--schema", "--schema-output", str(out)])
    assert result.exit_code == 0, result.output
    schema = json.loads(out.read_text())
    assert schema["properties"]["regime"]["enum"] == ["replace", "accumulate", "fresh"]
    assert schema["properties"]["generations"]["minimum"] == 1


def _mtimes(root: Path, names: list[str]) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for n in names for p in root.rglob(n)}


ONE_ARM = {"naive": {"dedup": {"threshold": 0.99}, "rebalance": {"top_up_rounds": 0}}}
TWO_ARMS = ONE_ARM | {"curated": {}}


# One loop of G=1 on two arms took 307 s on the shared 2 cores (5 builds, 2 tunings); one arm is the default run.
@pytest.mark.parametrize("arms", [ONE_ARM, pytest.param(TWO_ARMS, marks=pytest.mark.full)], ids=["one-arm", "two-arms"])
def test_a_loop_of_one_generation_runs_and_resumes(spec_dir, prefect_server, one_torch_thread, arms):
    from polyculture.flows.generations import generations
    from polyculture.tuning.adapter import read_adapter_metadata

    path = write_loop(spec_dir, arms=arms, probe={"families": ["numbers_1_10"]})
    result = generations(str(path))
    root = spec_dir / "out" / "tiny-loop"
    for arm in arms:
        for g in (0, 1):
            folder = root / arm / f"gen-{g}"
            assert (folder / "build.done").is_file() and (folder / "metrics.json").is_file()
            assert (folder / "tiny-bios" / "build" / "result.json").is_file()
        adapter = root / arm / "gen-0" / "adapter"
        assert read_adapter_metadata(adapter)["base_model"] == "smollm2-135m-instruct"
        assert read_adapter_metadata(adapter)["training"]["steps"] == 3
        # Generation 1 was built with generation 0's adapter.
        built = yaml.safe_load((root / arm / "gen-1" / "spec.yaml").read_text())
        assert built["model"]["adapter"] == str(adapter.resolve())
        figures = result["arms"][arm][1]["figures"]
        assert figures["records"] > 0 and figures["semantic_diversity"] is not None
        assert 0 <= figures["tail_ngram_coverage"] <= 1 and figures["unique_answers"] >= 1
        # Each generation's model was probed: the base model, then base + adapter 0.
        probes = [json.loads((root / arm / f"gen-{g}" / "probe.json").read_text()) for g in (0, 1)]
        assert probes[0]["adapter"] is None and probes[1]["adapter"] == str(adapter.resolve())
        for g, probe in enumerate(probes):
            assert probe["results"][0]["family"] == "numbers_1_10"
            entropy = result["arms"][arm][g]["figures"]["probe_numbers_1_10"]
            assert entropy == probe["results"][0]["exact"]["normalized_entropy"] and 0 < entropy <= 1
    report = json.loads((root / "report.json").read_text())
    assert {r["arm"] for r in report["summary"]} == set(arms)
    assert "probe_numbers_1_10" in {r["figure"] for r in report["summary"]}
    # Generation 0 built again with the next seed: the noise floor, in the summary beside each figure.
    for arm in arms:
        again = root / arm / "gen-0-replicate"
        seed = yaml.safe_load((root / arm / "gen-0" / "spec.yaml").read_text()).get("seed", 0)
        assert yaml.safe_load((again / "spec.yaml").read_text())["seed"] == seed + 1
        assert result["replicates"][arm]["figures"]["records"] > 0
    row = next(r for r in report["summary"] if r["arm"] == "naive" and r["figure"] == "semantic_diversity")
    assert row["replicate"] == result["replicates"]["naive"]["figures"]["semantic_diversity"]
    assert (root / "plots" / "drift-probe_numbers_1_10.png").is_file()
    assert (root / "plots" / "drift-semantic_diversity.png").is_file() and (root / "report.html").is_file()

    # A kill during generation 1's build of one arm (before it published): no result, no marker, no metrics.
    before = _mtimes(root, ["build.done", "tune.done", "adapter_model.safetensors", "probe.json"])
    for name in ("build.done", "metrics.json", "tiny-bios/build/result.json"):
        (root / "naive" / "gen-1" / name).unlink()
    again = generations(str(path))
    after = _mtimes(root, ["build.done", "tune.done", "adapter_model.safetensors", "probe.json"])
    rebuilt = {k for k in after if before.get(k) != after[k]}
    assert rebuilt == {"naive/gen-1/build.done"}  # everything else reused
    assert again["arms"]["naive"][1]["figures"]["records"] == result["arms"]["naive"][1]["figures"]["records"]


def test_a_rerun_under_a_changed_config_is_refused_before_reusing_steps(spec_dir):
    from typer.testing import CliRunner

    from polyculture.cli import app
    from polyculture.tuning.generations import LOOP_FILE, check_loop_identity, loop_identity

    config, specs = load_generations_config(write_loop(spec_dir))
    root = spec_dir / "out" / "tiny-loop"
    check_loop_identity(root, loop_identity(config, specs))  # a new loop folder records its identity
    assert (root / LOOP_FILE).is_file()
    # More generations and a probe added: the finished steps still hold; the loop goes on.
    config, specs = load_generations_config(write_loop(spec_dir, generations=3, probe={"families": ["fruits"]}))
    check_loop_identity(root, loop_identity(config, specs))
    # A new arm starts from nothing: recorded, not refused.
    config, specs = load_generations_config(write_loop(spec_dir, arms=TWO_ARMS | {"third": {"seed": 9}}))
    check_loop_identity(root, loop_identity(config, specs))
    assert "third" in json.loads((root / LOOP_FILE).read_text())["arms"]
    # Other tuning, or another build spec for an arm: refused with exit code 2, naming what changed.
    path = write_loop(spec_dir, tuning={"steps": 4, "batch_size": 4, "rank": 4},
                      arms={"naive": {"dedup": {"threshold": 0.95}}, "curated": {}})  # fmt: skip
    result = CliRunner().invoke(app, ["generations", str(path)])
    assert result.exit_code == 2, result.output
    assert "changed: arms.naive, tuning" in result.output.replace("\n", " ")


def test_the_command_refuses_a_bad_config_with_exit_code_2(spec_dir):
    from typer.testing import CliRunner

    from polyculture.cli import app

    path = write_loop(spec_dir, arms={"naive": {"sampling": {"temprature": 1.0}}})
    result = CliRunner().invoke(app, ["generations", str(path)])
    assert result.exit_code == 2
    assert "arms.naive.sampling.temprature: unknown key" in result.output
    assert not (spec_dir / "out").exists()  # refused before anything ran


def test_loops_under_two_regimes_combine_into_one_drift_report(tmp_path):
    from typer.testing import CliRunner

    from polyculture.cli import app
    from polyculture.tuning.drift_report import write_drift_report

    def gens(values: list[float]) -> list[dict]:
        return [{"generation": g, "figures": {"semantic_diversity": v, "probe_fruits": v / 100}}
                for g, v in enumerate(values)]  # fmt: skip

    for regime, values in (("replace", [40.0, 30.0, 20.0]), ("accumulate", [40.0, 38.0, 37.0])):
        loop = {"name": f"logic-{regime}", "regime": regime, "generations": 2}
        write_drift_report(tmp_path / regime, loop, {"naive": gens(values), "polyculture": gens([40.0] * 3)})
    out = tmp_path / "both"
    result = CliRunner().invoke(
        app, ["generations", "--combine", str(tmp_path / "replace"), "--combine", str(tmp_path / "accumulate"),
              "-o", str(out), "--json"],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert list(report["arms"]) == ["naive (replace)", "polyculture (replace)", "naive (accumulate)",
                                    "polyculture (accumulate)"]  # fmt: skip
    rows = {(r["arm"], r["figure"]): r for r in report["summary"]}
    assert rows[("naive (replace)", "semantic_diversity")]["ratio"] == 0.5
    assert rows[("naive (accumulate)", "semantic_diversity")]["last"] == 37.0
    assert (out / "plots" / "drift-probe_fruits.png").is_file() and (out / "report.html").is_file()
    missing = CliRunner().invoke(app, ["generations", "--combine", str(tmp_path / "nowhere"), "-o", str(out)])
    assert missing.exit_code == 2 and "no report.json" in missing.output
