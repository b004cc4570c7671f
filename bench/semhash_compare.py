"""Our dedup stage vs SemHash on the same texts and the same MiniLM embeddings, in one run.

The corpus is built here, seeded: sentences from the docstrings of Python's standard library and from `pydoc_data`
(natural English with natural near-duplicates), plus Faker-filled templated records (bios, reviews, questions,
headlines: the shape of LM-generated synthetic data), then planted duplicates of earlier texts at a known rate
(exact copies, case/punctuation/whitespace changes, typos, adjacent-word swaps, synonym substitutions, mixtures), each
inserted AFTER its source so "keep the first" keeps the original. Every text is embedded once with `minilm-l6`
(polyculture's on-disk cache makes reruns fast); both tools then get those same vectors: ours as the `embeddings`
argument of `dedup()`, SemHash through an encoder that looks the vectors up by text, so its time holds no encoding.

Reported: duplicates removed by each (and how many as exact duplicates), recall of the planted duplicates (overall,
among those whose cosine to their source reaches the threshold, and per kind), agreement of the removed sets
(intersection, Jaccard, share of each side's removals the other also made), a diagnosis of every disagreement, and
the wall time of each tool (median of --repeats, interleaved) with the ratio.

Usage: .venv/bin/python bench/semhash_compare.py [--n 20000] [--dup-rate 0.1] [--threshold 0.9] [--seed 0]
                                                 [--threads 2] [--repeats 3] [--json results.json]
Needs the bench extra (semhash, faker). Timings are comparable within one run only: the machines are shared.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import statistics
import sys
import sysconfig
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

PLANT_KINDS = {  # kind -> weight among planted duplicates
    "exact": 0.10,  # the identical string
    "surface": 0.15,  # case / whitespace / end punctuation only: equal after our normalisation
    "typo": 0.20,  # 1-2 character edits
    "swap": 0.15,  # two adjacent words swapped
    "synonym": 0.20,  # 1-3 words replaced by a synonym (or a filler word added / a stopword dropped)
    "mixed": 0.20,  # 2-3 of the above edits together
}

SYNONYMS = {
    "return": "give back",
    "returns": "gives back",
    "returned": "given back",
    "create": "make",
    "creates": "makes",
    "created": "made",
    "use": "utilize",
    "used": "utilized",
    "uses": "utilizes",
    "get": "obtain",
    "gets": "obtains",
    "show": "display",
    "shows": "displays",
    "start": "begin",
    "starts": "begins",
    "end": "finish",
    "ends": "finishes",
    "big": "large",
    "large": "big",
    "small": "little",
    "little": "small",
    "fast": "quick",
    "quick": "fast",
    "new": "fresh",
    "old": "former",
    "list": "sequence",
    "file": "document",
    "files": "documents",
    "error": "fault",
    "errors": "faults",
    "value": "quantity",
    "values": "quantities",
    "object": "item",
    "objects": "items",
    "method": "routine",
    "function": "routine",
    "called": "invoked",
    "call": "invoke",
    "calls": "invokes",
    "default": "standard",
    "given": "supplied",
    "specified": "given",
    "name": "label",
    "names": "labels",
    "string": "text",
    "strings": "texts",
    "number": "count",
    "check": "verify",
    "checks": "verifies",
    "set": "assign",
    "raise": "throw",
    "raises": "throws",
    "ignored": "skipped",
    "optional": "not required",
    "must": "has to",
    "should": "ought to",
    "can": "is able to",
    "may": "might",
    "also": "too",
    "only": "just",
    "each": "every",
    "all": "every",
    "many": "numerous",
    "several": "a few",
    "great": "excellent",
    "good": "fine",
    "bad": "poor",
    "really": "truly",
    "very": "extremely",
    "happy": "pleased",
    "love": "adore",
    "bought": "purchased",
    "buy": "purchase",
    "works": "is employed",
    "lives": "resides",
    "city": "town",
    "company": "firm",
    "announces": "unveils",
    "launches": "rolls out",
    "help": "assist",
    "helps": "assists",
    "product": "item",
    "problem": "issue",
    "broken": "faulty",
    "quickly": "rapidly",
    "often": "frequently",
    "enjoys": "likes",
    "team": "group",
    "plan": "strategy",
    "plans": "intends",
    "years": "yrs",
    "about": "regarding",
}
FILLERS = ["also", "really", "just", "actually", "simply", "basically"]
STOPWORDS = {"the", "a", "an", "that", "of", "to", "is", "very", "really", "just"}
PRODUCTS = [
    "blender",
    "backpack",
    "desk lamp",
    "coffee grinder",
    "keyboard",
    "water bottle",
    "rain jacket",
    "tent",
    "headphones",
    "standing desk",
    "air fryer",
    "running shoes",
    "monitor",
    "office chair",
    "phone case",
    "electric kettle",
    "yoga mat",
    "bike light",
    "toaster",
    "sleeping bag",
    "notebook",
    "smartwatch",
    "router",
    "vacuum cleaner",
    "frying pan",
    "hair dryer",
    "webcam",
    "suitcase",
    "drill",
    "thermostat",
]
OPINIONS = [
    "It works exactly as described and I would buy it again.",
    "It broke after two weeks, which was disappointing.",
    "Setup took five minutes and it has been reliable since.",
    "The build quality is great for the price.",
    "Shipping was slow but the product itself is excellent.",
    "It is louder than I expected, otherwise fine.",
    "Customer support replaced it quickly when it failed.",
    "Honestly it is overpriced for what you get.",
    "My whole family uses it every day now.",
    "The instructions were confusing but it works well.",
    "It looks nicer in person than in the photos.",
    "Battery life is much shorter than advertised.",
]
PROBLEMS = [
    "stops working after an update",
    "keeps disconnecting",
    "makes a strange noise",
    "will not turn on",
    "shows an error on startup",
    "runs out of battery too fast",
    "is slower than before",
    "overheats",
]


# -- corpus ---------------------------------------------------------------------------------------------------------

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEY = re.compile(r">>>|[{}\[\]=|]|::|\*\*|``")


def _sentences(block: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", block):
        if para.startswith((" ", "\t")):  # indented: code or a literal block
            continue
        for sentence in _SENTENCE_SPLIT.split(" ".join(para.split())):
            shaped = 40 <= len(sentence) <= 240 and sentence[0].isupper() and sentence[-1] in ".!?"
            if shaped and not _CODEY.search(sentence):
                out.append(sentence)
    return out


def natural_sentences() -> list[str]:
    """Sentences from stdlib docstrings and pydoc topics: fixed for a given Python version (3.11.7 here)."""
    import pydoc_data.topics

    found: set[str] = set()
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    found.update(_sentences(doc))
    for topic in pydoc_data.topics.topics.values():
        found.update(_sentences(topic))
    return sorted(found)


def faker_records(count: int, seed: int) -> list[str]:
    """Templated records filled by Faker: the repetitive shape of LM-generated synthetic data."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        template = rng.randrange(6)
        if template == 0:
            pronoun = rng.choice(["She", "He", "They"])
            out.append(
                f"{fake.name()} is a {fake.job().lower()} from {fake.city()}, {fake.state()}. "
                f"{pronoun} {'focus' if pronoun == 'They' else 'focuses'} on ways to {fake.bs()}."
            )
        elif template == 1:
            out.append(
                f"I bought the {fake.color_name().lower()} {rng.choice(PRODUCTS)} from {fake.company()} "
                f"in {fake.month_name()}. {rng.choice(OPINIONS)}"
            )
        elif template == 2:
            out.append(f"How do I {fake.bs()} when my {rng.choice(PRODUCTS)} {rng.choice(PROBLEMS)}?")
        elif template == 3:
            out.append(f"{fake.company()} announces {fake.catch_phrase().lower()} to {fake.bs()}.")
        elif template == 4:
            out.append(
                f"Born in {fake.year()} in {fake.city()}, {fake.first_name()} spent {rng.randint(2, 30)} years "
                f"as a {fake.job().lower()} before moving to {fake.country()}."
            )
        else:
            out.append(fake.sentence(nb_words=rng.randint(8, 18)))
    return out


