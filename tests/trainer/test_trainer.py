"""ALPTrainer end to end on a tiny random model with real environments, sandbox and grader.

Learning-state tests use ``test/LengthParity-v0`` (conftest.py) so rewards vary inside groups,
advantages are non-zero and the optimiser and sigma really move.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from alp_agents.learner.objectives import preset_names
from alp_agents.models import make_tiny_model
from alp_agents.reporting.runlog import read_metrics
from alp_agents.trainer import (
    OTHER_SECTIONS,
    ALPTrainer,
    TrainConfig,
    TrainConfigError,
    TrainingDivergedError,
    validate_config,
)
from alp_agents.trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
PARITY_ENV = "test/LengthParity-v0"  # registered in conftest.py
# Metrics of docs/alp.md's metric list that every step must log (presets add their own, e.g. sigma).
SECTION4_KEYS = [
    *(f"ratio/q{q:02d}" for q in (1, 2, 5, 25, 50, 75, 95, 98, 99)),
    "ratio/mean",
    "ratio/max",
    "ratio/min",
    "seq_log_ratio/q02",
    "seq_log_ratio/q98",
    "clip/lower",
    "clip/upper",
    "clip/dual",
    "mismatch/k1",
    "mismatch/k3",
    "mismatch/training_ppl",
    "mismatch/rollout_ppl",
    "mismatch/ppl_ratio",
    "mismatch/chi2_token",
    "mismatch/chi2_seq",
    "update/grad_norm",
    "entropy/sampled_nll",
    "env/turns_mean",
    "env/void_turn_ratio",
    "env/code_use_ratio",
    "env/tool_error_ratio",
    "env/response_tokens_mean",
    "reward/mean",
]


@pytest.fixture
def problems(problem_files) -> tuple[str, str]:
    return problem_files


def tiny_config(tmp_path: Path, problems: tuple[str, str], **changes) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.name = "tiny-llama"
    cfg.env.id = PARITY_ENV
    cfg.env.dataset = problems[0]
    cfg.env.train_split = None  # a JSONL path carries its own split
    cfg.env.eval_split = None
    cfg.env.eval_dataset = problems[1]
    cfg.env.max_turns = 1
    cfg.rollout.prompts_per_step = 4
    cfg.rollout.group_size = 4
    cfg.rollout.max_tokens = 16
    cfg.rollout.mask_void_turns = False
    cfg.algorithm.mini_batches = 2
    cfg.algorithm.micro_batch_size = 4
    cfg.optim.lr = 1e-3
    cfg.perturbation.sigma_init = 0.02
    cfg.perturbation.sigma_lr = 1e-2
    cfg.eval.num_problems = 0
    cfg.steps = 2
    cfg.logging.run_dir = str(tmp_path / "run")
    cfg.logging.progress = False
    cfg.logging.tensorboard = False
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    return cfg


def make_trainer(cfg, tokenizer, **kw) -> ALPTrainer:
    model = make_tiny_model("llama", tokenizer=tokenizer, hidden_size=64, num_layers=2, seed=0)
    return ALPTrainer(cfg, model=model, tokenizer=tokenizer, **kw)


def interrupt_after_first_step(metrics: Path) -> threading.Thread:
    """A started watcher that sends this process SIGINT once ``metrics`` holds a step's row
    (what Ctrl-C during training does); join it after ``train()`` returns."""

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def record_rollouts(trainer) -> list:
    """Wrap ``trainer.rollout`` so every trajectory it returns is also appended to the list."""
    seen: list = []
    rollout = trainer.rollout

    def recording_rollout():
        trajs, metrics = rollout()
        seen.extend(trajs)
        return trajs, metrics

    trainer.rollout = recording_rollout
    return seen


def step_rows(run_dir: Path) -> dict[int, dict]:
    """The per-step training rows of metrics.jsonl (eval rows carry no reward/mean)."""
    return {r["step"]: r for r in read_metrics(run_dir) if "reward/mean" in r}


VOLATILE = ("time", "time/", "throughput/")


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


# ------------------------------------------------------------------------------- end to end
def test_tool_env_step_on_the_real_sandbox_with_eval_checkpoint_export_and_plots(
    tmp_path, problems, tokenizer
):
    """ALP on alp/PythonTool-v0 (real sandbox, real grader): every section-4 metric is logged,
    held-out evaluation runs before and after, the export loads with plain from_pretrained and
    holds no sigma, trajectory samples and the four plots are written."""
    cfg = tiny_config(tmp_path, problems, steps=1)
    cfg.env.id = "alp/PythonTool-v0"
    cfg.env.max_turns = 2
    cfg.eval.num_problems = 2
    trainer = make_trainer(cfg, tokenizer)
    result = trainer.train()

    rows = step_rows(result.run_dir)
    assert sorted(rows) == [1]
    for key in SECTION4_KEYS:
        assert key in rows[1], f"metric {key} missing from metrics.jsonl"
    assert rows[1]["update/steps"] == 2  # K = 2 optimiser steps per rollout batch
    assert any(k.startswith("sigma/layer_") for k in rows[1])
    assert result.eval_before and result.eval_after
    samples = (result.run_dir / "trajectories.jsonl").read_text().splitlines()
    assert samples and "response" in json.loads(samples[0])
    for path in result.plots.values():
        assert path.stat().st_size > 5000

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    keys = set(load_file(str(result.export_dir / "model.safetensors")))
    assert not any("sigma" in k for k in keys)
    served = AutoModelForCausalLM.from_pretrained(result.export_dir)
    trained = trainer.dist.unwrap(trainer.model).state_dict()
    for k, v in served.state_dict().items():
        assert torch.equal(v, trained[k].cpu()), k


def test_alp_steps_move_weights_and_sigma(tmp_path, problems, tokenizer):
    cfg = tiny_config(tmp_path, problems, steps=2)
    trainer = make_trainer(cfg, tokenizer)
    before = {k: v.clone() for k, v in trainer.dist.unwrap(trainer.model).state_dict().items()}
    sigma0 = trainer.perturbation.sigmas().clone()
    trainer.train()
    rows = step_rows(trainer.run_dir)
    assert 0 < rows[1]["reward/mean"] < 1
    assert rows[1]["advantage/abs_mean"] > 0
    after = trainer.dist.unwrap(trainer.model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(sigma0, trainer.perturbation.sigmas())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
def test_training_runs_on_the_gpu_from_batches_collated_on_the_cpu(tmp_path, problems, tokenizer):
    """The trainer takes the GPU when one is visible; collation still builds each batch on the
    CPU. First run on an H200 (2026-11-28), every preset failed its first update with "index is
    on cpu, different from other tensors on cuda:0" until the update moved the batch."""
    import math

    from alp_agents.learner.logprobs import token_logprobs

    cfg = tiny_config(tmp_path, problems, steps=2)
    trainer = make_trainer(cfg, tokenizer)
    assert trainer.device.type == "cuda"
    sigma0 = trainer.perturbation.sigmas().clone()
    trainer.train()
    rows = step_rows(trainer.run_dir)
    assert all(rows[s]["update/steps"] == cfg.algorithm.mini_batches for s in (1, 2))
    assert all(math.isfinite(rows[s][k]) for s in (1, 2) for k in SECTION4_KEYS)
    model = trainer.dist.unwrap(trainer.model)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert trainer.perturbation.sigmas().device.type == "cuda"
    assert not torch.equal(sigma0, trainer.perturbation.sigmas())
    # The GPU's float32 log-probs are the CPU's to rounding (TF32 is off by default).
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        on_gpu = token_logprobs(model, ids.cuda()).cpu()
        on_cpu = token_logprobs(model.cpu(), ids)
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)


