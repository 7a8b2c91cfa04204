"""run_episodes on real environments: the six rollout invariants on three chat templates.

Fast tests use a tiny random model sized to each template's vocabulary (it never writes code,
so its episodes are single-turn); slow tests run the real SmolLM2 (bf16 engine) on the real
multi-turn PythonTool environment and sandbox, where it writes code, reads results and answers.
"""

from __future__ import annotations

import pytest
import torch

import envs
from alp_agents.models import make_tiny_model
from alp_agents.rollout import run_episodes
from alp_agents.rollout.chat import ChatDelta
from alp_agents.rollout.engines import HFEngine, SamplingParams

from .conftest import real_engine_for
from .rollout_helpers import (
    TEMPLATES,
    IgnoresStopCondition,
    RecordingEngine,
    check_token_in_token_out,
    fence_forever,
    force_next_tokens,
    scripted,
)

# bf16 engine vs one full bf16 forward (see test_engines.py). Multi-turn contexts are longer and
# temperature 0.7 scales logits by 1/0.7: measured mean 0.008 nats, one token at 0.53. On CPUs
# without native bf16 the engine is float32 (conftest.real_engine_for) and agrees far closer.
BF16_MEAN_TOL, BF16_MAX_TOL = 0.1, 1.0
ARITH = {"dataset": "arith", "split": "train"}


def problems(n):
    return envs.load_dataset("arith", split="train")[:n]


def tiny_engine(tok):
    return RecordingEngine(HFEngine(make_tiny_model(tokenizer=tok), tok, dtype=torch.float32))


def check_template_tokens(traj, tok):
    """Between turns, the mask-0 tokens are exactly the template's closing (after what was
    sampled) plus the observation delta of the env's messages, against a fixed base."""
    delta = ChatDelta(tok, traj.messages[: _initial_count(traj)])
    assert traj.prompt_ids == delta.prompt_ids
    messages = traj.messages[_initial_count(traj) :]
    for turn in range(traj.num_turns):
        start = traj.turn_start(turn)
        sampled = traj.sampled_ids(turn)
        end = traj.turn_start(turn + 1) if turn + 1 < traj.num_turns else len(traj.response_ids)
        tail = traj.response_ids[start + len(sampled) : end]
        assert all(m == 0 for m in traj.loss_mask[start + len(sampled) : end])
        assistant, messages = messages[0], messages[1:]
        assert assistant == {
            "role": "assistant",
            "content": tok.decode(sampled, skip_special_tokens=True),
        }
        closing = delta.closing_after(sampled)
        assert tail[: len(closing)] == closing
        if turn + 1 < traj.num_turns:
            observation = []
            while messages and messages[0]["role"] != "assistant":
                observation.append(messages.pop(0))
            assert tail[len(closing) :] == delta.observation_ids(observation)
        else:
            assert tail == closing  # the episode ended: nothing after the closing


def _initial_count(traj):
    return traj.metrics["initial_messages"]  # the env's initial chat (one-shot example included)


# ------------------------------------------------------------------------------ fast


@pytest.mark.parametrize("name", TEMPLATES)
def test_single_turn_token_in_token_out_and_truncation_is_graded(template_tokenizers, name):
    """Invariants 1-3 and 5 on a single-turn env: one generate call for all episodes, ids kept
    verbatim, template closing masked, and a response cut by max_tokens still reaches the
    grader (finish_reason "length", the env's verdict kept)."""
    tok = template_tokenizers[name]
    engine = tiny_engine(tok)
    stats = {}
    trajs = run_episodes(
        "alp/Math-v0", engine, tok, problems(2), group_size=3,
        sampling=SamplingParams(max_tokens=12), env_kwargs=ARITH, progress=False, seed=0,
        stats=stats,
    )  # fmt: skip
    assert len(trajs) == 6 and engine.rounds == stats["rounds"] == 1
    assert [t.group_id for t in trajs] == [0, 0, 0, 1, 1, 1]
    assert [t.problem_id for t in trajs] == [p.id for p in problems(2) for _ in range(3)]
    check_token_in_token_out(trajs, engine.calls)
    for traj in trajs:
        traj.validate()
        check_template_tokens(traj, tok)
        assert traj.num_turns == 1 and traj.num_generated_tokens == 12
        assert traj.finish_reason == "length" and traj.metrics["env_finish_reason"] == "answer"
        assert traj.grade_status == "wrong" and "grade_detail" in traj.metrics  # it was graded
    # Same seed, same trajectories; a different seed samples differently.
    again = run_episodes(
        "alp/Math-v0", tiny_engine(tok), tok, problems(2), group_size=3,
        sampling=SamplingParams(max_tokens=12), env_kwargs=ARITH, progress=False, seed=0,
    )  # fmt: skip
    assert [t.response_ids for t in again] == [t.response_ids for t in trajs]


