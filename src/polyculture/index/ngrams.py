"""Word n-grams for benchmark decontamination: a text's words (NFKC, casefolded, punctuation dropped), its n-grams as
hashes, and an index from hashed n-grams to the benchmark items holding them.

Hashes are Python's own string hashes: fast, and only ever compared within one process (nothing here is stored).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+")
# An item shorter than n words has no n-gram; one of at least this many words is matched as a whole word sequence
# instead (CHAMP holds 6-word problems such as "Find 2^32+1 mod 641."). Shorter ones are left to the embedding test:
# a 2-word item would match far too many texts.
MIN_WHOLE_ITEM_WORDS = 4


def words(text: str) -> list[str]:
    """The text's words: NFKC, casefolded, runs of letters and digits only (punctuation and operators drop out)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def ngram_hashes(tokens: Sequence[str], n: int) -> set[int]:
    """Hashes of the distinct n-grams of `tokens` (none when there are fewer than n)."""
    return {hash(" ".join(tokens[i : i + n])) for i in range(len(tokens) - n + 1)}


class NgramIndex:
    """Which items hold each n-gram, over a benchmark's texts; `matches` counts the n-grams a text shares with each.

    Items of at least n words are indexed by their n-grams; shorter ones (at least MIN_WHOLE_ITEM_WORDS words) by
    their whole word sequence, which a text matches when it contains it."""

    def __init__(self, texts: Sequence[str], n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self._items: dict[int, dict[int, list[int]]] = {}  # gram length -> gram hash -> items holding it
        self.whole: set[int] = set()  # items matched as a whole word sequence (shorter than n)
        self.unmatchable = 0  # items too short for either rule
        for item, text in enumerate(texts):
            tokens = words(text)
            if len(tokens) >= n:
                length, grams = n, ngram_hashes(tokens, n)
            elif len(tokens) >= MIN_WHOLE_ITEM_WORDS:
                length, grams = len(tokens), {hash(" ".join(tokens))}
                self.whole.add(item)
            else:
                self.unmatchable += 1
                continue
            table = self._items.setdefault(length, {})
            for gram in grams:
                table.setdefault(gram, []).append(item)

    def matches(self, text: str) -> Counter[int]:
        """Shared n-grams per item (an item matched as a whole counts 1); items sharing none are absent."""
        tokens = words(text)
        shared: Counter[int] = Counter()
        for length, table in self._items.items():
            for gram in ngram_hashes(tokens, length):
                for item in table.get(gram, ()):
                    shared[item] += 1
        return shared
