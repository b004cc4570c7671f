"""The math build on the embedded model, measured: configs/math_problems.yaml built once (or a finished run folder
read), then its funnel (problems generated, parsed, unique, decontaminated by each test, verified, published),
verified problems per topic x difficulty, tokens and seconds per verified problem (generation + solving), the
solve-rate distribution and the answers' spread.

    PYTHONPATH=src .venv/bin/python bench/math_build.py                 # builds (~20+ min on 2 cores), then prints
    PYTHONPATH=src .venv/bin/python bench/math_build.py --run-dir DIR   # a finished run folder: prints only
    ... --json                                                          # the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SOLVE_RATE = re.compile(r"solve rate (\d+(?:\.\d+)?)")


def build(spec: Path, output_dir: Path) -> tuple[Path, float]:
    """Runs `polyculture build` as a user would; the run folder and the wall seconds."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "polyculture.cli", "build", str(spec), "--new-run", "--json", "--quiet",
               "--output-dir", str(output_dir)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"build failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    return Path(result["run_dir"]), time.perf_counter() - started


def figures(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").is_file() else \
        json.loads(next(run_dir.rglob("report.json")).read_text())  # fmt: skip
    counts, usage, math = report["counts"], report["usage"], report.get("math") or {}
    contamination = report.get("contamination") or {}
    scores = pl.read_parquet(run_dir / "quality_scores.parquet")
    check = math.get("check", "verified")
    solved = scores.filter(pl.col("check") == check)
    validated = pl.read_parquet(run_dir / "validated.parquet").select("record_id", "topic", "difficulty")
    per_cell = (
        solved.join(validated, on="record_id", how="inner")
        .group_by("topic", "difficulty")
        .agg(checked=pl.len(), verified=pl.col("verdict").sum())
        .sort("topic", "difficulty")
    )
    # the cached verdict's note says "..., solve rate 0.25" (stages.quality_math); a failed comparison has none
    rates = [float(m.group(1)) if (m := SOLVE_RATE.search(n or "")) else None for n in solved["note"].to_list()]
    verified = int(solved["verdict"].sum())
    generated = int(usage.get("generated_tokens", 0))
    # runs before usage carried quality_tokens: quality_checks.parquet holds the last pass's cost only
    last_pass = pl.read_parquet(run_dir / "quality_checks.parquet").filter(pl.col("name") == check)
    solve_tokens = int(usage.get("quality_tokens", last_pass["tokens"].sum()))
    seconds = float(usage.get("wall_seconds", 0.0))
    return {
        "run_dir": str(run_dir),
        "funnel": {
            "prompts": counts.get("prompts"), "completions": counts.get("completions"),
            "problems_generated": counts.get("candidates"), "parsed_valid": counts.get("valid"),
            "unique_after_dedup": counts.get("after_semantic_dedup"),
            "after_decontaminate": counts.get("after_decontaminate"),
            "checked_by_solving": solved.height, "verified": verified, "published": counts.get("final"),
            "target": counts.get("target"),
        },  # fmt: skip
        "decontamination": [
            {k: b.get(k) for k in ("benchmark", "items", "records_checked", "flagged_ngram", "flagged_embedding",
                                   "flagged_both")}
            for b in contamination.get("benchmarks", [])
        ],  # fmt: skip
        "verified_by_cell": per_cell.to_dicts(),
        "cost": {
            "generated_tokens": generated, "solve_tokens": solve_tokens,
            "generation_seconds": usage.get("generation_seconds"), "solve_seconds": usage.get("quality_seconds", round(float(last_pass["seconds"].sum()), 1)),
            "solve_cost_complete": "quality_tokens" in usage,
            "wall_seconds": seconds,
            "tokens_per_verified": round((generated + solve_tokens) / verified) if verified else None,
            "seconds_per_verified": round(seconds / verified, 1) if verified else None,
        },  # fmt: skip
        "solve_rates": dict(sorted(Counter(r for r in rates if r is not None).items())),
        "mean_agreement": math.get("mean_agreement"),
        "answers": {"final": math.get("final_answers"), "distinct": math.get("distinct_answers"),
                    "share_0_1_2": math.get("small_answer_share"), "top": math.get("top_answers")},  # fmt: skip
        "stop_reason": (report.get("rebalance") or {}).get("stop_reason"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "configs" / "math_problems.yaml")
    parser.add_argument("--run-dir", type=Path, help="a finished run folder to read instead of building")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    run_dir = args.run_dir
    if run_dir is None:
        run_dir, _ = build(args.spec, Path(tempfile.mkdtemp(prefix="math-build-")))
    found = figures(run_dir)
    if args.json:
        print(json.dumps(found, indent=2))
        return
    print(f"run: {found['run_dir']}")
    print("funnel: " + ", ".join(f"{k} {v}" for k, v in found["funnel"].items() if v is not None))
    for b in found["decontamination"]:
        print(f"decontamination {b['benchmark']}: {b['records_checked']} checked against {b['items']} items; "
              f"flagged by n-gram {b['flagged_ngram']}, by embedding {b['flagged_embedding']}, both {b['flagged_both']}")
    print("verified by topic x difficulty:")
    for row in found["verified_by_cell"]:
        print(f"  {row['topic']:>14} {row['difficulty']:>6}: {row['verified']}/{row['checked']}")
    print("cost: " + ", ".join(f"{k} {v}" for k, v in found["cost"].items()))
    print(f"solve rates (share of 4 solutions equal to the author's answer): {found['solve_rates']}")
    print(f"mean agreement {found['mean_agreement']}; answers {found['answers']}")
    print(f"stop: {found['stop_reason']}")


if __name__ == "__main__":
    main()
