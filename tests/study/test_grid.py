"""The study grid: cells, names, overrides, and errors before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from alp_agents.configs.loader import ConfigError, load_config
from alp_agents.study.cli import _parser, build_spec
from alp_agents.study.grid import Cell, StudySpec, parse_values, read_study_section

ROOT = Path(__file__).resolve().parents[2]


def test_cells_cover_the_grid_with_seeds_innermost():
    spec = StudySpec(
        presets=["alp", "bypass"],
        seeds=[0, 1],
        sweep={"algorithm.mini_batches": [1, 4]},
        variants={"all": {}, "late": {"perturbation.layers": "20:30"}},
    )
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2 * 2
    assert [c.id for c in cells[:3]] == [
        "alp-all-mini_batches=1-s0",
        "alp-all-mini_batches=1-s1",
        "alp-all-mini_batches=4-s0",
    ]
    late = next(c for c in cells if c.variant == "late")
    assert late.id == "alp-late-mini_batches=1-s0" and late.group == "alp-late-mini_batches=1"
    overrides = late.overrides({"steps": 2})
    assert "perturbation.layers='20:30'" in overrides  # quoted: YAML would read 20:30 as 1230
    assert {"steps=2", "algorithm.mini_batches=1", "algorithm.preset=alp", "seed=0"} <= set(
        overrides
    )


def test_parse_values_reads_yaml_scalars_but_keeps_ranges_as_text():
    assert parse_values("1,2.5,null,true,float32,0:10") == [1, 2.5, None, True, "float32", "0:10"]


def test_cli_overrides_the_yaml_grid_key_by_key(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 2\nstudy:\n  presets: [alp]\n  seeds: [0, 1, 2]\n")
    assert read_study_section([base]) == {"presets": ["alp"], "seeds": [0, 1, 2]}
    args, rest = _parser().parse_known_args(["--presets", "alp,grpo", "optim.lr=1e-5"])
    spec = build_spec(args, rest, [base])
    assert spec.presets == ["alp", "grpo"] and spec.seeds == [0, 1, 2]
    assert spec.overrides == {"optim.lr": 1e-5}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0,x"], "--seeds '0,x': expected integers"),
        (["--sweep", "algorithm.mini_batches"], "expected KEY=V1,V2"),
        (["--variant", "late"], "expected NAME:KEY=VALUE"),
        (["--presets", "alp,alp"], "presets repeat"),
        (["stepz"], "cannot understand argument 'stepz'"),
    ],
)
def test_bad_grids_are_rejected_with_the_culprit(argv, message, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 2\n")
    args, rest = _parser().parse_known_args(argv)
    with pytest.raises(ConfigError, match=message):
        build_spec(args, rest, [base])


def test_unknown_study_key_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'presets'"):
        StudySpec.from_dict({"preset": ["alp"]}, "study.yaml")


def test_cells_are_validated_like_training_runs_before_anything_runs(tmp_path):
    """A misspelt swept key or an unknown preset fails at once, naming the key and the cell."""
    from alp_agents.study.runner import resolve_cells

    base = [ROOT / "train" / "configs" / "study_offpolicy_cpu.yaml"]
    bad_key = StudySpec(presets=["alp"], seeds=[0], sweep={"algorithm.mini_batchs": [1]})
    with pytest.raises(ConfigError, match=r"mini_batchs.*Did you mean 'algorithm.mini_batches'"):
        resolve_cells(bad_key, base, tmp_path)
    bad_preset = StudySpec(presets=["alpp"], seeds=[0])
    with pytest.raises(ConfigError, match=r"study cell alpp-s0: .*Did you mean 'alp'"):
        resolve_cells(bad_preset, base, tmp_path)
    cells = resolve_cells(StudySpec(presets=["alp", "grpo"], seeds=[0]), base, tmp_path)
    assert [c.id for c, _ in cells] == ["alp-s0", "grpo-s0"]
    assert isinstance(cells[0][0], Cell)


def test_the_staleness_lag_is_a_study_knob(tmp_path):
    """``--sweep rollout.async_steps=0,1,2`` (asynchronous rollouts, docs/training.md) resolves
    to validated cells whose overrides carry the lag; a negative lag fails naming the cell."""
    from alp_agents.study.runner import resolve_cells

    base = [ROOT / "train" / "configs" / "study_offpolicy_cpu.yaml"]
    args, rest = _parser().parse_known_args(
        ["--presets", "alp", "--seeds", "0", "--sweep", "rollout.async_steps=0,1,2"]
    )
    cells = resolve_cells(build_spec(args, rest, base), base, tmp_path)
    assert [c.id for c, _ in cells] == [f"alp-async_steps={n}-s0" for n in (0, 1, 2)]
    for n, (_, overrides) in enumerate(cells):
        assert f"rollout.async_steps={n}" in overrides
    bad = StudySpec(presets=["alp"], seeds=[0], sweep={"rollout.async_steps": [-1]})
    with pytest.raises(
        ConfigError, match=r"study cell alp-async_steps=-1-s0: rollout.async_steps=-1"
    ):
        resolve_cells(bad, base, tmp_path)


@pytest.mark.parametrize(
    ("name", "env_id", "dataset", "skip", "steps"),
    [
        ("study_offpolicy_cpu.yaml", "alp/Math-v0", "arith_small", True, 8),
        ("study_offpolicy_cpu_v1.yaml", "alp/PythonTool-v0", "arith_hard", False, 5),
    ],
)
def test_both_stress_configurations_resolve_to_valid_cells(
    tmp_path, name, env_id, dataset, skip, steps
):
    """The current stress configuration and the first one (kept for studies/offpolicy-cpu)
    both build validated cells, and differ where docs/study.md says they do."""
    from alp_agents.configs import OTHER_SECTIONS, TrainConfig
    from alp_agents.study.runner import resolve_cells

    base = [ROOT / "train" / "configs" / name]
    cells = resolve_cells(StudySpec(presets=["alp", "bypass"], seeds=[0]), base, tmp_path)
    assert [c.id for c, _ in cells] == ["alp-s0", "bypass-s0"]
    cfg = load_config(TrainConfig, base, cells[1][1], extra_sections=OTHER_SECTIONS)
    assert (cfg.env.id, cfg.env.dataset, cfg.optim.skip_signal_free_steps, cfg.steps) == (
        env_id,
        dataset,
        skip,
        steps,
    )
    # shared by both: the mismatch and the staleness under study
    assert cfg.algorithm.preset == "bypass" and cfg.algorithm.mini_batches == 4
    assert cfg.rollout.engine_kwargs == {"round_weights_to": "bfloat16"}
    assert (cfg.model.autocast, cfg.perturbation.sigma_init) == ("none", 0.02)
