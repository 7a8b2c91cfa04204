"""The evaluation schemas: what to sample (shared by training and evaluation) and a full run.

`EvalSampling` is the ONE definition of the fields both places mean the same way: which
problems (``num_problems``), how many samples (``k``) and how they are drawn (``temperature``,
``top_p``, ``max_tokens``). The trainer's ``eval:`` section
(`alp_agents.configs.train.TrainEvalConfig`) adds when to evaluate; `EvalConfig` (the schema of
``train/evaluate.py`` and `alp_agents.evaluate`) adds the model, environment, dataset, engine
and the run folder. Same names, same defaults, so a trainer's eval numbers and a
``train/evaluate.py`` report of the same checkpoint are the same measurement.

Older ``train/evaluate.py`` keys still load, with a `FutureWarning` naming the new key:
``limit`` -> ``num_problems``, ``env: ID`` -> ``env.id``, ``env_kwargs`` -> ``env.kwargs``.
The training-style dotted names ``env.id`` / ``env.kwargs.NAME`` work on both command lines.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_TOKENS_PER_TURN = 512
"""``train/evaluate.py``'s per-turn budget when ``max_tokens`` is null (the trainer uses its
``rollout.max_tokens`` instead)."""

UNSET = "<unset>"
"""Default of a deprecated alias key: distinguishes "not given" from an explicit null."""


@dataclass
class EvalSampling:
    """Which held-out problems are evaluated and how each is sampled (shared by train and eval).

    Defaults, and why: ``top_p`` 0.7 and ``temperature`` 1.0 are the papers' evaluation
    setting, so numbers compare with theirs and between the trainer's log and
    ``train/evaluate.py``; ``k`` 4 keeps pass@k, maj@k and avg@k distinct at a quarter of the
    cost of 8; ``num_problems`` 32 keeps an evaluation to minutes on a CPU (null: all).
    """

    num_problems: int | None = 32
    """Evaluate the first N problems of the held-out set; null = all (train: 0 = no evaluation)."""
    k: int = 4
    """Samples per problem and the headline k of pass@k / maj@k / avg@k."""
    temperature: float = 1.0
    """Sampling temperature (the papers evaluate at 1.0)."""
    top_p: float = 0.7
    """Nucleus sampling (the papers evaluate at 0.7)."""
    max_tokens: int | None = None
    """New tokens per assistant turn; null = the trainer's rollout.max_tokens (evaluate.py: 512)."""


@dataclass
class EvalEnvConfig:
    """The environment episodes run in (the same keys as the trainer's ``env.id`` / ``env.kwargs``)."""

    id: str = "alp/PythonTool-v0"
    """Registered environment id (see envs.registered())."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for envs.make (e.g. {stateful: false})."""


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"evaluation option {old!r} is deprecated; use {new!r} (same meaning)",
        FutureWarning,
        stacklevel=4,
    )


@dataclass
class EvalConfig(EvalSampling):
    """Evaluate a model on held-out problems: unbiased pass@k, avg@n, maj@k, tool statistics."""

    model: str = "smollm2-135m-instruct"
    """Embedded model name, a checkpoint folder (save_pretrained layout) or a Hub id."""
    env: Any = field(default_factory=lambda: dataclasses.asdict(EvalEnvConfig()))
    """The environment: env.id (registered id) and env.kwargs (envs.make arguments); a plain
    string is read as env.id (deprecated form)."""
    dataset: str = "gsm8k_test"
    """Bundled dataset name (gsm8k_test, math500, aime24, amc23, olympiadbench, arith, ...), a
    plugin's dataset, or a problem file (.jsonl, .parquet, .arrow; data/{split}.parquet picks
    the file by split)."""
    split: str | None = None
    """Dataset split where the dataset has several (procedural 'arith': train | test)."""
    dataset_columns: dict[str, str] = field(default_factory=dict)
    """For a problem file: which column fills which problem field, {field: column} (fields: id,
    question, answer, source), e.g. dataset_columns.question=prompt."""
    n: int | None = None
    """Samples drawn per problem when more than k are wanted (papers' Average@32: n=32, k=1); null = k."""
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
    batch_size: int = 64
    """Episodes generated together (problems are batched so that problems x n stays near this)."""
    train_dataset: str | None = None
    """Training set for the contamination guard: warn when it overlaps the evaluation set."""
    train_split: str | None = None
    """Split of train_dataset."""
    train_dataset_columns: dict[str, str] = field(default_factory=dict)
    """Column mapping of train_dataset when it is a problem file (like dataset_columns)."""
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
    limit: Any = UNSET
    """Deprecated: num_problems."""
    env_kwargs: Any = UNSET
    """Deprecated: env.kwargs."""

    def __post_init__(self) -> None:
        """Fold the deprecated keys into the unified ones and make ``env`` an `EvalEnvConfig`."""
        if isinstance(self.env, str):
            _deprecated("env: <id>", "env.id")
            self.env = EvalEnvConfig(id=self.env)
        elif isinstance(self.env, dict):
            unknown = sorted(set(self.env) - {"id", "kwargs"})
            if unknown:
                raise ValueError(f"unknown env key(s) {unknown}; known: id, kwargs")
            self.env = EvalEnvConfig(
                id=self.env.get("id", EvalEnvConfig.id), kwargs=dict(self.env.get("kwargs") or {})
            )
        elif not isinstance(self.env, EvalEnvConfig):
            raise TypeError(f"env must be an environment id or {{id, kwargs}}, got {self.env!r}")
        if self.limit != UNSET:
            _deprecated("limit", "num_problems")
            self.num_problems, self.limit = self.limit, UNSET
        if self.env_kwargs != UNSET:
            _deprecated("env_kwargs", "env.kwargs")
            self.env = EvalEnvConfig(self.env.id, {**self.env.kwargs, **(self.env_kwargs or {})})
            self.env_kwargs = UNSET

    @property
    def samples_per_problem(self) -> int:
        return self.k if self.n is None else self.n

    @property
    def max_tokens_per_turn(self) -> int:
        """``max_tokens``, or `DEFAULT_MAX_TOKENS_PER_TURN` when it is null."""
        return DEFAULT_MAX_TOKENS_PER_TURN if self.max_tokens is None else self.max_tokens
