"""Held-out evaluation: sample n episodes per problem, grade them, report pass@k / avg@n / maj@k.

Two entry points share one code path:

* `evaluate` (and ``python train/evaluate.py``) loads a model, validates the inputs before doing
  anything expensive, writes a run directory and resumes an interrupted run:

  ``samples.jsonl``    one line per episode (prompt, full transcript with tool outputs, extracted
                       answer, grade, finish reason, tool counts), appended as problems finish;
  ``eval_config.yaml`` the resolved configuration (also the resume fingerprint);
  ``report.json``      every metric, bootstrap intervals, per-source / per-level breakdown;
  ``report.md``        the same as tables for humans;
  ``pass_at_k.png``    unbiased pass@k against k with its confidence band.

* `evaluate_with_engine` runs on an engine that already exists (the trainer calls it every N
  steps on a held-out split with its live inference engine) and returns an `EvalResult` whose
  ``summary`` is a flat ``{metric: float}`` ready for logging.

Grades are three-valued; an unverifiable grade (verifier timeout, sandbox failure) is never
counted as wrong (see `alp_agents.evaluation.metrics`).

Example (the default model on 20 GSM8K test problems, 4 samples each; a few minutes on CPU)::

    >>> import alp_agents
    >>> report = alp_agents.evaluate(dataset="gsm8k_test", limit=20, k=4)  # doctest: +SKIP
    >>> report.summary["pass@1"], report.summary["pass@4"]                  # doctest: +SKIP
    (0.09, 0.2)
    >>> print(report.run_dir / "report.md")                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alp_agents.evaluation import metrics as eval_metrics
from alp_agents.evaluation.metrics import CORRECT, UNVERIFIABLE, WRONG

if TYPE_CHECKING:
    from alp_agents.rollout.engines import InferenceEngine, SamplingParams

__all__ = [
    "EvalConfig",
    "EvalReport",
    "EvalResult",
    "EvaluationError",
    "evaluate",
    "evaluate_with_engine",
    "load_records",
    "write_reports",
]

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "eval_config.yaml"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PASS_AT_K_PNG = "pass_at_k.png"

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "*.safetensors.index.json")
"""Files one of which a model folder must hold to have weights."""

# Fields that decide what the samples are; a run directory whose samples were drawn with other
# values cannot be resumed. (``limit`` and ``k`` are absent on purpose: raising the limit extends
# a finished run, and k only changes which numbers the report highlights.)
_FINGERPRINT_FIELDS = (
    "model",
    "env",
    "dataset",
    "split",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_turns",
    "seed",
    "env_kwargs",
    "sandbox",
    "dtype",
)


class EvaluationError(ValueError):
    """A bad evaluation request (unknown env or dataset, model without weights, k > n, ...)."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Evaluate a model on held-out problems: unbiased pass@k, avg@n, maj@k, tool statistics."""

    model: str = "smollm2-135m-instruct"
    """Embedded model name, a checkpoint folder (save_pretrained layout) or a Hub id."""
    env: str = "alp/PythonTool-v0"
    """Registered environment id (see envs.registered())."""
    dataset: str = "gsm8k_test"
    """Bundled dataset name (gsm8k_test, math500, aime24, amc23, olympiadbench, arith, ...) or a JSONL path."""
    split: str | None = None
    """Dataset split where the dataset has several (procedural 'arith': train | test)."""
    limit: int | None = None
    """Evaluate only the first N problems (quick runs); null = all."""
    k: int = 8
    """Samples per problem, and the headline k of pass@k / maj@k (see n)."""
    n: int | None = None
    """Samples drawn per problem when more than k are wanted (papers' Average@32: n=32, k=1); null = k."""
    temperature: float = 1.0
    """Sampling temperature (the paper evaluates at 1.0)."""
    top_p: float = 0.7
    """Nucleus sampling (the paper evaluates at 0.7)."""
    max_tokens: int = 512
    """New tokens per assistant turn."""
    max_turns: int | None = None
    """Assistant turns per episode; null = the environment's default."""
    seed: int = 0
    """Seeds sampling, environments and the bootstrap: same seed, same numbers."""
    engine: str = "auto"
    """Inference engine: hf (transformers, CPU default), vllm (GPU), auto (vllm if CUDA and vllm exist)."""
    dtype: str = "auto"
    """Engine weights dtype: auto = bfloat16 where the device runs it natively (GPU, AMX,
    AVX512-BF16; ~1.5x faster than float32 there), else float32 (bf16 matmuls are ~100x slower
    on AVX2-only CPUs); or any torch dtype name."""
    sandbox: str | None = None
    """Sandbox backend for tool environments (e.g. local, docker); null = the environment's default."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for envs.make (e.g. {timeout_s: 3})."""
    batch_size: int = 64
    """Episodes generated together (problems are batched so that problems x n stays near this)."""
    train_dataset: str | None = None
    """Training set for the contamination guard: warn when it overlaps the evaluation set."""
    train_split: str | None = None
    """Split of train_dataset."""
    confidence: float = 0.95
    """Level of the bootstrap confidence intervals."""
    bootstrap_resamples: int = 1000
    """Bootstrap resamples (over problems)."""
    run_dir: str | None = None
    """Output folder; null = runs/eval/<model>-<dataset>[-<split>]-n<n>-seed<seed>. Reused = resumed."""
    overwrite: bool = False
    """Delete earlier samples in run_dir instead of resuming them."""
    progress: bool = True
    """Show a progress bar with the running accuracy."""

    @property
    def samples_per_problem(self) -> int:
        return self.k if self.n is None else self.n


