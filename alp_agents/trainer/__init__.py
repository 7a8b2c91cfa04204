"""The trainer: the on-line RL loop and what it needs around it.

``loop`` (`ALPTrainer`: sample -> roll out -> advantages -> K updates -> sync -> log -> eval ->
checkpoint; the K updates are `alp_agents.learner.update.PolicyUpdate`), ``distributed``
(what differs on several processes: DDP/FSDP2 collectives, gathered state, the world checks),
``checkpoint`` (the typed `TrainerState`, one save and one load, and plain exports),
``problems`` (the checkpointable problem sampler), ``optim`` (learning-rate schedules), ``cli``
(`train/multi_turn.py`'s command line), ``validation`` (`validate_config`: the configuration
checked against the presets, models, environments and datasets it names). The configuration schema lives in
`alp_agents.configs.train`.
"""

from alp_agents.configs.train import OTHER_SECTIONS, TrainConfig, TrainConfigError
from alp_agents.trainer.checkpoint import TrainerState
from alp_agents.trainer.cli import cli_main
from alp_agents.trainer.loop import ALPTrainer, TrainingDivergedError, TrainResult, noise_seed
from alp_agents.trainer.problems import ProblemSampler
from alp_agents.trainer.validation import validate_config

__all__ = [
    "OTHER_SECTIONS",
    "ALPTrainer",
    "ProblemSampler",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainerState",
    "TrainingDivergedError",
    "cli_main",
    "noise_seed",
    "validate_config",
]
