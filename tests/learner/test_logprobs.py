"""token_logprobs: the shared log-prob convention, chunking, entropy, gradients."""

from __future__ import annotations

import pytest
import torch

from alp_agents.learner.logprobs import logprobs_from_logits, plan_shared_prefixes, token_logprobs
from alp_agents.learner.perturb import LayerwisePerturbation
from alp_agents.models import TINY_ARCHS, make_tiny_model


def reference(model, ids, mask, temperature):
    logp = torch.log_softmax(model(ids, attention_mask=mask).logits.float() / temperature, -1)
    lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)[:, :-1]
    zero = torch.zeros(ids.shape[0], 1)
    return torch.cat([zero, lp], 1), torch.cat([zero, ent], 1)


@pytest.mark.parametrize("chunk_size", [1, 5, 256])
def test_matches_full_log_softmax_and_gradients(chunk_size):
    model = make_tiny_model("qwen2", num_layers=2, vocab_size=300)
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    lp, ent = token_logprobs(
        model, ids, mask, temperature=0.7, return_entropy=True, chunk_size=chunk_size
    )
    ref_lp, ref_ent = reference(model, ids, mask, 0.7)
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.all(lp[:, 0] == 0) and torch.all(ent[:, 0] == 0)
    (lp.sum() + 0.1 * ent.sum()).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (ref_lp.sum() + 0.1 * ref_ent.sum()).backward()
    for a, p in zip(got, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_no_grad_and_bf16_autocast():
    model = make_tiny_model("llama", num_layers=2, vocab_size=300)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = token_logprobs(model, ids)
    assert not lp.requires_grad and torch.all(lp[:, 1:] < 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp16 = token_logprobs(model, ids)
    assert lp16.dtype == torch.float32
    assert torch.allclose(lp16, lp, atol=0.1)  # bf16 matmuls, float32 softmax


def test_probabilities_sum_to_one_over_vocab():
    """Column j is log p(x_j | x_<j): summing exp over every possible x_j gives 1."""
    logits = torch.randn(1, 2, 7, generator=torch.Generator().manual_seed(2))
    total = sum(
        logprobs_from_logits(logits, torch.tensor([[0, v]]), temperature=1.3)[0, 1].exp()
        for v in range(7)
    )
    assert float(total) == pytest.approx(1.0, abs=1e-6)


def test_bad_input():
    logits = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="do not match"):
        logprobs_from_logits(logits, torch.zeros(1, 4, dtype=torch.long))
    model = make_tiny_model("llama", num_layers=1, vocab_size=300)
    with pytest.raises(ValueError, match="attention_mask"):
        token_logprobs(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4))


# ------------------------------------------------------------------ shared prompt prefixes
def group_batch(generator, vocab=300, prompt_lens=(7, 5), group=3):
    """Right-padded rows: ``group`` sampled continuations of each prompt."""
    rows, starts = [], []
    for n in prompt_lens:
        prompt = torch.randint(3, vocab, (n,), generator=generator)
        for _ in range(group):
            k = int(torch.randint(2, 9, (1,), generator=generator))
            rows.append(torch.cat([prompt, torch.randint(3, vocab, (k,), generator=generator)]))
            starts.append(n)
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask, torch.tensor(starts)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shared_prefixes_match_the_full_forward(arch, attn):
    """Same log-probs, entropies and parameter gradients on every scored column, 0 elsewhere."""
    model = make_tiny_model(arch, num_layers=2, vocab_size=300)
    model.set_attn_implementation(attn)
    ids, mask, start = group_batch(torch.Generator().manual_seed(3))
    plan = plan_shared_prefixes(ids, mask, start)
    assert plan is not None and plan.input_ids.shape[0] == 2  # two prompts, six rows
    assert plan.positions < 0.9 * ids.numel()
    scored = (torch.arange(ids.shape[1]) >= start[:, None]) & (mask > 0)

    def run(**kw):
        model.zero_grad()
        lp, ent = token_logprobs(model, ids, mask, 0.7, return_entropy=True, **kw)
        (lp[scored].sum() + 0.1 * ent[scored].sum()).backward()
        return lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    full_lp, full_ent, full_grads = run()
    for kw in ({"score_from": start}, {"score_from": start, "share_prefixes": False}):
        lp, ent, grads = run(**kw)
        assert torch.allclose(lp[scored], full_lp[scored], atol=1e-5)
        assert torch.allclose(ent[scored], full_ent[scored], atol=1e-5)
        before = torch.arange(ids.shape[1]) < start[:, None]  # padding stays meaningless
        assert torch.all(lp[before] == 0) and torch.all(ent[before] == 0)
        for a, b in zip(grads, full_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-4)


