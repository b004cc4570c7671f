"""prose checks: real English sentences pass; what the embedded model writes when it degenerates fails, each with the
rule it broke; the fluency score ranks those loops above prose, which is why the check exists."""

from __future__ import annotations

import numpy as np
import pytest
from test_quality import prose_sentences, records_of

from polyculture.spec import ProseCheck
from polyculture.stages.quality import quality

# Records the embedded model wrote in the demo's frontier run (bench/quality_frontier.py), with the rule each breaks.
DEGENERATE = [
    ("2000-2019," + "2020," * 26, "compression ratio"),
    ("s.s.s.w.l.m.l.w.s.w.l.m.l.w.l.m.l.w.l.w." + "w." * 50, "mean word length"),
    ("John Smith</br>2005-2010|1998-2000|1999-2001|2002-2003|2003-2004|2004-2005|2005-2006", "words < 5"),
    ("Sandanja;1992-1996,Serbia;1991-1995,Moldova; 1982-1991,Ezman;2003-04,Moluaz; 2002-05", "stop words"),
    ("Prager Toussnamer" + "יעץלךיוחסזליסףמנהסיפריילבעקבקסכןסתה", "mean word length"),
    ("TruccionaraIberrada(uberAmariga 1970d-3-91894 4:20:16.23-3101", "hold a letter"),
    ("too,simple,ketan; margin en,title;first_person_textarea", "words < 5"),
    ("AmozikoAraulata, Cargo Rural en La Grilla Cordased", "0 stop words < 1"),
    ("1234 5678 9012 3456 7890 and the 1111", "hold a letter"),
]


def test_prose_passes_and_degenerate_text_fails_naming_the_rule():
    prose = prose_sentences(20)
    rows = [{"bio": t} for t in prose] + [{"bio": t} for t, _ in DEGENERATE] + [{"bio": ""}]
    check = ProseCheck(name="prose", kind="prose")
    result = quality(records_of(rows), np.zeros((len(rows), 2), dtype=np.float32), [check])
    assert result.records["record_id"].to_list() == [f"c{i}-0" for i in range(len(prose))]
    assert (result.records["_quality_prose"] == 1.0).all()
    details = dict(zip(result.rejects["record_id"], result.rejects["detail"], strict=True))
    for i, (_, rule) in enumerate(DEGENERATE, start=len(prose)):
        assert details[f"c{i}-0"].startswith("prose: ") and rule in details[f"c{i}-0"], details[f"c{i}-0"]
    assert details[f"c{len(rows) - 1}-0"] == "prose: text is empty (no score)"
    scores = result.scores.filter(result.scores["passed"].not_())["score"].drop_nulls().to_list()
    assert all(0 <= s < 1 for s in scores)  # the share of rules passed


def test_prose_rules_are_settings_and_a_field_can_be_named():
    loop = {"bio": "x", "summary": "He farmed and he farmed " * 8}
    strict = ProseCheck(name="p", kind="prose", field="summary")
    lenient = ProseCheck(name="p", kind="prose", field="summary", max_compression_ratio=5, stop_words=["he"])
    vectors = np.zeros((1, 2), dtype=np.float32)
    assert quality(records_of([loop]), vectors, [strict]).rejects["detail"][0].startswith("p: compression ratio")
    assert quality(records_of([loop]), vectors, [lenient]).records.height == 1
    with pytest.raises(ValueError, match="min_mean_word_length must be below max_mean_word_length"):
        ProseCheck(name="p", kind="prose", min_mean_word_length=12)
