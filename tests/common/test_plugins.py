"""``--import MODULE``: an environment, dataset and model registered in the user's own module
are usable from the training and evaluation command lines (real scripts, real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alp_agents.common.plugins import PluginImportError, import_modules, pop_imports
from tests.tiny_models import TINY_ONE_STEP_ARGS

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = textwrap.dedent(
    '''
    """A user's module: one environment, one dataset, the tiny test models."""
    import envs
    from envs.grading import Grade
    from envs.math_env import MathEnv

    from alp_agents.models import register_tiny_models


    class EvenLength(MathEnv):
        def grade_answer(self, text):
            even = len(text) % 2 == 0
            return Grade("correct" if even else "wrong", str(len(text)), "even", "parity")


    def problems(split="train", **_):
        return [envs.Problem(f"{split}-{i}", f"Say {i}.", "even") for i in range(8)]


    envs.register("plug/EvenLength-v0", EvenLength)
    envs.register_generator("plug_numbers", problems)
    register_tiny_models()
    '''
)

TRAIN_ARGS = [
    *TINY_ONE_STEP_ARGS,
    "env.id=plug/EvenLength-v0",
    "env.dataset=plug_numbers",
    "env.max_turns=1",
]


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ALP_AGENTS_MODEL_MODULES"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(ROOT / "train" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pop_imports_takes_every_occurrence_and_keeps_the_rest():
    rest, modules = pop_imports(["--import", "a", "x=1", "--import=b.c", "--preset", "alp"])
    assert rest == ["x=1", "--preset", "alp"] and modules == ["a", "b.c"]
    with pytest.raises(PluginImportError, match="needs a module name"):
        pop_imports(["--import"])


def test_import_errors_name_the_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(PluginImportError, match="no module named 'no_such_plugin'"):
        import_modules(["no_such_plugin"])
    (tmp_path / "broken_plugin.py").write_text("x = 1\nraise RuntimeError('bad registry')\n")
    with pytest.raises(
        PluginImportError, match=r"RuntimeError: bad registry \(.*broken_plugin.py:2\)"
    ):
        import_modules(["broken_plugin"])


@pytest.mark.slow
def test_training_cli_uses_an_env_registered_by_an_imported_module(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    run_dir = tmp_path / "run"
    without = _run("multi_turn.py", [*TRAIN_ARGS, f"logging.run_dir={run_dir}"], tmp_path)
    assert without.returncode == 2, without.stderr[-2000:]
    assert "tiny-llama" in without.stderr or "plug/EvenLength-v0" in without.stderr

    done = _run(
        "multi_turn.py",
        ["--import", "my_plugin", *TRAIN_ARGS, f"logging.run_dir={run_dir}"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r.get("step") == 1 and "reward/mean" in r)
    assert 0.0 <= step["reward/mean"] <= 1.0
    finish = {k: v for k, v in step.items() if k.startswith("finish/")}
    assert finish and sum(finish.values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_evaluation_cli_uses_an_imported_module(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    args = [
        "--model=tiny-llama",
        "--env.id=plug/EvenLength-v0",
        "--dataset=plug_numbers",
        "--split=test",
        "--num-problems=2",
        "--k=1",
        "--max-tokens=8",
        "--max-turns=1",
        "--progress=false",
        f"--run-dir={tmp_path / 'eval'}",
    ]
    missing = _run("evaluate.py", ["--import", "not_my_plugin", *args], tmp_path)
    assert missing.returncode == 2 and "not_my_plugin" in missing.stderr
    done = _run("evaluate.py", ["--import=my_plugin", *args], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["metrics"]["num_problems"] == 2 and report["metrics"]["num_samples"] == 2
