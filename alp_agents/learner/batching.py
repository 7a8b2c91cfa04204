"""Cutting a batch of trajectories into K mini-batches (whole prompt groups) and micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def mini_batch_rows(
    group_ids: Sequence[Any], parts: int, generator: torch.Generator | None = None
) -> list[list[int]]:
    """Rows of each of ``parts`` mini-batches, whole groups (prompts) kept together.

    Groups are taken in order of first appearance (shuffled with ``generator``) and split into
    ``parts`` contiguous near-equal runs of groups, as verl forms its mini-batches; rows of one
    prompt then sit side by side, so a micro-batch cut from a mini-batch computes their shared
    prompt once (`alp_agents.learner.logprobs.plan_shared_prefixes`). With fewer groups than parts the
    group-ordered rows are split instead.

    >>> mini_batch_rows(["a", "b", "a", "c", "b", "c"], 2)
    [[0, 2, 1, 4], [3, 5]]
    >>> mini_batch_rows(["a", "a", "a"], 2)
    [[0, 1], [2]]
    """
    groups: dict[Any, list[int]] = {}
    for row, gid in enumerate(group_ids):
        groups.setdefault(gid, []).append(row)
    runs = list(groups.values())
    if generator is not None:
        runs = [runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()]
    if len(runs) < parts:
        rows = [r for run in runs for r in run]
        return [[rows[i] for i in chunk] for chunk in split_indices(len(rows), parts)]
    return [[r for g in chunk for r in runs[g]] for chunk in split_indices(len(runs), parts)]


def first_scored_columns(loss_mask: torch.Tensor) -> torch.Tensor:
    """First column with a nonzero loss mask per row (the row width where there is none).

    >>> first_scored_columns(torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])).tolist()
    [2, 4]
    """
    scored = loss_mask > 0
    first = scored.int().argmax(dim=-1)
    return torch.where(scored.any(dim=-1), first, loss_mask.shape[-1])


def split_indices(n: int, parts: int) -> list[list[int]]:
    """Split ``range(n)`` into ``parts`` contiguous near-equal chunks (no empty chunk)."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def trim_shared_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut right padding shared by every row (micro-batches are often shorter than the batch)."""
    width = (
        int(batch["attention_mask"].sum(dim=1).max().item()) if "attention_mask" in batch else None
    )
    if not width:
        return batch
    return {k: v[:, :width] for k, v in batch.items()}
