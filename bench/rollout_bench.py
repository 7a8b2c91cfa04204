"""Rollout benchmark: run_episodes throughput vs raw model.generate, and multi-turn overhead.

Prints ratios measured in ONE run on the same model, prompts and machine (the CPU is shared,
absolute numbers are noisy):

1. single-turn (alp/Math-v0): generated tokens/s of ``run_episodes`` (whole call: env resets,
   template deltas, sampling, grading) against ``model.generate`` on the same rendered prompts,
   the same model object (the engine's bf16 copy) and the same sampling, counting only real
   tokens (up to the first EOS). Target >= 0.9x.
2. multi-turn (alp/PythonTool-v0 on the real sandbox): share of ``run_episodes`` wall time spent
   outside ``engine.generate`` (env steps, sandbox, grading, template deltas). Target <= 15%.
3. VLLMEngine vs HFEngine tokens/s on the same prompts, when vllm is importable.
4. degenerate policy (alp/PythonTool-v0 on the real sandbox): the same model forced by a logits
   bias to repeat a bare fence ("```\\n```\\n...", the collapse of docs/rollout.md) against the
   healthy model, same problems and settings: generated tok/s over the whole ``run_episodes``
   call and generate rounds. Target: >= 0.8x the healthy tok/s and rounds <= max_turns.
   ``--legacy`` adds the engine WITHOUT stop_condition support, uncapped (the behaviour before
   the fix: one round per fence) and with the default ``max_rounds_per_turn`` safety net.

    python bench/rollout_bench.py                 # 16 episodes, 96 tokens per turn
    python bench/rollout_bench.py --problems 8 --max-tokens 128 --repeats 3   # steadier
    python bench/rollout_bench.py --skip single multi vllm --dataset arith_hard --problems 8 \\
        --max-tokens 64 --max-turns 2 --legacy   # the issue's degenerate table
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def single_turn(engine, tok, problems, group_size, max_tokens, repeats):
    import envs
    from alp_agents.rollout import run_episodes
    from alp_agents.rollout.chat import ChatDelta
    from alp_agents.rollout.engines import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0)
    kwargs = {"dataset": "arith", "split": "train"}
    # The exact prompts run_episodes will render, for the baseline.
    env = envs.make("alp/Math-v0", **kwargs)
    prompts = []
    for p in problems:
        _, info = env.reset(options={"problem": p})
        prompts += [ChatDelta(tok, info["messages"]).prompt_ids] * group_size
    eos = sorted(engine.eos_token_ids)

    def ours(seed):
        stats = {}
        t = time.perf_counter()
        trajs = run_episodes("alp/Math-v0", engine, tok, problems, group_size, sampling,
                             env_kwargs=kwargs, progress=False, seed=seed, stats=stats)  # fmt: skip
        wall = time.perf_counter() - t
        return sum(tr.num_generated_tokens for tr in trajs) / wall, stats

    def baseline(seed):
        torch.manual_seed(seed)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        t = time.perf_counter()
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                top_k=0, max_new_tokens=max_tokens, eos_token_id=eos,
                pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        wall = time.perf_counter() - t
        real = 0
        for row in out.sequences[:, width:].tolist():
            ends = [i for i, x in enumerate(row) if x in eos]
            real += ends[0] + 1 if ends else len(row)
        return real / wall

    ours(0), baseline(0)  # warm-up (allocator, kernels, verifier pool, env registry)
    ratios, ours_tps, base_tps, gen_share = [], [], [], []
    for r in range(repeats):
        a, stats = ours(r + 1)
        b = baseline(r + 1)
        ours_tps.append(a)
        base_tps.append(b)
        ratios.append(a / b)
        gen_share.append(stats["generate_s"] / stats["total_s"])
        print(f"  repeat {r + 1}: run_episodes {a:.1f} tok/s, model.generate {b:.1f} tok/s, "
              f"ratio {a / b:.2f}x", flush=True)  # fmt: skip
    print(
        f"[single-turn summary] {len(prompts)} episodes, max {max_tokens} tokens, {repeats} repeat(s)"
    )
    print(f"  run_episodes      : {statistics.median(ours_tps):7.1f} generated tok/s "
          f"(generate() is {100 * statistics.median(gen_share):.1f}% of its wall time)")  # fmt: skip
    print(f"  model.generate    : {statistics.median(base_tps):7.1f} real tok/s (output_scores)")
    print(f"  ratio             : {statistics.median(ratios):.2f}x  (target >= 0.9x)")
    return statistics.median(ratios)


def multi_turn(engine, tok, problems, group_size, max_tokens, max_turns, dataset="arith"):
    from alp_agents.rollout import run_episodes
    from alp_agents.rollout.engines import SamplingParams

    stats = {}
    trajs = run_episodes(
        "alp/PythonTool-v0", engine, tok, problems, group_size,
        SamplingParams(max_tokens=max_tokens, temperature=1.0),
        env_kwargs={"dataset": dataset, "split": "train"}, max_turns=max_turns,
        progress=False, seed=0, stats=stats,
    )  # fmt: skip
    outside = 1.0 - stats["generate_s"] / stats["total_s"]
    turns = statistics.mean(t.num_turns for t in trajs)
    reward = statistics.mean(t.reward for t in trajs)
    tool_calls = sum(t.num_tool_calls for t in trajs)
    print(f"[multi-turn] {len(trajs)} episodes, max {max_turns} turns, {max_tokens} tokens/turn")
    print(f"  wall {stats['total_s']:.1f} s = generate {stats['generate_s']:.1f} s + "
          f"env/sandbox/template {stats['env_s']:.1f} s + loop "
          f"{stats['total_s'] - stats['generate_s'] - stats['env_s']:.2f} s; "
          f"{stats['rounds']} rounds, mean turns {turns:.2f}, {tool_calls} tool calls, "
          f"mean reward {reward:.2f}")  # fmt: skip
    print(f"  outside generation: {100 * outside:.1f}% of wall time  (target <= 15%)")
    return outside


def vllm_vs_hf(hf_engine, tok, problems, max_tokens):
    from alp_agents.rollout.engines import SamplingParams, VLLMEngine, vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason:
        print(f"[vllm] skipped: {reason}")
        return
    import envs
    from alp_agents.rollout.chat import ChatDelta

    env = envs.make("alp/Math-v0", dataset="arith", split="train")
    prompts = []
    for p in problems:
        prompts.append(ChatDelta(tok, env.reset(options={"problem": p})[1]["messages"]).prompt_ids)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0)
    vllm_engine = VLLMEngine("smollm2-135m-instruct", tok)
    result = {}
    for name, engine in (("vllm", vllm_engine), ("hf", hf_engine)):
        engine.generate(prompts, sampling)
        t = time.perf_counter()
        samples = engine.generate(prompts, sampling)
        result[name] = sum(len(s.token_ids) for s in samples) / (time.perf_counter() - t)
    print(f"[vllm] VLLMEngine {result['vllm']:.1f} tok/s vs HFEngine {result['hf']:.1f} tok/s: "
          f"{result['vllm'] / result['hf']:.2f}x")  # fmt: skip


class _IgnoresStopCondition:
    """An engine without ``stop_condition`` support: every stop string ends a sample."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, sampling):
        if isinstance(sampling, list | tuple):
            return self.engine.generate(prompts, [p.replace(stop_condition=None) for p in sampling])
        return self.engine.generate(prompts, sampling.replace(stop_condition=None))

    def update_weights(self, model_or_state_dict):
        self.engine.update_weights(model_or_state_dict)


