"""Damaged shard files: read_shard refuses every file it cannot trust (cut short, garbage, a lost column, rows other
than were written), never returns changed rows, and the shard loop sets such files aside, reports them and generates
those shards again from their own seeds. The engine here is a stand-in whose answers are a function of the seed and
the prompt, so a regenerated shard can be compared with the original; test_resume.py does the same with a real
engine and a whole build."""

from __future__ import annotations

import json
import random
from collections import Counter

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import small_spec_dict

from polyculture import progress
from polyculture.engines.base import Completion
from polyculture.methods import get_method
from polyculture.preflight import parse_spec
from polyculture.runs.files import ROWS_SHA256, DamagedFile, write_parquet_checked
from polyculture.stages.generate import (
    generate_round,
    in_process,
    plan_calls,
    plan_shards,
    read_shard,
    run_shard,
    write_shard,
)
from polyculture.stages.plan import plan


class _Seeded:
    """Answers that depend only on the sampling seed, the conversation and the sample: what a seeded engine does."""

    name = "seeded"

    def generate(self, conversations, params, json_schema=None):
        return [
            [Completion(json.dumps({"seed": params.seed, "user": c[-1]["content"], "sample": j}), 7, 11, "stop")
             for j in range(params.n)]
            for c in conversations
        ]  # fmt: skip


@pytest.fixture
def setup(spec_dir, tmp_path):
    spec = parse_spec(small_spec_dict(model={"batch_size": 1}), spec_dir)  # one prompt per shard, 2 samples each
    method = get_method(spec.method)
    cells = plan(spec)
    shards = plan_shards(spec, cells, method, tmp_path / "shards")
    return spec, method, cells, shards


def _written(setup, index=0):
    spec, method, _, shards = setup
    frame = run_shard(spec, shards[index], _Seeded(), method)  # type: ignore[arg-type]
    write_shard(frame, shards[index])
    return frame


def test_a_written_shard_reads_back_whole_with_its_checksum(setup):
    spec, method, _, shards = setup
    frame = _written(setup)
    assert read_shard(spec, shards[0], method).equals(frame)
    assert ROWS_SHA256.encode() in pq.ParquetFile(shards[0].path).metadata.metadata
    assert [p.name for p in shards[0].path.parent.iterdir()] == [shards[0].path.name]  # no temporary file left
    assert read_shard(spec, shards[1], method) is None  # not written yet


def _truncated(frame, path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(frame, path):
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _empty(frame, path):
    path.write_bytes(b"")


def _column_lost(frame, path):
    write_parquet_checked(frame.drop("completion"), path)  # its checksum is right: the columns are checked too


def _column_lost_no_checksum(frame, path):
    frame.drop("completion").write_parquet(path)  # as written before checksums


def _rows_changed(frame, path):
    # A readable file whose rows differ from those the checksum was written with (what a flipped bit in a data page
    # often gives: the parquet reader notices nothing).
    written = pq.ParquetFile(path).metadata.metadata[ROWS_SHA256.encode()].decode()
    changed = frame.with_columns(pl.col("completion").str.replace("seed", "sead"))
    changed.write_parquet(path, metadata={ROWS_SHA256: written})


def _other_rows(frame, path):
    write_parquet_checked(frame.head(1), path)  # whole and checksummed, but one of the shard's two completions


def _other_shard(frame, path):
    write_parquet_checked(frame.with_columns(pl.col("call_id").str.replace("-p0-", "-p9-")), path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncated, "not a readable parquet file"),
        (_garbage, "not a readable parquet file"),
        (_empty, "not a readable parquet file"),
        (_column_lost, r"columns missing or of another type: completion \(missing\)"),
        (_column_lost_no_checksum, r"columns missing or of another type: completion \(missing\)"),
        (_rows_changed, "rows do not match the checksum written with them"),
        (_other_rows, "holds 1 completions, 1 of the 2 this shard has"),
        (_other_shard, "holds 2 completions, 0 of the 2 this shard has"),
    ],
)
def test_read_shard_refuses_a_damaged_file(setup, damage, reason):
    spec, method, _, shards = setup
    damage(_written(setup), shards[0].path)
    with pytest.raises(DamagedFile, match=reason):
        read_shard(spec, shards[0], method)


