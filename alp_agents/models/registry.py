"""Models built in code, by name: register a factory once, then use its name like any model.

``model.name`` in a training or evaluation config, `load_model` and `load_tokenizer` accept a
registered name before trying the embedded models, local folders and Hub ids. Use it for a
model that is not a saved folder: one built from a config in code, a test model, a model with
a patched architecture::

    from alp_agents.models import register_model_factory, make_tiny_model

    register_model_factory(
        "my-tiny", lambda dtype, seed: make_tiny_model("qwen2", dtype=dtype, seed=seed)
    )
    cfg.model.name = "my-tiny"          # ALPTrainer(cfg) builds it with cfg.seed

A factory gets the master-weight dtype and the run's seed (a random initialisation must be
reproducible) and returns a transformers causal LM; the tokenizer is loaded by
``tokenizer`` (any name `load_tokenizer` accepts, the default model's by default).

Registrations live in the process that made them. Processes started for you (the study
runner's cells, ``accelerate launch`` workers that do not run your script) import the modules
listed in ``$ALP_AGENTS_MODEL_MODULES`` (comma-separated) the first time a name is not found,
so a module that registers at import makes its names available there too.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODULES_ENV = "ALP_AGENTS_MODEL_MODULES"
"""Environment variable: modules imported to find names registered in another process."""

ModelBuilder = Callable[[torch.dtype, int], "PreTrainedModel"]
"""``build(dtype, seed) -> model``."""


@dataclass(frozen=True)
class ModelFactory:
    """A registered model: how to build it and which tokenizer goes with it."""

    name: str
    build: ModelBuilder
    tokenizer: str


_FACTORIES: dict[str, ModelFactory] = {}
_imported_modules: set[str] = set()


def register_model_factory(
    name: str, build: ModelBuilder, *, tokenizer: str | None = None, replace: bool = False
) -> ModelFactory:
    """Make ``name`` loadable: ``build(dtype, seed)`` returns the model.

    ``tokenizer`` is what `load_tokenizer` loads for this name (default: the default model's,
    whose vocabulary the tiny test models share). Registering a name twice raises
    `ValueError` unless ``replace``.
    """
    from alp_agents.models.loading import DEFAULT_MODEL

    if not name or not isinstance(name, str):
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    if name in _FACTORIES and not replace:
        raise ValueError(f"model {name!r} is already registered (pass replace=True to replace it)")
    factory = ModelFactory(name, build, tokenizer or DEFAULT_MODEL)
    _FACTORIES[name] = factory
    return factory


def unregister_model_factory(name: str) -> None:
    """Forget ``name`` (no error if it was not registered)."""
    _FACTORIES.pop(name, None)


def model_factory(name: str) -> ModelFactory | None:
    """The factory registered under ``name`` (after importing ``$ALP_AGENTS_MODEL_MODULES``
    once, if it is not known yet), or None."""
    if name not in _FACTORIES:
        _import_registering_modules()
    return _FACTORIES.get(name)


def registered_models() -> list[str]:
    """Every registered name, sorted."""
    _import_registering_modules()
    return sorted(_FACTORIES)


def _import_registering_modules() -> None:
    for module in os.environ.get(MODULES_ENV, "").split(","):
        module = module.strip()
        if module and module not in _imported_modules:
            _imported_modules.add(module)
            importlib.import_module(module)
