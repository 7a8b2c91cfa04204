"""Held-out evaluation: sample n episodes per problem, grade them, report pass@k / avg@n / maj@k.

Two entry points share one code path:

* `evaluate` (and ``python train/evaluate.py``) loads a model, validates the inputs before doing
  anything expensive, writes a run directory (`alp_agents.evaluation.rundir`) and resumes an
  interrupted run:

  ``samples.jsonl``    one line per episode (prompt, full transcript with tool outputs, extracted
                       answer, grade, finish reason, tool counts; `alp_agents.evaluation.records`),
                       appended as problems finish;
  ``eval_config.yaml`` the resolved configuration (also the resume fingerprint);
  ``report.json``      every metric, bootstrap intervals, per-source / per-level breakdown;
  ``report.md``        the same as tables for humans;
  ``pass_at_k.png``    unbiased pass@k against k with its confidence band
                       (`alp_agents.evaluation.reports`).

* `evaluate_with_engine` runs on an engine that already exists (the trainer calls it every N
  steps on a held-out split with its live inference engine) and returns an `EvalResult` whose
  ``summary`` is a flat ``{metric: float}`` ready for logging.

Data flows one way: env -> rollout -> `Trajectory` (with its typed step records) -> sample
record -> metrics. Grades are three-valued; an unverifiable grade (verifier timeout, sandbox
failure) is never counted as wrong (see `alp_agents.evaluation.metrics`).

Example (the default model on 20 GSM8K test problems, 4 samples each; a few minutes on CPU)::

    >>> import alp_agents
    >>> report = alp_agents.evaluate(dataset="gsm8k_test", num_problems=20, k=4)  # doctest: +SKIP
    >>> report.summary["pass@1"], report.summary["pass@4"]                  # doctest: +SKIP
    (0.09, 0.2)
    >>> print(report.run_dir / "report.md")                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alp_agents.common.seeding import derive_seed
from alp_agents.common.suggest import did_you_mean
from alp_agents.configs.eval import EvalConfig, EvalEnvConfig
from alp_agents.evaluation import metrics as eval_metrics
from alp_agents.evaluation.metrics import CORRECT, UNVERIFIABLE
from alp_agents.evaluation.records import (
    append_records,
    complete_problem_ids,
    sample_record,
)
from alp_agents.evaluation.reports import write_reports
from alp_agents.evaluation.results import EvalReport, EvalResult, EvaluationError
from alp_agents.evaluation.rundir import (
    SAMPLES_FILE,
    check_model,
    default_run_dir,
    prepare_run_dir,
    resolve_checkpoint,
)
from alp_agents.reporting.console import progress_bar, say

if TYPE_CHECKING:
    from alp_agents.rollout.engines import InferenceEngine, SamplingParams

__all__ = ["evaluate", "evaluate_with_engine", "run_evaluation"]


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

    base_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    bar = progress_bar(
        len(problems), desc="eval", unit="problem", initial=len(problems) - len(todo),
        enabled=progress,
    )  # fmt: skip
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
                    env_id,
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
                by_problem: dict[str, list[Any]] = {}
                for t in trajectories:  # problem-major order; the ids say whose episode it is
                    by_problem.setdefault(str(t.problem_id), []).append(t)
                for problem, missing in members:
                    got = by_problem.get(str(problem.id), [])
                    if len(got) != len(missing):
                        raise RuntimeError(
                            f"run_episodes returned {len(got)} episodes for problem "
                            f"{problem.id!r}, expected {len(missing)}"
                        )
                    new = [sample_record(problem, i, t) for i, t in zip(missing, got, strict=True)]
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
    """A seed that depends only on the base seed and which samples the batch draws (so a
    resumed run draws the samples it misses exactly as an uninterrupted one would)."""
    key = "|".join(f"{p.id}:{','.join(map(str, missing))}" for p, missing in members)
    return derive_seed("eval-batch", int(seed), key, bits=31)


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

    Every `EvalConfig` field can be passed as a keyword (``temperature=0.6, num_problems=50,
    run_dir="runs/eval/x"``) or through ``config``; keywords win. Inputs are checked before the
    model is loaded: an unknown environment or dataset, a checkpoint folder without weights or
    ``k > n`` raise `EvaluationError` naming the problem.

    >>> from alp_agents import evaluate
    >>> r = evaluate(dataset="arith", split="test", num_problems=10, k=4)  # doctest: +SKIP
    >>> sorted(r.files)                                             # doctest: +SKIP
    ['config', 'report_json', 'report_md', 'pass_at_k_png', 'samples']
    """
    base = config or EvalConfig()
    given = {"model": model, "dataset": dataset, "split": split, "k": k}
    if env is not None:  # the documented argument: an environment id
        given["env"] = EvalEnvConfig(env, dict(base.env.kwargs))
    changes = {key: value for key, value in given.items() if value is not None} | overrides
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(EvalConfig)})
    if unknown:
        raise TypeError(
            f"evaluate() got unknown option(s) {unknown}; valid: "
            f"{', '.join(f.name for f in dataclasses.fields(EvalConfig))}"
        )
    changes = {key: os.fspath(v) if isinstance(v, os.PathLike) else v for key, v in changes.items()}
    cfg = dataclasses.replace(base, **changes)
    return run_evaluation(cfg)