def _typo(text: str, rng: random.Random) -> str | None:
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not spots:
        return None
    i = rng.choice(spots)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    op = rng.randrange(4)
    if op == 0:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    elif op == 1:
        w = w[:j] + w[j + 1 :]
    elif op == 2:
        w = w[:j] + w[j] + w[j:]
    else:
        w = w[:j] + rng.choice("abcdefghijklmnopqrstuvwxyz") + w[j + 1 :]
    words[i] = w
    return " ".join(words)


def _swap(text: str, rng: random.Random) -> str | None:
    words = text.split(" ")
    if len(words) < 3:
        return None
    i = rng.randrange(len(words) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _synonym(text: str, rng: random.Random) -> str | None:
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if w.lower().strip(".,;:!?") in SYNONYMS]
    if spots:
        i = rng.choice(spots)
        core = words[i].strip(".,;:!?")
        tail = words[i][len(core) :]
        new = SYNONYMS[core.lower()]
        words[i] = (new[0].upper() + new[1:] if core[0].isupper() else new) + tail
        return " ".join(words)
    drops = [i for i, w in enumerate(words) if w.lower() in STOPWORDS]
    if drops and rng.random() < 0.5:
        del words[rng.choice(drops)]
    else:
        words.insert(rng.randrange(1, len(words)), rng.choice(FILLERS))
    return " ".join(words)