@pytest.mark.parametrize("name", TEMPLATES)
def test_stop_string_ends_the_turn_on_token_ids(template_tokenizers, name):
    """Invariant 4 in the loop: with a stop string that ends inside a sampled token, the turn
    ends right after that token (kept whole), the env gets that text, and the template's full
    closing follows with mask 0 (the model did not sample the end-of-turn token)."""
    tok = template_tokenizers[name]
    kwargs = dict(env_kwargs=ARITH, progress=False, seed=3)
    [free] = run_episodes("alp/Math-v0", tiny_engine(tok), tok, problems(1), 1,
                          SamplingParams(max_tokens=30), **kwargs)  # fmt: skip
    sampled = free.sampled_ids(0)
    pieces = [tok.decode([t]) for t in sampled]
    k = next(i for i in range(4, len(pieces)) if len(pieces[i]) >= 2 and pieces[i - 1])
    stop = pieces[k - 1][-1:] + pieces[k][:-1]
    assert stop not in tok.decode(sampled[:k])
    engine = tiny_engine(tok)
    [cut] = run_episodes("alp/Math-v0", engine, tok, problems(1), 1,
                         SamplingParams(max_tokens=30, stop=[stop]), **kwargs)  # fmt: skip
    assert cut.sampled_ids(0) == sampled[: k + 1]
    assert cut.metrics["turns"][0]["finish"] == "stop"
    delta = ChatDelta(tok, cut.messages[:1])
    assert cut.response_ids[k + 1 :] == delta.closing_ids
    assert cut.messages[-1]["content"] == tok.decode(sampled[: k + 1], skip_special_tokens=True)
    check_token_in_token_out([cut], engine.calls)


@pytest.mark.parametrize("name", TEMPLATES)
def test_context_budget_is_counted_in_policy_tokens(template_tokenizers, name):
    """Invariant 5: the whole episode fits max_context_tokens; the cut is flagged "length"."""
    tok = template_tokenizers[name]
    engine = tiny_engine(tok)
    prompt_len = len(ChatDelta(tok, envs.make("alp/PythonTool-v0", **ARITH).reset(
        options={"problem_id": problems(1)[0].id})[1]["messages"]).prompt_ids)  # fmt: skip
    budget = prompt_len + 9
    trajs = run_episodes(
        "alp/PythonTool-v0", engine, tok, problems(1), group_size=2,
        sampling=SamplingParams(max_tokens=64), env_kwargs=ARITH, progress=False, seed=0,
        max_context_tokens=budget,
    )  # fmt: skip
    for traj in trajs:
        assert len(traj.input_ids) <= budget
        assert traj.finish_reason == "length" and traj.num_generated_tokens >= 1
        assert traj.messages[-1]["role"] == "assistant"  # the cut turn still went to the env
    check_token_in_token_out(trajs, engine.calls)
    # No room for even one sampled token: the episode ends before generating.
    [empty] = run_episodes(
        "alp/PythonTool-v0", tiny_engine(tok), tok, problems(1), group_size=1,
        sampling=SamplingParams(max_tokens=64), env_kwargs=ARITH, progress=False,
        max_context_tokens=prompt_len,
    )  # fmt: skip
    assert empty.response_ids == [] and empty.finish_reason == "length" and empty.num_turns == 0


