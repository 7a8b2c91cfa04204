"""token_logprobs: the shared log-prob convention, chunking, entropy, gradients."""

from __future__ import annotations

import pytest
import torch

from alp_agents.logprobs import logprobs_from_logits, token_logprobs
from alp_agents.models import make_tiny_model


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
