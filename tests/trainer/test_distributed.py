"""The trainer in two real processes (``accelerate launch``, gloo on CPU): DDP and FSDP2.

Each launch runs tests/trainer/distributed_worker.py on both ranks (a tiny random Llama,
``test/LengthParity-v0``, 2 steps, a checkpoint after each) and reads back one JSON report per
rank. What is checked: both ranks end with bit-identical weights and sigma, the engines hold
those weights, each rank rolled out its own half of every step's problems, only rank 0 wrote
the run (one run directory, one metrics row per step, checkpoints, export), and a run resumed
from its step-1 checkpoint on two processes ends exactly where the uninterrupted run did.

FSDP: accelerate 1.15 never selects FSDP for CPU processes (``AcceleratorState`` only turns
``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` over GPU-like devices; CPU processes get
DDP silently). torch's FSDP2 does run on CPU with gloo, so the FSDP test relabels the
initialised CPU process group (``distributed_worker.force_fsdp_on_cpu``) and then runs
accelerate's real FSDP2 preparation: the weights really are sharded (each rank holds half).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alp_agents.reporting.runlog import read_metrics
from alp_agents.trainer import ProblemSampler
from alp_agents.trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
DDP_CONFIG = ROOT / "train" / "configs" / "accelerate_ddp_cpu.yaml"
FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""
STEPS = 2
VOLATILE = ("time", "throughput/")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch build has no torch.distributed / gloo backend",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    cwd: Path, config_file: Path, problems: tuple[str, str], out: str, *args: str
) -> tuple[list[dict], str]:
    """``accelerate launch`` the worker on 2 processes; returns (rank reports, stderr)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--main_process_port",
        str(free_port()),
        str(WORKER),
        "--out",
        str(cwd / out),
        "--train",
        problems[0],
        "--test",
        problems[1],
        "--steps",
        str(STEPS),
        *args,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # 2 processes on 2 cores
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONFAULTHANDLER": "1",
        # These runs check the CPU processes (gloo). On a machine with one GPU, two processes
        # would both take it and NCCL refuses two ranks on one device.
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-8000:]}"
    reports = [json.loads((cwd / out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return reports, proc.stderr


def expected_shards(train_path: str) -> dict[int, list[set[str]]]:
    """Per step, the problem ids of rank 0 and rank 1 (the trainer's sampler, ``[rank::2]``)."""
    import envs

    problems = envs.load_dataset(train_path, split=None)
    sampler = ProblemSampler(len(problems), seed=0)
    shards = {}
    for step in range(1, STEPS + 1):
        ids = [problems[i].id for i in sampler.take(4)]
        shards[step] = [set(ids[0::2]), set(ids[1::2])]
    return shards


def step_rows(run_dir: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for row in read_metrics(run_dir):
        if "reward/mean" in row:
            assert row["step"] not in rows, f"step {row['step']} logged twice"
            rows[row["step"]] = {k: v for k, v in row.items() if not k.startswith(VOLATILE)}
    return rows


def check_ranks_agree(reports: list[dict], distributed_type: str) -> None:
    r0, r1 = reports
    assert [r["rank"] for r in reports] == [0, 1]
    assert {r["world"] for r in reports} == {2}
    assert {r["distributed_type"] for r in reports} == {distributed_type}
    assert all(r.get("packed_forwards", 0) > 0 for r in reports)  # shared prompts ran packed
    # The same trained model everywhere: weights and sigma bit-identical, both moved.
    assert r0["weights_at_start"] == r1["weights_at_start"]
    assert r0["weights"] == r1["weights"] != r0["weights_at_start"]
    assert r0["sigma"] == r1["sigma"] != r0["sigma_at_start"]
    assert all(r["engine_matches_at_start"] and r["engine_matches_at_end"] for r in reports)
    assert [r["steps_done"] for r in reports] == [STEPS, STEPS]


def check_shards(reports: list[dict], train_path: str) -> None:
    """Each rank rolled out its own half of every step's problems."""
    shards = expected_shards(train_path)
    for rank, report in enumerate(reports):
        done = {row["step"]: set(row["problems"]) for row in report["rollouts"]}
        start = report["start_step"]
        assert sorted(done) == list(range(start + 1, STEPS + 1))
        for step, ids in done.items():
            assert ids == shards[step][rank], (rank, step)
    for step in range(1, STEPS + 1):
        assert not shards[step][0] & shards[step][1]


def check_only_rank0_wrote(reports: list[dict], run_dir: Path, train_path: str) -> None:
    r0, r1 = reports
    assert r0["is_main"] and r0["has_logger"] and r0["export_dir"]
    assert not r1["is_main"] and not r1["has_logger"] and r1["export_dir"] is None
    assert sorted(step_rows(run_dir)) == list(range(1, STEPS + 1))  # once per step
    shards = expected_shards(train_path)
    samples = [json.loads(line) for line in (run_dir / "trajectories.jsonl").open()]
    assert samples
    for s in samples:  # trajectory samples come from rank 0's shard only
        assert s["problem_id"] in shards[s["step"] + 1][0]  # logged before the step counts
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == list(range(1, STEPS + 1))
    for _, path in ckpt.list_checkpoints(run_dir):  # every rank's RNG state is saved
        assert len(torch.load(path / "rng_per_rank.pt", weights_only=False)) == 2


def check_resume(
    cwd: Path, config_file: Path, problems, reference: list[dict], run_dir: Path, *args: str
) -> None:
    """Resume a copy of the run from its step-1 checkpoint on 2 processes: the final weights,
    sigma and the step-2 metrics are exactly those of the uninterrupted run."""
    killed = cwd / "killed"
    shutil.copytree(run_dir, killed)
    shutil.rmtree(ckpt.checkpoint_path(killed, 2))
    shutil.rmtree(killed / "final")
    resume_from = ckpt.checkpoint_path(killed, 1)
    reports, _ = launch(
        cwd, config_file, problems, "out_resumed", "--resume", str(resume_from), *args
    )
    assert [r["start_step"] for r in reports] == [1, 1]
    assert {r["run_dir"] for r in reports} == {str(killed.resolve())}
    check_ranks_agree_after_resume(reports, reference)
    check_shards(reports, problems[0])
    assert step_rows(killed) == step_rows(run_dir)


def check_ranks_agree_after_resume(reports: list[dict], reference: list[dict]) -> None:
    for got, want in zip(reports, reference, strict=True):
        assert got["weights"] == want["weights"]
        assert got["sigma"] == want["sigma"]
        assert got["engine_matches_at_start"] and got["engine_matches_at_end"]


# ------------------------------------------------------------------------------ config checks
@pytest.mark.parametrize(
    ("prompts", "mini_batches", "error"),
    [(4, 2, None), (3, 1, "multiple of the number of processes"), (2, 4, "per process")],
)
def test_prompts_must_split_evenly_over_processes(prompts, mini_batches, error):
    """Checked in-process (a stand-in accelerator with 2 processes): uneven shards would leave
    the ranks' collectives out of step, so they are refused before any model is loaded."""
    from types import SimpleNamespace

    from alp_agents.trainer import TrainConfig, TrainConfigError
    from alp_agents.trainer.distributed import check_world

    cfg = TrainConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = prompts, 2
    cfg.algorithm.mini_batches = mini_batches
    accelerator = SimpleNamespace(num_processes=2, distributed_type=None)
    said: list[str] = []
    if error is None:
        check_world(cfg.rollout, cfg.algorithm, accelerator, said.append)
    else:
        with pytest.raises(TrainConfigError, match=error):
            check_world(cfg.rollout, cfg.algorithm, accelerator, said.append)
    assert said == []


# ------------------------------------------------------------------------------------ DDP
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, problem_files):
    """2 steps of DDP on 2 CPU processes with the shipped accelerate config, a different
    initial model on each rank, and the run directory left to the trainer (runs/<stamp>)."""
    cwd = tmp_path_factory.mktemp("ddp")
    reports, _ = launch(cwd, DDP_CONFIG, problem_files, "out", "--rank-seed")
    return cwd, reports


def test_ddp_two_processes_train_one_model_on_two_shards(ddp_run, problem_files):
    cwd, reports = ddp_run
    check_ranks_agree(reports, "MULTI_CPU")
    r0, r1 = reports
    # Each rank built its own initial model, yet both trained rank 0's (DDP broadcast), and
    # the engines built from the local copies were re-synced before the first rollout.
    assert r0["own_weights_before_prepare"] != r1["own_weights_before_prepare"]
    assert r0["weights_at_start"] == r0["own_weights_before_prepare"]
    assert r0["local_fraction"] == r1["local_fraction"] == 1.0
    check_shards(reports, problem_files[0])
    # One run directory for both ranks (the main process makes it, the others are told).
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, runs
    assert {r["run_dir"] for r in reports} == {str(runs[0].resolve())}
    check_only_rank0_wrote(reports, runs[0], problem_files[0])


def test_ddp_resume_on_two_processes_is_exact(ddp_run, problem_files):
    cwd, reference = ddp_run
    [run_dir] = list((cwd / "runs").iterdir())
    check_resume(cwd, DDP_CONFIG, problem_files, reference, run_dir)


# ------------------------------------------------------------------------------------ FSDP
@pytest.fixture(scope="module")
def fsdp_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fsdp_config") / "accelerate_fsdp2_cpu.yaml"
    path.write_text(FSDP_CONFIG)
    return path


def test_fsdp_config_on_cpu_falls_back_to_ddp_with_a_warning(tmp_path, problem_files, fsdp_config):
    """What a user gets from an FSDP accelerate config on CPU: accelerate runs DDP; the
    trainer says so instead of pretending to shard."""
    reports, stderr = launch(
        tmp_path, fsdp_config, problem_files, "out", "--run-dir", str(tmp_path / "run")
    )
    check_ranks_agree(reports, "MULTI_CPU")
    assert {r["local_fraction"] for r in reports} == {1.0}
    assert "accelerate was asked for FSDP but runs MULTI_CPU" in stderr


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, problem_files, fsdp_config):
    cwd = tmp_path_factory.mktemp("fsdp")
    reports, stderr = launch(
        cwd,
        fsdp_config,
        problem_files,
        "out",
        "--run-dir",
        str(cwd / "run"),
        "--force-fsdp-on-cpu",
    )
    return cwd, reports, stderr


def test_fsdp2_sharded_training_gathers_full_weights_for_engine_and_checkpoints(
    fsdp_run, problem_files
):
    cwd, reports, stderr = fsdp_run
    run_dir = cwd / "run"
    check_ranks_agree(reports, "FSDP")  # weights compared as gathered full state dicts
    assert all(0.45 < r["local_fraction"] < 0.55 for r in reports)  # each rank holds half
    # one ordinary forward per micro-batch with the tree mask: works under FSDP's hooks too
    assert {r["share_prefixes"] for r in reports} == {True}
    assert all(r.get("packed_forwards", 0) > 0 for r in reports)
    check_shards(reports, problem_files[0])
    check_only_rank0_wrote(reports, run_dir, problem_files[0])

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import tests.trainer.distributed_worker as worker

    # Export and checkpoint hold the full weights (what the ranks trained), no sigma.
    served = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert worker.checksum(served.state_dict()) == reports[0]["weights"]
    assert not any("sigma" in k for k in load_file(str(run_dir / "final" / "model.safetensors")))
    last = ckpt.checkpoint_path(run_dir, STEPS)
    in_ckpt = AutoModelForCausalLM.from_pretrained(last / "model")
    assert worker.checksum(in_ckpt.state_dict()) == reports[0]["weights"]
    # The optimiser moments are saved whole (not rank 0's shard): one per parameter, full shape.
    opt = torch.load(last / "optimizer.pt", weights_only=False)
    shapes = [p.shape for p in served.parameters()] + [torch.Size([2])]  # model params, sigma
    moments = [opt["state"][i]["exp_avg"] for i in sorted(opt["state"])]
    assert [m.shape for m in moments] == shapes
    assert not any(type(m) is not torch.Tensor for m in moments)
    sigma = torch.load(last / "perturbation.pt", weights_only=False)["log_sigma"]
    assert sigma.exp().tolist() == reports[0]["sigma"]


def test_fsdp2_resume_on_two_processes_is_exact(fsdp_run, problem_files, fsdp_config):
    cwd, reference, _ = fsdp_run
    check_resume(cwd, fsdp_config, problem_files, reference, cwd / "run", "--force-fsdp-on-cpu")
