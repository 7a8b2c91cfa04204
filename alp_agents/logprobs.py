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

Shared prompts: a GRPO batch holds ``group_size`` rows per prompt, identical up to the first
sampled token. Given ``score_from`` (the first column whose log-prob is needed per row),
`token_logprobs` runs every distinct context prefix once, copies its KV cache to the rows that
share it, and runs only the per-row continuations on top (gradients flow back through the
shared prefix). With the single-turn default (4 rows per ~140-token prompt, ~45 sampled tokens)
that is ~2.3x fewer tokens through the model; logits and the vocabulary softmax are computed
only for the continuations. See `plan_shared_prefixes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["PrefixPlan", "logprobs_from_logits", "plan_shared_prefixes", "token_logprobs"]

# Share prefixes only when it saves at least this fraction of the token positions.
_MIN_SAVING = 0.1


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
    score_from: torch.Tensor | None = None,
    share_prefixes: bool = True,
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
        score_from: optional ``(B,)`` first column whose log-prob is needed per row (e.g. the
            first loss-mask column). Columns before it are returned as 0 and need not be
            computed: logits are only formed from there on, and rows whose context before it is
            identical share one forward of that context (see `plan_shared_prefixes`).
        share_prefixes: with ``score_from``, run identical context prefixes once (default).

    Gradients flow when grad is enabled; wrap in ``torch.no_grad()`` for pi_old / reference.

    >>> from alp_agents.models import make_tiny_model
    >>> model = make_tiny_model("llama")
    >>> lp = token_logprobs(model, torch.tensor([[1, 5, 9, 2]])).detach()
    >>> lp.shape, float(lp[0, 0]), bool((lp[0, 1:] < 0).all())
    (torch.Size([1, 4]), 0.0, True)
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    if score_from is not None:
        if score_from.shape != input_ids.shape[:1]:
            raise ValueError(
                f"score_from {tuple(score_from.shape)} must be ({input_ids.shape[0]},): one "
                "first-scored column per row"
            )
        plan = plan_shared_prefixes(input_ids, attention_mask, score_from)
        if share_prefixes and plan is not None:
            return _shared_prefix_logprobs(
                model, plan, input_ids.shape[1], temperature, return_entropy, chunk_size
            )
        # No sharing: still skip the logits (and softmax) of columns nobody needs.
        first = max(int(score_from.min()) - 1, 0)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=input_ids.shape[1] - first,
        )
        result = logprobs_from_logits(
            _logits(out), input_ids[:, first:], temperature, return_entropy, chunk_size
        )
        return _place(result, first, score_from)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return logprobs_from_logits(_logits(out), input_ids, temperature, return_entropy, chunk_size)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _place(result, first: int, score_from: torch.Tensor):
    """Put log-probs (and entropies) of columns ``first:`` back into full-width rows, with 0
    before each row's ``score_from``."""
    width = result[0].shape[1] if isinstance(result, tuple) else result.shape[1]
    columns = torch.arange(first, first + width, device=score_from.device)
    keep = columns[None, :] >= score_from[:, None]

    def place(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t * keep, (first, 0))

    return tuple(place(t) for t in result) if isinstance(result, tuple) else place(result)


# ---------------------------------------------------------------------------------------------
# shared prompt prefixes


@dataclass(frozen=True)
class PrefixPlan:
    """How a batch splits into distinct context prefixes and per-row continuations.

    Row ``r`` is ``prefix_ids[prefix_of_row[r], :prefix_len[r]] + suffix_ids[r, :suffix_len]``;
    the prefix ends one token before the row's first scored column, so the suffix's first
    position already predicts the first scored token.
    """

    prefix_ids: torch.Tensor  # (U, P) right-padded distinct prefixes
    prefix_mask: torch.Tensor  # (U, P)
    prefix_of_row: torch.Tensor  # (B,) index into the U prefixes
    prefix_len: torch.Tensor  # (B,)
    suffix_ids: torch.Tensor  # (B, S) right-padded
    suffix_mask: torch.Tensor  # (B, S)

    @property
    def positions(self) -> int:
        """Token positions the split forward runs (padding included)."""
        return self.prefix_ids.numel() + self.suffix_ids.numel()


def plan_shared_prefixes(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, score_from: torch.Tensor
) -> PrefixPlan | None:
    """Group rows whose context before their first scored token is identical.

    Returns None when splitting would not save at least 10% of the token positions of one
    plain ``(B, L)`` forward (e.g. every row has its own prompt), or when some row has no
    context token before its first scored column.

    >>> ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 0], [5, 6, 7, 2, 3]])
    >>> plan = plan_shared_prefixes(ids, (ids > 0).long(), torch.tensor([3, 3, 3]))
    >>> plan.prefix_ids.tolist(), plan.prefix_of_row.tolist(), plan.suffix_ids.tolist()
    ([[5, 6]], [0, 0, 0], [[7, 8, 9], [7, 1, 0], [7, 2, 3]])
    """
    rows, width = input_ids.shape
    lengths = [width] * rows if attention_mask is None else attention_mask.sum(-1).tolist()
    ids = input_ids.tolist()
    prefix_lens = [
        min(max(int(f), 1), n) - 1 for f, n in zip(score_from.tolist(), lengths, strict=True)
    ]
    if min(prefix_lens) < 1:
        return None
    distinct: dict[tuple[int, ...], int] = {}
    prefix_of_row = [
        distinct.setdefault(tuple(ids[r][: prefix_lens[r]]), len(distinct)) for r in range(rows)
    ]
    prefixes = list(distinct)
    prefix_width = max(map(len, prefixes))
    suffix_lens = [n - p for n, p in zip(lengths, prefix_lens, strict=True)]
    suffix_width = max(suffix_lens)
    if len(prefixes) * prefix_width + rows * suffix_width > (1 - _MIN_SAVING) * rows * width:
        return None
    prefix_ids = input_ids.new_zeros((len(prefixes), prefix_width))
    prefix_mask = input_ids.new_zeros((len(prefixes), prefix_width))
    for u, prefix in enumerate(prefixes):
        prefix_ids[u, : len(prefix)] = torch.tensor(prefix, dtype=input_ids.dtype)
        prefix_mask[u, : len(prefix)] = 1
    suffix_ids = input_ids.new_zeros((rows, suffix_width))
    suffix_mask = input_ids.new_zeros((rows, suffix_width))
    for r in range(rows):
        p, n = prefix_lens[r], suffix_lens[r]
        suffix_ids[r, :n] = input_ids[r, p : p + n]
        suffix_mask[r, :n] = 1
    return PrefixPlan(
        prefix_ids=prefix_ids,
        prefix_mask=prefix_mask,
        prefix_of_row=torch.tensor(prefix_of_row, device=input_ids.device),
        prefix_len=torch.tensor(prefix_lens, device=input_ids.device),
        suffix_ids=suffix_ids,
        suffix_mask=suffix_mask,
    )


def _shared_prefix_logprobs(
    model: torch.nn.Module,
    plan: PrefixPlan,
    length: int,
    temperature: float,
    return_entropy: bool,
    chunk_size: int,
):
    """Prefixes once (KV cache kept, with gradients), cache rows copied per row, then the
    suffixes on top with their true positions; results scattered back to ``(B, length)``."""
    from transformers import DynamicCache

    from alp_agents.models import cache_argument

    inner_config = getattr(model, "config", None) or model.module.config
    cache = DynamicCache(config=inner_config)
    cache_kw = cache_argument(model)
    model(
        input_ids=plan.prefix_ids,
        attention_mask=plan.prefix_mask,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
    )
    cache.batch_select_indices(plan.prefix_of_row)
    suffix_width = plan.suffix_ids.shape[1]
    out = model(
        input_ids=plan.suffix_ids,
        attention_mask=torch.cat([plan.prefix_mask[plan.prefix_of_row], plan.suffix_mask], 1),
        position_ids=plan.prefix_len[:, None]
        + torch.arange(suffix_width, device=plan.prefix_len.device),
        use_cache=True,
        **{cache_kw: cache},
    )
    result = logprobs_from_logits(
        _logits(out), plan.suffix_ids, temperature, return_entropy, chunk_size
    )
    # Suffix column t is column prefix_len + t of the row; padding columns are dropped.
    columns = plan.prefix_len[:, None] + torch.arange(suffix_width, device=plan.prefix_len.device)
    columns = torch.where(plan.suffix_mask.bool(), columns, length)  # one spare column

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros((values.shape[0], length + 1))
        return full.scatter(1, columns, values * plan.suffix_mask)[:, :length]

    if return_entropy:
        return scatter(result[0]), scatter(result[1])
    return scatter(result)
