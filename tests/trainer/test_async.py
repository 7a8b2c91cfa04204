"""Asynchronous rollouts (``rollout.async_steps``) through ALPTrainer on a tiny model.

What is asserted: async_steps=0 is the synchronous loop (no worker thread); with N=1 the first
step is the synchronous step bit for bit, later batches are sampled by weights exactly one
update old (recorded per turn) and the step logs the lag and the ratio statistics per lag;
the run is reproducible and a resume from any checkpoint (in-flight batches saved) or from a
Ctrl-C continues it exactly; no worker thread outlives ``train()``.

Every test pins torch to one intra-op thread: an asynchronous CPU run splits the threads
between trainer and worker, and matmuls with another thread count may round differently, so
"bit for bit against the synchronous run" needs the same count on both sides.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from alp_agents.trainer import TrainConfigError
from alp_agents.trainer import checkpoint as ckpt

from .test_trainer import (
    comparable,
    interrupt_after_first_step,
    make_trainer,
    resume_config,
    step_rows,
    tiny_config,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("alp-engine-worker")]


def record_rollouts(trainer) -> dict[int, list]:
    """The trajectories each step trained on, by step (1-based, as logged)."""
    seen: dict[int, list] = {}
    rollout = trainer.rollout

    def recording():
        trajs, metrics = rollout()
        seen[trainer.step + 1] = trajs
        seen.setdefault("worker_alive", []).append(bool(worker_threads()))
        return trajs, metrics

    trainer.rollout = recording
    return seen


def without_staleness(row: dict) -> dict:
    skip = ("staleness/", "step")
    return {k: v for k, v in comparable(row).items() if not k.startswith(skip)}


def async_config(root: Path, problems, steps: int = 3, **changes):
    cfg = resume_config(root, problems)  # checkpoints every step, linear LR, a KL term
    cfg.steps = steps
    cfg.rollout.async_steps = 1
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    return cfg


@pytest.fixture(scope="module")
def async_run(tmp_path_factory, problem_files, tokenizer):
    """An uninterrupted 3-step async_steps=1 run, a checkpoint after every step."""
    torch.set_num_threads(1)
    trainer = make_trainer(async_config(tmp_path_factory.mktemp("async"), problem_files),
                           tokenizer)  # fmt: skip
    seen = record_rollouts(trainer)
    result = trainer.train()
    return result.run_dir, seen, trainer


def test_async_0_is_the_synchronous_loop(tmp_path, problem_files, tokenizer):
    cfg = tiny_config(tmp_path, problem_files, steps=1)
    assert cfg.rollout.async_steps == 0  # the default
    trainer = make_trainer(cfg, tokenizer)
    seen = record_rollouts(trainer)
    trainer.train()
    assert seen["worker_alive"] == [False] and trainer.ahead is None
    row = step_rows(trainer.run_dir)[1]
    assert not any(k.startswith("staleness/") for k in row)
    assert all(t.policy_versions == [0] for t in seen[1])


def test_async_1_lags_one_update_and_logs_ratio_statistics_per_lag(
    async_run, problem_files, tokenizer, tmp_path
):
    run_dir, seen, trainer = async_run
    rows = step_rows(run_dir)
    assert sorted(rows) == [1, 2, 3] and seen["worker_alive"] == [True] * 3
    # batches 0 and 1 come from the initial weights, batch 2 from the weights after step 1
    assert [sorted({v for t in seen[s] for v in t.policy_versions}) for s in (1, 2, 3)] == [
        [0],
        [0],
        [1],
    ]
    assert [rows[s]["staleness/mean"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert rows[2]["staleness/max"] == 1.0 and rows[2]["staleness/lag_1/token_frac"] == 1.0
    for step, lag in ((1, 0), (2, 1), (3, 1)):
        prefix = f"staleness/lag_{lag}"
        for key in ("ratio/q01", "ratio/q99", "seq_log_ratio/q02", "seq_log_ratio/q98",
                    "mismatch/k3", "mismatch_update/k3"):  # fmt: skip
            assert rows[step][f"{prefix}/{key}"] == rows[step][f"{prefix}/{key}"], key  # not NaN
        # one lag per step here: its statistics are the step's own
        assert rows[step][f"{prefix}/ratio/q99"] == rows[step]["ratio/q99"]
        assert rows[step][f"{prefix}/mismatch_update/k3"] == rows[step]["mismatch_update/k3"]
        assert rows[step][f"{prefix}/mismatch/k3"] == pytest.approx(rows[step]["mismatch/k3"])
    # lag 0 is the precision gap alone; one update of staleness is orders of magnitude more
    assert rows[2]["staleness/lag_1/mismatch/k3"] > 100 * rows[1]["staleness/lag_0/mismatch/k3"]
    assert not worker_threads()

    # step 1 is the synchronous step, bit for bit (same batch, same weights)
    sync_cfg = async_config(tmp_path, problem_files, **{"rollout.async_steps": 0})
    sync_step_1 = make_trainer(sync_cfg, tokenizer).train_step()  # same LR schedule (3 steps)
    assert without_staleness(sync_step_1) == without_staleness(rows[1])


def test_checkpoints_hold_the_batches_in_flight(async_run):
    run_dir, seen, _ = async_run
    state = ckpt.load_training_checkpoint(ckpt.checkpoint_path(run_dir, 1))
    [pending] = state.pending_rollouts  # the batch of step 2 (0-based 1), made by version 0
    assert pending["step"] == 1
    assert [t["policy_versions"] for t in pending["trajectories"]] == [
        t.policy_versions for t in seen[2]
    ]
    final = ckpt.load_training_checkpoint(ckpt.checkpoint_path(run_dir, 3))
    assert final.pending_rollouts == []  # nothing is rolled out past the last step


def test_resume_from_a_checkpoint_continues_the_async_run_exactly(
    async_run, problem_files, tokenizer, tmp_path
):
    run_dir, _, _ = async_run
    reference = step_rows(run_dir)
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)
    for step, path in ckpt.list_checkpoints(killed):
        if step > 1:
            shutil.rmtree(path)
    shutil.rmtree(killed / "final")
    cfg = async_config(tmp_path, problem_files)
    make_trainer(cfg, tokenizer, resume_from=ckpt.checkpoint_path(killed, 1)).train()
    again = step_rows(killed)
    assert sorted(again) == [1, 2, 3]
    for step in (2, 3):
        assert comparable(again[step]) == comparable(reference[step]), f"step {step} differs"
    assert not worker_threads()


def test_ctrl_c_stops_the_worker_and_resume_matches(async_run, problem_files, tokenizer, tmp_path):
    """SIGINT in an async run: a checkpoint at a step boundary with the batches in flight,
    no worker thread left, and the resumed run logs the uninterrupted run's later steps."""
    run_dir, _, _ = async_run
    reference = step_rows(run_dir)
    cfg = async_config(tmp_path, problem_files)
    cfg.checkpoint.every = 0  # the checkpoint must come from the Ctrl-C handler
    trainer = make_trainer(cfg, tokenizer)
    watcher = interrupt_after_first_step(trainer.run_dir / "metrics.jsonl")
    result = trainer.train()
    watcher.join()
    assert result.interrupted and not worker_threads()
    saved = ckpt.latest_checkpoint(trainer.run_dir)
    stopped_at = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 3
    pending = ckpt.load_training_checkpoint(saved).pending_rollouts
    assert [p["step"] for p in pending] == [stopped_at]  # N=1: the next step's batch

    make_trainer(cfg, tokenizer, resume_from=saved).train()
    again = step_rows(trainer.run_dir)
    assert sorted(again) == [1, 2, 3]
    for step in range(stopped_at + 1, 4):
        assert comparable(again[step]) == comparable(reference[step]), f"step {step} differs"
    assert not worker_threads()


