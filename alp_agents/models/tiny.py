"""Tiny random models for tests and examples: any decoder-only architecture, seconds to build.

They pair with the default tokenizer (same vocabulary and special ids), so a test can roll out,
train and evaluate with the real tokenizer and chat template at a fraction of SmolLM2's cost.
The trainer and evaluation do not know them: a test passes the model object (or a saved
folder), or registers them by name with `register_tiny_models` (``"tiny-llama"``, ...), the
way a user registers any model built in code (`alp_agents.models.registry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from alp_agents.common import did_you_mean
from alp_agents.models.loading import _as_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


SMOLLM2_VOCAB_SIZE = 49152
"""Vocabulary of the default tokenizer, so tiny models pair with ``load_tokenizer()``."""
SMOLLM2_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
"""``<|im_start|>`` = 1 and ``<|im_end|>`` = 2 (also the pad token) in the default tokenizer."""

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "gpt_neox")
"""Architectures `make_tiny_model` knows; all are decoder-only ``AutoModelForCausalLM`` types."""

_TINY_MAX_POSITIONS = 4096
_DROPOUT_KEYS = (
    "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
    "summary_first_dropout", "classifier_dropout", "resid_dropout", "embd_dropout",
)  # fmt: skip


def _tiny_config_kwargs(arch: str, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """Per-architecture config fields; everything not named here keeps the library default."""
    heads = max(1, hidden_size // 16)
    if arch == "gpt2":
        return {"n_embd": hidden_size, "n_layer": num_layers, "n_head": heads,
                "n_positions": _TINY_MAX_POSITIONS}  # fmt: skip
    common = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": _TINY_MAX_POSITIONS,
    }
    if arch == "gpt_neox":
        return common | {"rotary_pct": 0.5}
    # Grouped-query attention (two heads per KV head) where the architecture supports it, so the
    # tiny models exercise the same code paths as the real ones.
    gqa = {"num_key_value_heads": max(1, heads // 2), "head_dim": hidden_size // heads}
    if arch in ("mistral", "qwen2", "qwen3"):
        gqa["sliding_window"] = None
    if arch == "phi3":
        gqa.pop("head_dim")
    return common | gqa


def make_tiny_model(
    arch: str = "llama",
    vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
) -> PreTrainedModel:
    """A tiny randomly initialised decoder-only model (no download; for fast tests).

    The vocabulary defaults to the default tokenizer's (49,152 ids) so the model pairs with
    ``load_tokenizer()``; pass ``tokenizer`` to match another one (its length and special ids are
    used) or ``vocab_size`` to set it directly. Dropout is off, input and output embeddings are
    tied, and the global RNG is left untouched (``seed`` fixes the weights). Returned in eval mode.

    >>> import torch
    >>> model = make_tiny_model("qwen2", num_layers=3)
    >>> model.config.num_hidden_layers, model.config.vocab_size
    (3, 49152)
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 49152])
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(
            f"Unknown tiny architecture {arch!r}.{did_you_mean(arch, TINY_ARCHS)} Known: {', '.join(TINY_ARCHS)}"
        )
    if hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16 (the head size), got {hidden_size}")
    special = dict(SMOLLM2_SPECIAL_IDS)
    if tokenizer is not None:
        vocab_size = vocab_size or len(tokenizer)
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        }
    vocab_size = vocab_size or SMOLLM2_VOCAB_SIZE
    kwargs = _tiny_config_kwargs(arch, hidden_size, num_layers)
    config = AutoConfig.for_model(
        arch, vocab_size=vocab_size, tie_word_embeddings=True, **special, **kwargs
    )
    for key in _DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, 0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=_as_dtype(dtype))
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    return model.eval()


def tiny_llama(**kwargs: Any) -> PreTrainedModel:
    """`make_tiny_model` with ``arch="llama"`` (the architecture of the default model)."""
    return make_tiny_model("llama", **kwargs)


TINY_PREFIX = "tiny-"


def register_tiny_models(prefix: str = TINY_PREFIX) -> list[str]:
    """Register ``<prefix><arch>`` for every architecture of `TINY_ARCHS`; returns the names.

    Each builds `make_tiny_model` (hidden 64, 2 layers) with the run's dtype and seed and pairs
    with the default tokenizer. Registering again is harmless (the same factories replace
    themselves).
    """
    from alp_agents.models.registry import register_model_factory

    names = []
    for arch in TINY_ARCHS:

        def build(dtype: torch.dtype, seed: int, arch: str = arch) -> PreTrainedModel:
            return make_tiny_model(arch, seed=seed, dtype=dtype)

        register_model_factory(prefix + arch, build, replace=True)
        names.append(prefix + arch)
    return names
