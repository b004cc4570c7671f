"""The quality checks on the embedded model: how well fluency (and the judge) separate prose from corrupted prose, and
what each check kind costs per 1,000 records.

    .venv/bin/python bench/quality_fluency.py --records 200 --judge-records 60 --threads 1

Fixture: `--records` distinct first sentences of stdlib docstrings (plain English prose, 40-220 characters), and as
many corrupted versions, a third of each kind: `shuffled` (the sentence's characters shuffled), `token_soup` (random
pieces of the model's own vocabulary, about as many tokens as the sentence) and `json` (a JSON fragment built from the
sentence's words, cut at a random point). Prints the AUC of the fluency score (prose above corrupted), overall and per
kind, the best single threshold, the prose check's AUC (its share of rules passed) and pass rates, the judge's AUC on a seeded subset (`--judge-records` of each class), and the cost of
each check kind (fluency, judge, expression, python) in seconds and engine tokens per 1,000 records, with the load
average: machines are shared, so quote ratios from one run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

MODULES = [
    "os", "os.path", "shutil", "random", "textwrap", "glob", "heapq", "bisect", "collections", "math", "zipfile",
    "copy", "calendar", "gzip", "inspect", "statistics", "threading", "subprocess", "logging", "queue", "uuid",
    "secrets", "tempfile", "base64", "json", "string", "itertools", "functools", "operator", "pathlib", "datetime",
    "decimal", "fractions", "fnmatch", "csv", "hashlib", "hmac", "socket", "select", "signal", "struct", "codecs",
    "unicodedata", "difflib", "pprint", "reprlib", "enum", "numbers", "cmath", "array", "weakref", "types",
    "contextlib", "abc", "atexit", "traceback", "warnings", "dataclasses", "tarfile", "zlib", "bz2", "lzma",
    "sqlite3", "configparser", "tomllib", "netrc", "platform", "errno", "io", "time", "argparse", "getpass",
    "locale", "gettext", "shlex", "sched", "asyncio", "concurrent.futures", "multiprocessing", "email",
    "html", "xml.etree.ElementTree", "urllib.parse", "http.client", "ftplib", "smtplib", "ipaddress", "wave",
    "colorsys", "imghdr", "turtle", "doctest", "unittest", "timeit", "trace", "pdb", "profile", "pstats",
]  # fmt: skip
KINDS = ("shuffled", "token_soup", "json")
RUBRIC = (
    "Rate this text from 1 to 5: 5 is clear, well-formed English prose; 1 is gibberish, code or broken text.\n\n"
    "Text: {{ bio }}"
)


def prose_sentences(count: int, seed: int) -> list[str]:
    """`count` distinct first sentences of stdlib docstrings that read as prose, in a seeded order."""
    import importlib

    found: dict[str, None] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this Python lacks is skipped
            continue
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if callable(member) else None
            if not doc:
                continue
            sentence = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()))[0]
            if (40 <= len(sentence) <= 220 and sentence.endswith(".") and sentence[0].isupper()
                    and not re.search(r"[()\[\]{}=<>_`*|\\]|\.\.\.|--|>>>", sentence)
                    and len(sentence.split()) >= 6):  # fmt: skip
                found[sentence] = None
    sentences = sorted(found)
    random.Random(seed).shuffle(sentences)
    if len(sentences) < count:
        sys.exit(f"only {len(sentences)} prose sentences found; ask for fewer --records")
    return sentences[:count]


def corrupt(sentence: str, kind: str, rng: random.Random, vocabulary: list[str]) -> str:
    if kind == "shuffled":
        chars = list(sentence)
        rng.shuffle(chars)
        return "".join(chars)
    if kind == "token_soup":
        pieces = [rng.choice(vocabulary) for _ in range(max(8, len(sentence) // 4))]
        return "".join(pieces).strip() or "x"
    words = [re.sub(r"\W", "", w) for w in sentence.split()]
    value = {words[i]: (words[i + 1] if i % 2 else [rng.randint(0, 999), words[i + 1]]) for i in range(0, len(words) - 1, 2)}
    text = json.dumps(value)
    return text[: rng.randint(len(text) // 2, len(text))]


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def best_threshold(positive: list[float], negative: list[float]) -> tuple[float, float]:
    """(threshold, accuracy) of the best single cut: positives at or above pass."""
    best = (0.0, 0.0)
    for cut in sorted(positive + negative):
        right = sum(p >= cut for p in positive) + sum(n < cut for n in negative)
        best = max(best, (right / (len(positive) + len(negative)), cut))
    return best[1], best[0]


class CountingEngine:
    """Counts the tokens an engine's generate calls spend (prompt and completion)."""

    def __init__(self, engine):
        self.engine, self.name, self.model_name = engine, engine.name, engine.model_name
        self.prompt_tokens = self.completion_tokens = 0

    def generate(self, conversations, params, json_schema=None):
        done = self.engine.generate(conversations, params, json_schema)
        for samples in done:
            self.prompt_tokens += samples[0].prompt_tokens if samples else 0
            self.completion_tokens += sum(c.completion_tokens for c in samples)
        return done

    def sequence_logprobs(self, conversation, continuations, *, mean_per_token=False):
        return self.engine.sequence_logprobs(conversation, continuations, mean_per_token=mean_per_token)

    def close(self):
        self.engine.close()