def test_step_metrics_are_the_values_of_the_batch(tmp_path, problems, tokenizer):
    """One step's metrics recomputed by hand from the trajectories it rolled out: rewards,
    turns, tokens, finish reasons, advantages, the K optimiser steps and the problems sampled."""
    from alp_agents.learner.advantages import grpo_advantages

    cfg = tiny_config(tmp_path, problems, steps=1)
    cfg.algorithm.mini_batches = 4
    trainer = make_trainer(cfg, tokenizer)
    seen = record_rollouts(trainer)
    m = trainer.train_step()
    n = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert len(seen) == n and not any(t.is_infra_failure for t in seen)
    assert len({t.problem_id for t in seen}) == cfg.rollout.prompts_per_step
    assert m["batch/trajectories"] == n and m["batch/infra_failures"] == 0
    assert m["reward/mean"] == pytest.approx(sum(t.reward for t in seen) / n)
    assert m["env/turns_mean"] == pytest.approx(sum(t.num_turns for t in seen) / n)
    tokens = sum(sum(t.loss_mask) for t in seen)
    assert m["env/response_tokens_mean"] == pytest.approx(tokens / n)
    assert m["tokens/before_rejection"] == tokens  # void turns are not masked in this config
    finish = {k: v for k, v in m.items() if k.startswith("finish/")}
    assert sum(finish.values()) == pytest.approx(1.0)
    for key, value in finish.items():
        reason = key.removeprefix("finish/")
        assert value == pytest.approx(sum(t.finish_reason == reason for t in seen) / n)
    adv = grpo_advantages([t.reward for t in seen], [t.group_id for t in seen])
    assert m["advantage/abs_mean"] == pytest.approx(float(adv.abs().mean()), rel=1e-6)
    assert m["update/steps"] == cfg.algorithm.mini_batches and m["update/skipped"] == 0
    assert m["update/lr"] == pytest.approx(cfg.optim.lr)
    assert m["sigma/mean"] > 0 and m["perturbation/logprob_change"] > 0


