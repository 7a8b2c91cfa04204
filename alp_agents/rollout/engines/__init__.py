"""Inference engines: batched token-in/token-out sampling with per-token log-probs.

`InferenceEngine` is the protocol (`generate`, `update_weights`); `HFEngine` runs any
transformers causal LM on its own copy of the weights (the CPU default), `VLLMEngine` runs vLLM;
`build_engine` picks and builds one from a choice (auto | hf | vllm) and a dtype setting.
See `alp_agents.rollout.engines.base` for the log-prob convention shared with the learner.
"""

from alp_agents.rollout.engines.base import (
    InferenceEngine,
    Sample,
    SamplingParams,
    per_request,
    stop_cut,
)
from alp_agents.rollout.engines.build import (
    ENGINE_CHOICES,
    EngineUnavailableError,
    build_engine,
    describe_engine,
    resolve_engine_choice,
)
from alp_agents.rollout.engines.hf import HFEngine
from alp_agents.rollout.engines.vllm import VLLMEngine, vllm_unavailable_reason

__all__ = [
    "ENGINE_CHOICES",
    "EngineUnavailableError",
    "HFEngine",
    "InferenceEngine",
    "Sample",
    "SamplingParams",
    "VLLMEngine",
    "build_engine",
    "describe_engine",
    "per_request",
    "resolve_engine_choice",
    "stop_cut",
    "vllm_unavailable_reason",
]
