"""envs: Gymnasium text environments, a registry, function tools, answer grading and datasets.

    >>> import envs
    >>> env = envs.make("alp/Math-v0", dataset="gsm8k", split="test")
    >>> obs, info = env.reset(seed=0)
    >>> info["messages"][0]["role"]
    'user'

Shipped environments: ``alp/Math-v0`` (single-turn maths) and ``alp/PythonTool-v0``
(multi-turn tool-integrated reasoning on the sandbox). See docs/environments.md.
"""

from __future__ import annotations

from . import (
    procedural,  # noqa: F401 - registers the "arith" generators
    rewards,
)
from .checker import CheckReport, EnvCheckError, check_env
from .core import FINISH_REASONS, INFO_KEYS, TextEnv, TextSpace, TurnOutcome
from .datasets import (
    DATASET_ENTRY_POINT_GROUP,
    DatasetError,
    OverlapReport,
    Problem,
    available_datasets,
    dataset_overlap,
    is_dataset_file,
    load_dataset,
    read_jsonl,
    read_problem_file,
    register_generator,
    write_jsonl,
)
from .grading import Grade, VerifierPool, extract_answer, extract_boxed, grade
from .math_env import MathEnv
from .registration import (
    ENTRY_POINT_GROUP,
    UnknownEnvError,
    discover_plugins,
    make,
    register,
    registered,
)
from .rewards import RewardFunc, RewardInput, Rubric
from .tool_formats import ToolFormat, get_tool_format, register_tool_format, tool_formats
from .tools import (
    Tool,
    ToolCall,
    ToolCallError,
    ToolContext,
    ToolEnv,
    ToolExample,
    parse_tool_calls,
    tool,
)

register("alp/Math-v0", "envs.math_env:MathEnv")
register("alp/PythonTool-v0", "envs.python_tool_env:PythonToolEnv")


def __getattr__(name: str):
    # PythonToolEnv imports the sandbox package; loaded on first use.
    if name in ("PythonToolEnv", "shared_sandbox"):
        from . import python_tool_env

        return getattr(python_tool_env, name)
    raise AttributeError(f"module 'envs' has no attribute {name!r}")


__all__ = [
    "DATASET_ENTRY_POINT_GROUP",
    "ENTRY_POINT_GROUP",
    "FINISH_REASONS",
    "INFO_KEYS",
    "CheckReport",
    "DatasetError",
    "EnvCheckError",
    "Grade",
    "MathEnv",
    "OverlapReport",
    "Problem",
    "PythonToolEnv",
    "TextEnv",
    "TextSpace",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolContext",
    "ToolEnv",
    "ToolExample",
    "ToolFormat",
    "TurnOutcome",
    "RewardFunc",
    "RewardInput",
    "Rubric",
    "UnknownEnvError",
    "VerifierPool",
    "available_datasets",
    "check_env",
    "dataset_overlap",
    "discover_plugins",
    "extract_answer",
    "extract_boxed",
    "get_tool_format",
    "grade",
    "is_dataset_file",
    "load_dataset",
    "make",
    "parse_tool_calls",
    "read_jsonl",
    "read_problem_file",
    "register",
    "register_generator",
    "register_tool_format",
    "registered",
    "rewards",
    "shared_sandbox",
    "tool",
    "tool_formats",
    "write_jsonl",
]
