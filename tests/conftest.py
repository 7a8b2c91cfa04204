"""Shared pytest set-up and fixtures for the whole suite.

Fixtures for every test folder:

* ``default_model_path`` (session): the converted SmolLM2-135M-Instruct folder (built once, ~20 s,
  then reused from ``$ALP_AGENTS_HOME``).
* ``tokenizer`` (session): its tokenizer with chat template. Shared: do not mutate it (e.g.
  ``padding_side``); call ``alp_agents.models.load_tokenizer()`` for a private copy.
* ``default_model`` (session): SmolLM2 in float32, eval mode. Shared: never train or modify it;
  ``load_model()`` gives a private copy in about a second.
* ``tiny_model`` (per test): a fresh 2-layer random Llama with the SmolLM2 vocabulary
  (``alp_agents.models.make_tiny_model``), safe to train.

The tiny models are also registered by name (``tiny-llama``, ... : tests/tiny_models.py), here
and, through ``$ALP_AGENTS_MODEL_MODULES``, in the processes the tests start.

Tests that use the real model are marked ``@pytest.mark.slow`` (they still run in CI).
"""

from __future__ import annotations

import os

# No hub downloads in tests (the machines have no network besides package indexes; a hub id
# must fail fast instead of retrying), and no tokenizers thread pool across the sandbox's forks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ALP_AGENTS_MODEL_MODULES", "tests.tiny_models")

import pytest  # noqa: E402

import tests.tiny_models  # noqa: E402,F401  (registers tiny-llama, ... in this process)


def pytest_report_header(config: pytest.Config) -> list[str]:
    from alp_agents.models import alp_agents_home

    preload = os.environ.get("LD_PRELOAD", "")
    allocator = "tcmalloc" if "tcmalloc" in preload else "default (glibc)"
    return [f"alp_agents cache: {alp_agents_home()}; allocator: {allocator}"]


@pytest.fixture(scope="session")
def default_model_path():
    """Path of the converted default model (converted on first use)."""
    from alp_agents.models import DEFAULT_MODEL, ensure_embedded_model

    return ensure_embedded_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    """The SmolLM2 tokenizer (shared across the session: treat as read-only)."""
    from alp_agents.models import load_tokenizer

    return load_tokenizer(default_model_path)


@pytest.fixture(scope="session")
def default_model(default_model_path):
    """SmolLM2-135M-Instruct, float32, eval mode (shared across the session: read-only)."""
    from alp_agents.models import load_model

    return load_model(default_model_path)


@pytest.fixture
def tiny_model():
    """A fresh tiny random Llama (2 layers, hidden 64, SmolLM2 vocabulary); safe to train."""
    from alp_agents.models import tiny_llama

    return tiny_llama()