def test_env_factory_and_problem_ids(template_tokenizers):
    tok = template_tokenizers["smollm2"]
    ids = [p.id for p in problems(2)]
    trajs = run_episodes(
        lambda **kw: envs.make("alp/Math-v0", **ARITH, **kw), tiny_engine(tok), tok, ids, 1,
        SamplingParams(max_tokens=4), progress=False, max_turns=1,
    )  # fmt: skip
    assert [t.problem_id for t in trajs] == ids
    with pytest.raises(ValueError, match="group_size"):
        run_episodes("alp/Math-v0", tiny_engine(tok), tok, ids, 0, SamplingParams())


# ------------------------------------------------------------------- degenerate turns (fast)


def fence_engine(tok):
    """A tiny model forced to write "```\\n```\\n```\\n..." (the issue's collapsed policy)."""
    engine = HFEngine(make_tiny_model(tokenizer=tok), tok, dtype=torch.float32)
    fence, newline = tok.encode("```\n", add_special_tokens=False)
    force_next_tokens(engine.model, fence_forever(fence, newline))
    return engine, [fence, newline]


def check_episodes(trajs, engine, tok):
    check_token_in_token_out(trajs, engine.calls)
    for traj in trajs:
        traj.validate()
        check_template_tokens(traj, tok)


@pytest.mark.parametrize("name", TEMPLATES)
def test_degenerate_turn_ends_in_one_round(template_tokenizers, name):
    """The issue's collapse: a policy repeating a bare fence ("```\\n" matches the PythonTool
    stop string but the turn has no python block). The engine samples through every fence in
    ONE generate call (the env's completion rule is its stop_condition), the turn ends at the
    token budget with finish "length" (the env's void verdict kept in metrics), and the
    trajectory is token-exact."""
    tok = template_tokenizers[name]
    hf, fence = fence_engine(tok)
    engine = RecordingEngine(hf)
    stats = {}
    trajs = run_episodes(
        "alp/PythonTool-v0", engine, tok, problems(2), group_size=2,
        sampling=SamplingParams(max_tokens=16), env_kwargs=ARITH, max_turns=2, progress=False,
        seed=0, stats=stats,
    )  # fmt: skip
    assert engine.rounds == stats["rounds"] == 1  # <= max_turns; before: 8 rounds
    assert hf.stats["generate_calls"] == 1
    assert stats["deferred_stops"] == 4 * 8 == hf.stats["deferred_stops"]
    assert stats["continuations"] == stats["capped_turns"] == 0
    for traj in trajs:
        assert traj.sampled_ids(0) == fence * 8 and traj.num_turns == 1
        assert traj.metrics["turns"] == [{"generated": 16, "segments": 1, "finish": "length"}]
        assert traj.metrics["deferred_stops"] == 8
        assert traj.finish_reason == "length" and traj.metrics["env_finish_reason"] == "void_turn"
        assert traj.num_void_turns == 0  # a turn cut by the budget is not a void turn
    check_episodes(trajs, engine, tok)


def test_engine_ignoring_stop_condition_is_bounded_by_max_rounds_per_turn(template_tokenizers):
    """The safety net: an engine that stops at every stop string (the old behaviour) gets at
    most max_rounds_per_turn generate calls per turn, counted in stats and metrics; uncapped
    it needs one round per fence (the collapse of the issue)."""
    tok = template_tokenizers["smollm2"]
    hf, fence = fence_engine(tok)
    kwargs = dict(env_kwargs=ARITH, max_turns=2, progress=False, seed=0)
    engine, stats = RecordingEngine(IgnoresStopCondition(hf)), {}
    trajs = run_episodes("alp/PythonTool-v0", engine, tok, problems(2), 2,
                         SamplingParams(max_tokens=16), max_rounds_per_turn=3, stats=stats,
                         **kwargs)  # fmt: skip
    assert engine.rounds == stats["rounds"] == 3
    assert stats["continuations"] == 4 * 2 and stats["capped_turns"] == 4
    assert stats["deferred_stops"] == 0
    for traj in trajs:
        assert traj.sampled_ids(0) == fence * 3
        assert traj.metrics["turns"] == [
            {"generated": 6, "segments": 3, "finish": "stop", "capped": True}
        ]
        assert traj.finish_reason == "void_turn" and traj.num_void_turns == 1
    check_episodes(trajs, engine, tok)
    engine, stats = RecordingEngine(IgnoresStopCondition(hf)), {}
    trajs = run_episodes("alp/PythonTool-v0", engine, tok, problems(1), 1,
                         SamplingParams(max_tokens=16), max_rounds_per_turn=100, stats=stats,
                         **kwargs)  # fmt: skip
    assert engine.rounds == stats["rounds"] == 8 and stats["capped_turns"] == 0
    assert trajs[0].sampled_ids(0) == fence * 8
    check_episodes(trajs, engine, tok)
    with pytest.raises(ValueError, match="max_rounds_per_turn"):
        run_episodes("alp/PythonTool-v0", hf, tok, problems(1), 1, SamplingParams(),
                     max_rounds_per_turn=0, **kwargs)  # fmt: skip
    with pytest.raises(ValueError, match="stop_condition"):
        run_episodes("alp/PythonTool-v0", hf, tok, problems(1), 1,
                     SamplingParams(stop_condition=bool), **kwargs)  # fmt: skip