# ------------------------------------------------------------------------------- resume
def resume_config(run_dir: Path, problems: tuple[str, str]) -> TrainConfig:
    cfg = tiny_config(run_dir, problems, steps=3)
    cfg.checkpoint.every = 1
    cfg.checkpoint.keep_last = 0
    cfg.optim.lr_schedule = "linear"  # the LR scheduler state must be restored too
    cfg.algorithm.loss = {"kl_coef": 0.05}  # the KL reference must stay the INITIAL model
    return cfg


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, problem_files, tokenizer) -> Path:
    """An uninterrupted 3-step run with a checkpoint after every step."""
    root = tmp_path_factory.mktemp("reference")
    return make_trainer(resume_config(root, problem_files), tokenizer).train().run_dir


def test_resume_after_kill_reproduces_the_following_steps(
    tmp_path, problems, tokenizer, reference_run
):
    """A run killed after its step-1 checkpoint and resumed logs exactly the same step-2/3
    metrics as the uninterrupted run (sampler position, RNGs, optimiser, LR schedule, sigma)."""
    reference = step_rows(reference_run)
    killed = tmp_path / "killed"
    shutil.copytree(reference_run, killed)
    for step, path in ckpt.list_checkpoints(killed):
        if step > 1:
            shutil.rmtree(path)
    shutil.rmtree(killed / "final")
    # Same configuration (as --resume reads it from the checkpoint's config.yaml).
    cfg = resume_config(tmp_path, problems)
    resumed = make_trainer(cfg, tokenizer, resume_from=ckpt.checkpoint_path(killed, 1)).train()
    assert resumed.run_dir == killed.resolve()
    again = step_rows(killed)
    assert sorted(again) == [1, 2, 3]
    for step in (2, 3):
        assert comparable(again[step]) == comparable(reference[step]), f"step {step} differs"


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, problems, tokenizer, reference_run):
    """SIGINT during training saves a checkpoint at a step boundary and returns
    (interrupted=True); resuming it gives the same later steps as an uninterrupted run."""
    reference = step_rows(reference_run)
    cfg = resume_config(tmp_path, problems)
    cfg.checkpoint.every = 0  # the checkpoint must come from the Ctrl-C handler
    trainer = make_trainer(cfg, tokenizer)
    watcher = interrupt_after_first_step(trainer.run_dir / "metrics.jsonl")
    result = trainer.train()
    watcher.join()
    assert result.interrupted
    saved = ckpt.latest_checkpoint(trainer.run_dir)
    assert saved is not None
    stopped_at = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 3
    assert not (trainer.run_dir / "final").exists()

    make_trainer(cfg, tokenizer, resume_from=saved).train()
    again = step_rows(trainer.run_dir)
    assert sorted(again) == [1, 2, 3]
    for step in range(stopped_at + 1, 4):
        assert comparable(again[step]) == comparable(reference[step]), f"step {step} differs"


