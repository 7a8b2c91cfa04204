#!/usr/bin/env python
"""Wall time per training step with synchronous vs asynchronous rollouts, in one run.

Trains the default multi-turn configuration (SmolLM2-135M-Instruct, alp/PythonTool-v0, ALP)
twice in this process, the same seed and steps, first with ``rollout.async_steps=0`` (the
baseline) and then with ``rollout.async_steps=1``; no held-out evaluation, checkpoint, export
or plots, so the steps are all that is timed. Printed per run: the median seconds per step over
the steps after the first (the first async step has nothing to overlap: batch 0 is rolled out
while the trainer waits), its parts, and the ratio against the baseline measured here.

Then an estimate for generation and update on separate devices (an inference GPU and a training
GPU, or a vLLM server and a trainer), from the synchronous run's own split: a synchronous step
costs rollout + update + sync; with the two on their own devices and one step of lag the step
is bounded by the slower of the two, so the gain is ``(R + U + S) / max(R, U + S)``. The weight
transfer between devices is taken to cost what the in-process sync cost here (an
underestimate across a network).

On one CPU the two threads share the cores: the trainer's torch thread count is split between
the trainer and the worker (`alp_agents.rollout.worker.split_cpu_threads`); with one thread in
all (``OMP_NUM_THREADS=1``) each gets one, so the asynchronous run uses a second core that the
synchronous one leaves idle. The output says which.

    python bench/async_rollout.py --tiny          # a tiny random model: ~1 min
    python bench/async_rollout.py --steps 3 rollout.prompts_per_step=2 rollout.group_size=2 \
        rollout.max_tokens=32                     # SmolLM2, a quarter of the default batch
    python bench/async_rollout.py                 # the default config as it is (slow on CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alp_agents.configs.loader import load_config  # noqa: E402
from alp_agents.trainer import ALPTrainer, TrainConfig  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "multi_turn_cpu.yaml"


def run(config: Path, overrides: list[str], async_steps: int, steps: int, root: Path) -> dict:
    """Train ``steps`` steps; the per-step timings of metrics.jsonl and the wall time."""
    cfg = load_config(
        TrainConfig,
        config,
        [
            *overrides,
            f"steps={steps}",
            f"rollout.async_steps={async_steps}",
            "eval.num_problems=0",
            "checkpoint.export=false",
            "logging.plots=false",
            "logging.tensorboard=false",
            "logging.progress=false",
            "logging.trajectory_samples_every=0",
            f"logging.run_dir={root / f'async{async_steps}'}",
        ],
    )
    trainer = ALPTrainer(cfg)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").open()]
    rows = [r for r in rows if "time/step_s" in r]
    return {"rows": rows, "wall": wall, "threads": torch.get_num_threads()}


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows[1:] if key in r]  # the first step is warm-up
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (first is warm-up)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny random Llama (hidden 64, 2 layers) instead of SmolLM2: seconds, but the "
        "steps are Python overhead more than compute",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    if args.tiny:
        from alp_agents.models import register_tiny_models

        register_tiny_models()
        args.overrides = ["model.name=tiny-llama", *args.overrides]
    budget = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        sync = run(args.config, args.overrides, 0, args.steps, Path(tmp))
        lagged = run(args.config, args.overrides, 1, args.steps, Path(tmp))

    from alp_agents.rollout.worker import split_cpu_threads

    trainer_threads, worker_threads = split_cpu_threads(budget)
    print(f"\nconfig {args.config.name} {' '.join(args.overrides)}")
    print(f"{args.steps} steps per run, torch threads {budget}")
    print(f"async: trainer {trainer_threads} thread(s) + engine worker {worker_threads}")
    r = median(sync["rows"], "time/rollout_s")
    u = median(sync["rows"], "time/update_s")
    s = median(sync["rows"], "time/sync_s")
    base = median(sync["rows"], "time/step_s")
    step = median(lagged["rows"], "time/step_s")
    wait = median(lagged["rows"], "time/rollout_wait_s")
    gen = median(lagged["rows"], "time/rollout_s")
    print(f"{'run':<16}{'s/step':>9}{'rollout':>10}{'update':>9}{'sync':>8}{'wall':>9}{'ratio':>8}")
    print(f"{'async_steps=0':<16}{base:>9.2f}{r:>10.2f}{u:>9.2f}{s:>8.2f}"
          f"{sync['wall']:>9.1f}{1.0:>8.2f}")  # fmt: skip
    print(f"{'async_steps=1':<16}{step:>9.2f}{gen:>10.2f}"
          f"{median(lagged['rows'], 'time/update_s'):>9.2f}"
          f"{median(lagged['rows'], 'time/sync_s'):>8.2f}{lagged['wall']:>9.1f}"
          f"{base / step:>8.2f}")  # fmt: skip
    print(
        f"  async: the trainer waited {wait:.2f} s per step for its batch (median); "
        "rollout = the worker's time generating a batch, concurrently with the update"
    )
    estimate = (r + u + s) / max(r, u + s)
    print(f"separate devices (estimate from the synchronous split): "
          f"{r + u + s:.2f} -> {max(r, u + s):.2f} s/step, {estimate:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
