"""One rank of a multi-process training run, for tests/trainer/test_distributed.py.

Started by ``accelerate launch`` (one process per rank, gloo on CPU). Builds an ALPTrainer on a
tiny random Llama with ``test/LengthParity-v0`` (registered by conftest.py), trains, and writes
``<out>/rank<R>.json`` with what the test compares across ranks: checksums of every model
weight and of sigma, the problems each step rolled out on this rank, whether the engine's
weights equal the trainer's (right after construction and at the end), how the parameters are
held (sharded or not) and where the run went::

    python -m accelerate.commands.launch --config_file CONFIG --main_process_port PORT \\
        tests/trainer/distributed_worker.py --out OUT --train T.jsonl --test E.jsonl --steps 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import tests.tiny_models  # noqa: E402,F401  (registers tiny-llama)
import tests.trainer.conftest  # noqa: E402,F401  (registers test/LengthParity-v0)
from alp_agents.models import load_tokenizer, make_tiny_model  # noqa: E402
from alp_agents.trainer import ALPTrainer, TrainConfig  # noqa: E402


def config(args: argparse.Namespace) -> TrainConfig:
    """The tiny set-up of tests/trainer/test_trainer.py::tiny_config, smaller."""
    cfg = TrainConfig()
    cfg.model.name = "tiny-llama"
    cfg.env.id = "test/LengthParity-v0"
    cfg.env.dataset = args.train
    cfg.env.train_split = None  # a JSONL path carries its own split
    cfg.env.eval_split = None
    cfg.env.eval_dataset = args.test
    cfg.env.max_turns = 1
    cfg.rollout.prompts_per_step = 4  # 2 prompts per rank
    cfg.rollout.group_size = 4
    cfg.rollout.max_tokens = 12
    cfg.rollout.mask_void_turns = False
    cfg.algorithm.mini_batches = 2
    # A mini-batch is one prompt's 4 rows: 2 micro-batches (no_sync, then the all-reduce), each
    # sharing its prompt's forward (algorithm.share_prefixes).
    cfg.algorithm.micro_batch_size = 2
    cfg.optim.lr = 1e-3
    cfg.optim.lr_schedule = "linear"
    cfg.perturbation.sigma_init = 0.02
    cfg.perturbation.sigma_lr = 1e-2
    cfg.eval.num_problems = 0
    cfg.steps = args.steps
    cfg.checkpoint.every = 1
    cfg.checkpoint.keep_last = 0
    cfg.logging.run_dir = args.run_dir  # None: runs/<timestamp>-dist under the working dir
    cfg.logging.name = "dist"
    cfg.logging.progress = False
    cfg.logging.tensorboard = False
    cfg.logging.plots = False
    return cfg


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def full_state(trainer: ALPTrainer) -> dict[str, torch.Tensor]:
    """The trainer's full (under FSDP: gathered) model state dict, on every rank."""
    return dict(trainer.dist.full_state_dict(trainer.model, all_ranks=True))


def engine_matches(trainer: ALPTrainer, state: dict[str, torch.Tensor]) -> bool:
    """The engine holds exactly the trainer's weights, cast to the engine's dtype (rounded
    first where the engine keeps rounded weights, see alp_agents.models.precision)."""
    own = trainer.engine.model.state_dict()
    rounded = trainer.engine.round_weights_to or torch.float32

    def expected(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return w.to(rounded).to(dtype) if w.is_floating_point() else w.to(dtype)

    return all(torch.equal(v, expected(state[k], v.dtype)) for k, v in own.items())


def local_fraction(trainer: ALPTrainer) -> float:
    """Elements this rank holds / elements of the model (1.0 unless the weights are sharded)."""
    from torch.distributed.tensor import DTensor

    held = full = 0
    for p in trainer.model.parameters():
        full += p.numel()
        held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return held / full


def force_fsdp_on_cpu() -> None:
    """Make accelerate use FSDP on CPU processes (gloo).

    accelerate (1.15) only turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` on top of
    a GPU-like distributed type (``AcceleratorState.__init__``); CPU processes silently get plain
    DDP (``MULTI_CPU``). torch's FSDP2 itself runs on CPU with gloo, so relabelling the already
    initialised CPU process group as MULTI_GPU (the device stays ``cpu``) lets accelerate's real
    FSDP2 preparation, and the trainer's FSDP code paths, run here.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resume", default=None, help="a checkpoint directory")
    p.add_argument("--rank-seed", action="store_true", help="a different initial model per rank")
    p.add_argument("--force-fsdp-on-cpu", action="store_true")
    args = p.parse_args()
    if args.force_fsdp_on_cpu:
        force_fsdp_on_cpu()

    rank = int(os.environ.get("RANK", "0"))
    tokenizer = load_tokenizer()
    model, own_start = None, None
    if args.rank_seed:  # rank 0's weights must win everywhere, the engines' copies included
        model = make_tiny_model("llama", tokenizer=tokenizer, seed=100 + rank)
        own_start = checksum(model.state_dict())
    trainer = ALPTrainer(config(args), model=model, tokenizer=tokenizer, resume_from=args.resume)
    state0 = full_state(trainer)
    report: dict = {
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "start_step": trainer.step,
        "own_weights_before_prepare": own_start,
        "weights_at_start": checksum(state0),
        "engine_matches_at_start": engine_matches(trainer, state0),
        "sigma_at_start": trainer.perturbation.sigmas().tolist(),
        "local_fraction": local_fraction(trainer),
        "rollouts": [],
    }

    rollout = trainer.rollout

    def recording_rollout():
        trajs, metrics = rollout()
        ids = sorted({t.problem_id for t in trajs})
        report["rollouts"].append({"step": trainer.step + 1, "problems": ids})
        return trajs, metrics

    trainer.rollout = recording_rollout
    import alp_agents.learner.logprobs as logprobs_module

    packed = logprobs_module._packed_logprobs

    def counting_packed(*a, **kw):  # the shared-prompt path really runs (DDP and FSDP)
        report["packed_forwards"] = report.get("packed_forwards", 0) + 1
        return packed(*a, **kw)

    logprobs_module._packed_logprobs = counting_packed
    result = trainer.train()
    state = full_state(trainer)
    report.update(
        run_dir=str(Path(result.run_dir).resolve()),
        steps_done=result.steps_done,
        export_dir=None if result.export_dir is None else str(result.export_dir),
        is_main=trainer.is_main,
        has_logger=trainer.logger is not None,
        weights=checksum(state),
        engine_matches_at_end=engine_matches(trainer, state),
        sigma=trainer.perturbation.sigmas().tolist(),
        share_prefixes=trainer.cfg.algorithm.share_prefixes,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{report['rank']}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
