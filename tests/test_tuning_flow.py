"""diffuse_tune end to end on the embedded model (real Prefect, real peft), and the probe/tune commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLI = [sys.executable, "-m", "polyculture.cli"]


def _cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"] + "-cli", "OMP_NUM_THREADS": "1", "COLUMNS": "220"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def _family(folder: Path, name: str, options: list[str], prompts: list[str], exhaustive: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        yaml.safe_dump({"name": name, "exhaustive": exhaustive, "options": options, "prompts": prompts})
    )


@pytest.fixture(scope="module")
def tune_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config folder with its own small families (found through <config dir>/families)."""
    root = tmp_path_factory.mktemp("tune")
    families = root / "families"
    _family(families, "colours", ["red", "green", "blue"], ["Name a colour. Answer with the colour only."])
    _family(
        families,
        "small_numbers",
        ["1", "2", "3", "4"],
        ["Pick a number from 1 to 4. Answer with the number only.", "Random number, 1 to 4. Just the number."],
    )
    _family(families, "pets", ["cat", "dog", "fish"], ["Name a pet. Answer with the animal only."], exhaustive=False)
    config = {
        "name": "tiny",
        "held_out": ["pets"],
        "training": {"learning_rate": 3e-3, "prompts_per_step": 2, "max_steps": 4},
        "probe": {"samples": 4},
        "output_dir": str(root / "out"),
        "seed": 1,
    }
    (root / "tune.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def tuned(tune_dir: Path, prefect_server) -> dict:
    import torch

    from polyculture.flows.diffuse_tune import diffuse_tune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return diffuse_tune(str(tune_dir / "tune.yaml"), run_id="run-1")
    finally:
        torch.set_num_threads(threads)


def test_flow_saves_an_adapter_with_its_metadata_and_a_report(tuned: dict, tune_dir: Path):
    run_dir = tune_dir / "out" / "tiny" / "run-1"
    assert tuned["run_dir"] == str(run_dir)
    adapter = Path(tuned["adapter_dir"])
    assert {"adapter_config.json", "adapter_model.safetensors", "polyculture-adapter.json"} <= {
        p.name for p in adapter.iterdir()
    }
    meta = json.loads((adapter / "polyculture-adapter.json").read_text())
    assert meta["base_model"] == "smollm2-135m-instruct"
    assert meta["families"] == ["colours", "small_numbers"] and meta["held_out"] == ["pets"]
    assert set(meta["final_loss"]) == {"colours", "small_numbers"} and meta["steps"] == 4
    assert set(meta["probe"]["before"]) == set(meta["probe"]["after"]) == {"colours", "small_numbers", "pets"}
    assert meta["config"]["lora"]["r"] == 4
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    report = json.loads((run_dir / "tune.json").read_text())
    assert [r["role"] for r in report["before_after"]] == ["trained", "trained", "held out"]
    assert report["training"]["steps"] == 4 and len(report["training"]["history"]) == 4
    markdown = (run_dir / "tune.md").read_text()
    assert "| pets | held out |" in markdown and "| colours | trained |" in markdown
    assert (run_dir / "tune.png").stat().st_size > 10_000
    # Training lowered the trained families' loss below where it started.
    for family in ("colours", "small_numbers"):
        before = report["probe_before"][family]["per_prompt"]
        assert report["training"]["final_ratio"][family] < 5
        assert len(before) == len(report["probe_after"][family]["per_prompt"])


def test_a_saved_adapter_reproduces_the_tuned_models_probe(tuned: dict, tune_dir: Path):
    """The adapter on disk, loaded by the probe command, gives the distribution the flow measured in memory."""
    out = _cli("probe", str(tune_dir / "families" / "colours.yaml"), "--adapter", tuned["adapter_dir"],
               "--samples", "0", "--json", "-q")  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)["results"][0]
    in_memory = json.loads(Path(tuned["report_json"]).read_text())["probe_after"]["colours"]["exact"]
    for option, share in in_memory["distribution"].items():
        assert result["exact"]["distribution"][option] == pytest.approx(share, abs=2e-3)
    # And the adapter folder alone names its base model.
    from polyculture.engines.model_files import resolve_chat_model

    resolved = resolve_chat_model(tuned["adapter_dir"])
    assert resolved.adapter is not None and Path(resolved.adapter) == Path(tuned["adapter_dir"]).resolve()


def test_probe_command_prints_a_table_and_refuses_bad_input(tune_dir: Path):
    out = _cli("probe", str(tune_dir / "families" / "small_numbers.yaml"), "--samples", "3", "-q")
    assert out.returncode == 0, out.stderr
    assert "small_numbers" in out.stdout and "norm. entropy" in out.stdout
    bad = _cli("probe", "no_such_family")
    assert bad.returncode == 2 and "unknown task family 'no_such_family'" in bad.stderr
    bad = _cli("probe", "numbers_1_10", "--engine", "openai")
    assert bad.returncode == 2 and "allowed: transformers, vllm" in bad.stderr
    bad = _cli("probe", "numbers_1_10", "--adapter", str(tune_dir))
    assert bad.returncode == 2 and "adapter" in bad.stderr


def test_tune_command_refuses_a_bad_config_before_loading_anything(tune_dir: Path, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"lora": {"rank": 4}}))
    out = _cli("tune", str(bad))
    assert out.returncode == 2 and "lora.rank: Extra inputs are not permitted" in out.stderr
    out = _cli("tune", str(tune_dir / "tune.yaml"), "--hold-out", "nope")
    assert out.returncode == 2 and "held_out: unknown task family 'nope'" in out.stderr
    assert "--leave-one-out" in _cli("tune", "--help").stdout


def test_probe_model_flow_writes_its_figures(tune_dir: Path, tmp_path: Path, prefect_server, one_torch_thread):
    from polyculture.flows.probe_model import probe_model

    result = probe_model(
        [str(tune_dir / "families" / "colours.yaml")], samples=3, output_dir=str(tmp_path / "probes")
    )
    out = Path(result["output_dir"])
    saved = json.loads((out / "probe.json").read_text())
    assert saved["results"][0]["family"] == "colours" and saved["results"][0]["sampled"]["samples_per_prompt"] == 3
    assert "| colours | 3 |" in (out / "probe.md").read_text()
