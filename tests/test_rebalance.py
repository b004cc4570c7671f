"""rebalance: exact joint targets, farthest-point cuts on real MiniLM embeddings, deficits and off-target values."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from polyculture.spec import Attribute, RebalanceSpec
from polyculture.stages.rebalance import farthest_point_order, rebalance

pytestmark = pytest.mark.usefixtures("private_cache")


OCCUPATION = Attribute(name="occupation", values=["doctor", "teacher"])


def records(rows: list[tuple[str, ...]], columns: list[str]) -> pl.DataFrame:
    """rows: (text, probability, *attribute values)."""
    frame = pl.DataFrame(
        rows, schema={"text": pl.String, "verbalized_probability": pl.Float64, **{c: pl.String for c in columns}}, orient="row"
    )
    ids = [f"r{i}" for i in range(frame.height)]
    return frame.with_columns(record_id=pl.Series(ids), call_id=pl.Series([f"c{i}" for i in range(frame.height)]))


def test_surplus_cut_to_quota_keeps_the_distinct_texts(embedder):
    frame = records(
        [
            ("A doctor treats patients in a hospital.", 0.9, "doctor"),
            ("A doctor treats patients at a hospital.", 0.5, "doctor"),  # cos 0.99 to r0
            ("The surgeon spends weekends sailing across the bay.", 0.1, "doctor"),
            ("A teacher grades essays late at night.", 0.4, "teacher"),
            ("This teacher climbs mountains in the Himalayas every summer.", 0.3, "teacher"),
        ],
        ["occupation"],
    )
    emb = embedder.encode(frame["text"].to_list())
    result = rebalance(frame, emb, RebalanceSpec(), [OCCUPATION], 4)

    # doctor: quota 2 of 3 -> the near-identical second text goes, not the distinct third one
    assert result.kept["record_id"].to_list() == ["r0", "r2", "r3", "r4"]
    np.testing.assert_array_equal(result.kept_embeddings, emb[[0, 2, 3, 4]])
    assert result.rejects["record_id"].to_list() == ["r1"]
    assert result.rejects["reason"].to_list() == ["surplus"]
    assert result.rejects["stage"].to_list() == ["rebalance"]
    cells = result.cells.to_dicts()
    assert [(c["cell_key"], c["target"], c["available"], c["kept"], c["deficit"]) for c in cells] == [
        ("occupation=doctor", 2, 3, 2, 0),
        ("occupation=teacher", 2, 2, 2, 0),
    ]
    assert all(c["reason"] is None for c in cells)


def test_farthest_point_starts_from_highest_probability(embedder):
    texts = [
        "A doctor treats patients in a hospital.",
        "A doctor treats patients at a hospital.",
        "The surgeon spends weekends sailing across the bay.",
    ]
    # the most likely record is now the second near-duplicate: it is kept, and the first one is cut
    frame = records([(texts[0], None), (texts[1], 0.8), (texts[2], 0.1)], [])
    result = rebalance(frame, embedder.encode(texts), RebalanceSpec(), [], 2)
    assert result.kept["record_id"].to_list() == ["r1", "r2"]
    assert result.cells["cell_key"].to_list() == ["all"]
    # all probabilities null: the first record in frame order starts, and the second pick is the far one
    unrated = records([(texts[1], None), (texts[0], None), (texts[2], None)], [])
    emb = embedder.encode(unrated["text"].to_list())
    assert rebalance(unrated, emb, RebalanceSpec(), [], 2).kept["record_id"].to_list() == ["r0", "r2"]
    assert farthest_point_order(emb, 0, 3) == [0, 2, 1]


def test_deficit_cell_reported_with_reason(embedder):
    rows = [(f"Doctor number {i} works nights in a clinic in town {i}.", 0.2, "doctor") for i in range(3)]
    rows += [(f"Teacher number {i} runs a choir in village {i}.", 0.2, "teacher") for i in range(10)]
    frame = records(rows, ["occupation"])
    result = rebalance(frame, embedder.encode(frame["text"].to_list()), RebalanceSpec(), [OCCUPATION], 20)
    cells = {c["occupation"]: c for c in result.cells.to_dicts()}
    assert cells["doctor"]["target"] == 10 and cells["doctor"]["kept"] == 3 and cells["doctor"]["deficit"] == 7
    assert cells["doctor"]["reason"] == "only 3 valid unique records for this cell (target 10)"
    assert cells["teacher"]["deficit"] == 0 and cells["teacher"]["reason"] is None
    assert result.kept.height == 13
    assert result.rejects.height == 0


def test_off_target_values_rejected(embedder):
    frame = records(
        [
            ("A doctor treats patients in a hospital.", 0.3, "doctor"),
            ("A pilot flies cargo planes over the Andes.", 0.3, "pilot"),
            ("Someone with no stated job.", 0.3, None),
            ("A teacher grades essays late at night.", 0.3, "teacher"),
        ],
        ["occupation"],
    )
    result = rebalance(frame, embedder.encode(frame["text"].to_list()), RebalanceSpec(), [OCCUPATION], 2)
    assert result.kept["record_id"].to_list() == ["r0", "r3"]
    rejects = result.rejects.sort("record_id")
    assert rejects["record_id"].to_list() == ["r1", "r2"]
    assert set(rejects["reason"]) == {"off_target_value"}
    assert "pilot" in rejects["detail"][0]
    assert "occupation" in rejects["detail"][1]


def test_two_attributes_jointly(embedder):
    continent = Attribute(name="continent", values=["Asia", "Europe"], weights=[3, 1])
    occupations = ["doctor", "teacher"]
    places = {"Asia": ["Tokyo", "Mumbai", "Hanoi", "Seoul", "Manila"], "Europe": ["Oslo", "Lisbon", "Prague"]}
    rows = []
    for occ in occupations:
        for cont, cities in places.items():
            for city in cities:
                rows.append((f"A {occ} who grew up in {city} and loves {city}'s food.", 0.1, occ, cont))
    frame = records(rows, ["occupation", "continent"])
    emb = embedder.encode(frame["text"].to_list())
    # 16 = product of marginals: doctor/Asia 6, doctor/Europe 2, teacher/Asia 6, teacher/Europe 2
    result = rebalance(frame, emb, RebalanceSpec(), [OCCUPATION, continent], 16)

    cells = result.cells
    assert cells.columns == [
        "cell_key", "occupation", "continent", "target", "available", "kept", "deficit", "wanted", "reason"
    ]
    assert cells["cell_key"].to_list() == [
        "occupation=doctor|continent=Asia",
        "occupation=doctor|continent=Europe",
        "occupation=teacher|continent=Asia",
        "occupation=teacher|continent=Europe",
    ]
    assert cells["target"].to_list() == [6, 2, 6, 2]
    assert cells["available"].to_list() == [5, 3, 5, 3]
    assert cells["kept"].to_list() == [5, 2, 5, 2]
    assert cells["deficit"].to_list() == [1, 0, 1, 0]
    counts = result.kept.group_by(["occupation", "continent"]).len()
    assert {(r["occupation"], r["continent"]): r["len"] for r in counts.to_dicts()} == {
        ("doctor", "Asia"): 5,
        ("doctor", "Europe"): 2,
        ("teacher", "Asia"): 5,
        ("teacher", "Europe"): 2,
    }
    assert result.rejects["reason"].to_list() == ["surplus", "surplus"]
    # output ordered by cell, then by the original order within a cell
    kept = result.kept.with_row_index("pos")
    for _, group in kept.group_by(["occupation", "continent"]):
        ids = [int(r[1:]) for r in group.sort("pos")["record_id"]]
        assert ids == sorted(ids)
    assert len(result.kept_embeddings) == result.kept.height


def test_misaligned_and_missing_column_refused():
    frame = records([("x", 0.1, "doctor")], ["occupation"])
    with pytest.raises(ValueError, match="misaligned"):
        rebalance(frame, np.zeros((2, 4), dtype=np.float32), RebalanceSpec(), [OCCUPATION], 1)
    with pytest.raises(ValueError, match="continent"):
        rebalance(frame, np.zeros((1, 4), dtype=np.float32), RebalanceSpec(), [Attribute(name="continent", values=["Asia"])], 1)


def test_empty_frame():
    frame = records([], ["occupation"])
    result = rebalance(frame, np.zeros((0, 384), dtype=np.float32), RebalanceSpec(), [OCCUPATION], 4)
    assert result.kept.height == 0
    assert result.kept_embeddings.shape == (0, 384)
    assert result.cells["deficit"].to_list() == [2, 2]


def _two_attribute_frame(counts: dict[tuple[str, str], int]) -> pl.DataFrame:
    rows = []
    for (occ, cont), k in counts.items():
        rows += [(f"{occ} {cont} story number {i} about {occ}s in {cont}", 0.1, occ, cont) for i in range(k)]
    return records(rows, ["occupation", "continent"])


def _spread_vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 24)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


CONTINENT = Attribute(name="continent", values=["Asia", "Europe"], weights=[1, 1])


def test_marginals_mode_trades_between_cells_to_hit_every_marginal():
    # joint plan for 8: every cell 2. doctor/Europe has only 1 record: joint mode is short there; marginals mode
    # moves the missing one to doctor/Asia and teacher/Europe so doctor=4, teacher=4, Asia=4, Europe=4 all hold.
    frame = _two_attribute_frame({("doctor", "Asia"): 5, ("doctor", "Europe"): 1, ("teacher", "Asia"): 5,
                                  ("teacher", "Europe"): 5})  # fmt: skip
    emb = _spread_vectors(frame.height)
    joint = rebalance(frame, emb, RebalanceSpec(), [OCCUPATION, CONTINENT], 8)
    assert joint.kept.height == 7
    assert joint.shortfalls() == [({"occupation": "doctor", "continent": "Europe"}, 1)]
    result = rebalance(frame, emb, RebalanceSpec(targets="marginals"), [OCCUPATION, CONTINENT], 8)
    assert result.kept.height == 8
    counts = result.kept.group_by(["occupation", "continent"]).len()
    table = {(r["occupation"], r["continent"]): r["len"] for r in counts.to_dicts()}
    assert table == {("doctor", "Asia"): 3, ("doctor", "Europe"): 1, ("teacher", "Asia"): 1, ("teacher", "Europe"): 3}
    assert result.marginals["deficit"].to_list() == [0, 0, 0, 0]
    assert result.marginals["kept"].to_list() == [4, 4, 4, 4]
    assert result.shortfalls() == []


def test_marginals_mode_reports_a_value_that_cannot_be_filled():
    frame = _two_attribute_frame({("doctor", "Asia"): 5, ("teacher", "Asia"): 5, ("teacher", "Europe"): 1})
    result = rebalance(frame, _spread_vectors(frame.height), RebalanceSpec(targets="marginals"), [OCCUPATION, CONTINENT], 8)
    marginals = {(r["attribute"], r["value"]): r for r in result.marginals.to_dicts()}
    assert marginals[("continent", "Europe")]["kept"] == 1 and marginals[("continent", "Europe")]["deficit"] == 3
    assert result.kept.height == 5  # Europe 1 + Asia 4; no marginal is ever exceeded
    wanted = dict((tuple(c.values()), k) for c, k in result.shortfalls())
    assert wanted == {("doctor", "Europe"): 2, ("teacher", "Europe"): 1}
    reasons = result.cells.filter(pl.col("wanted") > 0)["reason"].to_list()
    assert all("continent=Europe has 1 of 4 (only 1 available)" in r for r in reasons)


def test_table_targets_and_cells_outside_the_table():
    from polyculture.spec import CellWeight

    table = [
        CellWeight(cell={"occupation": "doctor", "continent": "Asia"}, weight=3),
        CellWeight(cell={"occupation": "teacher", "continent": "Europe"}, weight=1),
    ]
    frame = _two_attribute_frame({("doctor", "Asia"): 5, ("teacher", "Europe"): 5, ("teacher", "Asia"): 2})
    result = rebalance(frame, _spread_vectors(frame.height), RebalanceSpec(targets="table", table=table), [OCCUPATION, CONTINENT], 6)
    assert result.cells["target"].to_list() == [5, 1]  # 6 * 3/4 = 4.5 -> 5 (ties to the earlier cell), 6 * 1/4 -> 1
    assert result.cells["kept"].to_list() == [5, 1]
    outside = result.rejects.filter(pl.col("detail").str.contains("not in the target table"))
    assert outside.height == 2
    # The spec section refuses a table target without a table, before any stage runs.
    with pytest.raises(ValueError, match="targets 'table' needs table"):
        rebalance(frame, _spread_vectors(frame.height), RebalanceSpec(targets="table"), [OCCUPATION, CONTINENT], 6)


def test_mmr_prefers_typical_records_and_avoids_repeats(embedder):
    texts = [
        "A doctor treats patients in a hospital.",
        "A doctor treats patients at a hospital.",  # near copy of r0
        "A doctor examines children at a rural clinic.",
        "A doctor writes prescriptions for patients with flu.",
        "Bananas and pineapples grow in tropical climates.",  # off-topic outlier
    ]
    emb = embedder.encode(texts)
    frame = records([(t, None, "doctor") for t in texts], ["occupation"])
    doctor_only = Attribute(name="occupation", values=["doctor"])
    fp = rebalance(frame, emb, RebalanceSpec(), [doctor_only], 3)
    mmr = rebalance(frame, emb, RebalanceSpec(surplus="mmr", mmr_lambda=0.7), [doctor_only], 3)
    assert "r4" in fp.kept["record_id"].to_list()  # farthest-point reaches for the outlier
    kept = mmr.kept["record_id"].to_list()
    assert "r4" not in kept  # MMR keeps typical records ...
    assert not {"r0", "r1"} <= set(kept)  # ... but not both near copies
    assert "MMR" in mmr.rejects["detail"][0]
