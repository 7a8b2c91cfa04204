"""Registers the tiny random test models by name (``tiny-llama``, ``tiny-qwen2``, ...).

Imported by tests/conftest.py, and by processes the tests start through
``$ALP_AGENTS_MODEL_MODULES`` (study cells) or directly (tests/trainer/distributed_worker.py),
so a config can say ``model.name: tiny-llama`` anywhere in the suite.
"""

from alp_agents.models import register_tiny_models

TINY_MODELS = register_tiny_models()
