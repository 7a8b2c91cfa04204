"""HFEngine (real transformers models) and VLLMEngine's pure parts (the real vLLM engine is
tested in test_vllm_engine.py, `make test-vllm`)."""

from __future__ import annotations

import pytest
import torch

import envs
from alp_agents.models import make_tiny_model
from alp_agents.rollout.engines import (
    HFEngine,
    InferenceEngine,
    Sample,
    SamplingParams,
    VLLMEngine,
    stop_cut,
    vllm_unavailable_reason,
)
from alp_agents.rollout.engines.base import completed_stop, conditional_stop_cut
from alp_agents.rollout.engines.vllm import generate_in_two_passes, join_continuation, request_seed

from .rollout_helpers import fence_forever, force_next_tokens, scripted

PROMPTS_TEXT = [
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a long story about a cat and a dog.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


def prompts(tok):
    return [tok.encode(t, add_special_tokens=False) for t in PROMPTS_TEXT]


def teacher_forced_logprobs(model, prompt, sample, temperature=1.0):
    """log_softmax(logits / T) of the sampled ids from ONE full forward (no cache, no padding)."""
    ids = torch.tensor([prompt + sample.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1)


def test_protocol_and_sampling_params_validation(tokenizer):
    engine = HFEngine(make_tiny_model(), tokenizer, dtype=torch.float32)
    assert isinstance(engine, InferenceEngine)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(TypeError, match="list of strings"):
        SamplingParams(stop="```")
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(TypeError, match="stop_condition"):
        SamplingParams(stop_condition="```")
    with_condition = SamplingParams(stop=["x"], stop_condition=bool)
    assert with_condition.replace(max_tokens=3).stop_condition is bool
    with pytest.raises(ValueError, match="only max_tokens, stop, stop_token_ids and stop_cond"):
        engine.generate(prompts(tokenizer)[:2], [SamplingParams(), SamplingParams(temperature=0.5)])
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        engine.generate(prompts(tokenizer), [SamplingParams()] * 2)
    assert engine.generate([], SamplingParams()) == []


@pytest.mark.parametrize(
    ("dtype", "temperature", "tolerance"),
    # Stated tolerances (max |diff| over every sampled token, same weights and dtype): float32
    # agrees to rounding; bfloat16 differs between the cached batched decode and one full
    # forward by kernel/accumulation order only.
    [(torch.float32, 1.0, 1e-4), (torch.float32, 0.7, 1e-4), (torch.bfloat16, 1.0, 0.05)],
)
def test_logprobs_match_a_teacher_forced_forward(tokenizer, dtype, temperature, tolerance):
    engine = HFEngine(make_tiny_model(num_layers=3), tokenizer, dtype=dtype)
    assert next(engine.model.parameters()).dtype == dtype
    ps = prompts(tokenizer)
    samples = engine.generate(ps, SamplingParams(max_tokens=24, temperature=temperature, seed=1))
    for prompt, sample in zip(ps, samples, strict=True):
        assert isinstance(sample, Sample) and len(sample.token_ids) == len(sample.logprobs) == 24
        assert sample.finish_reason == "length"
        reference = teacher_forced_logprobs(engine.model, prompt, sample, temperature)
        diff = (reference - torch.tensor(sample.logprobs)).abs().max().item()
        assert diff <= tolerance, f"{dtype} T={temperature}: max |diff| {diff:.2e} > {tolerance}"


def test_top_p_top_k_shape_sampling_but_not_the_reported_logprob(tokenizer):
    engine = HFEngine(make_tiny_model(), tokenizer, dtype=torch.float32)
    ps = prompts(tokenizer)
    samples = engine.generate(ps, SamplingParams(max_tokens=16, top_k=3, top_p=0.9, seed=0))
    for prompt, sample in zip(ps, samples, strict=True):
        full = teacher_forced_logprobs(engine.model, prompt, sample)
        assert torch.allclose(full, torch.tensor(sample.logprobs), atol=1e-4)
        ids = torch.tensor([prompt + sample.token_ids])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(prompt) - 1 : -1]
        top3 = logits.topk(3, dim=-1).indices
        assert all(tok in row for tok, row in zip(sample.token_ids, top3.tolist(), strict=True))


def test_batched_left_padded_decode_equals_one_prompt_at_a_time(tokenizer):
    """Greedy: padding, row dropping and KV-cache compaction do not change any row."""
    engine = HFEngine(make_tiny_model(num_layers=3), tokenizer, dtype=torch.float32)
    ps = prompts(tokenizer)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    per_row = [SamplingParams(temperature=0.0, max_tokens=m) for m in (3, 12, 7)]
    batched = engine.generate(ps, per_row)
    assert [len(s.token_ids) for s in batched] == [3, 12, 7]  # rows finished at different steps
    for prompt, sample in zip(ps, batched, strict=True):
        [alone] = engine.generate([prompt], greedy)
        n = len(sample.token_ids)
        assert sample.token_ids == alone.token_ids[:n]
        assert sample.logprobs == pytest.approx(alone.logprobs[:n], abs=1e-4)
    small = HFEngine(
        make_tiny_model(num_layers=3), tokenizer, dtype=torch.float32, max_batch_size=1
    )
    assert [s.token_ids for s in small.generate(ps, per_row)] == [s.token_ids for s in batched]


def test_seeded_sampling_is_reproducible(tokenizer):
    engine = HFEngine(make_tiny_model(), tokenizer, dtype=torch.float32)
    ps = prompts(tokenizer)
    a = engine.generate(ps, SamplingParams(max_tokens=10, seed=123))
    b = engine.generate(ps, SamplingParams(max_tokens=10, seed=123))
    c = engine.generate(ps, SamplingParams(max_tokens=10, seed=124))
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_stop_string_inside_a_token_is_cut_on_token_ids(tokenizer):
    """Invariant 4 at the engine: pick a stop string that ends INSIDE a sampled token (it spans
    a token boundary and stops short of the token's last character); re-sampling with the same
    seed stops right after that token, keeping it whole, with the text never re-tokenised."""
    engine = HFEngine(make_tiny_model(), tokenizer, dtype=torch.float32)
    ps = prompts(tokenizer)[:1]
    params = SamplingParams(max_tokens=40, seed=7)
    [free] = engine.generate(ps, params)
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    k = next(i for i in range(5, len(pieces)) if len(pieces[i]) >= 2 and len(pieces[i - 1]) >= 1)
    text_before = tokenizer.decode(free.token_ids[:k])
    stop = pieces[k - 1][-1:] + pieces[k][:-1]  # ends one character before token k ends
    assert stop not in text_before, "pick another seed: the stop string occurs earlier"
    [cut] = engine.generate(ps, params.replace(stop=[stop]))
    assert cut.finish_reason == "stop" and cut.stop_string == stop
    assert cut.token_ids == free.token_ids[: k + 1]  # the completing token is kept whole
    assert cut.logprobs == free.logprobs[: k + 1]
    assert tokenizer.decode(cut.token_ids).endswith(pieces[k])  # overshoots the stop string
    assert stop_cut(free.token_ids, tokenizer.decode, [stop]) == (k + 1, stop)


def test_stop_cut_finds_the_first_of_several_stops(tokenizer):
    ids = tokenizer.encode(
        "Let me compute.\n```python\nprint(6*7)\n```\nDone ```\n", add_special_tokens=False
    )
    n, stop = stop_cut(ids, tokenizer.decode, ["Done", "```\n"])
    assert stop == "```\n"
    assert tokenizer.decode(ids[:n]).endswith("print(6*7)\n```\n")
    assert stop_cut(ids, tokenizer.decode, ["never"]) == (len(ids), None)
    assert stop_cut(ids, tokenizer.decode, []) == (len(ids), None)


def test_eos_and_extra_stop_token_ids_end_a_sample(tokenizer):
    engine = HFEngine(make_tiny_model(), tokenizer, dtype=torch.float32)
    ps = prompts(tokenizer)
    [free] = engine.generate(ps[:1], SamplingParams(max_tokens=20, seed=3))
    target = free.token_ids[4]
    first = free.token_ids.index(target)
    [cut] = engine.generate(ps[:1], SamplingParams(max_tokens=20, seed=3, stop_token_ids=[target]))
    assert cut.finish_reason == "eos" and cut.token_ids == free.token_ids[: first + 1]
    assert tokenizer.eos_token_id in engine.eos_token_ids


def test_own_copy_in_its_dtype_and_update_weights(tokenizer):
    from alp_agents.learner.perturb import LayerwisePerturbation

    trainer = make_tiny_model(seed=0)
    perturbation = LayerwisePerturbation(trainer)  # sigma parameters + hooks on the trainer
    assert trainer.model.layers[0]._forward_pre_hooks
    engine = HFEngine(trainer, tokenizer)  # bf16 by default
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert engine.model is not trainer
    assert not engine.model.model.layers[0]._forward_pre_hooks  # no perturbation in the engine
    assert not any("sigma" in name for name, _ in engine.model.named_parameters())
    emb = engine.model.get_input_embeddings().weight
    with torch.no_grad():  # the engine's copy is independent of the trainer's weights
        trainer.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(emb, trainer.get_input_embeddings().weight.to(torch.bfloat16))
    engine.update_weights(trainer)
    assert torch.equal(emb, trainer.get_input_embeddings().weight.to(torch.bfloat16))
    assert not engine.model.model.layers[0]._forward_pre_hooks
    assert len(list(perturbation.parameters())) > 0
    wrapped = {f"module.{k}": v for k, v in make_tiny_model(seed=5).state_dict().items()}
    engine.update_weights(wrapped)  # DDP-style prefixes are stripped
    with pytest.raises(KeyError, match="missing from the source state dict"):
        engine.update_weights({"lm_head.weight": emb})
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights(make_tiny_model(hidden_size=32).state_dict())


# bf16 SmolLM2 (30 layers): the cached decode and one full forward differ by accumulation order
# alone (measured: mean |diff| ~0.04 nats, max ~0.2 over 56 tokens, with or without padding);
# float32 agrees to 2e-5. This gap is the real train/inference mismatch the learner corrects.
BF16_MEAN_TOL, BF16_MAX_TOL = 0.1, 0.5


@pytest.mark.slow
def test_real_model_bf16_logprobs_match_teacher_forced(tokenizer, default_model):
    engine = HFEngine(default_model, tokenizer)
    ps = prompts(tokenizer)
    samples = engine.generate(ps, SamplingParams(max_tokens=24, seed=0))
    diffs = torch.cat(
        [
            (teacher_forced_logprobs(engine.model, p, s) - torch.tensor(s.logprobs)).abs()
            for p, s in zip(ps, samples, strict=True)
        ]
    )
    assert diffs.mean().item() <= BF16_MEAN_TOL and diffs.max().item() <= BF16_MAX_TOL, (
        f"bf16 SmolLM2: mean |diff| {diffs.mean():.3f}, max {diffs.max():.3f}"
    )
    # The instruct model ends its turns (greedy: a T=1 sample of 24 tokens often rambles on).
    [greedy] = engine.generate(ps[:1], SamplingParams(max_tokens=24, temperature=0.0))
    assert greedy.finish_reason == "eos", tokenizer.decode(greedy.token_ids)


def test_vllm_engine_says_why_it_cannot_run():
    reason = vllm_unavailable_reason()
    if reason is None:
        pytest.skip("vllm is installed; the real engine is tested in test_vllm_engine.py")
    with pytest.raises(RuntimeError, match="vllm is not importable"):
        VLLMEngine("smollm2-135m-instruct")


def test_sample_from_draws_the_given_distribution():
    from alp_agents.rollout.engines.hf import sample_from

    probs = torch.tensor([0.1, 0.2, 0.0, 0.7, 0.0]).expand(40_000, -1)
    g = torch.Generator().manual_seed(0)
    tokens = sample_from(probs * 3.0, g)  # unnormalised weights are fine
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert torch.allclose(freq, probs[0], atol=0.01)  # ~5 standard errors
    assert freq[2] == 0 and freq[4] == 0  # zero-weight tokens are never drawn
    again = sample_from(probs * 3.0, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    one_hot = torch.zeros(3, 49152)
    one_hot[torch.arange(3), torch.tensor([0, 7, 49151])] = 1.0
    assert sample_from(one_hot).tolist() == [0, 7, 49151]


def test_identical_prompts_are_prefilled_once_and_sampled_independently(tokenizer):
    """A GRPO group (the same prompt n times) runs one prefill row; every copy is its own
    sample and its log-probs still match a teacher-forced forward."""
    engine = HFEngine(make_tiny_model(num_layers=3), tokenizer, dtype=torch.float32)
    a, b = prompts(tokenizer)[:2]
    batch = [a, b, a, a, b]
    before = engine.stats["forward_rows"]
    samples = engine.generate(batch, SamplingParams(max_tokens=12, seed=3))
    first_forward_rows = engine.stats["forward_rows"] - before - 5 * 11  # 11 decode steps
    assert first_forward_rows == 2  # the prefill ran the 2 distinct prompts only
    assert len({tuple(samples[i].token_ids) for i in (0, 2, 3)}) == 3  # independent draws
    for prompt, sample in zip(batch, samples, strict=True):
        reference = teacher_forced_logprobs(engine.model, prompt, sample)
        assert torch.allclose(reference, torch.tensor(sample.logprobs), atol=1e-4)


def test_round_weights_to_stores_bf16_values_and_computes_in_float32(tokenizer):
    """The weight-precision part of a bf16 engine at fp32 speed (AVX2 CPUs): every weight is
    its bf16 rounding, kept in float32, also after update_weights; log-probs move accordingly."""
    model = make_tiny_model("llama", tokenizer=tokenizer, hidden_size=64, num_layers=2, seed=1)
    exact = HFEngine(model, tokenizer, dtype=torch.float32)
    rounded = HFEngine(model, tokenizer, dtype=torch.float32, round_weights_to="bfloat16")
    for key, w in rounded.model.state_dict().items():
        assert w.dtype == torch.float32, key
        torch.testing.assert_close(
            w, model.state_dict()[key].to(torch.bfloat16).float(), rtol=0, atol=0
        )
    assert any(
        not torch.equal(w, exact.model.state_dict()[k])
        for k, w in rounded.model.state_dict().items()
    )
    with torch.no_grad():
        next(model.parameters()).add_(0.001)
    rounded.update_weights(model)
    key, first = next(iter(model.state_dict().items()))
    assert torch.equal(rounded.model.state_dict()[key], first.to(torch.bfloat16).float())
    prompt = [1, 5, 9, 11]
    params = SamplingParams(max_tokens=6, seed=0, temperature=0)
    a, b = exact.generate([prompt], params)[0], rounded.generate([prompt], params)[0]
    n = min(len(a.token_ids), len(b.token_ids))
    assert n and a.logprobs[:n] != b.logprobs[:n]


# ------------------------------------------------------------------ conditional stop strings


def python_tool_rule(tokenizer):
    """The real PythonTool env's completion rule on token ids (what run_episodes passes)."""
    env = envs.make("alp/PythonTool-v0", dataset="arith", split="train")
    return lambda ids: env.response_is_complete(tokenizer.decode(ids, skip_special_tokens=True))


def test_stop_condition_samples_through_rejected_stops_in_the_same_call(tokenizer):
    """A stop string the predicate rejects does not end the row: it goes on in the SAME call
    (one prefill, one decode step per token: the KV cache is reused) and the sample is exactly
    the unconditioned sample's prefix up to the first accepted stop, token ids and log-probs."""
    engine = HFEngine(make_tiny_model(), tokenizer, dtype=torch.float32)
    ps = prompts(tokenizer)[:1]
    params = SamplingParams(max_tokens=40, seed=11)
    [free] = engine.generate(ps, params)
    assert free.finish_reason == "length"
    texts = [tokenizer.decode(free.token_ids[:n]) for n in range(len(free.token_ids) + 1)]
    # A character that three different tokens complete: the third occurrence is accepted.
    char, grows = next(
        (c, [n for n in range(1, 41) if texts[n].count(c) > texts[n - 1].count(c)])
        for c in " etaoinsrl"
        if sum(texts[n].count(c) > texts[n - 1].count(c) for n in range(1, 41)) >= 3
    )
    end = next(n for n in grows if texts[n].count(char) >= 3)
    seen = []

    def third(ids):
        seen.append(len(ids))
        return tokenizer.decode(ids).count(char) >= 3

    before = dict(engine.stats)
    [cut] = engine.generate(ps, params.replace(stop=[char], stop_condition=third))
    assert cut.finish_reason == "stop" and cut.stop_string == char
    assert cut.token_ids == free.token_ids[:end] and cut.logprobs == free.logprobs[:end]
    assert seen == [n for n in grows if n <= end]  # called once per completed stop, no more
    assert engine.stats["deferred_stops"] - before["deferred_stops"] == len(seen) - 1
    assert engine.stats["generate_calls"] - before["generate_calls"] == 1
    assert engine.stats["forward_rows"] - before["forward_rows"] == end  # 1 prefill + end-1 steps
    # The replay used by VLLMEngine finds the same cut on the finished ids.
    assert conditional_stop_cut(free.token_ids, tokenizer.decode, [char], third) == (end, char)
    # A predicate that never accepts: the row runs to max_tokens like the free sample.
    [never] = engine.generate(ps, params.replace(stop=[char], stop_condition=lambda ids: False))
    assert never.finish_reason == "length" and never.stop_string is None
    assert never.token_ids == free.token_ids and never.logprobs == free.logprobs


def test_degenerate_bare_fences_end_at_the_length_limit_in_one_call(tokenizer):
    """The issue's collapsed policy ("```\\n" repeated) under the PythonTool completion rule:
    one call, every fence deferred, finish "length" with the whole budget; the same call's
    row WITHOUT the predicate (per-prompt params) still stops at its first fence."""
    engine = HFEngine(make_tiny_model(), tokenizer, dtype=torch.float32)
    fence, newline = tokenizer.encode("```\n", add_special_tokens=False)
    force_next_tokens(engine.model, fence_forever(fence, newline))
    plain = SamplingParams(max_tokens=20, stop=["```\n"], seed=0)
    conditional = plain.replace(stop_condition=python_tool_rule(tokenizer))
    ps = prompts(tokenizer)[:2]
    before = dict(engine.stats)
    first, degenerate = engine.generate(ps, [plain, conditional])
    assert first.token_ids == [fence, newline] and first.finish_reason == "stop"
    assert first.stop_string == "```\n"
    assert degenerate.token_ids == [fence, newline] * 10
    assert degenerate.finish_reason == "length" and degenerate.stop_string is None
    assert all(-1e-3 < lp <= 0.0 for lp in degenerate.logprobs)  # forced, still real log-probs
    assert engine.stats["deferred_stops"] - before["deferred_stops"] == 10
    assert engine.stats["generate_calls"] - before["generate_calls"] == 1


def test_completed_stop_ignores_a_deferred_occurrence_still_in_the_window(tokenizer):
    ids = tokenizer.encode("```\n```\n", add_special_tokens=False)  # ``` \n ``` \n
    assert len(ids) == 4
    decode = tokenizer.decode
    assert completed_stop(ids[:2], decode, ["```\n"]) == "```\n"
    assert completed_stop(ids[:3], decode, ["```\n"]) is None  # only the old fence
    assert completed_stop(ids[:4], decode, ["```\n"]) == "```\n"  # a new one
    assert completed_stop(ids[:1], decode, ["```\n"]) is None
    # Two stops completed by the same token: the one whose new occurrence starts first.
    assert completed_stop(ids[:2], decode, ["\n", "```\n"]) == "```\n"


def test_join_continuation_cuts_where_the_predicate_accepts(tokenizer):
    """VLLMEngine's second pass: the joined ids are cut after the first accepted stop."""
    rule = python_tool_rule(tokenizer)
    ids = tokenizer.encode("```\n```python\nprint(1)\n```\nmore ```\n", add_special_tokens=False)
    close = len(tokenizer.encode("```\n```python\nprint(1)\n```\n", add_special_tokens=False))
    lps = [-0.01 * (k + 1) for k in range(len(ids))]
    params = SamplingParams(max_tokens=64, stop=["```\n"], stop_condition=rule)
    head = Sample(ids[:2], lps[:2], "stop", "```\n")
    tail = Sample(ids[2:], lps[2:], "length")
    joined = join_continuation(head, tail, params, tokenizer.decode)
    assert joined == Sample(ids[:close], lps[:close], "stop", "```\n")
    bare = tokenizer.encode("```\nx = 1\n```\n", add_special_tokens=False)  # no python block
    tail = Sample(bare[2:] + [2], [-0.5] * (len(bare) - 1), "eos")
    joined = join_continuation(Sample(bare[:2], [-0.1, -0.2], "stop", "```\n"), tail, params,
                               tokenizer.decode)  # fmt: skip
    assert joined.finish_reason == "eos" and joined.token_ids == bare + [2]
    assert request_seed(None, 0) is None
    assert len({request_seed(5, i, p) for i in range(4) for p in (0, 1)}) == 8


def test_two_pass_generation_equals_one_conditional_call(tokenizer):
    """`generate_in_two_passes` (VLLMEngine's algorithm) driven by a plain-stop engine gives
    the same token ids as HFEngine's one conditional call: a scripted policy writes a bare
    fence, then a python block, then goes on; a fence-forever policy never completes."""
    engine = HFEngine(make_tiny_model(), tokenizer, dtype=torch.float32)
    [prompt] = prompts(tokenizer)[:1]
    turn = tokenizer.encode("```\n```python\nprint(1)\n```\n", add_special_tokens=False)
    script = turn + tokenizer.encode("and more text here", add_special_tokens=False)
    hook = force_next_tokens(engine.model, scripted(script, start=len(prompt)))
    plain = SamplingParams(max_tokens=24, stop=["```\n"], seed=0)
    params = [plain, plain.replace(stop_condition=python_tool_rule(tokenizer))]

    def run(prompts_, params_, indices, pass_):  # an engine without stop_condition
        return engine.generate(prompts_, [p.replace(stop_condition=None) for p in params_])

    one_call = engine.generate([prompt, prompt], params)
    stats = {}
    two_pass = generate_in_two_passes(run, [prompt, prompt], params, tokenizer.decode, stats)
    assert one_call[0].token_ids == two_pass[0].token_ids == turn[:2]
    assert one_call[1].token_ids == two_pass[1].token_ids == turn
    assert one_call[1].finish_reason == two_pass[1].finish_reason == "stop"
    assert two_pass[1].logprobs == pytest.approx(one_call[1].logprobs, abs=1e-4)
    assert stats == {"deferred_stops": 1, "continued_rows": 1}
    hook.remove()
    fence, newline = turn[:2]
    force_next_tokens(engine.model, fence_forever(fence, newline))
    [never] = generate_in_two_passes(run, [prompt], params[1:], tokenizer.decode)
    assert never.token_ids == [fence, newline] * 12 and never.finish_reason == "length"
