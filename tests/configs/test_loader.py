"""alp_agents.configs.loader: YAML + command line -> typed dataclass, with clear errors."""

from __future__ import annotations

import doctest
import enum
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from alp_agents.configs import loader as config_module
from alp_agents.configs.loader import (
    ConfigError,
    config_help,
    config_to_yaml,
    load_config,
    normalize_overrides,
    parse_cli,
)


class Preset(enum.Enum):
    alp = "alp"
    grpo = "grpo"


@dataclass
class OptimConfig:
    """AdamW settings."""

    lr: float = 1e-6
    """Learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # decoupled weight decay
    weight_decay: float = 0.0


@dataclass
class DemoConfig:
    steps: int = 100  # optimisation steps
    bf16: bool = False
    model: str = "smollm2-135m-instruct"
    out_dir: Path | None = None
    preset: Preset = Preset.alp
    env_kwargs: dict[str, int] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = field(default=0, metadata={"help": "global random seed"})

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps: 7\noptim:\n  lr: 1.0e-5\n")
    cfg = load_config(
        DemoConfig,
        yaml_file,
        ["optim.lr=3e-6", "--bf16", "--preset", "grpo", "--env_kwargs.max_turns=4", "steps=9"],
    )
    assert isinstance(cfg, DemoConfig) and isinstance(cfg.optim, OptimConfig)
    assert cfg.steps == 9  # the override wins over the file
    assert cfg.optim.lr == 3e-6 and cfg.optim.betas == [0.9, 0.999]
    assert cfg.bf16 is True and cfg.preset is Preset.grpo
    assert cfg.env_kwargs == {"max_turns": 4}
    assert load_config(DemoConfig, yaml_file).optim.lr == 1e-5


def test_override_token_styles_are_equivalent():
    assert normalize_overrides(["--optim.lr", "2e-6"]) == ["optim.lr=2e-6"]
    assert normalize_overrides(["--optim.lr=2e-6"]) == ["optim.lr=2e-6"]
    assert normalize_overrides(["optim.lr=2e-6"]) == ["optim.lr=2e-6"]
    assert normalize_overrides(["--bf16", "--steps", "3"], DemoConfig) == ["bf16=true", "steps=3"]


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("optim.lrr=1", "optim.lrr", "optim.lr"),
        ("stepz=3", "stepz", "steps"),
        ("lr=1e-6", "lr", "optim.lr"),  # right leaf, wrong section
        ("optim.weigth_decay=0.1", "optim.weigth_decay", "optim.weight_decay"),
    ],
)
def test_unknown_cli_key_names_key_source_and_closest_valid_key(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, overrides=[override])
    message = str(err.value)
    assert message.startswith("command line:")
    assert f"unknown key {key!r}" in message
    assert f"Did you mean {suggestion!r}?" in message
    assert err.value.key == key and err.value.source == "command line"


def test_unknown_key_in_yaml_names_file_and_line(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("steps: 3\noptim:\n  lr: 1.0e-5\n  weigth_decay: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, yaml_file)
    assert str(err.value).startswith(f"{yaml_file}:4: unknown key 'optim.weigth_decay'")
    assert "Did you mean 'optim.weight_decay'?" in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("steps=abc", "'steps' expects int, got 'abc'"),
        ("steps=1.5", "'steps' expects int, got 1.5"),
        ("bf16=maybe", "'bf16' expects bool"),
        ("optim.lr=[1,2]", "'optim.lr' expects float, got [1, 2]"),
        ("preset=ppo", "'preset' expects Preset (one of alp, grpo)"),
        ("optim=3", "'optim' is a section (OptimConfig)"),
        ("env_kwargs.max_turns=many", "'env_kwargs.max_turns' expects"),
    ],
)
def test_wrong_types_name_the_field_and_the_expected_type(override, expected):
    with pytest.raises(ConfigError, match="^command line: ") as err:
        load_config(DemoConfig, overrides=[override])
    assert expected in str(err.value)


def test_wrong_type_in_yaml_names_the_line(tmp_path):
    yaml_file = tmp_path / "typo.yaml"
    yaml_file.write_text("model: x\n\nsteps: ten\n")
    with pytest.raises(ConfigError, match=rf"^{yaml_file}:3: 'steps' expects int, got 'ten'"):
        load_config(DemoConfig, yaml_file)


def test_broken_or_missing_yaml_and_post_init_checks_are_config_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(DemoConfig, broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DemoConfig, tmp_path / "absent.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(DemoConfig, listing)
    with pytest.raises(ConfigError, match="steps must be >= 0"):
        load_config(DemoConfig, overrides=["steps=-1"])
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(DemoConfig, overrides=["--steps"])
    with pytest.raises(ConfigError, match="cannot understand argument 'oops'"):
        load_config(DemoConfig, overrides=["oops"])


def test_yaml_snapshot_round_trips(tmp_path):
    cfg = load_config(DemoConfig, overrides=["out_dir=/tmp/run", "preset=grpo", "optim.lr=2e-6"])
    text = config_to_yaml(cfg)
    assert "!!python" not in text  # plain, safe YAML
    snapshot = tmp_path / "config.yaml"
    snapshot.write_text(text)
    assert load_config(DemoConfig, snapshot) == cfg


def test_help_lists_every_field_with_default_and_doc(capsys):
    text = config_help(DemoConfig)
    for key in ("steps", "bf16", "model", "out_dir", "preset", "env_kwargs", "seed", "optim.lr"):
        assert f"--{key} (" in text
    assert "--steps (int, default: 100)\n      optimisation steps" in text
    assert "--optim.lr (float, default: 1e-06)\n      Learning rate." in text
    assert "decoupled weight decay" in text and "global random seed" in text
    assert "[optim]  AdamW settings." in text
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(DemoConfig, ["--help"], prog="demo")
    assert exit_info.value.code == 0
    assert "--optim.betas (list[float], default: [0.9, 0.999])" in capsys.readouterr().out


def test_parse_cli_reads_config_file_overrides_and_passthrough(tmp_path, capsys):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("steps: 5\n")
    cfg, extras = parse_cli(
        DemoConfig, ["-c", str(yaml_file), "--optim.lr", "4e-6", "--", "--extra", "x"]
    )
    assert (cfg.steps, cfg.optim.lr) == (5, 4e-6)
    assert extras.config_path == yaml_file
    assert extras.overrides == ["optim.lr=4e-6"]
    assert extras.passthrough == ["--extra", "x"]
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(DemoConfig, ["--stepz=1"], prog="demo")
    assert exit_info.value.code == 2
    assert "unknown key 'stepz'. Did you mean 'steps'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_cli(DemoConfig, ["--print-config", "steps=3"])
    assert "steps: 3\n" in capsys.readouterr().out


def test_module_doctests_hold():
    result = doctest.testmod(config_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# layered files: `defaults:` and several --config


def test_defaults_layer_files_and_repeated_config_flags_apply_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\noptim:\n  lr: 2.0e-6\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("defaults: [../base.yaml]\noptim:\n  weight_decay: 0.5\n")
    cfg = load_config(DemoConfig, child)
    assert (cfg.steps, cfg.optim.lr, cfg.optim.weight_decay) == (5, 2e-6, 0.5)
    last = tmp_path / "last.yaml"
    last.write_text("steps: 9\n")
    cfg, extras = parse_cli(DemoConfig, ["-c", str(child), "--config", str(last), "steps=11"])
    assert (cfg.steps, cfg.optim.lr, cfg.optim.weight_decay) == (11, 2e-6, 0.5)
    assert extras.config_paths == [child, last] and extras.config_path == last
    cfg, _ = parse_cli(DemoConfig, ["-c", str(child), "--config", str(last)])
    assert cfg.steps == 9


def test_defaults_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 1\ndefaults: [missing.yaml]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: defaults names 'missing\.yaml'"):
        load_config(DemoConfig, bad)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults: [b.yaml]\n")
    b.write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="form a cycle"):
        load_config(DemoConfig, a)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("defaults: {x: 1}\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml:1: defaults must be a list"):
        load_config(DemoConfig, wrong)


def test_every_preset_file_differs_from_the_cpu_default_only_in_its_own_keys():
    """A preset run is the default run with another objective: same attention, micro-batch,
    stored noise, data and budget (a comparison must differ only in what it compares)."""
    from dataclasses import asdict

    from alp_agents.configs import TrainConfig

    configs = Path(__file__).resolve().parents[2] / "train" / "configs"
    default = asdict(load_config(TrainConfig, configs / "multi_turn_cpu.yaml"))

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v})
        return out

    presets = sorted((configs / "presets").glob("*.yaml"))
    assert len(presets) >= 6
    for path in presets:
        resolved = flat(asdict(load_config(TrainConfig, path)))
        changed = {k for k, v in resolved.items() if flat(default)[k] != v}
        assert changed <= {"algorithm.preset", "logging.name"}, (path.name, changed)
        assert resolved["algorithm.preset"] == path.stem
