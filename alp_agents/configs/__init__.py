"""Configuration: the YAML + command-line loader, and the schemas it loads.

``loader`` turns layered YAML files (``defaults:``) and ``key=value`` overrides into typed
dataclasses, with errors that name the file, line and closest valid key; ``train`` is the schema
of a training run (its validation against the components it names is
`alp_agents.trainer.validation`). Nothing here imports torch.
"""

from alp_agents.configs.loader import (
    CliExtras,
    ConfigError,
    config_help,
    config_to_yaml,
    field_docs,
    load_config,
    normalize_overrides,
    parse_cli,
    save_config,
)
from alp_agents.configs.train import (
    OTHER_SECTIONS,
    TrainConfig,
    TrainConfigError,
    config_from_dict,
)

__all__ = [
    "OTHER_SECTIONS",
    "CliExtras",
    "ConfigError",
    "TrainConfig",
    "TrainConfigError",
    "config_from_dict",
    "config_help",
    "config_to_yaml",
    "field_docs",
    "load_config",
    "normalize_overrides",
    "parse_cli",
    "save_config",
]
