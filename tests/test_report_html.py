"""report.html in a real headless browser (Debian's chromium): it loads offline, renders its figures, fetches nothing.

A small hand-made Verbalized Sampling run (3 cells x 4 prompts x 3 items, exact and near duplicates, a CSV reference
dataset) embedded with the real MiniLM model goes through write_report; chromium then dumps the DOM and takes a
screenshot. Set POLYCULTURE_SCREENSHOT_DIR to keep the screenshot (copied there as report.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from PIL import Image

from polyculture.preflight import parse_spec
from polyculture.report.model import Round
from polyculture.report.reference_dataset import load_report_reference
from polyculture.report.write import RecordSet, ReportInputs, write_report
from polyculture.spec import BuildSpec

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_TIMEOUT_S = 120
WINDOW = (1280, 2400)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "occupation": {"type": "string"},
        "mood": {"type": "string"},
        "bio": {"type": "string"},
    },
    "required": ["name", "occupation", "bio"],
}
JOBS = ["doctor", "farmer", "teacher"]
MOODS = ["happy", "calm", "tired"]
PLACES = ["a coastal village", "the northern mountains", "a busy port city", "a quiet river valley"]
DEEDS = [
    "spends weekends restoring old sailing boats",
    "keeps bees and sells honey at the market",
    "writes letters to a pen friend in Chile",
    "trains for marathons before sunrise",
    "collects recipes from neighbours",
    "repairs clocks for the whole street",
]


def make_spec(tmp_path: Path) -> BuildSpec:
    (tmp_path / "person.schema.json").write_text(json.dumps(SCHEMA))
    # The reference: "real" short biographies with a mood column named differently.
    people = [
        ("Grew up in Lagos, studied marine biology and now maps coral reefs off Mozambique.", "happy"),
        ("A retired train driver who still times his tea by the 7:15 from Leeds.", "calm"),
        ("Night-shift nurse in Manila; sleeps four hours and paints murals on her days off.", "tired"),
        ("Lost the family bakery in the floods and is furious at the insurers.", "angry"),
        ("Teaches violin to deaf children in Montreal using vibrations in the floor.", "happy"),
        ("A shepherd in the Atlas mountains who records birdsong on an old phone.", "calm"),
        ("Software tester in Pune who writes detective novels on the commuter train.", "tired"),
        ("Campaigns against a new motorway through the wetlands near her village.", "angry"),
        ("Runs a night market food stall in Taipei and knows every regular by their order.", "happy"),
        ("An astronomer in Chile who spends winters alone at a high-altitude observatory.", "calm"),
        ("Single father of three in Ohio working two warehouse jobs.", "tired"),
        ("A beekeeper whose hives were poisoned by a neighbour's pesticide.", "angry"),
        ("Translates Korean poetry into Portuguese from a houseboat in Lisbon.", "happy"),
        ("Former boxer who now coaches teenagers in a Glasgow community gym.", "calm"),
        ("Junior doctor in Nairobi on her third double shift this week.", "tired"),
        ("Organised a rent strike after the landlord ignored the broken heating.", "angry"),
    ]
    pl.DataFrame(
        {
            "biography": [text for text, _ in people],
            "sentiment": [mood for _, mood in people],
        }
    ).write_csv(tmp_path / "people.csv")
    return parse_spec(
        {
            "name": "tiny-people",
            "prompt": {"template": "Describe a {{ occupation }}."},
            "record": {"schema": "person.schema.json", "text_field": "bio"},
            "attributes": [
                {"name": "occupation", "values": JOBS, "weights": [2, 1, 1]},
                {"name": "mood", "values": MOODS, "source": "field"},
            ],
            "target_size": 24,
            "method": {"name": "vs_standard", "k": 3},
            "report": {
                "reference": {"path": "people.csv", "text_field": "biography", "fields": {"mood": "sentiment"}},
                "sample": 200,
            },
            "seed": 5,
        },
        base_dir=tmp_path,
    )


def make_records() -> pl.DataFrame:
    """36 VS records (3 cells x 4 prompts x 3 items); the third item of every second prompt repeats the first."""
    rows: list[dict[str, Any]] = []
    for cell, job in enumerate(JOBS):
        for prompt in range(4):
            for item in range(3):
                n = cell * 12 + prompt * 3 + item
                mood = MOODS[(n * 7) % 3] if n % 11 else None
                bio = f"A {job} from {PLACES[(prompt + item) % 4]} who {DEEDS[(cell + 2 * prompt + item) % 6]}."
                if item == 2 and prompt % 2:
                    bio = rows[-2]["text"]  # an exact duplicate for dedup to drop
                rows.append(
                    {
                        "record_id": f"c{cell}-p{prompt}-s0-{item}",
                        "call_id": f"c{cell}-p{prompt}-s0",
                        "cell_id": cell,
                        "cell_key": f"occupation={job}",
                        "item_index": item,
                        "method": "vs_standard",
                        "model": "smollm2-135m-instruct",
                        "verbalized_probability": [0.5, 0.3, 0.2][item],
                        "record_json": json.dumps({"name": f"P{n}", "occupation": job, "mood": mood, "bio": bio}),
                        "text": bio,
                        "occupation": job,
                        "mood": mood,
                    }
                )
    return pl.DataFrame(rows, schema_overrides={"mood": pl.String})


def build_report(tmp_path: Path, embedder: Any) -> tuple[dict[str, Any], Path]:
    spec = make_spec(tmp_path)
    validated = make_records()
    validated_emb = embedder.encode(validated["text"].to_list())
    # After dedup: first occurrence of each text; final: the pool cut to 12 doctors, 6 farmers, 6 teachers at most.
    keep = validated.with_row_index("row").unique("text", keep="first", maintain_order=True)
    pool, pool_rows = keep.drop("row"), keep["row"].to_list()
    final_rows = [r for r in pool_rows if validated["cell_id"][r] == 0][:10]
    final_rows += [r for r in pool_rows if validated["cell_id"][r] == 1][:6]
    final_rows += [r for r in pool_rows if validated["cell_id"][r] == 2][:5]
    final_rows.sort()
    final = validated[final_rows]
    reference = load_report_reference(spec)
    assert reference is not None and reference.columns == ["text", "mood"]
    cells = pl.DataFrame(
        {
            "cell_key": [f"occupation={j}" for j in JOBS],
            "occupation": JOBS,
            "target": [12, 6, 6],
            "available": [10, 9, 9],
            "kept": [10, 6, 5],
            "deficit": [2, 0, 1],
            "reason": ["not enough unique records after 1 top-up round", None, "duplicates removed by dedup"],
        }
    )
    rejects = pl.DataFrame(
        {
            "record_id": [None, "c2-p1-s0-2", "c0-p1-s0-2"],
            "call_id": ["c1-p3-s0", "c2-p1-s0", "c0-p1-s0"],
            "stage": ["parse", "schema", "dedup"],
            "reason": ["unparseable", "schema_violation", "exact_duplicate"],
            # A URL written by the model must not become a URL in the page.
            "detail": ["no JSON found: see https://example.com/x", "mood: 7 is not of type 'string'", "same as c0-p1"],
        }
    )
    out_dir = tmp_path / "run"
    counts = {"prompts": 12, "completions": 12, "candidates": 38, "valid": validated.height,
              "after_exact_dedup": pool.height, "after_semantic_dedup": pool.height, "final": final.height}  # fmt: skip
    rounds = [{"round": 0, "cells": 3, "prompts": 12, "completions": 12, "generated_tokens": 4321,
               "unique_valid": pool.height, "final": final.height, "short_cells": 2, "missing": 3}]  # fmt: skip
    report = write_report(
        spec,
        ReportInputs(
            run_id="run-html",
            counts=counts,
            validated=RecordSet(validated, validated_emb),
            pool=RecordSet(pool, validated_emb[pool_rows]),
            final=RecordSet(final, validated_emb[final_rows]),
            rejects=rejects,
            cells=cells,
            usage={"generated_tokens": 4321, "generation_seconds": 12.5},
            rounds=tuple(Round.from_dict(r) for r in rounds),
            stop_reason="stopped: all 1 top-up rounds used",
            reference=RecordSet(reference, embedder.encode(reference["text"].to_list())),
        ),
        out_dir,
    )
    return report.to_dict(), out_dir


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def html_report(tmp_path_factory: pytest.TempPathFactory, embedder: Any) -> tuple[dict[str, Any], Path]:
    return build_report(tmp_path_factory.mktemp("html-report"), embedder)


def test_report_html_is_self_contained(html_report: tuple[dict[str, Any], Path]) -> None:
    report, out_dir = html_report
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", html), "the page must not reference any URL"
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, re.IGNORECASE)
    sources = re.findall(r'<img [^>]*src="([^"]*)"', html)
    # One bar chart per attribute, the similarity histogram and the embedding map, all inlined.
    assert len(sources) == len(report["attributes"]) + 2
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "example.com/x" in html  # the model's URL is shown as text, broken so it is not a URL


def test_report_html_renders_in_chromium(html_report: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: `apt-get install -y chromium` (the Makefile's setup installs it)")
    report, out_dir = html_report
    url = (out_dir / "report.html").resolve().as_uri()

    dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "Diversity report: tiny-people" in page
    records = re.search(r'id="headline-records">\s*(\d+)', page)
    assert records and int(records.group(1)) == report["headline"]["records"] > 0
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == len(report["attributes"]) + 2
    assert not re.search(r"https?://", page)
    assert "homogeneous" in page or "population more varied" in page  # the conceptual verdict rendered

    png = tmp_path / "report.png"
    shot = chromium(f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={png}", url,
                    profile=tmp_path / "profile-shot")  # fmt: skip
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    if os.environ.get("POLYCULTURE_SCREENSHOT_DIR"):
        keep = Path(os.environ["POLYCULTURE_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, keep / "report.png")
    with Image.open(png) as image:
        assert image.size == WINDOW
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20, "the screenshot is blank"
    # Amber (#e0a030) is drawn only inside the figures (after-dedup bars and histogram, records cut by rebalancing):
    # seeing it proves the inlined PNGs were decoded and painted, not just present in the DOM.
    amber = np.abs(pixels - np.array([224, 160, 48])).sum(axis=2) < 30
    assert amber.sum() > 200
    header = pixels[:60].reshape(-1, 3).mean(axis=0)
    assert header[2] > header[0] + 20  # the dark blue header painted, so the inline CSS applied
