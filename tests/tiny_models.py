"""Registers the tiny random test models by name (``tiny-llama``, ``tiny-qwen2``, ...).

Imported by tests/conftest.py, and by processes the tests start through
``$ALP_AGENTS_MODEL_MODULES`` (study cells) or directly (tests/trainer/distributed_worker.py),
so a config can say ``model.name: tiny-llama`` anywhere in the suite.
"""

from alp_agents.models import register_tiny_models

TINY_MODELS = register_tiny_models()

#: Command-line overrides for a one-step training run of ``tiny-llama`` in a test: two prompts x
#: two samples of up to 8 tokens, float32 throughout, one mini-batch, no evaluation, nothing
#: written but metrics. Tests add their environment, dataset and run directory.
TINY_ONE_STEP_ARGS = [
    "model.name=tiny-llama",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_tokens=8",
    "rollout.engine_dtype=float32",
    "model.autocast=none",
    "algorithm.mini_batches=1",
    "eval.num_problems=0",
    "steps=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "checkpoint.export=false",
]
