"""The schema of a training run (`TrainConfig`) and its validation.

Nested dataclasses, one per YAML section; `alp_agents.configs.loader` fills them from layered
YAML and ``key=value`` overrides. `validate_config` checks every name and number that can be
checked without loading a model, so a typo fails in a second, not after the model has loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from alp_agents.configs.eval import EvalSampling

ENGINES = ("hf", "vllm")


LR_SCHEDULES = ("constant", "linear", "cosine")


# Top-level YAML sections that belong to other tools: a study's grid (train/study.py) may share
# a training config file.
OTHER_SECTIONS = ("study",)


@dataclass
class ModelConfig:
    """The policy being trained."""

    # embedded name, local folder, Hub id, or a name registered in code
    # (alp_agents.models.register_model_factory)
    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"  # master weights
    # "auto": bf16 where the device has native bf16 matmuls (GPU, AMX, AVX512-BF16), else none
    # (alp_agents.models.precision); "bf16" or "none" to force one
    autocast: str = "auto"
    gradient_checkpointing: bool = False
    # transformers attention backend of the trainer's forwards ("sdpa", "eager", ...); the
    # engine keeps its own. On CPU at a few hundred tokens "eager" trains ~10% faster (sdpa's
    # CPU flash-attention backward is slow for short sequences); on GPU keep sdpa/flash.
    attn_implementation: str = "sdpa"


@dataclass
class EnvConfig:
    """Which environment and problems the agent trains and is evaluated on."""

    id: str = "alp/PythonTool-v0"
    # a bundled or procedural name, a plugin's dataset, or a problem file (.jsonl, .parquet,
    # .arrow; "data/{split}.parquet" picks the file by split); see envs.load_dataset
    dataset: str = "arith"
    train_split: str | None = "train"  # not used for a file without {split} (its own split)
    eval_split: str | None = "test"
    eval_dataset: str | None = None  # held-out problem set if not `dataset` (e.g. math500)
    dataset_options: dict[str, Any] = field(default_factory=dict)  # e.g. {n: 500} for generators
    # {field: column} for problem FILES among dataset / eval_dataset, e.g. {question: prompt,
    # answer: solution} (fields: id, question, answer, source); not used for named datasets
    dataset_columns: dict[str, str] = field(default_factory=dict)
    max_turns: int = 2  # code turn + answer turn is all arith needs
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra env constructor arguments


@dataclass
class RolloutConfig:
    """How episodes are sampled."""

    engine: str = "hf"  # "hf" (transformers, CPU default) or "vllm"
    # the engine's own weight copy (a real mismatch vs the fp32 trainer): "auto" = bfloat16 where
    # native, else float32 with bf16-rounded weights (alp_agents.models.precision); or a torch dtype
    engine_dtype: str = "auto"
    prompts_per_step: int = 4
    group_size: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64  # per assistant turn
    mask_void_turns: bool = True  # void-turn trajectories get loss mask 0 ...
    void_in_group_stats: bool = True  # ... but their reward still counts for the group baseline
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. vLLM gpu_memory_utilization


@dataclass
class AlgorithmConfig:
    """Objective (a preset of alp_agents.learner.objectives) and how each rollout batch is consumed."""

    preset: str = "alp"  # any name of alp_agents.learner.objectives.preset_names() (docs/alp.md)
    setting: str = "multi_turn"  # multi_turn | single_turn (preset defaults: dual clip c, KL)
    loss: dict[str, Any] = field(default_factory=dict)  # PolicyLossConfig overrides
    mini_batches: int = 2  # K optimiser steps per rollout batch (staleness)
    micro_batch_size: int = 2  # sequences per forward/backward (gradient accumulation; memory)
    shuffle: bool = True  # shuffle the groups (prompts) before splitting into mini-batches
    share_prefixes: bool = True  # run a prompt shared by a micro-batch's rows once, not per row
    advantage_eps: float = 1e-6
    # mismatch/catastrophic_*: a token whose rho = pi_old / mu is below 1/this or above this
    catastrophic_ratio: float = 1e4


@dataclass
class PerturbationConfig:
    """Layerwise perturbation (only used by presets that perturb, i.e. ``alp``)."""

    sigma_init: float = 1e-6  # multi-turn release; single-turn release uses 0.02
    sigma_lr: float = 5e-4
    learnable: bool = True
    weight_decay: float = 0.0  # the release applies its global 0.01
    layers: str | None = None  # decoder layers "start:end" (e.g. "0:6"); None = all layers
    target: str = "hidden"  # "hidden" (residual stream) or "logits"
    # keep each layer's noise for the backward instead of redrawing it: one draw less per layer,
    # 4 bytes per hidden unit, token and layer more (47 MB per 8-row SmolLM2 micro-batch)
    store_noise: bool = False


@dataclass
class OptimConfig:
    """AdamW over the model (and sigma in its own group), clipping and the LR schedule."""

    lr: float = 2e-5  # CPU default for a 135M model and 8 steps; the 7B release uses 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    fused: bool = (
        True  # fused AdamW: ~4.5x faster optimiser step on CPU (measured on an AMX CPU, 2026)
    )
    lr_schedule: str = "constant"  # constant | linear | cosine (over optimiser steps)
    warmup_steps: int = 0  # optimiser steps of linear warm-up
    min_lr_ratio: float = 0.0  # floor of linear/cosine decay, as a fraction of lr


@dataclass
class LoggingConfig:
    run_dir: str | None = None  # default: runs/<name>-<YYYYmmdd-HHMMSS>
    name: str = "multi_turn"
    progress: bool = True
    tensorboard: bool = True
    trajectory_samples_every: int = 1  # steps between saved trajectory samples (0: never)
    trajectory_samples: int = 8  # trajectories saved each time (-1: all)
    plots: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only at the end / on Ctrl-C)
    keep_last: int = 2
    export: bool = True  # plain from_pretrained export in run_dir/final at the end
    on_interrupt: bool = True  # Ctrl-C saves a checkpoint before exiting


@dataclass
class TrainEvalConfig(EvalSampling):
    """Held-out evaluation during training: what to sample (`EvalSampling`, the same fields and
    defaults as ``train/evaluate.py``) and when: before, after, and every N steps."""

    every: int = 0  # steps between evaluations during training (0: only before/after)
    before: bool = True
    after: bool = True


@dataclass
class TrainConfig:
    """Everything a training run needs; every field is settable from YAML or the command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    steps: int = 8
    seed: int = 0
    max_nonfinite_in_row: int = 3  # stop after this many consecutive skipped updates


class TrainConfigError(ValueError):
    """A configuration value is invalid; raised before any model is loaded."""


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from ``asdict`` output (e.g. a checkpoint's saved config)."""

    def build(cls: type, values: dict[str, Any]) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            factory = f.default_factory
            if isinstance(factory, type) and dataclasses.is_dataclass(factory):
                kwargs[f.name] = build(factory, v)
            else:
                kwargs[f.name] = v
        return cls(**kwargs)

    return build(TrainConfig, data)


def eval_dataset(cfg: TrainConfig) -> str:
    return cfg.env.eval_dataset or cfg.env.dataset


def dataset_kwargs(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """The `envs.load_dataset` keyword arguments for ``name`` (``env.dataset`` or
    ``env.eval_dataset``): ``env.dataset_options``, plus ``env.dataset_columns`` as ``columns=``
    where ``name`` is a problem file.

    The mapping describes a file's columns, so it is not passed for a bundled or procedural
    name: training on a parquet file and evaluating on ``math500`` is the common case.
    """
    import envs

    kwargs = dict(cfg.env.dataset_options)
    if cfg.env.dataset_columns and envs.is_dataset_file(name):
        kwargs["columns"] = dict(cfg.env.dataset_columns)
    return kwargs
