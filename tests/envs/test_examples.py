"""Runs the tests that ship with the examples in docs/examples (they are part of the suite), and
the shopping-cart tutorial (docs/examples/shop) end to end: stepped by hand, then evaluated and
trained through the real command lines with ``--import shop_env`` on a tiny model."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import envs
from tests.tiny_models import TINY_ONE_STEP_ARGS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
SHOP = EXAMPLES / "shop"
COLUMN_ARGS = ["id=uid", "question=prompt", "answer=total_cents"]


def test_example_environment_tests_pass():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(EXAMPLES),
            str(EXAMPLES),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.fixture
def shop(monkeypatch):
    """The tutorial's module, imported from its folder as ``--import shop_env`` would."""
    monkeypatch.syspath_prepend(str(SHOP))
    return importlib.import_module("shop_env")  # importing registers shop/Cart-v0


@pytest.fixture
def problem_files(tmp_path, shop) -> Path:
    return shop.write_problem_files(tmp_path / "data", n_train=4, n_test=2)


def test_shop_tutorial_stepped_by_hand(shop, problem_files):
    env = envs.make("shop/Cart-v0", dataset=str(problem_files / "{split}.parquet"))
    assert env.tool_prompt == "auto" and not env.tools_in_template  # no tokenizer: "system"
    _, info = env.reset(options={"problem_id": "shop-test-0"})
    assert env.problem.answer == "845" and env.problem.metadata == {"items": "apple,lemon,mango"}
    call = '<tool_call>{{"name": "add_to_cart", "arguments": {{"item": "{}", "quantity": {}}}}}</tool_call>'
    obs, reward, terminated, _, info = env.step(call.format("apple", 5) + call.format("lemon", 4))
    assert not terminated and "total 365 cents" in obs
    assert reward == pytest.approx(0.2) and info["rewards"] == {"tool_use": 1.0}
    assert env.episode_state["cart"] == {"apple": 5, "lemon": 4}
    obs, reward, *_ = env.step(call.format("mango", 4))
    assert "total 845 cents" in obs and reward == 0.0
    _, reward, terminated, _, info = env.step("So \\boxed{845}.")
    assert terminated and reward == 1.0
    assert info["rewards"] == {"correctness": 1.0, "tool_use": 0.0}
    assert env.last_cart == {"apple": 5, "lemon": 4, "mango": 4}


def test_shop_tutorial_code_blocks_are_the_example_code():
    """The README shows the real tool and class (lines elided with `...` only), so they cannot drift."""
    readme = (SHOP / "README.md").read_text()
    code = (SHOP / "shop_env.py").read_text().splitlines()
    blocks = [
        b
        for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
        if "class ShopEnv" in b or "@envs.tool" in b
    ]
    assert len(blocks) == 2
    for block in blocks:
        for line in block.splitlines():
            assert not line.strip() or "..." in line or line in code, line


def _run_script(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Runs a train/ script from the tutorial's folder, as its README does; the tiny models come
    from ``$ALP_AGENTS_MODEL_MODULES`` (tests.tiny_models, importable from the repo root)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ALP_AGENTS_MODEL_MODULES="tests.tiny_models")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, str(ROOT / "train" / script), "--import", "shop_env", *args],
        cwd=SHOP,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_shop_tutorial_evaluates_from_the_command_line(problem_files, tmp_path):
    done = _run_script(
        "evaluate.py",
        [
            "--model=tiny-llama",
            "--env.id=shop/Cart-v0",
            f"--dataset={problem_files}/{{split}}.parquet",
            "--split=test",
            *[f"dataset_columns.{c}" for c in COLUMN_ARGS],
            "--num-problems=2",
            "--k=1",
            "--max-tokens=8",
            "--max-turns=2",
            "--env.kwargs.one_shot=true",
            "--progress=false",
            f"--run-dir={tmp_path / 'eval'}",
        ],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"]
    assert metrics["num_problems"] == 2 and metrics["num_samples"] == 2
    assert {"reward/mean", "reward/correctness", "reward/tool_use"} <= set(metrics)
    lines = (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    samples = sorted((json.loads(line) for line in lines), key=lambda s: s["problem_id"])
    assert [s["problem_id"] for s in samples] == ["shop-test-0", "shop-test-1"]
    assert samples[0]["reference"] == "845"  # total_cents, read through dataset_columns
    assert set(samples[0]["rewards"]) <= {"correctness", "tool_use"}
    # The tiny model uses SmolLM2's template, which ignores tools=: the fallback puts the schemas
    # in the system message, and the one-shot example's call is written out as text.
    prompt = samples[0]["prompt"]
    assert '"name": "add_to_cart"' in prompt[0]["content"]
    assert prompt[2]["role"] == "assistant" and "<tool_call>" in prompt[2]["content"]


@pytest.mark.slow
def test_shop_tutorial_trains_from_the_command_line(problem_files, tmp_path):
    run_dir = tmp_path / "run"
    done = _run_script(
        "multi_turn.py",
        [
            *TINY_ONE_STEP_ARGS,
            "env.id=shop/Cart-v0",
            f"env.dataset={problem_files}/{{split}}.parquet",
            *[f"env.dataset_columns.{c}" for c in COLUMN_ARGS],
            "env.max_turns=2",
            f"logging.run_dir={run_dir}",
        ],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r.get("step") == 1 and "reward/mean" in r)
    assert step["batch/trajectories"] == 4
    assert 0.0 <= step["reward/correctness"] <= 1.0 and 0.0 <= step["reward/tool_use"] <= 1.0
    ids = {json.loads(line)["problem_id"] for line in (run_dir / "trajectories.jsonl").open()}
    assert ids <= {f"shop-train-{i}" for i in range(4)}
