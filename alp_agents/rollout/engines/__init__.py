"""Inference engines: batched token-in/token-out sampling with per-token log-probs.

`InferenceEngine` is the protocol (`generate`, `update_weights`); `HFEngine` runs any
transformers causal LM on its own copy of the weights (the CPU default), `VLLMEngine` runs vLLM.
See `alp_agents.rollout.engines.base` for the log-prob convention shared with the learner.
"""

from alp_agents.rollout.engines.base import InferenceEngine, Sample, SamplingParams, stop_cut
from alp_agents.rollout.engines.hf import HFEngine
from alp_agents.rollout.engines.vllm import VLLMEngine, vllm_unavailable_reason

__all__ = [
    "HFEngine",
    "InferenceEngine",
    "Sample",
    "SamplingParams",
    "VLLMEngine",
    "stop_cut",
    "vllm_unavailable_reason",
]
