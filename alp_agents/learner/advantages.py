"""GRPO group-relative advantages (docs/alp.md, section 5; used by every method).

Each prompt is rolled out ``n`` times; the ``n`` trajectories form a group. A trajectory's
advantage is its reward minus the group mean, divided by the group's *unbiased* standard deviation
(plus ``eps``). Groups whose rewards are all equal (all correct or all wrong) and groups of one
get exactly 0: they stay in the batch but push nothing.

Trajectories lost to an infrastructure failure (a sandbox crash, not a wrong answer) can be
excluded from the group statistics with ``valid=False``; they receive advantage 0. Void turns are
*not* infrastructure failures: their reward counts in the group statistics (SimpleTIR's filter)
and the trainer masks their tokens out of the loss instead.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

__all__ = ["grpo_advantages", "group_index"]


def group_index(group_ids: torch.Tensor | Sequence[Hashable]) -> torch.Tensor:
    """Map arbitrary group ids (ints, strings, ...) to dense indices 0..G-1, in first-seen order.

    >>> group_index(["b", "a", "b"]).tolist()
    [0, 1, 0]
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
        _, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse
    seen: dict[Hashable, int] = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], dtype=torch.long)


def grpo_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[Hashable],
    scale_by_std: bool = True,
    eps: float = 1e-6,
    valid: torch.Tensor | Sequence[bool] | None = None,
) -> torch.Tensor:
    """Group-normalised advantages ``A_i = (R_i - mean_g R) / (std_g R + eps)``.

    Args:
        rewards: ``(N,)`` scalar reward per trajectory (must be finite).
        group_ids: ``(N,)`` id of the prompt group each trajectory belongs to (any hashable).
        scale_by_std: divide by the unbiased group std (GRPO); ``False`` only centres (Dr. GRPO).
        eps: added to the std.
        valid: optional ``(N,)`` bool; ``False`` rows are left out of the group mean/std and get 0.

    Returns:
        ``(N,)`` float32 advantages on the rewards' device. Exactly 0 for groups with a single
        valid member, for groups whose valid rewards are all equal, and for invalid rows.

    >>> [round(a, 4) for a in grpo_advantages([1.0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]).tolist()]
    [0.866, -0.866, -0.866, 0.866, 0.0, 0.0]
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one per trajectory), got shape {tuple(r.shape)}")
    out_device = r.device
    bad = ~torch.isfinite(r)
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"rewards contain NaN/inf at rows {idx}; score or exclude them first")
    g = group_index(group_ids).to(r.device)
    if g.shape != r.shape:
        raise ValueError(f"group_ids has {g.numel()} entries but rewards has {r.numel()}")
    if valid is None:
        v = torch.ones_like(r)
    else:
        v = torch.as_tensor(valid, device=r.device).to(torch.float64)
        if v.shape != r.shape:
            raise ValueError(f"valid has shape {tuple(v.shape)}, expected {tuple(r.shape)}")
    n_groups = int(g.max().item()) + 1 if g.numel() else 0
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=r.device)
    count = zeros.scatter_add(0, g, v)
    mean = zeros.scatter_add(0, g, r * v) / count.clamp(min=1)
    centred = (r - mean[g]) * v
    var = zeros.scatter_add(0, g, centred**2) / (count - 1).clamp(min=1)
    std = var.sqrt()
    # All-equal groups: the centred rewards are rounding noise; force them to exactly 0.
    big = torch.finfo(torch.float64).max
    rmax = torch.full_like(zeros, -big).scatter_reduce(0, g, torch.where(v > 0, r, -big), "amax")
    rmin = torch.full_like(zeros, big).scatter_reduce(0, g, torch.where(v > 0, r, big), "amin")
    degenerate = (count < 2) | (rmax <= rmin)
    adv = centred / (std[g] + eps) if scale_by_std else centred
    adv = torch.where(degenerate[g] | (v == 0), torch.zeros_like(adv), adv)
    return adv.to(device=out_device, dtype=torch.float32)
