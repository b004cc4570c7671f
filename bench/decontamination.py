"""How well the decontaminate stage finds benchmark leaks: recall on edited copies of CHAMP problems and false
positives on unrelated problem-like texts, for each test alone and both together (a record is rejected when either
fires), at n-gram lengths 8 and 13 and embedding thresholds 0.8, 0.85 and 0.9.

Positives: 50 CHAMP problems (seeded draw), each edited four ways: variables renamed (single letters), numbers
changed, sentences (or clauses) reordered, and all three at once. The benchmark is all 270 CHAMP problems.
Negatives: 1,000 texts from other sources (no CHAMP problem is a negative: held-out problems would be true
positives): 500 arithmetic word problems from templates, 200 competition-style problems from templates written here
(the phrasing a math generator produces: "Find all positive integers n such that ...", the hard case for n-grams) and
300 first paragraphs of standard-library docstrings.
Tests run through the stage's own code (stages.decontaminate, the real MiniLM embedder and FAISS), once per n-gram
length; a flag counts as correct only when it names the problem the positive was made from.

    PYTHONPATH=src .venv/bin/python bench/decontamination.py            # add --json for the figures as JSON
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import polars as pl  # noqa: E402

from polyculture.index.benchmarks import read_champ  # noqa: E402
from polyculture.spec import DecontaminateSpec  # noqa: E402
from polyculture.stages.decontaminate import benchmark_evidence, checked_texts, decontaminate  # noqa: E402
from polyculture.stages.embed import load_embedder  # noqa: E402

SEED = 7
POSITIVE_ITEMS = 50
WORD_PROBLEMS = 500
COMPETITION_PROBLEMS = 200
DOCSTRINGS = 300
NGRAMS = (8, 13)
THRESHOLDS = (0.8, 0.85, 0.9)
EDITS = ("rename", "numbers", "reorder", "all")

# Single-letter variables and what they become; "a" and "i" are left alone (articles, "I").
RENAMES = {"x": "s", "y": "t", "z": "r", "n": "j", "m": "l", "k": "q", "p": "u", "b": "e", "c": "g", "d": "h"}
_LETTER = re.compile(r"(?<![A-Za-z0-9])([a-z])(?![A-Za-z])")
_NUMBER = re.compile(r"\d+")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def rename_variables(text: str) -> str:
    return _LETTER.sub(lambda m: RENAMES.get(m.group(1), m.group(1)), text)


def change_numbers(text: str, rng: random.Random) -> str:
    return _NUMBER.sub(lambda m: str(int(m.group()) + rng.randint(1, 9)), text)


def reorder(text: str) -> str:
    """The last sentence (usually the question) first; a one-sentence text gets its last clause first."""
    sentences = _SENTENCE_END.split(text.strip())
    if len(sentences) > 1:
        return " ".join([sentences[-1], *sentences[:-1]])
    clauses = text.strip().rstrip(".?!").split(", ")
    if len(clauses) > 1:
        return (", ".join([clauses[-1], *clauses[:-1]]) + text.strip()[-1:]).strip()
    return text


def edit(text: str, kind: str, rng: random.Random) -> str:
    if kind == "rename":
        return rename_variables(text)
    if kind == "numbers":
        return change_numbers(text, rng)
    if kind == "reorder":
        return reorder(text)
    return reorder(change_numbers(rename_variables(text), rng))


NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Diego", "Sofia", "Ben", "Chen", "Fatima"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards", "stamps", "shells"]
TEMPLATES = [
    "{a} has {x} {item}. {b} gives {a} {y} more. How many {item} does {a} have now?",
    "{a} buys {x} packs of {item} with {y} {item} in each pack. How many {item} does {a} buy in all?",
    "There are {x} {item} in a box. {a} takes {y} of them. How many {item} are left in the box?",
    "{a} shares {x} {item} equally among {y} friends. How many {item} does each friend get, and how many are left?",
    "A shop sells {item} for {y} dollars each. {a} pays with a {x}-dollar note for one. How much change does {a} get?",
    "{a} reads {x} pages on Monday and {y} pages on Tuesday. How many pages did {a} read over the two days?",
    "{a} is {x} years old and {b} is {y} years older. How old will {b} be in five years?",
    "A train travels {x} kilometres in {y} hours at a steady speed. How far does it travel in one hour?",
    "{a} saves {y} dollars every week. After {x} weeks, how much money has {a} saved?",
    "A garden has {x} rows of plants with {y} plants in each row. {a} adds one more row. How many plants are there?",
]


def word_problems(count: int, rng: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < count:
        a, b = rng.sample(NAMES, 2)
        out.add(rng.choice(TEMPLATES).format(a=a, b=b, item=rng.choice(ITEMS), x=rng.randint(2, 99), y=rng.randint(2, 30)))
    return sorted(out)


COMPETITION = [
    "Find all positive integers n such that n^2 + {a} is divisible by n + {b}.",
    "Let a, b, c be positive real numbers with a + b + c = {a}. Find the maximum value of ab + bc + ca.",
    "How many ways are there to colour the cells of a {b} by {b} board black and white so that no two black cells share a side?",
    "Prove that for every positive integer n, the number {a}^n + {b} is not a perfect square.",
    "Find the remainder when {a}^{c} is divided by {b}.",
    "The sequence x_n is defined by x_1 = {b} and x_(n+1) = x_n^2 - {a}. Find x_{b}.",
    "Find all real solutions of the equation x^3 - {a}x + {c} = 0.",
    "Let P(x) be a polynomial with integer coefficients such that P({b}) = {a} and P({c}) = {b}. Find P(0) modulo {b}.",
    "In how many ways can {c} identical balls be placed into {b} distinct boxes if every box gets at least one ball?",
    "Find the smallest positive integer n such that {a} divides n! and n is a multiple of {b}.",
    "For real numbers x and y with x^2 + y^2 = {a}, what is the largest possible value of x + {b}y?",
    "Determine all pairs of integers (x, y) with x^2 - {b}y^2 = {a}.",
]  # fmt: skip


def competition_problems(count: int, rng: random.Random) -> list[str]:
    out: set[str] = set()
    while len(out) < count:
        out.add(rng.choice(COMPETITION).format(a=rng.randint(2, 99), b=rng.randint(2, 12), c=rng.randint(13, 60)))
    return sorted(out)


DOC_MODULES = [
    "math", "statistics", "fractions", "decimal", "itertools", "functools", "collections", "heapq", "bisect", "random",
    "string", "textwrap", "json", "re", "datetime", "calendar", "pathlib", "os.path", "shutil", "csv", "difflib",
    "inspect", "typing", "dataclasses", "enum", "argparse", "logging", "zipfile", "tarfile", "urllib.parse", "email",
    "http.client", "unittest", "threading", "queue", "subprocess", "tempfile", "glob", "fnmatch", "operator", "cmath",
]  # fmt: skip


def docstrings(count: int, rng: random.Random) -> list[str]:
    """First paragraphs (8+ words) of public functions' and classes' docstrings in DOC_MODULES, a seeded draw."""
    found: set[str] = set()
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value)):
                continue
            doc = inspect.getdoc(value) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            if len(first.split()) >= 8:
                found.add(first)
    pool = sorted(found)
    return rng.sample(pool, min(count, len(pool)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(SEED)
    champ = read_champ()
    chosen = sorted(rng.sample(range(len(champ.texts)), POSITIVE_ITEMS))
    positives = [(kind, item, edit(champ.texts[item], kind, rng)) for item in chosen for kind in EDITS]
    unchanged = {kind: sum(1 for k, i, t in positives if k == kind and t == champ.texts[i]) for kind in EDITS}
    sources = {
        "word problems": word_problems(WORD_PROBLEMS, rng),
        "competition-style": competition_problems(COMPETITION_PROBLEMS, rng),
        "docstrings": docstrings(DOCSTRINGS, rng),
    }
    negatives = [text for texts in sources.values() for text in texts]
    source_of = [name for name, texts in sources.items() for _ in texts]
    texts = [t for _, _, t in positives] + negatives
    records = pl.DataFrame(
        {
            "record_id": [f"pos-{k}-{i}" for k, i, _ in positives] + [f"neg-{j}" for j in range(len(negatives))],
            "call_id": [f"c{j}" for j in range(len(texts))],
            "text": texts,
            "record_json": ["{}"] * len(texts),
        }
    )
    embedder = load_embedder("minilm-l6")
    started = time.perf_counter()
    embeddings = embedder.encode(texts)
    embedder.encode(list(champ.texts))
    encode_seconds = time.perf_counter() - started
    n_pos = len(positives)
    rows, timings, false_hits = [], {}, {}
    for n in NGRAMS:
        started = time.perf_counter()
        found = benchmark_evidence(champ, checked_texts(records, None), {"text": embeddings}, n, embedder)
        timings[n] = time.perf_counter() - started
        false_hits[n] = [
            (records["text"][n_pos + j], champ.item_ids[e.ngram_item], e.shared)
            for j, e in enumerate(found[n_pos:]) if e.shared
        ]  # fmt: skip
        for threshold in THRESHOLDS:
            tests = {
                "ngram": [e.shared > 0 for e in found],
                "embedding": [e.cosine >= threshold - 1e-6 for e in found],
            }
            tests["either"] = [a or b for a, b in zip(tests["ngram"], tests["embedding"], strict=True)]
            for test, flags in tests.items():
                if test == "ngram" and threshold != THRESHOLDS[0]:
                    continue  # the n-gram test does not depend on the threshold
                right = [
                    flags[j] and item in (found[j].ngram_item, found[j].nearest_item)
                    for j, (_, item, _) in enumerate(positives)
                ]
                row = {
                    "ngram": n, "threshold": None if test == "ngram" else threshold, "test": test,
                    "recall": sum(flags[:n_pos]) / n_pos, "right_item": sum(right) / n_pos,
                    "false_positives": sum(flags[n_pos:]), "negatives": len(negatives),
                    **{f"fp_{name}": sum(f for f, src in zip(flags[n_pos:], source_of, strict=True) if src == name) for name in sources},
                    **{f"recall_{k}": sum(f for f, (kk, _, _) in zip(flags, positives, strict=False) if kk == k) / POSITIVE_ITEMS for k in EDITS},
                }  # fmt: skip
                rows.append(row)
    # The stage itself at its defaults rejects what "either" flags there.
    settings = DecontaminateSpec(benchmarks=["champ"])
    stage = decontaminate(records, embeddings, settings, [champ], embedder)
    default_row = next(
        r for r in rows if r["ngram"] == settings.ngram and r["threshold"] == settings.embedding_threshold and r["test"] == "either"
    )
    assert stage.rejects.height == round(default_row["recall"] * n_pos) + default_row["false_positives"]
    neg_cos = sorted(((e.cosine, src) for e, src in zip(found[n_pos:], source_of, strict=True)), reverse=True)
    pos_cos = {k: sorted(e.cosine for e, (kk, _, _) in zip(found, positives, strict=False) if kk == k) for k in EDITS}
    result = {
        "positives": n_pos, "negatives": len(negatives), "edits_that_changed_nothing": unchanged,
        "encode_seconds": round(encode_seconds, 1), "test_seconds": {str(k): round(v, 2) for k, v in timings.items()},
        "highest_negative_cosines": [(round(c, 3), src) for c, src in neg_cos[:5]],
        "negatives_sharing_ngrams": {str(n): hits for n, hits in false_hits.items()},
        "lowest_positive_cosines": {k: [round(c, 3) for c in v[:3]] for k, v in pos_cos.items()},
        "rows": rows,
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{n_pos} positives ({POSITIVE_ITEMS} CHAMP problems x {len(EDITS)} edits), {len(negatives)} negatives")
    print(f"edits that left the text unchanged: {unchanged}")
    print(f"encode {encode_seconds:.1f} s; tests per n: {result['test_seconds']} s")
    print(f"highest negative cosines: {result['highest_negative_cosines']}")
    for n, hits in false_hits.items():
        for text, item, shared in hits:
            print(f"negative sharing {shared} {n}-gram(s) with {item}: {text}")
    print(f"lowest positive cosines by edit: {result['lowest_positive_cosines']}")
    print()
    header = " | ".join([*(f"recall {k}" for k in EDITS), *(f"FP {name}" for name in sources)])
    print(f"| n | threshold | test | recall | right item | {header} | false positives |")
    print("|---:|---:|---|---:|---:|" + "---:|" * (len(EDITS) + len(sources)) + "---:|")
    for r in rows:
        threshold = "" if r["threshold"] is None else r["threshold"]
        by_edit = " | ".join([*(f"{r[f'recall_{k}']:.0%}" for k in EDITS), *(str(r[f"fp_{name}"]) for name in sources)])
        print(
            f"| {r['ngram']} | {threshold} | {r['test']} | {r['recall']:.1%} | {r['right_item']:.1%} | {by_edit} | "
            f"{r['false_positives']} / {r['negatives']} |"
        )


if __name__ == "__main__":
    main()
