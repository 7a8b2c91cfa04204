"""HFEngine (real transformers models) and VLLMEngine (skipped without vllm)."""

from __future__ import annotations

import pytest
import torch

from alp_agents.engines import (
    HFEngine,
    InferenceEngine,
    Sample,
    SamplingParams,
    VLLMEngine,
    stop_cut,
    vllm_unavailable_reason,
)
from alp_agents.models import make_tiny_model

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
    with pytest.raises(ValueError, match="only max_tokens, stop and stop_token_ids"):
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
    from alp_agents.perturb import LayerwisePerturbation

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


@pytest.mark.skipif(vllm_unavailable_reason() is not None, reason=str(vllm_unavailable_reason()))
def test_vllm_engine_logprobs_stop_and_weight_update(tokenizer, default_model_path, default_model):
    engine = VLLMEngine(default_model_path, tokenizer, enforce_eager=True, max_model_len=1024)
    ps = prompts(tokenizer)
    samples = engine.generate(ps, SamplingParams(max_tokens=24, seed=0))
    for prompt, sample in zip(ps, samples, strict=True):
        reference = teacher_forced_logprobs(default_model.to(torch.bfloat16), prompt, sample)
        assert (reference - torch.tensor(sample.logprobs)).abs().max().item() <= 0.1
    [stopped] = engine.generate(ps[1:2], SamplingParams(max_tokens=64, seed=0, stop=[" the"]))
    assert stopped.finish_reason in ("stop", "length", "eos")
    zeroed = {k: torch.zeros_like(v) for k, v in default_model.state_dict().items()}
    engine.update_weights(zeroed)
    [after] = engine.generate(ps[:1], SamplingParams(max_tokens=4, seed=0))
    assert after.logprobs != samples[0].logprobs[:4]


def test_vllm_engine_says_why_it_cannot_run():
    reason = vllm_unavailable_reason()
    if reason is None:
        pytest.skip("vllm is installed; the real engine is tested above")
    with pytest.raises(RuntimeError, match="vllm is not importable"):
        VLLMEngine("smollm2-135m-instruct")


def test_sample_from_draws_the_given_distribution():
    from alp_agents.engines.hf import sample_from

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
