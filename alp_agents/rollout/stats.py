"""Statistics of a batch of trajectories (reward, turns, tool use, finish reasons).

The void and tool-error statistics have one definition each, shared with evaluation's report
(`alp_agents.evaluation.metrics.summarize`: ``void_turn_rate``, ``void_episode_rate``,
``tool_error_rate`` are the same ratios over the evaluation's episodes):

* ``env/void_turn_ratio``: void turns / turns (a void turn holds neither code nor an answer);
* ``env/void_episode_ratio``: episodes with at least one void turn / episodes (the share of
  episodes the learner masks out of the loss);
* ``env/tool_error_ratio``: failed tool calls / tool calls, where a call failed when its result
  status is not ``ok`` (an exception, a timeout, a resource limit, a malformed call); 0.0 when
  no tool was called.

For an env with a rubric (`envs.Rubric`), ``reward/<name>`` is the mean over the batch of each
reward function's unweighted value summed over the episode (`Trajectory.reward_components`; an
episode where it was never scored, e.g. cut by the context budget before the end, counts 0.0),
so ``reward/mean == sum(weight * reward/<name>)``. Without a rubric only ``reward/mean`` exists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from alp_agents.rollout.trajectory import Trajectory


def episode_stats(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Environment statistics over a batch of trajectories (see the module docstring)."""
    if not trajs:
        return {}
    n = len(trajs)
    out: dict[str, float] = {}
    out["reward/mean"] = sum(float(t.reward) for t in trajs) / n
    out.update(reward_component_means(trajs))
    out["env/turns_mean"] = sum(t.num_turns for t in trajs) / n
    out["env/tool_calls_mean"] = sum(t.num_tool_calls for t in trajs) / n
    out["env/code_use_ratio"] = sum(t.num_tool_calls > 0 for t in trajs) / n
    turns = sum(t.num_turns for t in trajs)
    out["env/void_turn_ratio"] = sum(t.num_void_turns for t in trajs) / turns if turns else 0.0
    out["env/void_episode_ratio"] = sum(t.num_void_turns > 0 for t in trajs) / n
    out["env/response_tokens_mean"] = sum(t.num_generated_tokens for t in trajs) / n
    out["env/episode_tokens_mean"] = sum(len(t.response_ids) for t in trajs) / n
    calls = sum(t.num_tool_calls for t in trajs)
    errors = sum(t.num_tool_errors for t in trajs)
    out["env/tool_error_ratio"] = errors / calls if calls else 0.0
    for reason, count in Counter(t.finish_reason for t in trajs).items():
        out[f"finish/{reason}"] = count / n
    return out


def reward_component_means(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """``{"reward/<name>": mean}`` over ``trajs`` for every rubric value any of them has."""
    components = [t.reward_components for t in trajs]
    names = list(dict.fromkeys(name for c in components for name in c))
    return {
        f"reward/{name}": sum(c.get(name, 0.0) for c in components) / len(trajs) for name in names
    }
