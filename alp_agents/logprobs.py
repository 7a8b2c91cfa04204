"""Per-token log-probabilities (and entropies) of given token ids under a causal LM.

Convention shared with the rollout engines (docs/architecture.md): column ``j`` is
``log p(input_ids[:, j] | input_ids[:, :j])`` under ``log_softmax(logits / temperature)``, i.e.
the temperature-scaled distribution before any top-p/top-k truncation; column 0 (no context) is
0. Entropy column ``j`` is the entropy of that same predictive distribution.

Memory: the vocabulary is large (49,152 for SmolLM2), so a float32 ``log_softmax`` over the
whole ``(B, L, V)`` logits would double the biggest activation of the step and be kept for
backward. Instead the float32 maths runs over chunks of ``chunk_size`` positions, each under
activation checkpointing: backward keeps only the model's own logits (bf16 under autocast) and
recomputes one chunk's float32 softmax at a time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["token_logprobs", "logprobs_from_logits"]


def _chunk_stats(
    logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 (float64 stays)
    if inv_temperature != 1.0:
        z = z * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return picked, torch.zeros_like(picked)
    p = torch.softmax(z, dim=-1)
    entropy = lse - (p * z).sum(-1)
    return picked, entropy


def logprobs_from_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 256,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` from already computed ``(B, L, V)`` logits (position ``j`` predicts
    ``j + 1``). Returns ``(B, L)`` float32 (and the entropies if asked).

    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    >>> logprobs_from_logits(logits, torch.tensor([[0, 1, 2]])).tolist()
    [[0.0, -1.3862943649291992, -1.3862943649291992]]
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bsz, length = input_ids.shape
    pred = logits[:, :-1]
    targets = input_ids[:, 1:]
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    lps, ents = (
        [logits.new_zeros(bsz, 1, dtype=torch.promote_types(logits.dtype, torch.float32))],
        [],
    )
    ents.append(lps[0])
    for start in range(0, max(length - 1, 0), chunk_size):
        sl = slice(start, start + chunk_size)
        args = (pred[:, sl], targets[:, sl], 1.0 / temperature, return_entropy)
        if use_ckpt:
            lp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(*args)
        lps.append(lp)
        ents.append(ent)
    out = torch.cat(lps, dim=1)
    if return_entropy:
        return out, torch.cat(ents, dim=1)
    return out


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 256,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every token given its prefix, ``(B, L)`` float32 with column 0 = 0.

    Args:
        model: a causal LM returning ``.logits`` (a DDP wrapper is fine). Whatever hooks are
            attached (e.g. an active `LayerwisePerturbation`) take effect.
        input_ids: ``(B, L)`` right-padded token ids (positions are 0..L-1 per row).
        attention_mask: ``(B, L)`` 1 on real tokens; padding columns get meaningless values
            that the loss mask must exclude.
        temperature: divide logits by this before the softmax (the sampling temperature).
        return_entropy: also return the ``(B, L)`` entropy of each predictive distribution
            (differentiable; column 0 = 0).
        chunk_size: positions per float32 chunk (memory/speed trade-off).

    Gradients flow when grad is enabled; wrap in ``torch.no_grad()`` for pi_old / reference.

    >>> from alp_agents.models import make_tiny_model
    >>> model = make_tiny_model("llama")
    >>> lp = token_logprobs(model, torch.tensor([[1, 5, 9, 2]]))
    >>> lp.shape, float(lp[0, 0]), bool((lp[0, 1:] < 0).all())
    (torch.Size([1, 4]), 0.0, True)
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logprobs_from_logits(logits, input_ids, temperature, return_entropy, chunk_size)
