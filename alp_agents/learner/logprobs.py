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
`token_logprobs` packs each prompt with its rows' continuations into ONE sequence, the prompt
once followed by every continuation, with a tree attention mask (a continuation sees the prompt
and its own earlier tokens, never another continuation) and each continuation's true position
ids. One ordinary forward, no padding inside a group, and gradients reach the prompt from every
continuation. With the single-turn default (4 rows per ~140-token prompt, ~45 sampled tokens)
that is ~2.3x fewer token positions; logits and the vocabulary softmax are computed only for the
continuations. See `plan_shared_prefixes`.
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
        plan = None
        if share_prefixes and _takes_tree_masks(model):
            plan = plan_shared_prefixes(input_ids, attention_mask, score_from)
        if plan is not None:
            return _packed_logprobs(
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
    columns = torch.arange(first, first + _width(result), device=score_from.device)
    keep = columns[None, :] >= score_from[:, None]

    def place(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t * keep, (first, 0))

    return tuple(place(t) for t in result) if isinstance(result, tuple) else place(result)


# ---------------------------------------------------------------------------------------------
# shared prompt prefixes


@dataclass(frozen=True)
class PrefixPlan:
    """A batch packed as one sequence per prompt: the prompt, then each row's continuation.

    A continuation starts with the prompt's last token (whose logits predict the row's first
    scored token) and keeps the row's own position ids; ``segments`` tells the attention mask
    which tokens may see which (0: the prompt, ``k >= 1``: continuation k, -1: padding).
    Row ``r`` of the original batch is packed row ``packed_row[r]`` from column ``start[r]``
    for ``length[r]`` tokens, which were its columns ``context[r]`` onwards.
    """

    input_ids: torch.Tensor  # (U, T)
    position_ids: torch.Tensor  # (U, T)
    segments: torch.Tensor  # (U, T)
    packed_row: torch.Tensor  # (B,)
    start: torch.Tensor  # (B,)
    context: torch.Tensor  # (B,)
    length: torch.Tensor  # (B,)

    @property
    def positions(self) -> int:
        """Token positions the packed forward runs (padding included)."""
        return self.input_ids.numel()

    def attention_mask(self, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(U, 1, T, T)`` mask: True (or 0.0 when ``additive_dtype`` is given, for eager
        attention) where query ``i`` may attend to key ``j``: causal, and the key is in the
        prompt or in the query's own continuation. Padding attends to itself only."""
        seg = self.segments
        width = seg.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
        same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
        allowed = causal & same & (seg[:, None, :] >= 0)
        allowed |= torch.eye(width, dtype=torch.bool, device=seg.device)
        allowed = allowed[:, None]
        if additive_dtype is None:
            return allowed
        blocked = torch.finfo(additive_dtype).min
        return torch.zeros(allowed.shape, dtype=additive_dtype, device=seg.device).masked_fill(
            ~allowed, blocked
        )


def plan_shared_prefixes(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, score_from: torch.Tensor
) -> PrefixPlan | None:
    """Pack rows whose context before their first scored token is identical.

    A packed sequence holds at most ``2 L`` tokens (``L`` the batch width, bounding attention's
    quadratic cost); a group that does not fit continues in another sequence with its own copy
    of the prompt. Returns None when packing would not save at least 10% of the token positions
    of one plain ``(B, L)`` forward (e.g. every row has its own prompt), or when some row has no
    context token before its first scored column.

    >>> ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 0], [5, 6, 7, 2, 3]])
    >>> plan = plan_shared_prefixes(ids, (ids > 0).long(), torch.tensor([3, 3, 3]))
    >>> plan.input_ids.tolist(), plan.segments.tolist()
    ([[5, 6, 7, 8, 9, 7, 1, 7, 2, 3]], [[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]])
    >>> plan.position_ids.tolist(), plan.start.tolist()
    ([[0, 1, 2, 3, 4, 2, 3, 2, 3, 4]], [2, 5, 7])
    """
    rows, width = input_ids.shape
    lengths = [width] * rows if attention_mask is None else attention_mask.sum(-1).tolist()
    ids = input_ids.tolist()
    context = [
        min(max(int(f), 1), n) - 1 for f, n in zip(score_from.tolist(), lengths, strict=True)
    ]
    if min(context) < 1:
        return None
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in range(rows):
        groups.setdefault(tuple(ids[r][: context[r]]), []).append(r)
    budget = 2 * width
    packs: list[tuple[tuple[int, ...], list[int]]] = []
    for prompt, members in groups.items():
        pack: list[int] = []
        used = len(prompt)
        for r in members:
            n = lengths[r] - context[r]
            if pack and used + n > budget:
                packs.append((prompt, pack))
                pack, used = [], len(prompt)
            pack.append(r)
            used += n
        packs.append((prompt, pack))
    sizes = [len(prompt) + sum(lengths[r] - context[r] for r in pack) for prompt, pack in packs]
    packed_width = max(sizes)
    if len(packs) * packed_width > (1 - _MIN_SAVING) * rows * width:
        return None
    shape = (len(packs), packed_width)
    packed_ids = input_ids.new_zeros(shape)
    positions = input_ids.new_zeros(shape)
    segments = input_ids.new_full(shape, -1)
    packed_row, start, length = [0] * rows, [0] * rows, [0] * rows
    for u, (prompt, pack) in enumerate(packs):
        c = len(prompt)
        packed_ids[u, :c] = input_ids[pack[0], :c]
        positions[u, :c] = torch.arange(c)
        segments[u, :c] = 0
        for k, r in enumerate(pack, start=1):
            n = lengths[r] - context[r]
            packed_ids[u, c : c + n] = input_ids[r, context[r] : context[r] + n]
            positions[u, c : c + n] = torch.arange(context[r], context[r] + n)
            segments[u, c : c + n] = k
            packed_row[r], start[r], length[r] = u, c, n
            c += n
    as_tensor = lambda v: torch.tensor(v, device=input_ids.device)  # noqa: E731
    return PrefixPlan(
        input_ids=packed_ids,
        position_ids=positions,
        segments=segments,
        packed_row=as_tensor(packed_row),
        start=as_tensor(start),
        context=as_tensor(context),
        length=as_tensor(length),
    )


def _takes_tree_masks(model: torch.nn.Module) -> bool:
    """Whether the model's attention accepts a custom 4D mask (transformers' sdpa and eager)."""
    from accelerate.utils import extract_model_from_parallel

    config = getattr(extract_model_from_parallel(model), "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    # One mask for every layer: no per-layer sliding windows or mixed layer types.
    layer_types = set(getattr(config, "layer_types", None) or ())
    windowed = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    return len(layer_types) <= 1 and not windowed


def _packed_logprobs(
    model: torch.nn.Module,
    plan: PrefixPlan,
    width: int,
    temperature: float,
    return_entropy: bool,
    chunk_size: int,
):
    """One forward over the packed sequences; results put back into ``(B, width)`` rows."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    eager = inner.config._attn_implementation == "eager"
    dtype = inner.get_input_embeddings().weight.dtype if eager else None
    first = int(plan.start.min())  # no logits for the prompts' own positions
    out = model(
        input_ids=plan.input_ids,
        attention_mask=plan.attention_mask(dtype),
        position_ids=plan.position_ids,
        use_cache=False,
        logits_to_keep=plan.input_ids.shape[1] - first,
    )
    # Column k of the result scores packed token first + k from the logits at first + k - 1:
    # right for every continuation token but its first (the prompt's last token, never scored).
    result = logprobs_from_logits(
        _logits(out), plan.input_ids[:, first:], temperature, return_entropy, chunk_size
    )
    steps = torch.arange(int(plan.length.max()), device=plan.start.device)
    valid = (steps[None, :] >= 1) & (steps[None, :] < plan.length[:, None])
    source = (plan.start[:, None] + steps[None, :] - first).clamp(max=_width(result) - 1)
    target = torch.where(valid, plan.context[:, None] + steps[None, :], width)  # spare column

    def unpack(values: torch.Tensor) -> torch.Tensor:
        picked = values[plan.packed_row].gather(1, source) * valid
        full = values.new_zeros((picked.shape[0], width + 1))
        return full.scatter(1, target, picked)[:, :width]

    if return_entropy:
        return unpack(result[0]), unpack(result[1])
    return unpack(result)


def _width(result) -> int:
    """Columns of a log-prob result (a tensor, or a (log-probs, entropies) pair)."""
    return (result[0] if isinstance(result, tuple) else result).shape[1]