def test_a_shard_written_before_checksums_is_read_when_whole(setup):
    spec, method, _, shards = setup
    frame = _written(setup)
    frame.write_parquet(shards[0].path)  # no checksum in its metadata
    assert read_shard(spec, shards[0], method).equals(frame)


def test_no_flipped_byte_is_ever_read_as_good_rows(setup):
    """Every third byte of a real shard file flipped in turn: read_shard gives the rows written or refuses the file
    (never a crash: polars alone aborts or panics on some of these files); the checksum catches the flips the parquet
    reader reads without complaint."""
    spec, method, _, shards = setup
    frame = _written(setup)
    path = shards[0].path
    data = path.read_bytes()
    outcomes: Counter[str] = Counter()
    for at in range(0, len(data), 3):
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
        try:
            got = read_shard(spec, shards[0], method)
        except DamagedFile as exc:
            outcomes["checksum" if "checksum" in str(exc) else "refused"] += 1
            continue
        assert got is not None and got.equals(frame), f"byte {at} flipped: changed rows were read as good"
        outcomes["same rows"] += 1  # statistics, padding: nothing the rows depend on
    assert outcomes["checksum"] > 0 and outcomes["refused"] > 0, outcomes


def test_the_shard_loop_sets_damaged_shards_aside_and_generates_them_again(setup, tmp_path):
    spec, method, cells, shards = setup
    assert len(shards) >= 3
    runner = in_process(spec, _Seeded(), method)  # type: ignore[arg-type]
    first = generate_round(spec, cells, method, tmp_path / "shards", runner)
    assert first.corrupt_shards == ()
    _truncated(None, shards[0].path)
    _rows_changed(first.completions.filter(pl.col("shard") == 2), shards[2].path)
    untouched = {s.path: s.path.stat().st_mtime_ns for s in shards if s.index not in (0, 2)}

    reports: list[tuple[str, int, int, str]] = []
    with progress.reporting(lambda *report: reports.append(report)):
        again = generate_round(spec, cells, method, tmp_path / "shards", runner)

    assert again.shard_runs["shard"].to_list() == [0, 2]  # only the damaged ones were generated
    assert {p.stat().st_mtime_ns for p in untouched} == set(untouched.values()) and len(untouched) == len(shards) - 2
    # set aside beside the shard, never deleted; reported, one line each, naming the file and the reason
    assert [p.name.split(".corrupt-")[0] for p in again.corrupt_shards] == [shards[0].path.name, shards[2].path.name]
    assert all(p.is_file() and p.parent == shards[0].path.parent for p in again.corrupt_shards)
    notes = [note for stage, *_, note in reports if stage == "corrupt"]
    assert len(notes) == 2 and "not a readable parquet file" in notes[0] and "checksum" in notes[1]
    assert all(str(s.path) in n for s, n in zip((shards[0], shards[2]), notes, strict=True))
    # from their own seeds: the same completions as the first time (batch_seconds is a timing)
    assert again.completions.drop("batch_seconds").equals(first.completions.drop("batch_seconds"))
    third = generate_round(spec, cells, method, tmp_path / "shards", runner)
    assert third.corrupt_shards == () and third.shard_runs.height == 0


def test_a_call_joining_shards_is_generated_again_whole_and_writes_only_its_missing_shards(spec_dir, tmp_path):
    # 2 prompts x n=2 per engine call: shards (1 prompt each) go in pairs, sampled from the pair's first seed
    spec = parse_spec(small_spec_dict(model={"batch_size": 1, "sequences_per_call": 4}), spec_dir)
    method, cells = get_method(spec.method), plan(spec)
    shards = plan_shards(spec, cells, method, tmp_path / "shards")
    assert [[s.index for s in call] for call in plan_calls(spec, shards)][:2] == [[0, 1], [2, 3]]
    runner = in_process(spec, _Seeded(), method)  # type: ignore[arg-type]
    first = generate_round(spec, cells, method, tmp_path / "shards", runner)
    seeds = {row["shard"]: json.loads(row["completion"])["seed"] for row in first.completions.iter_rows(named=True)}
    assert seeds[0] == seeds[1] == shards[0].seeds[0] and seeds[2] == seeds[3] == shards[2].seeds[0]
    assert first.completions["batch_seconds"].is_finite().all()

    shards[1].path.unlink()  # a crash after the pair's first shard was written
    kept = {s.path: s.path.stat().st_mtime_ns for s in shards if s.index != 1}
    calls: list[int] = []

    class Counting(_Seeded):
        def generate(self, conversations, params, json_schema=None):
            calls.append(len(conversations))
            return super().generate(conversations, params, json_schema)

    again = generate_round(spec, cells, method, tmp_path / "shards", in_process(spec, Counting(), method))  # type: ignore[arg-type]
    assert calls == [2]  # the whole pair, nothing else
    assert again.shard_runs["shard"].to_list() == [1]  # shard 0 came back identical and was not written again
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert again.completions.drop("batch_seconds").equals(first.completions.drop("batch_seconds"))