def run_evaluation(cfg: EvalConfig) -> EvalReport:
    """`evaluate` for a ready `EvalConfig` (what ``train/evaluate.py`` calls)."""
    started = time.perf_counter()
    n = cfg.samples_per_problem
    _check_k(cfg.k, n)
    if cfg.num_problems is not None and cfg.num_problems < 1:
        raise EvaluationError(
            f"num_problems must be a positive number of problems (null: all), got {cfg.num_problems}"
        )
    if cfg.sandbox not in (None, *SANDBOX_BACKENDS):
        raise EvaluationError(
            f"sandbox must be one of {', '.join(SANDBOX_BACKENDS)}; got {cfg.sandbox!r}"
        )
    if cfg.engine != "auto":
        _engine_choice(cfg.engine)
    _check_env(cfg.env.id)
    problems, split = _load_problems(cfg)
    if split != cfg.split:
        _say(f"evaluating the {split!r} split of {cfg.dataset!r} (pass --split to choose)")
        cfg = dataclasses.replace(cfg, split=split)
    cfg = dataclasses.replace(cfg, model=resolve_checkpoint(cfg.model))
    check_model(cfg.model)
    if cfg.train_dataset is None:
        cfg = dataclasses.replace(cfg, **_training_set_of(cfg.model))
    _contamination_guard(cfg, problems)

    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    completed = prepare_run_dir(run_dir, cfg)
    wanted = {str(p.id) for p in problems}
    resumed = sum(str(r["problem_id"]) in wanted and r["sample_index"] < n for r in completed)
    if resumed:
        _say(f"resuming {run_dir}: {resumed} of {len(problems) * n} samples already done")

    done_ids = complete_problem_ids(completed, n)
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
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens_per_turn
        )
        samples_path = run_dir / SAMPLES_FILE
        result = evaluate_with_engine(
            engine,
            tokenizer,
            cfg.env.id,
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
            on_problem_done=lambda records: append_records(samples_path, records),
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


def _say(message: str) -> None:
    say(message, prefix="[evaluate] ")


def _load_problems(cfg: EvalConfig) -> tuple[list[Any], str | None]:
    """The evaluation problems and the split they came from.

    Without a split, the held-out ``"test"`` split is used where the dataset has one (e.g. the
    procedural ``arith``, whose default split is ``train``), else the dataset as named.
    """
    import envs

    columns = _columns_for(cfg.dataset, cfg.dataset_columns, "dataset")
    split = cfg.split
    one_file = (
        envs.is_dataset_file(cfg.dataset) and envs.datasets.SPLIT_PLACEHOLDER not in cfg.dataset
    )
    if split is None and not one_file:
        try:
            problems = envs.load_dataset(cfg.dataset, split="test", **columns)
            split = "test"
        except ValueError:
            problems = None
    else:
        problems = None
    if problems is None:
        try:
            problems = envs.load_dataset(cfg.dataset, split=split, **columns)
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise EvaluationError(
                f"cannot load dataset {cfg.dataset!r} (split={split!r}): {exc}"
            ) from exc
    problems = list(problems)
    if cfg.num_problems is not None:
        problems = problems[: cfg.num_problems]
    if not problems:
        raise EvaluationError(f"dataset {cfg.dataset!r} (split={split!r}) has no problems")
    return problems, split


def _columns_for(dataset: str, columns: dict[str, str], field_name: str) -> dict[str, Any]:
    """``{"columns": ...}`` for a problem file, ``{}`` without a mapping; a mapping given for a
    named dataset is an error (it has no columns to map)."""
    import envs

    if not columns:
        return {}
    if not envs.is_dataset_file(dataset):
        raise EvaluationError(
            f"{field_name}_columns={dict(columns)!r} maps the columns of a problem file, but "
            f"{field_name}={dataset!r} names no file"
        )
    return {"columns": dict(columns)}


def _check_env(env_id: str) -> None:
    import envs

    known = list(envs.registered())
    if env_id not in known:
        hint = did_you_mean(env_id, known)
        raise EvaluationError(
            f"unknown environment {env_id!r}.{hint} Registered: {', '.join(sorted(known))}"
        )


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
            found = {"train_dataset": env["dataset"], "train_split": env.get("train_split")}
            columns = env.get("dataset_columns")
            if columns and isinstance(columns, dict):
                import envs

                if envs.is_dataset_file(env["dataset"]):
                    found["train_dataset_columns"] = dict(columns)
            return found
    return {}


def _contamination_guard(cfg: EvalConfig, problems: list[Any]) -> int:
    """Warn when evaluation problems also occur in the training set; return how many do."""
    if not cfg.train_dataset:
        return 0
    import envs

    try:
        columns = _columns_for(cfg.train_dataset, cfg.train_dataset_columns, "train_dataset")
        train = envs.load_dataset(cfg.train_dataset, split=cfg.train_split, **columns)
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
    kwargs = {"dataset": cfg.dataset, "split": cfg.split, **cfg.env.kwargs}
    if cfg.dataset_columns:  # the env loads the file itself: it needs the mapping too
        options = dict(kwargs.get("dataset_options") or {})
        kwargs["dataset_options"] = {**options, "columns": dict(cfg.dataset_columns)}
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


def _engine_choice(choice: str) -> str:
    """``hf`` or ``vllm`` (`alp_agents.rollout.engines.resolve_engine_choice`), as an
    `EvaluationError` when the choice is unknown or vLLM cannot run here."""
    from alp_agents.rollout.engines import EngineUnavailableError, resolve_engine_choice

    try:
        return resolve_engine_choice(choice)
    except EngineUnavailableError as exc:
        raise EvaluationError(str(exc)) from exc


def _make_engine(cfg: EvalConfig) -> tuple[Any, Any]:
    """HFEngine (on the GPU when one is visible, as the trainer's); VLLMEngine when asked for,
    or for ``auto`` when CUDA and vllm exist."""
    from alp_agents.models import load_tokenizer
    from alp_agents.rollout.engines import build_engine, describe_engine

    kind = _engine_choice(cfg.engine)
    tokenizer = load_tokenizer(cfg.model)
    extra = {"max_batch_size": cfg.batch_size} if kind == "hf" else {}
    engine = build_engine(kind, cfg.model, tokenizer, dtype=cfg.dtype, seed=cfg.seed, **extra)
    _say(f"engine: {describe_engine(engine)} for {cfg.model}")
    return engine, tokenizer
