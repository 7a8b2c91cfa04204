"""Models built in code, registered by name: load_model, load_tokenizer and config validation
accept the name; the tiny test models are registered the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alp_agents.models import (
    load_model,
    load_tokenizer,
    make_tiny_model,
    model_factory,
    model_name_problem,
    register_model_factory,
    registered_models,
    unregister_model_factory,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registered():
    calls = []

    def build(dtype, seed):
        calls.append((dtype, seed))
        return make_tiny_model("qwen2", num_layers=1, seed=seed, dtype=dtype)

    register_model_factory("test-built-in-code", build)
    yield calls
    unregister_model_factory("test-built-in-code")


def test_a_registered_name_loads_with_the_dtype_and_seed(registered):
    model = load_model("test-built-in-code", dtype="bfloat16", seed=5)
    assert registered == [(torch.bfloat16, 5)]
    assert model.config.model_type == "qwen2" and not model.training
    again = load_model("test-built-in-code", dtype="bfloat16", seed=5)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )
    assert len(load_tokenizer("test-built-in-code")) == model.config.vocab_size


def test_registering_twice_needs_replace(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_model_factory("test-built-in-code", lambda dtype, seed: None)
    register_model_factory("test-built-in-code", lambda dtype, seed: "other", replace=True)
    assert model_factory("test-built-in-code").build(torch.float32, 0) == "other"


def test_config_validation_accepts_registered_names_and_suggests_one(registered):
    assert model_name_problem("test-built-in-code") is None
    assert model_name_problem("smollm2-135m-instruct") is None
    assert model_name_problem("HuggingFaceTB/SmolLM2-135M") is None
    problem = model_name_problem("test-built-in-cod")
    assert "Did you mean 'test-built-in-code'" in problem
    assert "tiny-llama" in registered_models()  # tests/conftest.py registers the tiny models


def test_train_config_rejects_an_unknown_model_name():
    from alp_agents.configs.train import TrainConfig, TrainConfigError
    from alp_agents.trainer.validation import validate_config

    cfg = TrainConfig()
    cfg.model.name = "tiny-lama"
    with pytest.raises(TrainConfigError, match="model.name='tiny-lama'.*Did you mean 'tiny-llama'"):
        validate_config(cfg)


def test_another_process_finds_names_through_the_module_list():
    code = (
        "from alp_agents.models import model_factory; print(model_factory('tiny-gpt2') is not None)"
    )
    env = {**os.environ, "ALP_AGENTS_MODEL_MODULES": "tests.tiny_models"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "True", out.stderr
    env.pop("ALP_AGENTS_MODEL_MODULES")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr
