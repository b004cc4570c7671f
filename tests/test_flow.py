"""End to end: the real build_dataset Prefect flow on the embedded model, through to a loadable dataset."""

from __future__ import annotations

import json

import datasets
import polars as pl
import yaml
from conftest import small_spec_dict
from polyculture.flows.build_dataset import build_dataset


def test_build_dataset_end_to_end(spec_dir, tmp_path, prefect_server):
    spec = small_spec_dict(
        method={"name": "vs_standard", "k": 3},
        sampling={"max_tokens": 400, "n": 1},
        target_size=4,
        generation={"oversample": 2.0},
    )
    spec_path = spec_dir / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = build_dataset(str(spec_path), run_id="run-1", output_root=str(tmp_path / "out"))

    run_dir = tmp_path / "out" / "tiny-bios" / "run-1"
    assert result["run_dir"] == str(run_dir)
    counts = result["counts"]
    # every stage only removes: the funnel is monotone and ends at most at the target
    assert counts["completions"] == counts["prompts"] == 4  # 2 cells x ceil(2 * 2.0 / 3) prompts, n=1
    assert counts["candidates"] >= counts["valid"] >= counts["after_exact_dedup"] >= counts["after_semantic_dedup"]
    assert counts["after_semantic_dedup"] >= counts["final"] == result["records"]
    assert 0 < result["records"] <= 4
    assert result["usage"]["generated_tokens"] > 0 and result["usage"]["generated_tokens_per_second"] > 0

    for name in ("spec.yaml", "plan.parquet", "validated.parquet", "rejects.parquet", "cells.parquet",
                 "dedup_clusters.parquet", "report.json", "report.md", "result.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert len(result["plots"]) == 1 and result["plots"][0].endswith(".png")

    report = json.loads((run_dir / "report.json").read_text())
    assert report["counts"]["final"] == result["records"]
    assert set(report["attributes"]) == {"occupation"}

    loaded = datasets.load_dataset(result["dataset_dir"], split="train")
    assert loaded.num_rows == result["records"]
    assert loaded.column_names[:4] == ["name", "birth_year", "occupation", "bio"]
    assert set(loaded["occupation"]) <= {"doctor", "farmer"}
    assert all(p is None or 0 <= p <= 1 for p in loaded["_verbalized_probability"])
    assert result["dataset_dir"] == str(run_dir / "tiny-bios-run-1")
    card = (run_dir / "tiny-bios-run-1" / "README.md").read_text()
    assert card.startswith("---\n") and "configs:" in card

    rejects = pl.read_parquet(run_dir / "rejects.parquet")
    assert rejects.height == counts["candidates"] - counts["final"] + rejects.filter(pl.col("record_id").is_null()).height