def test_a_shard_is_written_as_soon_as_its_own_requests_finish_while_its_call_goes_on(spec_dir, tmp_path):
    # 3 one-prompt shards per call; the engine finishes the call's requests last to first, and before it hands back
    # the call's first request the shards of the others must already be on disk, with the completions of a run whose
    # engine reports nothing until the end.
    spec = parse_spec(small_spec_dict(model={"batch_size": 1, "sequences_per_call": 6}), spec_dir)
    method, cells = get_method(spec.method), plan(spec)
    on_disk_at_each_request: list[set[int]] = []

    class FinishingInReverse(_Seeded):
        def generate_as_finished(self, conversations, params, json_schema=None):
            outputs = self.generate(conversations, params, json_schema)
            for index in reversed(range(len(conversations))):
                on_disk_at_each_request.append({int(p.stem.split("-")[1]) for p in folder.glob("shard-*.parquet")})
                yield index, outputs[index]

    folder = tmp_path / "streamed"
    shards = plan_shards(spec, cells, method, folder)
    first_call = plan_calls(spec, shards)[0]
    assert [s.index for s in first_call] == [0, 1, 2]
    progress_seen: list[int] = []
    streamed = generate_round(
        spec, cells, method, folder, in_process(spec, FinishingInReverse(), method),  # type: ignore[arg-type]
        on_progress=lambda done, total: progress_seen.append(done),
    )  # fmt: skip
    # request 2 (shard 2) came first: nothing on disk; request 1: shard 2 written; request 0: shards 2 and 1 written
    assert on_disk_at_each_request[:3] == [set(), {2}, {1, 2}]
    assert progress_seen[:4] == [0, 1, 2, 3]  # one step per shard, not per call
    # the written order differs, the completions do not; a shard's seconds are its share of the call's time
    at_end = generate_round(spec, cells, method, tmp_path / "at-end", in_process(spec, _Seeded(), method))  # type: ignore[arg-type]
    assert streamed.completions.drop("batch_seconds").equals(at_end.completions.drop("batch_seconds"))
    assert streamed.shard_runs["shard"].to_list() == [s.index for s in shards]
    assert (streamed.shard_runs["seconds"] >= 0).all()


def test_a_failing_call_stops_the_loop_after_writing_the_shards_it_finished(spec_dir, tmp_path):
    spec = parse_spec(small_spec_dict(model={"batch_size": 1, "sequences_per_call": 6}), spec_dir)
    method, cells = get_method(spec.method), plan(spec)

    class DyingMidCall(_Seeded):
        def generate_as_finished(self, conversations, params, json_schema=None):
            outputs = self.generate(conversations, params, json_schema)
            yield 0, outputs[0]
            raise RuntimeError("engine died")

    folder = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="engine died"):
        generate_round(spec, cells, method, folder, in_process(spec, DyingMidCall(), method))  # type: ignore[arg-type]
    assert [p.name for p in folder.glob("shard-*.parquet")] == ["shard-00000.parquet"]
    # resume regenerates the whole first call (its samples depend on all of it) and writes only what is missing
    again = generate_round(spec, cells, method, folder, in_process(spec, _Seeded(), method))  # type: ignore[arg-type]
    assert 0 not in again.shard_runs["shard"].to_list() and 1 in again.shard_runs["shard"].to_list()