def test_plan_declines_when_nothing_is_shared():
    g = torch.Generator().manual_seed(4)
    ids, mask, start = group_batch(g, prompt_lens=(6, 7, 8), group=1)  # one row per prompt
    assert plan_shared_prefixes(ids, mask, start) is None
    ids, mask, start = group_batch(g)
    assert plan_shared_prefixes(ids, mask, torch.ones_like(start)) is None  # no context token
    model = make_tiny_model("llama", num_layers=1, vocab_size=300)
    with pytest.raises(ValueError, match="score_from"):
        token_logprobs(model, ids, mask, score_from=start[:2])


def test_shared_prefixes_under_perturbation():
    """Prefix and continuations get independent noise; d/d log-sigma is the same whether the
    backward redraws the noise from its per-call seed or reads a stored copy."""
    ids, mask, start = group_batch(torch.Generator().manual_seed(5))
    scored = (torch.arange(ids.shape[1]) >= start[:, None]) & (mask > 0)
    grads = []
    for store in (False, True):
        model = make_tiny_model("llama", num_layers=2, vocab_size=300)
        pert = LayerwisePerturbation(model, sigma_init=0.1, store_noise=store)
        with pert.active(seed=11):
            lp = token_logprobs(model, ids, mask, score_from=start)
        lp[scored].sum().backward()
        grads.append(pert.log_sigma.grad.clone())
        with torch.no_grad(), pert.active(seed=11):
            again = token_logprobs(model, ids, mask, score_from=start)
        assert torch.equal(lp.detach(), again)  # reproducible from the seed
        clean = token_logprobs(model, ids, mask, score_from=start).detach()
        assert not torch.allclose(lp.detach()[scored], clean[scored], atol=1e-4)
    assert torch.all(grads[0] != 0)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_docstring_examples():
    import doctest

    import alp_agents.learner.logprobs
    import alp_agents.learner.perturb

    for module in (alp_agents.learner.logprobs, alp_agents.learner.perturb):
        failures, _ = doctest.testmod(module)
        assert failures == 0, module.__name__


def test_tree_mask_keeps_continuations_apart():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 0]])
    plan = plan_shared_prefixes(ids, (ids > 0).long(), torch.tensor([3, 3]))
    # packed: [5 6 | 7 8 9 | 7 1]: prompt 0-1, continuation 1 at 2-4, continuation 2 at 5-6
    mask = plan.attention_mask()[0, 0]
    assert mask[6].tolist() == [True, True, False, False, False, True, True]
    assert mask[4].tolist() == [True, True, True, True, True, False, False]
    assert mask[1].tolist() == [True, True, False, False, False, False, False]
    additive = plan.attention_mask(torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask)


def test_large_groups_are_split_over_several_packed_rows():
    """A group whose continuations exceed the 2L budget continues in another packed row with
    its own copy of the prompt; results are unchanged."""
    g = torch.Generator().manual_seed(6)
    ids, mask, start = group_batch(g, prompt_lens=(9,), group=8)
    plan = plan_shared_prefixes(ids, mask, start)
    assert plan is not None and plan.input_ids.shape[0] >= 2
    assert plan.input_ids.shape[1] <= 2 * ids.shape[1]
    model = make_tiny_model("qwen2", num_layers=2, vocab_size=300)
    scored = (torch.arange(ids.shape[1]) >= start[:, None]) & (mask > 0)
    with torch.no_grad():
        full = token_logprobs(model, ids, mask)
        packed = token_logprobs(model, ids, mask, score_from=start)
    assert torch.allclose(packed[scored], full[scored], atol=1e-5)


def test_sliding_window_models_fall_back_to_the_plain_forward():
    model = make_tiny_model("mistral", num_layers=2, vocab_size=300)
    model.config.sliding_window = 4  # one tree mask cannot express a per-layer window
    ids, mask, start = group_batch(torch.Generator().manual_seed(7))
    scored = (torch.arange(ids.shape[1]) >= start[:, None]) & (mask > 0)
    with torch.no_grad():
        full = token_logprobs(model, ids, mask)
        got = token_logprobs(model, ids, mask, score_from=start)
    assert torch.allclose(got[scored], full[scored], atol=1e-5)
