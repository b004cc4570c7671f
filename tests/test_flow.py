"""End to end: the real build_dataset Prefect flow on the embedded model, through to a loadable dataset."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import polars as pl
import yaml
from conftest import small_spec_dict
from hub_server import HubServer
from huggingface_hub import constants

from polyculture.flows.build_dataset import build_dataset

ALICE = "hf_aliceFLOWTOKEN0123456789SECRET"


def test_build_dataset_end_to_end(spec_dir, tmp_path, prefect_server, monkeypatch):
    """... and pushed to a Hub (the local stand-in) at the end of the build, tagged with the run id."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain LFS uploads: the stand-in speaks no Xet
    monkeypatch.setenv("HF_TOKEN", ALICE)
    hub = HubServer({ALICE: "alice"})
    spec = small_spec_dict(
        method={"name": "vs_standard", "k": 3},
        sampling={"max_tokens": 400, "n": 1},
        target_size=4,
        generation={"oversample": 2.0},
        rebalance={"top_up_rounds": 0},
        publish={"hub": {"repo_id": "alice/tiny-bios", "endpoint": hub.url, "push_on_build": True}},
    )
    spec_path = spec_dir / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    with hub:
        result = build_dataset(str(spec_path), run_id="run-1", output_root=str(tmp_path / "out"))
        pushed = hub.files("alice/tiny-bios", "run-1")  # the run's tag
    pushed.pop(".gitattributes", None)  # the Hub's own file of a new repo
    assert result["hub"]["tag"] == "run-1" and result["hub"]["repo_id"] == "alice/tiny-bios"
    published = Path(result["dataset_dir"])
    assert pushed == {p.relative_to(published).as_posix(): p.read_bytes() for p in published.rglob("*") if p.is_file()}
    assert json.loads((tmp_path / "out" / "tiny-bios" / "run-1" / "result.json").read_text())["hub"] == result["hub"]

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
    assert {Path(p).name for p in result["plots"]} == {"attribute_occupation.png", "similarity.png", "embedding_map.png"}
    html = Path(result["report_html"]).read_text()
    assert "<img" in html and "data:image/png;base64," in html
    assert (published / "report.html").read_text() == html

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


def test_top_up_rounds_extraction_and_dedup_against_the_previous_release(spec_dir, tmp_path, prefect_server):
    """An extracted attribute the prompt cannot set leaves cells short after a lean first round: a hinted top-up
    round follows within its token budget, short cells say why, and a second build with the first as its reference
    never repeats a released record."""
    spec = small_spec_dict(
        attributes=[
            {"name": "occupation", "values": ["doctor", "farmer"]},
            {"name": "setting", "values": ["city", "countryside"], "source": "extract",
             "extractor": {"label_template": "a life in the {label}"}},
        ],  # fmt: skip
        method={"name": "direct"},
        sampling={"max_tokens": 100, "n": 2},
        target_size=8,
        generation={"oversample": 1.0},
        dedup={"keep": "central"},
        rebalance={"top_up_rounds": 1, "top_up_max_tokens": 600},
    )
    spec_path = spec_dir / "topup.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    first = build_dataset(str(spec_path), run_id="v1", output_root=str(tmp_path / "out"))
    run_dir = tmp_path / "out" / "tiny-bios" / "v1"
    report = json.loads((run_dir / "report.json").read_text())

    rounds = report["rebalance"]["rounds"]
    assert "## Rebalancing" in (run_dir / "report.md").read_text()
    assert rounds[0]["prompts"] == 4  # 2 cells x ceil(4 / 2): n=2 direct answers per prompt
    assert rounds[0]["short_cells"] > 0  # 4 prompts cannot fill 8 records after dedup
    assert [r["round"] for r in rounds] == [0, 1]
    top_up = pl.read_parquet(run_dir / "plan-topup-01.parquet")
    assert top_up.height > 0 and top_up["cell_id"].min() > pl.read_parquet(run_dir / "plan.parquet")["cell_id"].max()
    assert all(set(json.loads(h)) == {"setting"} for h in top_up["hints"])
    shards = list((run_dir / "generate" / "topup-01").glob("*.parquet"))
    users = pl.concat([pl.read_parquet(p) for p in shards])["user"].to_list()
    assert all(u.endswith(("Its setting must be: city.", "Its setting must be: countryside.")) for u in users)
    # the budget bounds the round: its prompts were sized by tokens per prompt observed in round 0
    per_prompt = rounds[0]["generated_tokens"] / rounds[0]["prompts"]
    assert rounds[1]["prompts"] <= 600 / per_prompt
    cells = pl.read_parquet(run_dir / "cells.parquet")
    assert (cells["kept"] <= cells["target"]).all()
    assert cells["kept"].sum() == first["records"] == report["counts"]["final"]
    for row in cells.filter(pl.col("deficit") > 0).iter_rows(named=True):
        assert row["reason"].startswith(f"short by {row['deficit']}: ") and "stopped" in row["reason"]
    # the extracted attribute is a column of the final records and of the published dataset
    setting = report["attributes"]["setting"]
    assert setting["source"] == "extract" and setting["after"]["n"] == first["records"]
    loaded = datasets.load_dataset(first["dataset_dir"], split="train")
    assert set(loaded["setting"]) <= {"city", "countryside"} and len(loaded["setting"]) == first["records"]
    assert (run_dir / "reference" / "reference.json").is_file()

    # The same spec and seed again (first round only), deduplicated against the first release: the model writes the
    # same first-round records (same seed), and each released one is refused as already released.
    spec["dedup"]["reference"] = [str(run_dir)]
    spec["rebalance"]["top_up_rounds"] = 0
    spec_path.write_text(yaml.safe_dump(spec))
    second = build_dataset(str(spec_path), run_id="v2", output_root=str(tmp_path / "out"))
    released = set(loaded["bio"])
    assert not released & set(datasets.load_dataset(second["dataset_dir"], split="train")["bio"])
    first_round = pl.read_parquet(run_dir / "validated.parquet").filter(pl.col("cell_id") < 2)
    again = released & set(first_round["text"])
    rejects = pl.read_parquet(tmp_path / "out" / "tiny-bios" / "v2" / "rejects.parquet")
    assert again and rejects.filter(pl.col("reason") == "exact_in_reference").height >= len(again)