def force_bare_fences(model, tok, bias=40.0):
    """A forward hook making ``model`` repeat "```\\n": after "```" a newline, else "```".

    +40 on one logit leaves the rest of the vocabulary ~e-40 of the mass, so every sample is the
    fence pattern while the reported log-probs stay real. Returns the handle (``.remove()``).
    """
    fence, newline = tok.encode("```\n", add_special_tokens=False)

    def hook(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1]
        target = torch.where(last == fence, newline, fence)
        rows = torch.arange(len(target), device=target.device)
        output.logits[rows, -1, target] += bias
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def degenerate(engine, tok, problems, group_size, max_tokens, max_turns, dataset, repeats, legacy):
    from alp_agents.rollout import run_episodes
    from alp_agents.rollout.engines import SamplingParams

    def run(case, eng, **kwargs):
        stats = {}
        trajs = run_episodes(
            "alp/PythonTool-v0", eng, tok, problems, group_size,
            SamplingParams(max_tokens=max_tokens, temperature=1.0),
            env_kwargs={"dataset": dataset, "split": "train"}, max_turns=max_turns,
            progress=False, seed=0, stats=stats, **kwargs,
        )  # fmt: skip
        tokens = sum(t.num_generated_tokens for t in trajs)
        row = {
            "case": case,
            "wall": stats["total_s"],
            "tokens": tokens,
            "tok_s": tokens / stats["total_s"],
            "gen_tok_s": tokens / stats["generate_s"],
            "rounds": stats["rounds"],
            "turns": statistics.mean(t.num_turns for t in trajs),
            "deferred": stats["deferred_stops"],
            "continued": stats["continuations"],
            "capped": stats["capped_turns"],
        }
        print(f"  {case:<34} {row['wall']:7.1f} s {tokens:6d} tok {row['tok_s']:7.1f} tok/s "
              f"(generate {row['gen_tok_s']:6.1f}) rounds {row['rounds']:3d} "
              f"mean turns {row['turns']:.2f} deferred stops {row['deferred']:5d} "
              f"continuations {row['continued']:4d} capped turns {row['capped']:3d}",
              flush=True)  # fmt: skip
        return row

    n = len(problems) * group_size
    print(f"[degenerate] alp/PythonTool-v0 on {dataset}: {n} episodes, max {max_turns} turns, "
          f"{max_tokens} tokens/turn, {repeats} repeat(s)")  # fmt: skip
    run("warm-up (healthy, not counted)", engine)
    healthy, forced, ratios = [], [], []
    for _ in range(repeats):
        healthy.append(run("healthy", engine))
        hook = force_bare_fences(engine.model, tok)
        try:
            forced.append(run("degenerate (bare fences)", engine))
        finally:
            hook.remove()
        ratios.append(forced[-1]["tok_s"] / healthy[-1]["tok_s"])
    if legacy:
        hook = force_bare_fences(engine.model, tok)
        try:
            run("degenerate, no stop_condition, cap 4", _IgnoresStopCondition(engine))
            run("degenerate, no stop_condition, uncapped", _IgnoresStopCondition(engine),
                max_rounds_per_turn=10**6)  # fmt: skip
        finally:
            hook.remove()
    ratio = statistics.median(ratios)
    rounds = max(r["rounds"] for r in forced)
    print(f"  degenerate / healthy tok/s: {ratio:.2f}x  (target >= 0.8x); degenerate rounds "
          f"{rounds} (target <= max_turns = {max_turns})")  # fmt: skip
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dataset", default="arith", help="arith dataset for multi/degenerate")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["single", "multi", "vllm", "degenerate"]
    )
    parser.add_argument(
        "--legacy", action="store_true", help="degenerate: also without stop_condition"
    )
    args = parser.parse_args()

    import envs
    from alp_agents.models import load_model, load_tokenizer
    from alp_agents.rollout.engines import HFEngine

    tok = load_tokenizer()
    engine = HFEngine(load_model(), tok, dtype=args.dtype)
    problems = envs.load_dataset("arith", split="train")[: args.problems]
    tool_problems = envs.load_dataset(args.dataset, split="train")[: args.problems]
    preload = os.environ.get("LD_PRELOAD", "")
    print(f"SmolLM2-135M-Instruct, HFEngine {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"allocator {'tcmalloc' if 'tcmalloc' in preload else 'glibc'}")  # fmt: skip
    if "single" not in args.skip:
        single_turn(engine, tok, problems, args.group_size, args.max_tokens, args.repeats)
    if "multi" not in args.skip:
        multi_turn(engine, tok, tool_problems, args.group_size, args.max_tokens, args.max_turns,
                   args.dataset)  # fmt: skip
    if "vllm" not in args.skip:
        vllm_vs_hf(engine, tok, problems * args.group_size, args.max_tokens)
    if "degenerate" not in args.skip:
        degenerate(engine, tok, tool_problems, args.group_size, args.max_tokens, args.max_turns,
                   args.dataset, args.repeats, args.legacy)  # fmt: skip


if __name__ == "__main__":
    main()