# ------------------------------------------------------------------------------- failures
def test_non_finite_updates_are_skipped_then_training_stops(tmp_path, problems, tokenizer):
    """A NaN in the training forward: the update is skipped (weights unchanged, logged), and
    after max_nonfinite_in_row in a row the run stops with a clear error and no NaN checkpoint."""
    cfg = tiny_config(tmp_path, problems, steps=3, max_nonfinite_in_row=3)
    trainer = make_trainer(cfg, tokenizer)
    before = {k: v.clone() for k, v in trainer.dist.unwrap(trainer.model).state_dict().items()}

    def poison(module, args, output):  # only the grad-enabled training forward is poisoned
        if torch.is_grad_enabled():
            output.logits = output.logits * float("nan")
        return output

    trainer.dist.unwrap(trainer.model).register_forward_hook(poison)
    with pytest.raises(TrainingDivergedError, match="3 consecutive optimiser steps"):
        trainer.train()
    after = trainer.dist.unwrap(trainer.model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.skipped_updates == 3
    assert ckpt.latest_checkpoint(trainer.run_dir) is None


def test_nan_state_is_never_checkpointed(tmp_path, problems, tokenizer):
    trainer = make_trainer(tiny_config(tmp_path, problems), tokenizer)
    with torch.no_grad():
        next(trainer.dist.unwrap(trainer.model).parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ckpt.NonFiniteCheckpointError):
        trainer.save_checkpoint()
    assert ckpt.latest_checkpoint(trainer.run_dir) is None


# ------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", ["grpo", "tis"])
def test_presets_switch_the_objective(tmp_path, problems, tokenizer, preset):
    """Only ALP perturbs; TIS reports its weights' ESS as a batch value in (0, 1]."""
    cfg = tiny_config(tmp_path, problems, steps=1)
    cfg.algorithm.preset = preset
    trainer = make_trainer(cfg, tokenizer)
    assert trainer.perturbation is None
    assert trainer.loss_cfg.name == preset
    row = step_rows(trainer.train().run_dir)[1]
    assert row["mismatch/k3"] >= 0.0 and row["mismatch/ppl_ratio"] > 0.0
    assert not any(k.startswith(("sigma/", "perturbation/")) for k in row)
    if preset == "tis":
        assert 0.0 < row["correction/ess"] <= 1.0
        assert row["correction/weight_min"] <= row["correction/weight_mean"]
        assert row["correction/weight_mean"] <= row["correction/weight_max"] <= 5.0


# ------------------------------------------------------------------------------- config
def test_bad_names_fail_before_any_model_is_loaded(tmp_path, problems, monkeypatch):
    import alp_agents.models as models

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(models, "load_model", forbidden)
    monkeypatch.setattr(models, "make_tiny_model", forbidden)
    cases = [
        ({"algorithm.preset": "alpp"}, ["alpp", "bypass", "grpo", "'alp'"]),
        ({"env.id": "alp/Nope-v0"}, ["alp/Nope-v0", "alp/PythonTool-v0"]),
        ({"env.dataset": "gsm9k"}, ["gsm9k", "gsm8k"]),
        ({"rollout.engine": "tgi"}, ["tgi", "hf", "vllm"]),
    ]
    for change, expected in cases:
        cfg = tiny_config(tmp_path, problems, **change)
        with pytest.raises(TrainConfigError) as info:
            ALPTrainer(cfg)
        for text in expected:
            assert text in str(info.value), (change, str(info.value))


def test_cli_rejects_unknown_key_and_preset_without_loading(tmp_path):
    script = str(ROOT / "train" / "multi_turn.py")
    bad_key = subprocess.run(
        [sys.executable, script, "optim.lrr=1"], capture_output=True, text=True, timeout=120
    )
    assert bad_key.returncode == 2
    assert "optim.lrr" in bad_key.stderr and "optim.lr" in bad_key.stderr
    bad_preset = subprocess.run(
        [sys.executable, script, "--preset", "alpha"], capture_output=True, text=True, timeout=120
    )
    assert bad_preset.returncode == 2
    assert "alpha" in bad_preset.stderr and "gspo" in bad_preset.stderr
    printed = subprocess.run(
        [sys.executable, script, "--preset", "gspo", "steps=3", "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    assert "preset: gspo" in printed.stdout and "steps: 3" in printed.stdout


def test_validate_accepts_every_shipped_config():
    from alp_agents.configs.loader import load_config

    for path in sorted((ROOT / "train" / "configs").rglob("*.yaml")):
        if path.name.startswith(("eval", "accelerate")) or "vllm" in path.name:
            continue
        validate_config(load_config(TrainConfig, path, extra_sections=OTHER_SECTIONS))


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_trains_a_step(tmp_path, problems, tokenizer, preset):
    """Every preset of alp_agents.learner.objectives runs through the trainer (what
    `train/multi_turn.py --preset NAME` does): finite loss, K optimiser steps, its own ratio."""
    cfg = tiny_config(tmp_path, problems, steps=1)
    cfg.algorithm.preset = preset
    trainer = make_trainer(cfg, tokenizer)
    assert trainer.loss_cfg.name == preset
    assert (trainer.perturbation is not None) == trainer.loss_cfg.perturbation
    row = step_rows(trainer.train().run_dir)[1]
    assert row["update/steps"] + row["update/skipped"] == cfg.algorithm.mini_batches
    assert row["update/skipped"] == 0
    for key in ("update/loss", "seq_log_ratio/q02", "mismatch/k3"):
        assert row[key] == row[key], key  # not NaN