def test_bare_fence_then_a_python_block_is_one_turn_in_one_round(template_tokenizers):
    """A turn that opens a bare fence and then writes a real python block: the engine passes
    the bare fence and stops at the block's closing fence (finish "stop") in one call, the env
    runs the code in the sandbox; an engine ignoring the predicate needs two rounds for the
    same turn and gives the very same tokens."""
    tok = template_tokenizers["smollm2"]
    prompt = ChatDelta(tok, envs.make("alp/PythonTool-v0", **ARITH).reset(
        options={"problem_id": problems(1)[0].id})[1]["messages"]).prompt_ids  # fmt: skip
    turn = tok.encode("```\n```python\nprint(1)\n```\n", add_special_tokens=False)
    hf = HFEngine(make_tiny_model(tokenizer=tok), tok, dtype=torch.float32)
    force_next_tokens(hf.model, scripted(turn + [turn[0]] * 8, start=len(prompt)))
    runs = {}
    for label, engine in (("one call", hf), ("fallback", IgnoresStopCondition(hf))):
        recording, stats = RecordingEngine(engine), {}
        trajs = run_episodes(
            "alp/PythonTool-v0", recording, tok, problems(1), group_size=2,
            sampling=SamplingParams(max_tokens=32), env_kwargs=ARITH, max_turns=1,
            progress=False, seed=0, stats=stats,
        )  # fmt: skip
        check_episodes(trajs, recording, tok)
        runs[label] = (trajs, stats)
    trajs, stats = runs["one call"]
    assert stats["rounds"] == 1 and stats["deferred_stops"] == 2 and stats["continuations"] == 0
    for traj in trajs:
        assert traj.sampled_ids(0) == turn
        assert traj.metrics["turns"][0]["segments"] == 1
        assert traj.metrics["turns"][0]["finish"] == "stop"
        assert traj.num_tool_calls == 1 and traj.finish_reason == "max_turns"
    fallback, stats = runs["fallback"]
    assert stats["rounds"] == 2 and stats["continuations"] == 2
    for a, b in zip(trajs, fallback, strict=True):
        assert b.metrics["turns"][0]["segments"] == 2
        assert (a.response_ids, a.loss_mask, a.messages) == (
            b.response_ids,
            b.loss_mask,
            b.messages,
        )
        assert a.infer_logprobs == pytest.approx(b.infer_logprobs, abs=1e-4)


# ------------------------------------------------------------------------------ slow: SmolLM2


_RUNS: dict[str, tuple] = {}


