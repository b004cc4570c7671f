"""Task runners: generation shards on a real Dask local cluster of 2 worker processes give the dataset the thread
runner gives for the same spec and seed; each worker loads its engine once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import small_spec_dict
from pydantic import ValidationError
from typer.testing import CliRunner

from polyculture.cli import app
from polyculture.engines.base import Completion
from polyculture.flows.build_dataset import build_dataset
from polyculture.flows.runners import task_runner_for
from polyculture.preflight import parse_spec
from polyculture.spec import RunnerSpec


def test_runner_spec_and_task_runners(spec_dir):
    assert RunnerSpec().kind == "threads"
    for bad, says in [
        ({"kind": "threads", "address": "tcp://h:8786"}, "address is for runner kind dask or ray"),
        ({"kind": "dask", "address": "h:8786"}, "not a dask scheduler address"),
        ({"kind": "ray", "address": "tcp://h:1"}, "not a ray address"),
        ({"kind": "dask", "address": "tcp://h:8786", "workers": 2}, "with an address the cluster has its own"),
        ({"kind": "spark"}, "'threads', 'dask' or 'ray'"),
    ]:
        with pytest.raises(ValidationError, match=says):
            RunnerSpec.model_validate(bad)
    assert type(task_runner_for(RunnerSpec())).__name__ == "ThreadPoolTaskRunner"
    dask = task_runner_for(RunnerSpec(kind="dask", workers=3))
    assert type(dask).__name__ == "DaskTaskRunner" and dask.cluster_kwargs["n_workers"] == 3
    # Where shards run never changes what they hold: the runner is not part of the fingerprint (resume anywhere).
    plain = parse_spec(small_spec_dict(), base_dir=spec_dir)
    on_dask = parse_spec(small_spec_dict(runner={"kind": "dask", "workers": 2}), base_dir=spec_dir)
    assert plain.fingerprint() == on_dask.fingerprint()


def test_cli_refuses_a_bad_runner_naming_the_option(spec_dir):
    spec_path = spec_dir / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec_dict()))
    result = CliRunner().invoke(app, ["build", str(spec_path), "--runner", "dask", "--runner-address", "nowhere"])
    assert result.exit_code == 2
    assert "--runner-address" in result.output and "not a dask scheduler address" in result.output


def _shards(run_dir: Path) -> pl.DataFrame:
    frames = [pl.read_parquet(p).with_columns(pl.lit(str(p.relative_to(run_dir))).alias("file"))
              for p in sorted(run_dir.glob("generate/**/*.parquet"))]  # fmt: skip
    return pl.concat(frames).select("file", "call_id", "completion", "completion_tokens").sort("file", "call_id")


@pytest.mark.slow
def test_dask_two_workers_build_the_thread_runners_dataset(spec_dir, tmp_path, prefect_server):
    spec = small_spec_dict(
        target_size=6,
        method={"name": "direct"},
        model={"batch_size": 2},
        sampling={"max_tokens": 100, "n": 2},
        generation={"oversample": 2.0},
        rebalance={"top_up_rounds": 1, "top_up_max_tokens": 1500},
    )
    spec_path = spec_dir / "runners.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = str(tmp_path / "out")

    threads = build_dataset(str(spec_path), run_id="threads", output_root=out)
    dask = build_dataset(str(spec_path), run_id="dask", output_root=out, runner={"kind": "dask", "workers": 2})

    threads_dir, dask_dir = Path(threads["run_dir"]), Path(dask["run_dir"])
    assert _shards(threads_dir).equals(_shards(dask_dir))  # every shard the same, wherever it ran
    assert threads["counts"] == dask["counts"] and dask["records"] > 0
    rows = [pq.read_table(Path(r["dataset_dir"]) / "data").to_pylist() for r in (threads, dask)]
    assert rows[0] == rows[1]

    ran = pl.read_parquet(dask_dir / "shard_runs.parquet")
    assert ran.height >= 3  # 6 prompts in shards of 2, plus any top-up shard
    workers = set(ran["worker"].to_list())
    assert len(workers) == 2 and dask["usage"]["workers"] == 2  # both worker processes took shards ...
    loads = ran.filter(pl.col("engine_load_seconds") > 0)
    assert sorted(loads["worker"].to_list()) == sorted(workers)  # ... each loading its engine once, not per shard
    assert threads["usage"]["workers"] == 1 and threads["usage"]["engine_loads"] == 1


class _Reversed:
    """A stand-in engine for the shard loop's plumbing only (the real engines are in test_engines): answers that depend
    only on the seed and the prompt, handed out last request first; it notes which shard files exist at each one."""

    name, model_name = "reversed", "stand-in"

    def __init__(self, folder: Path, die_after: int | None = None) -> None:
        self.folder, self.die_after, self.on_disk = folder, die_after, []

    def generate(self, conversations, params, json_schema=None):
        return [[Completion(json.dumps({"seed": params.seed, "user": c[-1]["content"], "sample": j}), 7, 11, "stop")
                 for j in range(params.n)] for c in conversations]  # fmt: skip

    def generate_as_finished(self, conversations, params, json_schema=None):
        outputs = self.generate(conversations, params, json_schema)
        for handed, index in enumerate(reversed(range(len(conversations)))):
            if handed == self.die_after:
                raise RuntimeError("engine died mid-call")
            time.sleep(0.2)  # the driver thread writes meanwhile
            self.on_disk.append({int(p.stem.split("-")[1]) for p in self.folder.glob("shard-*.parquet")})
            yield index, outputs[index]


def test_thread_runner_writes_each_shard_as_its_own_requests_finish(spec_dir, tmp_path, prefect_server, monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner

    from polyculture.flows import shards as flow_shards
    from polyculture.flows.common import SharedEngine
    from polyculture.methods import get_method
    from polyculture.stages.generate import generate_round, in_process, plan_calls, plan_shards
    from polyculture.stages.plan import plan

    spec = parse_spec(small_spec_dict(model={"batch_size": 1, "sequences_per_call": 6}), spec_dir)
    method, cells = get_method(spec.method), plan(spec)
    folder = tmp_path / "threads"
    assert [s.index for s in plan_calls(spec, plan_shards(spec, cells, method, folder))[0]] == [0, 1, 2]
    engine = _Reversed(folder)
    monkeypatch.setattr(flow_shards, "shared_engine", lambda spec: (SharedEngine(engine, 0.0), False))
    with ThreadPoolTaskRunner(max_workers=1) as runner:
        streamed = generate_round(spec, cells, method, folder, flow_shards.prefect_shards(spec, runner))
    # shard 2 finished first and was on disk before its call handed out request 1, shard 1 before request 0
    assert engine.on_disk[:3] == [set(), {2}, {1, 2}]
    alone = generate_round(spec, cells, method, tmp_path / "alone", in_process(spec, _Reversed(tmp_path), method))
    assert streamed.completions.drop("batch_seconds").equals(alone.completions.drop("batch_seconds"))
    assert streamed.shard_runs["shard"].to_list() == list(range(len(plan_shards(spec, cells, method, folder))))

    # an engine that dies mid-call fails the loop, after the shard it finished was written
    dying = _Reversed(tmp_path / "dying", die_after=1)
    monkeypatch.setattr(flow_shards, "shared_engine", lambda spec: (SharedEngine(dying, 0.0), False))
    with ThreadPoolTaskRunner(max_workers=1) as runner, pytest.raises(RuntimeError, match="died mid-call"):
        generate_round(spec, cells, method, tmp_path / "dying", flow_shards.prefect_shards(spec, runner))
    assert [p.name for p in (tmp_path / "dying").glob("shard-*.parquet")] == ["shard-00002.parquet"]