def frame_of(rows: list[dict]):
    import polars as pl

    return pl.DataFrame({
        "record_id": [f"r{i}" for i in range(len(rows))], "call_id": [f"r{i}" for i in range(len(rows))],
        "record_json": [json.dumps(r) for r in rows], "text": [str(r.get("bio", "")) for r in rows],
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--records", type=int, default=200, help="prose records (as many corrupted ones again)")
    parser.add_argument("--judge-records", type=int, default=60, help="of each class, for the judge (0: no judge)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from polyculture.engines.factory import create_engine
    from polyculture.spec import ExpressionCheck, JudgeCheck, ModelSpec, ProseCheck, PythonCheck
    from polyculture.stages.quality import fluency_scores, quality
    from polyculture.stages.quality_prose import prose_outcome

    rng = random.Random(args.seed)
    prose = prose_sentences(args.records, args.seed)
    started = time.perf_counter()
    engine = CountingEngine(create_engine(ModelSpec(engine=args.engine), seed=args.seed))
    load_seconds = time.perf_counter() - started
    tokenizer = getattr(engine.engine, "tokenizer", None)
    vocabulary = [tokenizer.decode([i]) for i in range(0, 49000, 7)] if tokenizer is not None else prose[0].split()
    kinds = [KINDS[i % len(KINDS)] for i in range(len(prose))]
    corrupted = [corrupt(s, k, rng, vocabulary) for s, k in zip(prose, kinds, strict=True)]

    started = time.perf_counter()
    scores = fluency_scores(prose + corrupted, engine)
    fluency_seconds = time.perf_counter() - started
    good, bad = scores[: len(prose)], scores[len(prose) :]
    cut, accuracy = best_threshold(good, bad)
    per_kind = {k: round(auc(good, [b for b, kk in zip(bad, kinds, strict=True) if kk == k]), 4) for k in KINDS}
    result = {
        "engine": args.engine, "threads": args.threads, "prose": len(prose), "corrupted": len(corrupted),
        "fluency": {
            "auc": round(auc(good, bad), 4), "auc_by_kind": per_kind, "best_threshold": round(cut, 3),
            "accuracy_at_best": round(accuracy, 4), "prose_mean": round(float(np.mean(good)), 3),
            "corrupted_mean": round(float(np.mean(bad)), 3),
        },
        "examples": {k: next(c for c, kk in zip(corrupted, kinds, strict=True) if kk == k)[:100] for k in KINDS},
        "load_seconds": round(load_seconds, 1),
    }  # fmt: skip
    cost = {"fluency": {"seconds_per_1000": round(1000 * fluency_seconds / len(scores), 1), "generated_tokens": 0}}
    check = ProseCheck(name="prose", kind="prose")
    started = time.perf_counter()
    prose_good = [prose_outcome(t, check, field="text") for t in prose]
    prose_bad = [prose_outcome(t, check, field="text") for t in corrupted]
    cost["prose"] = {"seconds_per_1000": round(1000 * (time.perf_counter() - started) / len(scores), 2), "generated_tokens": 0}
    good_p, bad_p = [o[0] or 0.0 for o in prose_good], [o[0] or 0.0 for o in prose_bad]
    result["prose_check"] = {
        "auc": round(auc(good_p, bad_p), 4),
        "auc_by_kind": {k: round(auc(good_p, [b for b, kk in zip(bad_p, kinds, strict=True) if kk == k]), 4) for k in KINDS},
        "pass_rate_prose": round(sum(bool(o[1]) for o in prose_good) / len(prose), 3),
        "pass_rate_corrupted": round(sum(bool(o[1]) for o in prose_bad) / len(corrupted), 3),
    }  # fmt: skip

    if args.judge_records:
        n = min(args.judge_records, len(prose))
        picked = rng.sample(range(len(prose)), n)
        rows = [{"bio": prose[i]} for i in picked] + [{"bio": corrupted[i]} for i in picked]
        check = JudgeCheck(name="readable", kind="judge", rubric=RUBRIC, threshold=3, max_tokens=96)
        engine.prompt_tokens = engine.completion_tokens = 0
        started = time.perf_counter()
        judged = quality(frame_of(rows), np.zeros((len(rows), 2), dtype=np.float32), [check], engine=engine)
        judge_seconds = time.perf_counter() - started
        verdicts = judged.scores["score"].to_list()
        as_number = [-1.0 if v is None else v for v in verdicts]  # no usable verdict ranks lowest
        result["judge"] = {
            "records": len(rows), "auc": round(auc(as_number[:n], as_number[n:]), 4),
            "pass_rate_prose": round(sum(v is not None and v >= 3 for v in verdicts[:n]) / n, 3),
            "pass_rate_corrupted": round(sum(v is not None and v >= 3 for v in verdicts[n:]) / n, 3),
            "no_verdict": sum(v is None for v in verdicts),
            "score_counts": {str(s): as_number.count(s) for s in sorted(set(as_number))},
        }  # fmt: skip
        cost["judge"] = {
            "seconds_per_1000": round(1000 * judge_seconds / len(rows), 1),
            "prompt_tokens_per_1000": round(1000 * engine.prompt_tokens / len(rows)),
            "generated_tokens_per_1000": round(1000 * engine.completion_tokens / len(rows)),
        }
    engine.close()

    formulas = [{"formula": f"{a} * ({b} + {c})", "answer": a * (b + c)}
                for a, b, c in ((rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 99)) for _ in range(1000))]  # fmt: skip
    started = time.perf_counter()
    quality(frame_of(formulas), np.zeros((1000, 2), dtype=np.float32),
            [ExpressionCheck(name="math", kind="expression", expression_field="formula", value_field="answer")])  # fmt: skip
    cost["expression"] = {"seconds_per_1000": round(time.perf_counter() - started, 2), "generated_tokens": 0}
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "bench_check.py").write_text("def long_enough(record):\n    return len(record['bio']) > 50\n")
        check = PythonCheck(name="long", kind="python", function="bench_check:long_enough", workers=2)
        rows = [{"bio": prose[i % len(prose)]} for i in range(1000)]
        started = time.perf_counter()
        quality(frame_of(rows), np.zeros((1000, 2), dtype=np.float32), [check], base_dir=folder)
        cost["python"] = {"seconds_per_1000": round(time.perf_counter() - started, 2), "generated_tokens": 0,
                          "note": "2 spawned workers, start-up included"}  # fmt: skip
    result["cost"] = cost
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