@pytest.fixture
def multi_turn_run(template_tokenizers, smollm2_bf16):
    """One real multi-turn PythonTool run per template (SmolLM2, bf16 engine, real sandbox),
    made on first use and shared by the tests of that template."""

    def get(name):
        if name not in _RUNS:
            tok = template_tokenizers[name]
            engine = RecordingEngine(real_engine_for(smollm2_bf16, tok))
            stats = {}
            trajs = run_episodes(
                "alp/PythonTool-v0", engine, tok, problems(1), group_size=3,
                sampling=SamplingParams(max_tokens=64, temperature=0.7), env_kwargs=ARITH,
                max_turns=2, max_observation_tokens=12, progress=False, seed=0, stats=stats,
            )  # fmt: skip
            _RUNS[name] = (tok, engine, trajs, stats)
        return _RUNS[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", TEMPLATES)
def test_multi_turn_invariants_with_the_real_model(multi_turn_run, name):
    """Invariants 1-5 on real multi-turn episodes (code, sandbox output, answers)."""
    tok, engine, trajs, stats = multi_turn_run(name)
    if name != "llama3":  # the 135M model follows the unfamiliar Llama-3 format only sometimes
        assert max(t.num_turns for t in trajs) >= 2, "expected the model to use the tool"
    # One generate call per round for all live episodes.
    assert engine.rounds == stats["rounds"] >= max(t.num_turns for t in trajs)
    assert len(engine.calls) == sum(len(t.metrics["turns"]) for t in trajs) + sum(
        turn["segments"] - 1 for t in trajs for turn in t.metrics["turns"]
    )
    # 1 + 2: ids verbatim, mask 1 exactly on sampled ids, template tokens exactly the deltas.
    check_token_in_token_out(trajs, engine.calls)
    for traj in trajs:
        traj.validate()
        check_template_tokens(traj, tok)
        assert traj.num_tool_calls >= traj.num_turns - 1
        if traj.finish_reason == "void_turn":
            assert traj.is_void and traj.num_void_turns == 1
    # 3: log-probs equal a teacher-forced forward of the engine's own weights (bf16 or float32).
    model = engine.engine.model
    diffs = []
    for traj in trajs:
        with torch.no_grad():
            logits = model(torch.tensor([traj.input_ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits / 0.7, dim=-1)
        target = torch.tensor(traj.input_ids[1:])
        token_lp = logp.gather(-1, target[:, None]).squeeze(-1)[len(traj.prompt_ids) - 1 :]
        mask = torch.tensor(traj.loss_mask, dtype=torch.bool)
        diffs.append((token_lp[mask] - torch.tensor(traj.infer_logprobs)[mask]).abs())
    diff = torch.cat(diffs)
    assert diff.mean() <= BF16_MEAN_TOL and diff.max() <= BF16_MAX_TOL, (diff.mean(), diff.max())
    # 4: no turn runs past the end of its first complete code block.
    for traj in trajs:
        for turn in range(traj.num_turns):
            sampled = traj.sampled_ids(turn)
            assert "```\n" not in tok.decode(sampled[:-1])
            if traj.metrics["turns"][turn]["finish"] == "stop":
                assert "```\n" in tok.decode(sampled)
    # 5: observations fit their budget in policy tokens.
    for traj in trajs:
        for m in traj.messages[_initial_count(traj) :]:
            if m["role"] != "assistant":
                assert len(tok.encode(m["content"], add_special_tokens=False)) <= 12 + 2


# Greedy decoding under the Llama-3-style template: the 135M model writes no code block for
# this prompt, so that case could only skip (it did on every run); the invariant needs code.
CODE_WRITING_TEMPLATES = tuple(name for name in TEMPLATES if name != "llama3")


@pytest.mark.slow
@pytest.mark.parametrize("name", CODE_WRITING_TEMPLATES)
def test_sandbox_failure_is_flagged_not_scored(template_tokenizers, smollm2_bf16, name):
    """Invariant 6: the sandbox is gone (closed) when the model's code must run: the episode is
    a sandbox_error with an unverifiable grade, flagged for the learner to exclude."""
    from sandbox import LocalSandbox

    tok = template_tokenizers[name]
    dead = LocalSandbox(workers=1)
    dead.close()
    trajs = run_episodes(
        "alp/PythonTool-v0", real_engine_for(smollm2_bf16, tok), tok, problems(1), group_size=2,
        sampling=SamplingParams(max_tokens=48, temperature=0.0),
        env_kwargs={**ARITH, "sandbox": dead, "stateful": False}, max_turns=1, progress=False,
    )  # fmt: skip
    wrote_code = [t for t in trajs if "```python" in t.messages[-1]["content"]]
    assert wrote_code, "expected the model to write code on the one-shot prompt"
    for traj in wrote_code:
        traj.validate()
        assert traj.finish_reason == "sandbox_error" and traj.grade_status == "unverifiable"
        assert traj.is_infra_failure and "closed" in traj.metrics["error"]
        assert traj.reward == 0.0