def test_held_out_evaluation_during_an_async_run(tmp_path, problem_files, tokenizer):
    """Evaluations before (main thread), between steps (on the worker, with the current
    weights) and after (main thread again, final weights) all run; N=2 lags two updates."""
    cfg = async_config(tmp_path, problem_files, steps=3, **{"rollout.async_steps": 2})
    cfg.checkpoint.every = 0
    cfg.eval.num_problems, cfg.eval.k, cfg.eval.every = 2, 2, 1
    trainer = make_trainer(cfg, tokenizer)
    seen = record_rollouts(trainer)
    result = trainer.train()
    assert result.eval_before and result.eval_after
    assert [e["label"] for e in trainer.eval_history] == ["before", "step 1", "step 2", "after"]
    assert [sorted({v for t in seen[s] for v in t.policy_versions}) for s in (1, 2, 3)] == [
        [0],
        [0],
        [0],
    ]
    assert [step_rows(result.run_dir)[s]["staleness/mean"] for s in (1, 2, 3)] == [0, 1, 2]
    # the engine holds the trained weights at the end (what eval "after" and the export used)
    engine = trainer.engine.model.state_dict()
    for k, v in trainer.dist.unwrap(trainer.model).state_dict().items():
        torch.testing.assert_close(engine[k], v.to(torch.bfloat16).to(engine[k].dtype))
    assert not worker_threads()


def test_negative_async_steps_and_multi_process_are_refused(tmp_path, problem_files):
    from types import SimpleNamespace

    from alp_agents.trainer import ALPTrainer
    from alp_agents.trainer.distributed import check_world

    cfg = tiny_config(tmp_path, problem_files, **{"rollout.async_steps": -1})
    with pytest.raises(TrainConfigError, match="rollout.async_steps=-1"):
        ALPTrainer(cfg)
    cfg.rollout.async_steps = 1  # the batches ahead are per-rank state: one process only
    two = SimpleNamespace(num_processes=2, distributed_type=None)
    with pytest.raises(TrainConfigError, match="one process only"):
        check_world(cfg.rollout, cfg.algorithm, two, print)