def _surface(text: str, rng: random.Random) -> str:
    op = rng.randrange(5)
    if op == 0:
        return text.lower()
    if op == 1:
        return text.upper()
    if op == 2:
        return text.rstrip(".!?") if text[-1] in ".!?" else text + "."
    if op == 3:
        return text.rstrip(".!?") + "!!"
    return "  " + text.replace(" ", "  ", 2) + " "


def plant(text: str, kind: str, rng: random.Random) -> str:
    if kind == "exact":
        return text
    if kind == "surface":
        return _surface(text, rng)
    edits = {"typo": [_typo], "swap": [_swap], "synonym": [_synonym, _synonym, _synonym][: rng.randint(1, 3)]}.get(
        kind
    ) or rng.sample([_typo, _swap, _synonym, _synonym, _typo], rng.randint(2, 3))
    out = text
    for edit in edits:
        out = edit(out, rng) or out
    if kind == "mixed" and rng.random() < 0.5:
        out = _surface(out, rng)
    return out


def build_corpus(n: int, dup_rate: float, seed: int) -> tuple[list[str], list[int], list[str], dict]:
    """texts; source row of each planted duplicate (-1 for a base text); label of each text (a plant kind, or the
    origin of a base text: "natural" or "faker")."""
    from polyculture.index.text import normalize_text

    rng = random.Random(seed)
    n_planted = round(n * dup_rate)
    n_base = n - n_planted
    natural = natural_sentences()
    n_natural = min(len(natural), n_base // 2)
    pool = rng.sample(natural, n_natural)
    from_natural = set(pool)
    # Base texts are unique after our normalisation, so every exact duplicate in the corpus is a planted one.
    seen = {normalize_text(t) for t in pool}
    fake_seed = seed
    while len(pool) < n_base:
        for text in faker_records(2 * (n_base - len(pool)) + 100, fake_seed):
            key = normalize_text(text)
            if key not in seen and len(pool) < n_base:
                seen.add(key)
                pool.append(text)
        fake_seed += 1_000_003
    rng.shuffle(pool)

    # Sort key: base text i sits at i; a planted copy of source s at a uniform point after s.
    kinds, weights = zip(*PLANT_KINDS.items(), strict=True)
    items = [(float(i), text, -1, "natural" if text in from_natural else "faker") for i, text in enumerate(pool)]
    for _ in range(n_planted):
        source = rng.randrange(n_base - 1) if n_base > 1 else 0
        kind = rng.choices(kinds, weights)[0]
        items.append((rng.uniform(source + 1e-6, n_base), plant(pool[source], kind, rng), source, kind))
    items.sort(key=lambda item: item[0])
    position_of_base = {int(key): pos for pos, (key, _, src, _) in enumerate(items) if src < 0}
    texts = [text for _, text, _, _ in items]
    sources = [position_of_base[src] if src >= 0 else -1 for _, _, src, _ in items]
    labels = [kind for _, _, _, kind in items]
    info = {
        "base_texts": n_base,
        "natural_sentences": n_natural,
        "faker_records": n_base - n_natural,
        "planted": n_planted,
        "planted_by_kind": dict(Counter(k for k in labels if k in PLANT_KINDS)),
    }
    return texts, sources, labels, info


# -- the two tools --------------------------------------------------------------------------------------------------


class LookupEncoder:
    """SemHash's Encoder protocol (`encode(inputs, **kwargs) -> np.ndarray`) over precomputed vectors."""

    def __init__(self, texts, vectors) -> None:
        self._row = {}
        for i, text in enumerate(texts):
            self._row.setdefault(text, i)
        self._vectors = vectors
        self.calls = 0
        self.seconds = 0.0

    def encode(self, inputs, **kwargs):
        started = time.perf_counter()
        self.calls += 1
        out = self._vectors[[self._row[text] for text in inputs]]
        self.seconds += time.perf_counter() - started
        return out


def limit_usearch_threads(threads: int) -> None:
    """vicinity builds and searches its usearch index with threads=0 (all cores): pin it to `threads`."""
    import usearch.index
    import vicinity.backends.usearch as vicinity_usearch

    class PinnedIndex(usearch.index.Index):
        def add(self, keys, vectors, **kwargs):
            kwargs.setdefault("threads", threads)
            return super().add(keys, vectors, **kwargs)

        def search(self, vectors, count=10, radius=float("inf"), **kwargs):
            kwargs.setdefault("threads", threads)
            return super().search(vectors, count, radius, **kwargs)

    vicinity_usearch.UsearchIndex = PinnedIndex


def run_ours(frame, vectors, threshold: float) -> tuple[float, dict[int, tuple[str, str]]]:
    from polyculture.spec import DedupSpec
    from polyculture.stages.dedup import dedup

    started = time.perf_counter()
    result = dedup(frame, vectors, DedupSpec(threshold=threshold))
    seconds = time.perf_counter() - started
    removed = {
        int(rid[1:]): (reason, detail)
        for rid, reason, detail in result.rejects.select("record_id", "reason", "detail").iter_rows()
    }
    return seconds, removed


def run_semhash(texts, vectors, threshold: float, backend: str) -> tuple[dict, dict[int, tuple[bool, int, float]]]:
    from semhash import SemHash

    encoder = LookupEncoder(texts, vectors)
    records = [{"text": text, "idx": i} for i, text in enumerate(texts)]
    started = time.perf_counter()
    semhash = SemHash.from_records(records, columns=["text"], model=encoder, ann_backend=backend)
    built = time.perf_counter()
    result = semhash.self_deduplicate(threshold=threshold)
    done = time.perf_counter()
    removed = {d.record["idx"]: (bool(d.exact), d.duplicate_of["idx"], float(d.score)) for d in result.filtered}
    times = {
        "total_s": done - started,
        "index_s": built - started,
        "dedup_s": done - built,
        "encoder_lookup_s": encoder.seconds,
        "encoder_calls": encoder.calls,
        "index_dtype": str(getattr(getattr(semhash.index.backend, "index", None), "dtype", "n/a")),
    }
    return times, removed


# -- analysis -------------------------------------------------------------------------------------------------------


def max_earlier_cosine(vectors, i: int, allowed) -> tuple[float, int]:
    """Exact best cosine of row i against earlier rows in `allowed` (a boolean mask), and which row."""
    import numpy as np

    earlier = np.flatnonzero(allowed[:i])
    if not len(earlier):
        return -1.0, -1
    sims = vectors[earlier] @ vectors[i]
    best = int(np.argmax(sims))
    return float(sims[best]), int(earlier[best])


def analyse(texts, sources, labels, vectors, threshold, ours, sem) -> dict:
    import numpy as np

    n = len(texts)
    ours_set, sem_set = set(ours), set(sem)
    both = ours_set & sem_set
    union = ours_set | sem_set
    planted = [i for i in range(n) if sources[i] >= 0]
    source_cos = {i: float(vectors[i] @ vectors[sources[i]]) for i in planted}
    reachable = [i for i in planted if source_cos[i] >= threshold - 1e-6]

    def recall(removed: set[int], rows: list[int]) -> float | None:
        return round(sum(i in removed for i in rows) / len(rows), 4) if rows else None

    by_kind = {}
    for kind in PLANT_KINDS:
        rows = [i for i in planted if labels[i] == kind]
        by_kind[kind] = {
            "planted": len(rows),
            "cos_to_source_ge_threshold": sum(i in reachable for i in rows),
            "median_cos_to_source": round(statistics.median(source_cos[i] for i in rows), 4) if rows else None,
            "recall_ours": recall(ours_set, rows),
            "recall_semhash": recall(sem_set, rows),
        }

    raw_seen: set[str] = set()
    raw_exact = 0
    for text in texts:
        raw_exact += text in raw_seen
        raw_seen.add(text)

    ours_kept = np.ones(n, dtype=bool)
    ours_kept[list(ours_set)] = False
    sem_kept = np.ones(n, dtype=bool)
    sem_kept[list(sem_set)] = False
    # Why did the sides disagree? Recompute exactly, by brute force, against the other side's kept set.
    only_ours = Counter()
    only_ours_examples = []
    for i in sorted(ours_set - sem_set):
        reason = ours[i][0]
        cos, j = max_earlier_cosine(vectors, i, sem_kept)
        if cos >= threshold:
            cause = f"semhash missed it: an earlier record it kept is within the threshold ({reason})"
            if cos < threshold + 0.01:
                cause += ", cosine within 0.01 above the threshold"
        elif reason == "exact_duplicate":
            cause = "normalised-exact duplicate (ours) whose cosine to SemHash's kept records is below the threshold"
        else:
            cause = f"different kept sets: nothing SemHash kept is within the threshold ({reason})"
        only_ours[cause] += 1
        if len(only_ours_examples) < 5:
            only_ours_examples.append(
                {
                    "text": texts[i],
                    "ours": ours[i][1],
                    "semhash_best_kept_cos": round(cos, 5),
                    "semhash_best_kept_text": texts[j] if j >= 0 else None,
                }
            )
    only_sem = Counter()
    only_sem_examples = []
    for i in sorted(sem_set - ours_set):
        _, rep, score = sem[i]
        cos, _ = max_earlier_cosine(vectors, i, ours_kept)
        if rep >= 0 and not ours_kept[rep]:
            cause = "SemHash's representative was dropped by ours (different kept sets)"
        elif score >= threshold and cos < threshold:
            cause = "cosine to a record both kept reaches the threshold in SemHash's scoring but not ours"
        else:
            cause = "other"
        only_sem[cause] += 1
        if len(only_sem_examples) < 5:
            only_sem_examples.append(
                {
                    "text": texts[i],
                    "semhash_duplicate_of": texts[rep],
                    "semhash_score": round(score, 5),
                    "ours_best_kept_cos": round(cos, 5),
                }
            )

    return {
        "removed_ours": len(ours_set),
        "removed_semhash": len(sem_set),
        "removed_ours_exact": sum(r == "exact_duplicate" for r, _ in ours.values()),
        "removed_ours_near": sum(r == "near_duplicate" for r, _ in ours.values()),
        "removed_semhash_flagged_exact": sum(e for e, _, _ in sem.values()),
        "raw_identical_duplicates_in_corpus": raw_exact,
        "removed_base_texts_ours": dict(Counter(labels[i] for i in ours_set if sources[i] < 0)),
        "removed_base_texts_semhash": dict(Counter(labels[i] for i in sem_set if sources[i] < 0)),
        "agreement": {
            "both": len(both),
            "only_ours": len(ours_set - sem_set),
            "only_semhash": len(sem_set - ours_set),
            "jaccard": round(len(both) / len(union), 5) if union else 1.0,
            "share_of_ours_also_removed_by_semhash": round(len(both) / len(ours_set), 5) if ours_set else None,
            "share_of_semhash_also_removed_by_ours": round(len(both) / len(sem_set), 5) if sem_set else None,
            "only_ours_causes": dict(only_ours),
            "only_semhash_causes": dict(only_sem),
            "only_ours_examples": only_ours_examples,
            "only_semhash_examples": only_sem_examples,
        },
        "planted": {
            "count": len(planted),
            "cos_to_source_ge_threshold": len(reachable),
            "recall_ours": recall(ours_set, planted),
            "recall_semhash": recall(sem_set, planted),
            "recall_ours_where_cos_ge_threshold": recall(ours_set, reachable),
            "recall_semhash_where_cos_ge_threshold": recall(sem_set, reachable),
            "by_kind": by_kind,
        },
    }


# -- main -----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="corpus size, planted duplicates included")
    parser.add_argument("--dup-rate", type=float, default=0.1, help="share of the corpus that is planted duplicates")
    parser.add_argument("--threshold", type=float, default=0.9, help="cosine similarity threshold for both tools")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="for torch, faiss, BLAS/OpenMP and usearch alike")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each tool, interleaved")
    parser.add_argument("--semhash-backend", default="usearch", help="vicinity backend (SemHash's default: usearch)")
    parser.add_argument("--json", metavar="PATH", help="also write the full results as JSON ('-': stdout only)")
    args = parser.parse_args(argv)
    if not 0 <= args.dup_rate < 1 or args.n < 10 or args.repeats < 1 or args.threads < 1:
        parser.error("need --n >= 10, 0 <= --dup-rate < 1, --repeats >= 1, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before numpy/torch/faiss load: their thread pools read these once.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import faiss
    import numpy as np
    import polars as pl
    import torch

    from polyculture.stages.embed import load_embedder

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    limit_usearch_threads(args.threads)
    load_start = os.getloadavg()

    started = time.perf_counter()
    texts, sources, labels, corpus_info = build_corpus(args.n, args.dup_rate, args.seed)
    corpus_s = time.perf_counter() - started
    print(f"corpus: {len(texts)} texts ({corpus_info['planted']} planted) in {corpus_s:.1f}s", file=sys.stderr)

    started = time.perf_counter()
    embedder = load_embedder("minilm-l6")
    model_load_s = time.perf_counter() - started
    started = time.perf_counter()
    vectors = np.ascontiguousarray(embedder.encode(texts, show_progress=False), dtype=np.float32)
    embed_s = time.perf_counter() - started
    print(f"embedded in {embed_s:.1f}s (model load {model_load_s:.1f}s)", file=sys.stderr)

    frame = pl.DataFrame({"record_id": [f"r{i:07d}" for i in range(len(texts))], "call_id": "bench", "text": texts})
    ours_times, sem_times = [], []
    ours_removed = sem_removed = None
    ours_per_repeat, sem_per_repeat = [], []
    for repeat in range(args.repeats):
        seconds, removed = run_ours(frame, vectors, args.threshold)
        ours_times.append(seconds)
        if repeat == 0:
            ours_removed = removed
        times, removed_sem = run_semhash(texts, vectors, args.threshold, args.semhash_backend)
        sem_times.append(times)
        if repeat == 0:
            sem_removed = removed_sem
        ours_per_repeat.append(set(removed))
        sem_per_repeat.append(set(removed_sem))
        print(f"repeat {repeat + 1}: ours {seconds:.2f}s, semhash {times['total_s']:.2f}s", file=sys.stderr)

    analysis = analyse(texts, sources, labels, vectors, args.threshold, ours_removed, sem_removed)
    ours_median = statistics.median(ours_times)
    sem_median = statistics.median(t["total_s"] for t in sem_times)
    results = {
        "config": {
            "n": len(texts),
            "dup_rate": args.dup_rate,
            "threshold": args.threshold,
            "seed": args.seed,
            "threads": args.threads,
            "repeats": args.repeats,
            "semhash_backend": args.semhash_backend,
        },
        "corpus": corpus_info | {"build_s": round(corpus_s, 2)},
        "embedding": {
            "model": "minilm-l6",
            "model_load_s": round(model_load_s, 2),
            "encode_s": round(embed_s, 2),
            "note": "once, shared by both tools; fast when polyculture's embedding cache already holds the texts",
        },
        "time": {
            "ours_s": [round(t, 3) for t in ours_times],
            "semhash_s": [round(t["total_s"], 3) for t in sem_times],
            "semhash_index_s": [round(t["index_s"], 3) for t in sem_times],
            "semhash_dedup_s": [round(t["dedup_s"], 3) for t in sem_times],
            "semhash_encoder_lookup_s": [round(t["encoder_lookup_s"], 4) for t in sem_times],
            "ours_median_s": round(ours_median, 3),
            "semhash_median_s": round(sem_median, 3),
            "semhash_over_ours": round(sem_median / ours_median, 3),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "semhash_index_dtype": sem_times[0]["index_dtype"],
        "per_repeat": {
            "removed_ours": [len(r) for r in ours_per_repeat],
            "removed_semhash": [len(r) for r in sem_per_repeat],
            "ours_differs_from_repeat_1": [len(r ^ ours_per_repeat[0]) for r in ours_per_repeat],
            "semhash_differs_from_repeat_1": [len(r ^ sem_per_repeat[0]) for r in sem_per_repeat],
            "jaccard": [
                round(len(o & m) / max(1, len(o | m)), 5) for o, m in zip(ours_per_repeat, sem_per_repeat, strict=True)
            ],
        },
        "results": analysis,
        "versions": {
            name: _version(name)
            for name in (
                "semhash",
                "vicinity",
                "usearch",
                "faiss-cpu",
                "torch",
                "numpy",
                "faker",
                "sentence-transformers",
            )
        }
        | {"python": platform.python_version()},
    }
    print_summary(results)
    if args.json:
        text = json.dumps(results, indent=2, ensure_ascii=False)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def print_summary(r: dict) -> None:
    res, agr, pl_, t = r["results"], r["results"]["agreement"], r["results"]["planted"], r["time"]
    lines = [
        (
            f"n={r['config']['n']} threshold={r['config']['threshold']} seed={r['config']['seed']} "
            f"threads={r['config']['threads']} backend={r['config']['semhash_backend']} "
            f"(index dtype {r['semhash_index_dtype']})"
        ),
        f"embedding (once): {r['embedding']['encode_s']}s + model load {r['embedding']['model_load_s']}s",
        (
            f"removed: ours {res['removed_ours']} "
            f"({res['removed_ours_exact']} exact, {res['removed_ours_near']} near), "
            f"semhash {res['removed_semhash']} ({res['removed_semhash_flagged_exact']} flagged exact); "
            f"raw-identical duplicates in corpus {res['raw_identical_duplicates_in_corpus']}"
        ),
        (
            f"base (unplanted) texts removed, by origin: ours {res['removed_base_texts_ours']}, "
            f"semhash {res['removed_base_texts_semhash']}"
        ),
        (
            f"planted recall: ours {pl_['recall_ours']}, semhash {pl_['recall_semhash']} (of {pl_['count']}); "
            f"where cos(dup, source) >= threshold ({pl_['cos_to_source_ge_threshold']}): "
            f"ours {pl_['recall_ours_where_cos_ge_threshold']}, semhash {pl_['recall_semhash_where_cos_ge_threshold']}"
        ),
    ]
    for kind, k in pl_["by_kind"].items():
        lines.append(
            f"  {kind:8s} planted {k['planted']:5d}  cos>=t {k['cos_to_source_ge_threshold']:5d}  "
            f"median cos {k['median_cos_to_source']}  recall ours {k['recall_ours']}  semhash {k['recall_semhash']}"
        )
    lines += [
        (
            f"agreement: both {agr['both']}, only ours {agr['only_ours']}, only semhash {agr['only_semhash']}, "
            f"jaccard {agr['jaccard']}, ours also removed by semhash {agr['share_of_ours_also_removed_by_semhash']}, "
            f"semhash also removed by ours {agr['share_of_semhash_also_removed_by_ours']}"
        ),
    ]
    lines += [f"  only ours: {v} x {k}" for k, v in agr["only_ours_causes"].items()]
    lines += [f"  only semhash: {v} x {k}" for k, v in agr["only_semhash_causes"].items()]
    lines += [
        (
            f"time (median of {r['config']['repeats']}): ours {t['ours_median_s']}s, semhash {t['semhash_median_s']}s "
            f"(index {statistics.median(t['semhash_index_s']):.3f}s "
            f"+ dedup {statistics.median(t['semhash_dedup_s']):.3f}s); "
            f"semhash/ours = {t['semhash_over_ours']}"
        ),
        (
            f"per repeat: removed ours {r['per_repeat']['removed_ours']}, "
            f"semhash {r['per_repeat']['removed_semhash']}; "
            f"records differing from repeat 1: ours {r['per_repeat']['ours_differs_from_repeat_1']}, "
            f"semhash {r['per_repeat']['semhash_differs_from_repeat_1']}; jaccard {r['per_repeat']['jaccard']}"
        ),
        f"load average start {t['loadavg_start']} end {t['loadavg_end']} (2 cores; above 2 means timings are inflated)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
