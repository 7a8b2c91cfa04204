"""MathEnv (``alp/Math-v0``): single-turn maths. One step: the answer is graded, the episode ends.

>>> import envs
>>> env = envs.make("alp/Math-v0", dataset="gsm8k", split="test")
>>> _, info = env.reset(options={"problem_id": "gsm8k-test-0"})
>>> _, reward, terminated, truncated, info = env.step("\\\\boxed{18}")
>>> reward, terminated, truncated, info["messages"]
(1.0, True, False, [])
"""

from __future__ import annotations

from typing import Any

from .core import TextEnv, TurnOutcome
from .prompts import MATH_INSTRUCTION, Message, math_one_shot


class MathEnv(TextEnv):
    """Single-turn maths on any problem set: the whole assistant message is the solution.

    Takes every :class:`envs.TextEnv` option (``dataset``, ``split``, ``instruction``,
    ``one_shot``, ``answer_extraction``...). ``max_turns`` is fixed to 1.
    """

    default_instruction = MATH_INSTRUCTION

    def __init__(self, dataset: str = "math500", split: str | None = None, **kwargs: Any) -> None:
        if kwargs.get("max_turns") not in (None, 1):
            raise ValueError(
                "MathEnv is single-turn: max_turns must be 1 (use alp/PythonTool-v0 for multi-turn)"
            )
        kwargs["max_turns"] = 1
        super().__init__(dataset, split, **kwargs)

    def default_one_shot(self) -> list[Message]:
        return math_one_shot(self.instruction, self.question_template)

    def take_turn(self, action: str) -> TurnOutcome:
        return TurnOutcome(finish_reason="answer", answer_text=action)
