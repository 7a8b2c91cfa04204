"""The examples in the envs docstrings and in docs/environments.md run as written."""

from __future__ import annotations

import doctest
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = [
    "envs",
    "envs.checker",
    "envs.core",
    "envs.datasets",
    "envs.grading",
    "envs.math_env",
    "envs.procedural",
    "envs.prompts",
    "envs.python_tool_env",
    "envs.registration",
    "envs.rewards",
    "envs.text",
    "envs.tool_formats",
    "envs.tools",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, (
        f"{result.failed} doctest(s) failed in {name} (run: python -m doctest -v)"
    )


def test_environments_guide_examples_run(monkeypatch):
    text = (ROOT / "docs" / "environments.md").read_text()
    blocks = [
        b
        for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
        if not b.lstrip().startswith("# illustrative")
    ]
    assert len(blocks) >= 3
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples" / "unit_converter"))
    namespace: dict = {"__name__": "docs_example"}
    for block in blocks:
        exec(
            compile(block, "<docs/environments.md>", "exec", dont_inherit=True), namespace
        )  # our own docs
    sys.modules.pop("unit_converter_env", None)


def test_tutorial_grading_hook_is_the_example_code_verbatim():
    """The tutorial shows the real grade_answer (not `...`), so the two cannot drift apart."""
    example = ROOT / "docs" / "examples" / "unit_converter"
    readme = (example / "README.md").read_text()
    [block] = [
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "def grade_answer" in b
    ]
    method = block[block.index("    def grade_answer") :]
    assert "..." not in method and "envs.extract_boxed" in method and "envs.Grade(" in method
    assert method in (example / "unit_converter_env.py").read_text()