@dataclass
class EvalResult:
    """What an evaluation produced.

    Attributes:
        summary: flat ``{name: float}``: ``pass@1..pass@n``, ``avg@n``, ``maj@j`` (j in
            ``report_ks``), ``tool_calls_per_episode``, ``tool_use_rate``, ``tool_error_rate``,
            ``void_turn_rate``, ``turns_per_episode``, ``response_tokens_per_episode``,
            ``unverifiable_rate``, ``finish_reason/<reason>``, ``num_problems``,
            ``num_samples``, ``num_unverifiable``. Undefined rates are NaN.
        intervals: ``{name: (low, high)}`` bootstrap intervals of the headline metrics.
        breakdown: ``{"source" | "level": {value: {metric: float}}}`` where the data has them.
        records: one dict per episode (see `sample_record`).
        n, k: samples per problem and the headline k.
        report: the full `eval_metrics.summarize` output (JSON-able).
    """

    summary: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    breakdown: dict[str, dict[str, dict[str, float]]]
    records: list[dict[str, Any]]
    n: int
    k: int
    report: dict[str, Any]


@dataclass
class EvalReport(EvalResult):
    """An `EvalResult` plus where it was written and how long it took."""

    config: EvalConfig = field(default_factory=EvalConfig)
    run_dir: Path = Path(".")
    files: dict[str, Path] = field(default_factory=dict)
    elapsed_s: float = 0.0
    resumed_samples: int = 0


# ----------------------------------------------------------------------------------------------
# Per-sample records
# ----------------------------------------------------------------------------------------------


def sample_grade(grade_status: str, finish_reason: str | None) -> str:
    """The evaluation grade of an episode: correct | wrong | unverifiable.

    An episode that ended without a gradable answer (``grade_status == "none"``) is wrong,
    unless OUR infrastructure ended it (``sandbox_error``): then nobody knows, and it is
    unverifiable rather than a silent zero.
    """
    from alp_agents.rollout.trajectory import INFRA_FAILURE_REASONS

    if finish_reason in INFRA_FAILURE_REASONS:
        return CORRECT if grade_status == CORRECT else UNVERIFIABLE
    if grade_status in (CORRECT, WRONG, UNVERIFIABLE):
        return grade_status
    return WRONG


