"""Rollout: engines sample, environments answer, trajectories record every token exactly.

``engines`` (the `InferenceEngine` protocol, HF and vLLM, `build_engine`), ``chat``
(token-exact chat-template deltas), ``trajectory`` (the record the learner trains on, with typed
step records of what the env did: `StepRecord`, `ToolCallRecord`, `GradeRecord`),
``agent_loop`` (`run_episodes`: the multi-turn loop over a batch of environments), ``stats``
(per-batch episode statistics).
"""

from alp_agents.rollout.agent_loop import run_episodes
from alp_agents.rollout.chat import ChatDelta
from alp_agents.rollout.trajectory import (
    GradeRecord,
    StepRecord,
    ToolCallRecord,
    Trajectory,
    TrajectoryError,
    collate,
)

__all__ = [
    "ChatDelta",
    "GradeRecord",
    "StepRecord",
    "ToolCallRecord",
    "Trajectory",
    "TrajectoryError",
    "collate",
    "run_episodes",
]
