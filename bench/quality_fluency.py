"""The fluency check on the embedded model: how well it separates prose from character-shuffled prose, and what it
costs per 100 records.

    .venv/bin/python bench/quality_fluency.py --engine transformers --threads 1 --records 100

Texts: first sentences of stdlib docstrings (the prose the test uses), joined into records of ~120-200 characters
(the size of a biography's `bio`), and each record's characters shuffled (seeded) as its gibberish twin. Prints the
AUC of the mean token log-prob (prose above gibberish), the best accuracy of one absolute threshold, and the seconds
of `stages.quality.fluency_scores` per 100 records (model load apart), with the load average: machines are shared.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import time

OBJECTS = [
    "os.path.join", "os.path.exists", "shutil.copyfile", "shutil.rmtree", "random.shuffle", "random.choice",
    "textwrap.wrap", "glob.glob", "heapq.heappush", "heapq.merge", "bisect.insort", "collections.Counter",
    "math.isclose", "zipfile.is_zipfile", "copy.deepcopy", "calendar.isleap", "gzip.open", "inspect.getsource",
    "statistics.median", "statistics.mean", "threading.Thread", "subprocess.run", "logging.getLogger",
    "queue.Queue", "uuid.uuid4", "secrets.token_hex", "tempfile.mkdtemp", "base64.b64encode",
]  # fmt: skip


def first_sentence(dotted: str) -> str:
    module, _, name = dotted.rpartition(".")
    doc = " ".join((getattr(importlib.import_module(module), name).__doc__ or "").strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s", doc)[0]


def shuffled(text: str, seed: int) -> str:
    chars = list(text)
    random.Random(seed).shuffle(chars)
    return "".join(chars)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--records", type=int, default=100, help="prose records (as many gibberish ones again)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from polyculture.engines.factory import create_engine
    from polyculture.spec import ModelSpec
    from polyculture.stages.quality import fluency_scores

    sentences = [first_sentence(o) for o in OBJECTS]
    rng = random.Random(0)
    prose = []
    while len(prose) < args.records:
        text = ""
        while len(text) < 120:
            text = f"{text} {rng.choice(sentences)}".strip()
        prose.append(text[:200])
    gibberish = [shuffled(t, i) for i, t in enumerate(prose)]

    started = time.perf_counter()
    engine = create_engine(ModelSpec(engine=args.engine), seed=0)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scores = fluency_scores(prose + gibberish, engine)
    seconds = time.perf_counter() - started
    engine.close()
    good, bad = scores[: len(prose)], scores[len(prose) :]
    cut, accuracy = best_threshold(good, bad)
    print(json.dumps({
        "engine": args.engine, "threads": args.threads, "records": len(scores),
        "auc": round(auc(good, bad), 4), "best_threshold": round(cut, 3), "accuracy_at_best": round(accuracy, 4),
        "prose_mean": round(sum(good) / len(good), 3), "gibberish_mean": round(sum(bad) / len(bad), 3),
        "prose_min": round(min(good), 3), "gibberish_max": round(max(bad), 3),
        "seconds_per_100_records": round(100 * seconds / len(scores), 2), "load_seconds": round(load_seconds, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
