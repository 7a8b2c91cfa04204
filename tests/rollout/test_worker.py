"""EngineWorker (asynchronous rollouts) on a real HFEngine, and per-turn policy versions.

The worker's promise is that a job runs on exactly the weights of the version it was submitted
with, in submission order, whatever the trainer does to its own model meanwhile; and that
closing it never leaves a thread behind, even in the middle of a rollout.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import envs
from alp_agents.models import make_tiny_model
from alp_agents.rollout import run_episodes
from alp_agents.rollout.engines import HFEngine, InferenceEngine, SamplingParams
from alp_agents.rollout.worker import EngineWorker, RolloutCancelled, split_cpu_threads

from .rollout_helpers import SCRIPTS, ProtocolEngine

PROMPT = [1, 4093, 198, 22, 33]


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("alp-engine-worker")]


@pytest.fixture
def trainer_and_engine(tokenizer):
    model = make_tiny_model(tokenizer=tokenizer, seed=0)
    return model, HFEngine(model, tokenizer, dtype=torch.float32)


def engine_weight(engine: HFEngine) -> torch.Tensor:
    return engine.model.get_input_embeddings().weight[:4, :4].clone()


def test_jobs_run_in_order_on_the_weights_of_their_version(trainer_and_engine):
    """Three versions pushed while earlier jobs are queued: each job sees exactly its version's
    snapshot (not the trainer's later edits), and the sampled tokens of a job equal what a
    synchronous engine with those weights samples."""
    model, engine = trainer_and_engine
    embed = model.get_input_embeddings().weight
    expected = {0: embed[:4, :4].detach().clone()}
    sampling = SamplingParams(max_tokens=6, seed=3)

    def look(eng: InferenceEngine, version: int):
        [sample] = eng.generate([PROMPT], [sampling])
        return version, engine_weight(engine), sample.token_ids

    [before] = engine.generate([PROMPT], [sampling])  # version 0, synchronously
    with EngineWorker(engine, version=0) as worker:
        jobs = [worker.submit(look, 0)]
        for version in (1, 2, 3):
            with torch.no_grad():
                embed.add_(0.5)  # the trainer's update
            worker.push_weights(version, model.state_dict())
            expected[version] = embed[:4, :4].detach().clone()
            jobs.append(worker.submit(look, version))
            with torch.no_grad():
                embed.add_(100.0)  # a later edit the snapshot must not see ...
            time.sleep(0.01)
            with torch.no_grad():
                embed.sub_(100.0)  # ... undone before the next version
        results = [job.result(timeout=60) for job in jobs]
        assert worker.engine_version == 3
    assert [v for v, _, _ in results] == [0, 1, 2, 3]
    for version, weights, _ in results:
        torch.testing.assert_close(weights, expected[version], rtol=0, atol=1e-5)
    [after] = engine.generate([PROMPT], [sampling])  # the engine holds version 3 now
    assert results[0][2] == before.token_ids and results[3][2] == after.token_ids
    assert not worker_threads()


def test_a_job_must_name_the_newest_version(trainer_and_engine):
    model, engine = trainer_and_engine
    with EngineWorker(engine, version=4) as worker:
        with pytest.raises(ValueError, match="newest weights are version 4"):
            worker.submit(lambda eng, v: v, 3)
        worker.push_weights(5, model.state_dict())
        with pytest.raises(ValueError, match="push_weights first"):
            worker.submit(lambda eng, v: v, 4)
        with pytest.raises(ValueError, match="older"):
            worker.push_weights(4, model.state_dict())
        assert worker.call(lambda eng, v: v, 5) == 5
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda eng, v: v, 5)


def test_close_stops_a_running_rollout_and_joins_the_thread(trainer_and_engine):
    """Ctrl-C's path: a rollout that would run for minutes is stopped at its next generate
    call, the queued job never runs, and no worker thread is left."""
    _, engine = trainer_and_engine
    started, calls = threading.Event(), []

    def endless(eng: InferenceEngine, version: int):
        started.set()
        while True:
            calls.append(eng.generate([PROMPT], [SamplingParams(max_tokens=4)]))

    worker = EngineWorker(engine)
    running = worker.submit(endless, 0)
    queued = worker.submit(lambda eng, v: "ran", 0)
    assert started.wait(60)
    t0 = time.perf_counter()
    worker.close()
    assert time.perf_counter() - t0 < 30
    with pytest.raises(RolloutCancelled):
        running.result(timeout=1)
    assert queued.future.cancelled()
    assert calls and not worker_threads()
    worker.close()  # twice is fine


def test_a_cancelled_job_still_loads_the_weights_it_carries(trainer_and_engine):
    """Later jobs of the same version rely on the weights the first one brought."""
    model, engine = trainer_and_engine
    with EngineWorker(engine) as worker:
        gate = threading.Event()
        worker.submit(lambda eng, v: gate.wait(60), 0)
        with torch.no_grad():
            model.get_input_embeddings().weight.add_(1.0)
        worker.push_weights(1, model.state_dict())
        dropped = worker.submit(lambda eng, v: "ran", 1)
        dropped.cancel()
        later = worker.submit(lambda eng, v: engine_weight(engine), 1)
        gate.set()
        with pytest.raises(RolloutCancelled):
            dropped.result(timeout=60)
        torch.testing.assert_close(
            later.result(timeout=60), model.get_input_embeddings().weight[:4, :4].detach()
        )


def test_the_worker_thread_has_its_own_torch_thread_count(trainer_and_engine):
    _, engine = trainer_and_engine
    before = torch.get_num_threads()
    with EngineWorker(engine, threads=1) as worker:
        assert worker.call(lambda eng, v: torch.get_num_threads(), 0) == 1
    assert torch.get_num_threads() == before
    assert split_cpu_threads(2) == (1, 1) and split_cpu_threads(16) == (8, 8)
    assert split_cpu_threads(3) == (2, 1)


def test_run_episodes_records_the_version_of_each_turn(tokenizer):
    """Multi-turn scripted episodes (real PythonTool env and sandbox) with a version that moves
    between generate rounds: each turn records the version at its first call."""
    engine = ProtocolEngine(tokenizer, [list(s) for s in SCRIPTS])
    calls = []

    def version() -> int:
        calls.append(len(calls))
        return 10 + 2 * calls[-1]  # 10, 12, 14: a new version every round

    trajectories = run_episodes(
        "alp/PythonTool-v0", engine, tokenizer, envs.load_dataset("arith", split="train")[:2],
        group_size=1, sampling=SamplingParams(max_tokens=64), max_turns=4, progress=False,
        seed=5, env_kwargs={"dataset": "arith", "split": "train"}, policy_version=version,
    )  # fmt: skip
    three_turns, void = trajectories
    assert three_turns.num_turns == 3 and three_turns.policy_versions == [10, 12, 14]
    assert void.num_turns == 1 and void.policy_versions == [10]
    fixed = run_episodes(
        "alp/PythonTool-v0", ProtocolEngine(tokenizer, [list(s) for s in SCRIPTS]), tokenizer,
        envs.load_dataset("arith", split="train")[:2], group_size=1,
        sampling=SamplingParams(max_tokens=64), max_turns=4, progress=False, seed=5,
        env_kwargs={"dataset": "arith", "split": "train"}, policy_version=7,
    )  # fmt: skip
    assert [t.policy_versions for t in fixed] == [[7, 7, 7], [7]]
