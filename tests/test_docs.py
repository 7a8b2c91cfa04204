"""The Python examples in docs/models.md and docs/configuration.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
SKIP_PREFIX = "# illustrative"


def python_blocks(name: str) -> list[str]:
    text = (DOCS / name).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if not b.lstrip().startswith(SKIP_PREFIX)]


def run_blocks(blocks: list[str]) -> dict:
    namespace: dict = {"__name__": "docs_example"}
    for block in blocks:
        code = compile(block, "<docs example>", "exec", dont_inherit=True)
        exec(code, namespace)  # our own docs, not model output
    return namespace


def test_configuration_examples_run(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["demo", "--steps", "7"])
    blocks = python_blocks("configuration.md")
    assert len(blocks) >= 4
    namespace = run_blocks(blocks)
    assert namespace["cfg"].steps == 7  # parse_cli read the patched argv
    out = capsys.readouterr().out
    assert "unknown key 'optim.lrr'. Did you mean 'optim.lr'?" in out


def test_tiny_model_examples_run(capsys):
    blocks = [b for b in python_blocks("models.md") if "load_model(" not in b]
    assert blocks
    run_blocks(blocks)
    assert "LlamaForCausalLM" in capsys.readouterr().out


@pytest.mark.slow
def test_default_model_example_runs(default_model_path, capsys):
    blocks = [b for b in python_blocks("models.md") if "load_model(" in b]
    assert blocks
    run_blocks(blocks)
    assert "Paris" in capsys.readouterr().out