def sample_record(
    problem: Any, sample_index: int, trajectory: Any, episode_log: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One JSON-able line of ``samples.jsonl``: the episode as a human wants to read it.

    ``episode_log`` is what `_EpisodeRecorder` saw of the episode's ``env.step`` infos: every tool
    call (code, status, the observation the model saw, stdout / stderr; including a final call
    whose output held the answer and so produced no observation message), the extracted answer
    and the grader's detail.
    """
    messages = list(trajectory.messages)
    log = episode_log or {}
    prompt = log.get("prompt")
    if prompt is None:  # no log: everything before the first reply (misses one-shot examples)
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        prompt = messages if first is None else messages[:first]
    metadata = dict(getattr(problem, "metadata", None) or {})
    tool_results = list(log.get("tool_results", []))
    return {
        "problem_id": str(problem.id),
        "sample_index": sample_index,
        "source": getattr(problem, "source", None),
        "level": metadata.get("level"),
        "question": problem.question,
        "reference": problem.answer,
        "extracted_answer": log.get("extracted_answer"),
        "grade": sample_grade(trajectory.grade_status, trajectory.finish_reason),
        "grade_detail": log.get("grade_detail", trajectory.metrics.get("grade_detail")),
        "reward": float(trajectory.reward),
        "finish_reason": trajectory.finish_reason,
        "num_turns": int(trajectory.num_turns),
        "num_tool_calls": int(trajectory.num_tool_calls),
        "num_tool_errors": sum(r.get("status") not in ("ok", None) for r in tool_results),
        "num_void_turns": int(trajectory.num_void_turns),
        "response_tokens": int(sum(trajectory.loss_mask)),
        "prompt": prompt,
        "transcript": messages,
        "tool_results": tool_results,
    }


_TOOL_TEXT_CHARS = 2000


class _EpisodeRecorder:
    """Keeps what the rollout does not: per-episode tool results and the extracted answer.

    `run_episodes` accepts an environment factory; this one wraps every environment in a
    `gymnasium.Wrapper` that logs each ``step``'s ``info`` (tool results, grade) under the reset
    seed. `run_episodes` resets episode ``i`` of a call with ``seed + i``, so the log of the
    trajectory at position ``i`` is ``logs[seed + i]`` (checked against its problem id).
    """

    def __init__(self, env_id_or_factory: str | Callable[..., Any]):
        self.env_id_or_factory = env_id_or_factory
        self.logs: dict[int, dict[str, Any]] = {}

    def make(self, **kwargs: Any) -> Any:
        if isinstance(self.env_id_or_factory, str):
            import envs

            env = envs.make(self.env_id_or_factory, **kwargs)
        else:
            env = self.env_id_or_factory(**kwargs)
        return _recording_wrapper_class()(env, self)

    def log_for(self, seed: int, problem_id: str) -> dict[str, Any] | None:
        log = self.logs.pop(seed, None)
        if log is not None and str(log.get("problem_id")) != problem_id:
            logger.warning(
                "episode log for seed %s is for %s, not %s", seed, log["problem_id"], problem_id
            )
            return None
        return log


def _recording_wrapper_class() -> type:
    import gymnasium

    class RecordingEnv(gymnasium.Wrapper):
        """Passes everything through; copies tool results and the grade into the recorder."""

        def __init__(self, env: Any, recorder: _EpisodeRecorder):
            super().__init__(env)
            self._recorder = recorder
            self._log: dict[str, Any] = {}

        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
            obs, info = self.env.reset(seed=seed, options=options)
            self._log = {
                "problem_id": info.get("problem_id"),
                "prompt": [dict(m) for m in info.get("messages") or []],
                "tool_results": [],
            }
            if seed is not None:
                self._recorder.logs[seed] = self._log
            return obs, info

        def step(self, action: str):
            result = self.env.step(action)
            info = result[-1]
            for tool in info.get("tool_results") or []:
                self._log["tool_results"].append(
                    {
                        "turn": info.get("turn"),
                        "name": tool.get("name"),
                        "status": tool.get("status"),
                        "code": tool.get("code"),
                        "observation": tool.get("observation"),
                        "stdout": _clip(tool.get("stdout")),
                        "stderr": _clip(tool.get("stderr")),
                    }
                )
            grade = info.get("grade")
            if grade is not None:
                self._log["extracted_answer"] = getattr(grade, "extracted", None)
                self._log["grade_detail"] = getattr(grade, "detail", None)
            return result

    return RecordingEnv


def _clip(text: Any) -> Any:
    if not isinstance(text, str) or len(text) <= _TOOL_TEXT_CHARS:
        return text
    half = _TOOL_TEXT_CHARS // 2
    return f"{text[:half]}\n...[{len(text) - 2 * half} characters cut]...\n{text[-half:]}"


# ----------------------------------------------------------------------------------------------
# The evaluation loop (shared by the script and the trainer)
# ----------------------------------------------------------------------------------------------


def evaluate_with_engine(
    engine: InferenceEngine,
    tokenizer: Any,
    env_id: str | Callable[..., Any],
    problems: Sequence[Any],
    k: int,
    sampling: SamplingParams,
    env_kwargs: dict[str, Any] | None = None,
    seed: int | None = None,
    progress: bool = True,
    *,
    n: int | None = None,
    max_turns: int | None = None,
    batch_size: int = 64,
    completed: Sequence[dict[str, Any]] = (),
    on_problem_done: Callable[[list[dict[str, Any]]], None] | None = None,
    confidence: float = 0.95,
    bootstrap_resamples: int = 1000,
) -> EvalResult:
    """Sample ``n`` (default ``k``) episodes per problem with a live engine and score them.

    Args:
        engine, tokenizer: an `InferenceEngine` and its tokenizer (the trainer passes its own).
        env_id: a registered environment id, or a factory returning an environment.
        problems: `envs.Problem` objects (ids must be unique).
        k: samples per problem and headline k; ``n`` draws more samples than k.
        sampling: temperature / top_p / max_tokens per turn (the env adds its stop strings).
        env_kwargs: passed to the environment factory.
        seed: fixes sampling and environment seeds; each batch of problems derives its own seed
            from this and its problem ids, so a rerun reproduces every sample.
        progress: a tqdm bar over problems with the running accuracy and pass@n.
        max_turns: assistant turns per episode (None = the environment's default).
        batch_size: episodes generated together.
        completed: records of samples already done (resume); they are not redone.
        on_problem_done: called with a problem's new records as soon as its batch finishes
            (the script appends them to ``samples.jsonl``).

    Returns:
        An `EvalResult`; ``result.summary`` is flat and ready for a metrics logger.
    """
    from alp_agents.rollout.agent_loop import run_episodes

    n = k if n is None else n
    _check_k(k, n)
    ids = [str(p.id) for p in problems]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise EvaluationError(f"problem ids must be unique; repeated: {dupes}")
    wanted = set(ids)
    done: dict[str, dict[int, dict[str, Any]]] = {}
    for record in completed:
        pid = str(record["problem_id"])
        if pid in wanted and 0 <= int(record["sample_index"]) < n:
            done.setdefault(pid, {})[int(record["sample_index"])] = record
    todo = [
        (p, [i for i in range(n) if i not in done.get(str(p.id), {})])
        for p in problems
        if len(done.get(str(p.id), {})) < n
    ]

    recorder = _EpisodeRecorder(env_id)
    base_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    bar = _progress_bar(len(problems), len(problems) - len(todo), progress)
    running = _RunningScore(done.values(), n)
    bar.set_postfix_str(running.text(), refresh=False)
    try:
        for batch in _batches(todo, batch_size):
            # Problems that miss the same number of samples share one run_episodes call
            # (group_size must be the same for every problem in a call).
            by_missing: dict[int, list[tuple[Any, list[int]]]] = {}
            for problem, missing in batch:
                by_missing.setdefault(len(missing), []).append((problem, missing))
            for group_size, members in by_missing.items():
                batch_seed = _batch_seed(base_seed, members)
                trajectories = run_episodes(
                    recorder.make,
                    engine,
                    tokenizer,
                    [p for p, _ in members],
                    group_size,
                    sampling,
                    env_kwargs=env_kwargs,
                    max_turns=max_turns,
                    progress=progress,  # a per-batch bar: episodes, live, tokens/s
                    seed=batch_seed,
                )
                by_problem: dict[str, list[tuple[Any, Any]]] = {}
                for position, t in enumerate(trajectories):
                    log = recorder.log_for(batch_seed + position, str(t.problem_id))
                    by_problem.setdefault(str(t.problem_id), []).append((t, log))
                for problem, missing in members:
                    got = by_problem.get(str(problem.id), [])
                    if len(got) != len(missing):
                        raise RuntimeError(
                            f"run_episodes returned {len(got)} episodes for problem "
                            f"{problem.id!r}, expected {len(missing)}"
                        )
                    new = [
                        sample_record(problem, i, t, log)
                        for i, (t, log) in zip(missing, got, strict=True)
                    ]
                    for record in new:
                        done.setdefault(str(problem.id), {})[record["sample_index"]] = record
                    if on_problem_done is not None:
                        on_problem_done(new)
                    running.add(done[str(problem.id)].values())
                    bar.update(1)
                    bar.set_postfix_str(running.text(), refresh=True)
    finally:
        bar.close()

    records = [done[pid][i] for pid in ids for i in range(n)]
    return _result_from_records(records, n, k, confidence, bootstrap_resamples, seed or 0)


def _result_from_records(
    records: list[dict[str, Any]],
    n: int,
    k: int,
    confidence: float,
    bootstrap_resamples: int,
    seed: int,
) -> EvalResult:
    report = eval_metrics.summarize(
        records, n=n, k=k, confidence=confidence, num_resamples=bootstrap_resamples, seed=seed
    )
    return EvalResult(
        summary=dict(report["metrics"]),
        intervals={name: (lo, hi) for name, (lo, hi) in report["intervals"].items()},
        breakdown=report["breakdown"],
        records=records,
        n=n,
        k=k,
        report=report,
    )


def _check_k(k: int, n: int) -> None:
    if k < 1:
        raise EvaluationError(f"k must be at least 1, got k={k}")
    if n < 1:
        raise EvaluationError(f"n (samples per problem) must be at least 1, got n={n}")
    if k > n:
        raise EvaluationError(
            f"k={k} is larger than n={n} samples per problem: pass@{k} needs at least {k} "
            f"samples. Raise n (n={k}) or lower k."
        )


def _batches(
    todo: list[tuple[Any, list[int]]], batch_size: int
) -> list[list[tuple[Any, list[int]]]]:
    """Consecutive problems whose missing samples add up to about ``batch_size`` episodes."""
    batches: list[list[tuple[Any, list[int]]]] = []
    current: list[tuple[Any, list[int]]] = []
    size = 0
    for item in todo:
        if current and size + len(item[1]) > batch_size:
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += len(item[1])
    if current:
        batches.append(current)
    return batches


def _batch_seed(seed: int, members: list[tuple[Any, list[int]]]) -> int:
    """A seed that depends only on the base seed and which samples the batch draws."""
    key = "|".join(f"{p.id}:{','.join(map(str, missing))}" for p, missing in members)
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**31 - 1)


class _RunningScore:
    """Accuracy (mean correct over verifiable samples) and pass@n over finished problems."""

    def __init__(self, finished: Any, n: int):
        self.n = n
        self.correct = self.verifiable = self.solved = self.problems = 0
        for samples in finished:
            if len(samples) == n:
                self.add(samples.values())

    def add(self, samples: Any) -> None:
        grades = [s["grade"] for s in samples]
        if len(grades) < self.n:
            return
        self.correct += grades.count(CORRECT)
        self.verifiable += sum(g != UNVERIFIABLE for g in grades)
        self.solved += CORRECT in grades
        self.problems += 1

    def text(self) -> str:
        if not self.problems:
            return "acc=-"
        acc = self.correct / self.verifiable if self.verifiable else math.nan
        return f"acc={acc:.3f} pass@{self.n}={self.solved / self.problems:.3f}"


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="eval",
        unit="problem",
        disable=not enabled,
        dynamic_ncols=True,
    )


# ----------------------------------------------------------------------------------------------
# The script-level API: validation, run directory, resume, reports
# ----------------------------------------------------------------------------------------------


def evaluate(
    model: str | None = None,
    env: str | None = None,
    dataset: str | None = None,
    split: str | None = None,
    k: int | None = None,
    *,
    config: EvalConfig | None = None,
    **overrides: Any,
) -> EvalReport:
    """Evaluate a model on held-out problems and write a report folder (resumable).

    Every `EvalConfig` field can be passed as a keyword (``temperature=0.6, limit=50,
    run_dir="runs/eval/x"``) or through ``config``; keywords win. Inputs are checked before the
    model is loaded: an unknown environment or dataset, a checkpoint folder without weights or
    ``k > n`` raise `EvaluationError` naming the problem.

    >>> from alp_agents import evaluate
    >>> r = evaluate(dataset="arith", split="test", limit=10, k=4)  # doctest: +SKIP
    >>> sorted(r.files)                                             # doctest: +SKIP
    ['config', 'report_json', 'report_md', 'pass_at_k_png', 'samples']
    """
    given = {"model": model, "env": env, "dataset": dataset, "split": split, "k": k}
    changes = {key: value for key, value in given.items() if value is not None} | overrides
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(EvalConfig)})
    if unknown:
        raise TypeError(
            f"evaluate() got unknown option(s) {unknown}; valid: "
            f"{', '.join(f.name for f in dataclasses.fields(EvalConfig))}"
        )
    changes = {key: os.fspath(v) if isinstance(v, os.PathLike) else v for key, v in changes.items()}
    cfg = dataclasses.replace(config or EvalConfig(), **changes)
    return run_evaluation(cfg)


def run_evaluation(cfg: EvalConfig) -> EvalReport:
    """`evaluate` for a ready `EvalConfig` (what ``train/evaluate.py`` calls)."""
    started = time.perf_counter()
    n = cfg.samples_per_problem
    _check_k(cfg.k, n)
    if cfg.limit is not None and cfg.limit < 1:
        raise EvaluationError(f"limit must be a positive number of problems, got {cfg.limit}")
    if cfg.engine not in ("auto", "hf", "vllm"):
        raise EvaluationError(f"engine must be one of auto, hf, vllm; got {cfg.engine!r}")
    if cfg.sandbox not in (None, *SANDBOX_BACKENDS):
        raise EvaluationError(
            f"sandbox must be one of {', '.join(SANDBOX_BACKENDS)}; got {cfg.sandbox!r}"
        )
    if cfg.engine == "vllm":
        from alp_agents.rollout.engines import vllm_unavailable_reason

        reason = vllm_unavailable_reason()
        if reason:
            raise EvaluationError(f"engine 'vllm' is unavailable: {reason}")
    _check_env(cfg.env)
    problems, split = _load_problems(cfg)
    if split != cfg.split:
        _say(f"evaluating the {split!r} split of {cfg.dataset!r} (pass --split to choose)")
        cfg = dataclasses.replace(cfg, split=split)
    cfg = dataclasses.replace(cfg, model=resolve_checkpoint(cfg.model))
    _check_model(cfg.model)
    if cfg.train_dataset is None:
        cfg = dataclasses.replace(cfg, **_training_set_of(cfg.model))
    _contamination_guard(cfg, problems)

    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    completed = _prepare_run_dir(run_dir, cfg)
    wanted = {str(p.id) for p in problems}
    resumed = sum(str(r["problem_id"]) in wanted and r["sample_index"] < n for r in completed)
    if resumed:
        _say(f"resuming {run_dir}: {resumed} of {len(problems) * n} samples already done")

    done_ids = _complete_problem_ids(completed, n)
    if wanted <= done_ids:
        records = [r for r in completed if str(r["problem_id"]) in wanted and r["sample_index"] < n]
        order = {str(p.id): i for i, p in enumerate(problems)}
        records.sort(key=lambda r: (order[str(r["problem_id"])], r["sample_index"]))
        result = _result_from_records(
            records, n, cfg.k, cfg.confidence, cfg.bootstrap_resamples, cfg.seed
        )
    else:
        engine, tokenizer = _make_engine(cfg)
        from alp_agents.rollout.engines import SamplingParams

        sampling = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens
        )
        with open(run_dir / SAMPLES_FILE, "a", encoding="utf-8") as sink:

            def append(records: list[dict[str, Any]]) -> None:
                for record in records:
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())

            result = evaluate_with_engine(
                engine,
                tokenizer,
                cfg.env,
                problems,
                cfg.k,
                sampling,
                env_kwargs=_env_kwargs(cfg),
                seed=cfg.seed,
                progress=cfg.progress,
                n=n,
                max_turns=cfg.max_turns,
                batch_size=cfg.batch_size,
                completed=completed,
                on_problem_done=append,
                confidence=cfg.confidence,
                bootstrap_resamples=cfg.bootstrap_resamples,
            )
    elapsed = time.perf_counter() - started
    files = write_reports(run_dir, result, cfg, elapsed_s=elapsed, resumed_samples=resumed)
    return EvalReport(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(EvalResult)},
        config=cfg,
        run_dir=run_dir,
        files=files,
        elapsed_s=elapsed,
        resumed_samples=resumed,
    )


def default_run_dir(cfg: EvalConfig) -> Path:
    """``runs/eval/<model>-<dataset>[-<split>]-n<n>-seed<seed>``: rerunning the same command resumes."""
    model = Path(cfg.model.rstrip("/")).name or cfg.model
    dataset = Path(cfg.dataset).stem if cfg.dataset.endswith(".jsonl") else cfg.dataset
    parts = [model, dataset] + ([cfg.split] if cfg.split else [])
    parts += [f"n{cfg.samples_per_problem}", f"seed{cfg.seed}"]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))
    return Path("runs") / "eval" / slug


def _say(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def _load_problems(cfg: EvalConfig) -> tuple[list[Any], str | None]:
    """The evaluation problems and the split they came from.

    Without a split, the held-out ``"test"`` split is used where the dataset has one (e.g. the
    procedural ``arith``, whose default split is ``train``), else the dataset as named.
    """
    import envs

    split = cfg.split
    if split is None and not str(cfg.dataset).endswith((".jsonl", ".json")):
        try:
            problems = envs.load_dataset(cfg.dataset, split="test")
            split = "test"
        except ValueError:
            problems = None
    else:
        problems = None
    if problems is None:
        try:
            problems = envs.load_dataset(cfg.dataset, split=split)
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise EvaluationError(
                f"cannot load dataset {cfg.dataset!r} (split={split!r}): {exc}"
            ) from exc
    problems = list(problems)
    if cfg.limit is not None:
        problems = problems[: cfg.limit]
    if not problems:
        raise EvaluationError(f"dataset {cfg.dataset!r} (split={split!r}) has no problems")
    return problems, split


def _check_env(env_id: str) -> None:
    import envs

    known = list(envs.registered())
    if env_id not in known:
        import difflib

        close = difflib.get_close_matches(env_id, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise EvaluationError(
            f"unknown environment {env_id!r}.{hint} Registered: {', '.join(sorted(known))}"
        )


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def resolve_checkpoint(model: str) -> str:
    """Accept the folders a training run writes, not only the innermost model folder.

    A folder with weights is used as is; a training checkpoint (``checkpoints/step_N``) means its
    ``model/`` export; a run folder means its ``final/`` export, else its latest checkpoint.
    Names that are not local folders (embedded names, Hub ids) are returned unchanged.
    """
    local = Path(model).expanduser()
    if not local.is_dir() or _has_weights(local):
        return model
    candidates = [local / "model", local / "final"]
    candidates += sorted(local.glob("checkpoints/step_*/model"), reverse=True)
    for candidate in candidates:
        if candidate.is_dir() and _has_weights(candidate):
            _say(f"{local} has no weights of its own; evaluating {candidate}")
            return str(candidate)
    return model


def _check_model(model: str) -> None:
    """Refuse a local folder without weights before anything is loaded."""
    from alp_agents.models import UnknownModelError, resolve_model_path

    local = Path(model).expanduser()
    if local.is_dir() and not _has_weights(local):
        raise EvaluationError(
            f"{local} holds no model weights (looked for {', '.join(WEIGHT_PATTERNS)} here and "
            "in its model/, final/ and checkpoints/step_*/model/ folders). Point --model at a "
            "folder written by save_pretrained, a training run or checkpoint folder, an "
            "embedded name or a Hub id."
        )
    try:
        resolve_model_path(model)
    except UnknownModelError as exc:
        raise EvaluationError(str(exc)) from exc


def _training_set_of(model: str) -> dict[str, Any]:
    """The training set recorded next to a trained checkpoint (the run's ``config.yaml``).

    Looks in the model folder and up to three parents for a config with ``env.dataset`` and
    ``env.train_split`` (the trainer's layout); returns EvalConfig fields, or {} if none.
    """
    import yaml

    local = Path(model).expanduser()
    if not local.is_dir():
        return {}
    for folder in [local.resolve(), *list(local.resolve().parents)[:3]]:
        path = folder / "config.yaml"
        if not path.is_file():
            continue
        try:
            env = (yaml.safe_load(path.read_text()) or {}).get("env") or {}
        except (yaml.YAMLError, AttributeError):
            continue
        if isinstance(env, dict) and env.get("dataset"):
            _say(
                f"contamination guard: training set {env['dataset']!r} "
                f"(split {env.get('train_split')!r}) from {path}"
            )
            return {"train_dataset": env["dataset"], "train_split": env.get("train_split")}
    return {}


def _contamination_guard(cfg: EvalConfig, problems: list[Any]) -> int:
    """Warn when evaluation problems also occur in the training set; return how many do."""
    if not cfg.train_dataset:
        return 0
    import envs

    try:
        train = envs.load_dataset(cfg.train_dataset, split=cfg.train_split)
    except ValueError as exc:
        raise EvaluationError(
            f"contamination guard: cannot load train_dataset {cfg.train_dataset!r} "
            f"(split={cfg.train_split!r}): {exc}"
        ) from exc
    overlap = envs.dataset_overlap(train, problems)
    if overlap.n_overlap:
        message = (
            f"contamination: {overlap} (evaluation set {cfg.dataset!r}, training set "
            f"{cfg.train_dataset!r}); scores on those problems are not held-out scores."
        )
        warnings.warn(message, stacklevel=3)
        _say(message)
    else:
        _say(f"contamination guard: no overlap with the training set {cfg.train_dataset!r}")
    return overlap.n_overlap


SANDBOX_BACKENDS = ("local", "docker")


def _env_kwargs(cfg: EvalConfig) -> dict[str, Any]:
    """``envs.make`` keyword arguments: the config's env_kwargs plus the sandbox backend.

    ``sandbox: local`` (or null) keeps the environment's default (the process-wide warm
    LocalSandbox); ``sandbox: docker`` builds one `sandbox.DockerSandbox` shared by all episodes.
    """
    kwargs = {"dataset": cfg.dataset, "split": cfg.split, **cfg.env_kwargs}
    if cfg.sandbox in (None, "local"):
        return kwargs
    if cfg.sandbox == "docker":
        try:
            from sandbox import DockerSandbox

            kwargs["sandbox"] = DockerSandbox()
        except Exception as exc:  # ImportError (no docker package) or no reachable engine
            raise EvaluationError(f"sandbox 'docker' is unavailable here: {exc}") from exc
        return kwargs
    raise EvaluationError(
        f"sandbox must be one of {', '.join(SANDBOX_BACKENDS)}; got {cfg.sandbox!r}"
    )


def _make_engine(cfg: EvalConfig) -> tuple[Any, Any]:
    """HFEngine on CPU; VLLMEngine when asked for, or for ``auto`` when CUDA and vllm exist."""
    from alp_agents.models import load_tokenizer
    from alp_agents.rollout.engines import HFEngine, VLLMEngine, vllm_unavailable_reason

    choice = cfg.engine
    if choice not in ("auto", "hf", "vllm"):
        raise EvaluationError(f"engine must be one of auto, hf, vllm; got {cfg.engine!r}")
    if choice == "auto":
        import torch

        choice = "vllm" if torch.cuda.is_available() and not vllm_unavailable_reason() else "hf"
    tokenizer = load_tokenizer(cfg.model)
    if choice == "vllm":
        dtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype
        engine = VLLMEngine(cfg.model, tokenizer, dtype=dtype, seed=cfg.seed)
    else:
        from alp_agents.models.precision import resolve_engine_precision

        dtype, _ = resolve_engine_precision(cfg.dtype, "cpu", training=False)  # HFEngine's device
        engine = HFEngine(cfg.model, tokenizer, dtype=dtype, max_batch_size=cfg.batch_size)
    _say(f"engine: {type(engine).__name__} ({dtype}) for {cfg.model}")
    return engine, tokenizer


# ----------------------------------------------------------------------------------------------
# Run directory and resume
# ----------------------------------------------------------------------------------------------


def _fingerprint(cfg: EvalConfig) -> dict[str, Any]:
    values = {name: getattr(cfg, name) for name in _FINGERPRINT_FIELDS if name != "n"}
    values["n"] = cfg.samples_per_problem
    values["model_weights"] = _weights_signature(cfg.model)
    return json.loads(json.dumps(values, default=str))


def _weights_signature(model: str) -> str | None:
    """Size and mtime of a local model's weight files: a checkpoint rewritten in place is new."""
    local = Path(model).expanduser()
    if not local.is_dir():
        return None
    files = sorted(f for pattern in WEIGHT_PATTERNS for f in local.glob(pattern))
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def _prepare_run_dir(run_dir: Path, cfg: EvalConfig) -> list[dict[str, Any]]:
    """Create the folder, check an earlier run is the same evaluation, return its records."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    samples_path = run_dir / SAMPLES_FILE
    fingerprint = _fingerprint(cfg)
    if cfg.overwrite:
        for name in (SAMPLES_FILE, REPORT_JSON, REPORT_MD, PASS_AT_K_PNG):
            (run_dir / name).unlink(missing_ok=True)
    elif samples_path.exists() and config_path.exists():
        earlier = (yaml.safe_load(config_path.read_text()) or {}).get("fingerprint", {})
        changed = sorted(
            key
            for key in set(earlier) | set(fingerprint)
            if earlier.get(key) != fingerprint.get(key)
        )
        if changed:
            detail = "; ".join(
                f"{key}: {earlier.get(key)!r} -> {fingerprint.get(key)!r}" for key in changed
            )
            raise EvaluationError(
                f"{run_dir} holds samples of a different evaluation ({detail}). "
                "Use another --run_dir, or --overwrite to discard them."
            )
    config_path.write_text(
        yaml.safe_dump(
            {"config": dataclasses.asdict(cfg), "fingerprint": fingerprint}, sort_keys=False
        )
    )
    return load_records(samples_path) if samples_path.exists() else []


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``samples.jsonl``; a torn last line (the process died mid-write) is dropped.

    The file is rewritten without the torn line, so that appended records start on a fresh line.
    Raises `EvaluationError` naming the line for corruption anywhere else.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    records: list[dict[str, Any]] = []
    torn = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                _say(f"{path}:{number}: dropping a truncated last line (interrupted write)")
                torn = True
                break
            raise EvaluationError(f"{path}:{number}: not valid JSON: {exc}") from exc
    if torn or (text and not text.endswith("\n")):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def _complete_problem_ids(records: list[dict[str, Any]], n: int) -> set[str]:
    seen: dict[str, set[int]] = {}
    for r in records:
        if r["sample_index"] < n:
            seen.setdefault(str(r["problem_id"]), set()).add(int(r["sample_index"]))
    return {pid for pid, indices in seen.items() if len(indices) == n}


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def write_reports(
    run_dir: str | os.PathLike[str],
    result: EvalResult,
    cfg: EvalConfig,
    elapsed_s: float | None = None,
    resumed_samples: int = 0,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``pass_at_k.png``; return every file's path."""
    run_dir = Path(run_dir)
    report = {
        "config": dataclasses.asdict(cfg),
        **result.report,
        "elapsed_s": elapsed_s,
        "resumed_samples": resumed_samples,
    }
    json_path = run_dir / REPORT_JSON
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    md_path = run_dir / REPORT_MD
    md_path.write_text(markdown_report(result, cfg, elapsed_s))
    png_path = run_dir / PASS_AT_K_PNG
    split = f" ({cfg.split})" if cfg.split else ""
    title = f"{Path(cfg.model).name or cfg.model} on {cfg.dataset}{split}, n={result.n}"
    plot_pass_at_k(result, png_path, title=title)
    return {
        "samples": run_dir / SAMPLES_FILE,
        "config": run_dir / CONFIG_FILE,
        "report_json": json_path,
        "report_md": md_path,
        "pass_at_k_png": png_path,
    }


def _json_safe(value: Any) -> Any:
    """NaN / inf become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def markdown_report(result: EvalResult, cfg: EvalConfig, elapsed_s: float | None = None) -> str:
    """The report as markdown tables (scores in percent, intervals from the bootstrap)."""
    m, report = result.summary, result.report
    ks = report["report_ks"]
    level = int(round(100 * report["confidence"]))
    lines = [
        f"# Evaluation: {cfg.model} on {cfg.dataset}" + (f" ({cfg.split})" if cfg.split else ""),
        "",
        f"- environment `{cfg.env}`, {int(m['num_problems'])} problems x n={result.n} samples "
        f"= {int(m['num_samples'])} episodes",
        f"- sampling: temperature {cfg.temperature}, top_p {cfg.top_p}, {cfg.max_tokens} tokens "
        f"per turn, max_turns {cfg.max_turns if cfg.max_turns is not None else 'env default'}, "
        f"seed {cfg.seed}",
        f"- unverifiable samples (not counted as wrong): {int(m['num_unverifiable'])}",
    ]
    if elapsed_s is not None:
        lines.append(f"- wall time: {elapsed_s:.1f} s")
    lines += [
        "",
        f"| metric | score (%) | {level}% CI | problems scored |",
        "|---|---|---|---|",
    ]
    for name in [f"pass@{j}" for j in ks] + [f"avg@{result.n}"] + [f"maj@{j}" for j in ks]:
        lo, hi = result.intervals.get(name, (math.nan, math.nan))
        lines.append(
            f"| {name} | {_fmt(m[name])} | [{_fmt(lo)}, {_fmt(hi)}] | "
            f"{report['scored_problems'][name]} |"
        )
    lines += ["", "## Episodes", "", "| statistic | value |", "|---|---|"]
    for name in (
        "turns_per_episode",
        "tool_calls_per_episode",
        "response_tokens_per_episode",
    ):
        lines.append(f"| {name} | {_fmt(m.get(name), percent=False)} |")
    for name in ("tool_use_rate", "tool_error_rate", "void_turn_rate", "unverifiable_rate"):
        lines.append(f"| {name} (%) | {_fmt(m.get(name))} |")
    reasons = sorted(key for key in m if key.startswith("finish_reason/"))
    if reasons:
        lines += ["", "## Finish reasons", "", "| reason | episodes (%) |", "|---|---|"]
        lines += [f"| {key.split('/', 1)[1]} | {_fmt(m[key])} |" for key in reasons]
    for field_name, table in result.breakdown.items():
        columns = [f"pass@{j}" for j in ks] + [f"avg@{result.n}", f"maj@{ks[-1]}"]
        lines += [
            "",
            f"## By {field_name}",
            "",
            f"| {field_name} | problems | " + " | ".join(columns) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        for value, row in table.items():
            cells = " | ".join(_fmt(row.get(c)) for c in columns)
            lines.append(f"| {value} | {int(row['num_problems'])} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_pass_at_k(result: EvalResult, path: str | os.PathLike[str], title: str = "") -> Path:
    """PNG of unbiased pass@k against k (log2 axis) with bootstrap bands where computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, result.n + 1))
    ys = [100 * result.summary[f"pass@{j}"] for j in ks]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ks, ys, marker="o", label="pass@k (unbiased)")
    band = [(j, result.intervals.get(f"pass@{j}")) for j in ks]
    band = [
        (j, lo, hi) for j, iv in band if iv is not None for lo, hi in [iv] if not math.isnan(lo)
    ]
    if band:
        ax.fill_between(
            [b[0] for b in band],
            [100 * b[1] for b in band],
            [100 * b[2] for b in band],
            alpha=0.2,
            label=f"{int(round(100 * result.report['confidence']))}% bootstrap CI",
        )
    maj = [(j, result.summary.get(f"maj@{j}")) for j in ks]
    maj = [(j, v) for j, v in maj if v is not None and not math.isnan(v)]
    if maj:
        ax.plot([j for j, _ in maj], [100 * v for _, v in maj], marker="s", ls="--", label="maj@k")
    if result.n > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks if result.n <= 16 else result.report["report_ks"])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or "pass@k", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
