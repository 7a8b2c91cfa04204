"""Statistics of a batch of trajectories (reward, turns, tool use, finish reasons)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def episode_stats(trajs: Sequence[Any]) -> dict[str, float]:
    """Environment statistics of ALP_SPEC section 4 over a list of trajectories."""
    n = max(1, len(trajs))
    out: dict[str, float] = {}
    if not trajs:
        return out
    out["reward/mean"] = sum(float(t.reward) for t in trajs) / n
    out["env/turns_mean"] = sum(int(t.num_turns) for t in trajs) / n
    out["env/tool_calls_mean"] = sum(int(t.num_tool_calls) for t in trajs) / n
    out["env/code_use_ratio"] = sum(int(t.num_tool_calls) > 0 for t in trajs) / n
    out["env/void_turn_ratio"] = sum(int(t.num_void_turns) > 0 for t in trajs) / n
    out["env/response_tokens_mean"] = sum(int(sum(t.loss_mask)) for t in trajs) / n
    out["env/episode_tokens_mean"] = sum(len(t.response_ids) for t in trajs) / n
    tool_errors = sum(int(getattr(t, "num_tool_errors", 0) or 0) for t in trajs)
    calls = sum(int(t.num_tool_calls) for t in trajs)
    out["env/tool_error_ratio"] = tool_errors / calls if calls else 0.0
    for reason, count in Counter(str(t.finish_reason) for t in trajs).items():
        out[f"finish/{reason}"] = count / n
    return out
