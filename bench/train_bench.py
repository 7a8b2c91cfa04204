#!/usr/bin/env python
"""Training-step speed of ALPTrainer vs TRL's GRPOTrainer, side by side in one run.

Both trainers get the same model (SmolLM2-135M-Instruct), the same prompts (the first problems of
the single-turn default's training set, rendered by ``alp/Math-v0``), the same group size,
completion length, batch and number of optimiser steps per generation batch (our K mini-batches
= TRL's ``steps_per_generation``). TRL runs at its own defaults (bf16 autocast over fp32
weights, like ours; gradient checkpointing on) and once more without gradient checkpointing, its
fastest setting here; the speed-up is taken against the faster of the two. Reported per rollout
batch (one "step" here = generate the batch + K optimiser steps):

* seconds per step (median over the timed steps, after warm-up),
* update tokens/s: tokens of the batch (prompt + completion, every row) per second of update,
* achieved update FLOP/s: 6 N per token position that went through a forward with gradient
  (forward + backward) + 2 N per position of a no-grad forward (pi_old / reference), counting
  the positions the model really ran (a prompt shared by a group runs once), as a fraction of
  the matmul throughput (bf16 where native, else float32) measured at the start of this same run. N includes the LM head,
  which only runs on scored positions, so this is a slight over-estimate.

TRL is only needed for the benchmark (it is not a project dependency)::

    .venv/bin/pip install trl==1.16.0     # adds datasets, pandas, pyarrow; torch is untouched
    make bench-train                      # ~8 min on 2 cores (tcmalloc preloaded, as for training)
    make bench-train ARGS=--skip-trl      # ours only

Target: ours at least 2x faster per step than TRL.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alp_agents.configs.loader import load_config  # noqa: E402
from alp_agents.trainer import ALPTrainer, TrainConfig  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "single_turn_cpu.yaml"


def ceiling_dtype() -> torch.dtype:
    """bf16 where this CPU runs it natively, else float32: the precision training runs in
    here (`alp_agents.models.precision`); an emulated bf16 matmul would take minutes."""
    from alp_agents.models.precision import native_bf16

    return torch.bfloat16 if native_bf16("cpu") else torch.float32


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    """Measured matmul throughput (FLOP/s) in `ceiling_dtype` on this machine right now."""
    a = torch.randn(n, n, dtype=ceiling_dtype())
    b = torch.randn(n, n, dtype=ceiling_dtype())
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


class PositionCounter:
    """Token positions each model runs, split into forwards with and without gradient."""

    def __init__(self, *models: torch.nn.Module) -> None:
        self.grad = self.no_grad = 0
        self.handles = [
            m.register_forward_pre_hook(self._count, with_kwargs=True)
            for m in models
            if m is not None
        ]

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            if torch.is_grad_enabled():
                self.grad += ids.numel()
            else:
                self.no_grad += ids.numel()

    def take(self) -> tuple[int, int]:
        out = (self.grad, self.no_grad)
        self.grad = self.no_grad = 0
        return out


def bench_ours(cfg: TrainConfig, steps: int, warmup: int) -> dict[str, float]:
    trainer = ALPTrainer(cfg)
    n_params = sum(p.numel() for p in trainer.dist.unwrap(trainer.model).parameters())
    counter = PositionCounter(trainer.dist.unwrap(trainer.model), trainer.ref_model)
    rows = []
    for i in range(warmup + steps):
        m = trainer.train_step()
        trainer.step += 1
        grad_pos, no_grad_pos = counter.take()
        m["flops"] = (6 * grad_pos + 2 * no_grad_pos) * n_params / m["time/update_s"]
        m["positions"] = grad_pos + no_grad_pos
        if i >= warmup:
            rows.append(m)
        print(
            f"  ours step {i + 1}: {m['time/step_s']:.1f}s (rollout {m['time/rollout_s']:.1f}s, "
            f"update {m['time/update_s']:.1f}s)",
            flush=True,
        )
    return {
        "step_s": statistics.median(r["time/step_s"] for r in rows),
        "rollout_s": statistics.median(r["time/rollout_s"] for r in rows),
        "update_s": statistics.median(r["time/update_s"] for r in rows),
        "update_tok_s": statistics.median(r["throughput/update_tokens_per_s"] for r in rows),
        "update_flops": statistics.median(r["flops"] for r in rows),
    }


def bench_trl(
    cfg: TrainConfig, prompts: list, steps: int, warmup: int, checkpointing: bool
) -> dict[str, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alp_agents.models import load_model, load_tokenizer

    model = load_model(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model.name)
    n_params = sum(p.numel() for p in model.parameters())
    k = cfg.algorithm.mini_batches
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    def reward(completions, **kw):
        tokens.append(sum(len(tokenizer(c[0]["content"])["input_ids"]) for c in completions))
        return [float("\\boxed" in c[0]["content"]) for c in completions]

    data = Dataset.from_list([{"prompt": p} for p in prompts])
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch // k,
        steps_per_generation=k,
        num_generations=cfg.rollout.group_size,
        max_completion_length=cfg.rollout.max_tokens,
        max_steps=(warmup + steps) * k,
        learning_rate=cfg.optim.lr,
        beta=0.001,
        temperature=cfg.rollout.temperature,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=checkpointing,  # TRL's default: True
        save_strategy="no",
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    # One of our steps = one generation + k optimiser steps = k TRL steps.
    per_batch = [sum(times[i : i + k]) for i in range(0, len(times), k)][warmup:]
    step_s = statistics.median(per_batch)
    return {"step_s": step_s, "n_params": n_params}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=3, help="timed rollout batches per trainer")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("overrides", nargs="*", help="TrainConfig overrides, e.g. rollout.group_size=8")
    args = ap.parse_args()

    cfg = load_config(TrainConfig, CONFIG, args.overrides)
    cfg.eval.num_problems = 0
    cfg.logging.run_dir = tempfile.mkdtemp(prefix="train_bench-")
    cfg.logging.progress = False
    cfg.logging.tensorboard = False
    cfg.logging.plots = False
    cfg.checkpoint.export = False
    peak = matmul_flops()
    kind = str(ceiling_dtype()).removeprefix("torch.")
    print(f"{kind} matmul throughput: {peak / 1e9:.0f} GFLOP/s", flush=True)
    print(
        f"setting: {cfg.model.name}, {cfg.env.id} ({cfg.env.dataset}), "
        f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size}, "
        f"max {cfg.rollout.max_tokens} new tokens, {cfg.algorithm.mini_batches} optimiser steps "
        f"per batch, preset {cfg.algorithm.preset}",
        flush=True,
    )
    ours = bench_ours(cfg, args.steps, args.warmup)
    print(
        f"ours: {ours['step_s']:.2f} s/step (rollout {ours['rollout_s']:.2f} s), "
        f"update {ours['update_s']:.2f} s, "
        f"{ours['update_tok_s']:.0f} update tok/s, {ours['update_flops'] / 1e9:.0f} GFLOP/s "
        f"= {ours['update_flops'] / peak:.1%} of {kind} matmul peak",
        flush=True,
    )
    if args.skip_trl:
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL not installed: `.venv/bin/pip install trl==1.16.0` to run the baseline")
        return
    import envs

    env = envs.make(cfg.env.id, dataset=cfg.env.dataset, split=cfg.env.train_split)
    problems = envs.load_dataset(cfg.env.dataset, split=cfg.env.train_split)
    n = cfg.rollout.prompts_per_step * (args.steps + args.warmup) * 2
    prompts = [env.reset(options={"problem_id": p.id})[1]["messages"] for p in problems[:n]]
    env.close()
    results = {}
    for checkpointing in (True, False):
        label = f"TRL GRPOTrainer (gradient checkpointing {'on' if checkpointing else 'off'})"
        results[label] = bench_trl(cfg, prompts, args.steps, args.warmup, checkpointing)
        print(f"{label}: {results[label]['step_s']:.2f} s/step", flush=True)
    best = min(results, key=lambda k: results[k]["step_s"])
    speedup = results[best]["step_s"] / ours["step_s"]
    print(f"speed-up per step vs the faster, {best}: {speedup:.2f}x (target >= 2x)")
    # A shared host can change speed mid-run; the ratio only holds if the machine did not.
    peak_end = matmul_flops()
    drift = peak_end / peak - 1
    print(f"{kind} matmul throughput at the end: {peak_end / 1e9:.0f} GFLOP/s ({drift:+.0%})")
    if abs(drift) > 0.1:
        print("WARNING: the machine's speed changed by more than 10% during the run; re-run")


if __name__ == "__main__":
    main()
