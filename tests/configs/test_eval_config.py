"""The one evaluation schema: shared sampling fields, deprecated aliases, train-style keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from alp_agents.configs import load_config
from alp_agents.configs.eval import EvalConfig, EvalEnvConfig, EvalSampling
from alp_agents.configs.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _sampling(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalSampling)}


def test_train_and_eval_share_names_and_defaults():
    assert _sampling(TrainConfig().eval) == _sampling(EvalConfig()) == _sampling(EvalSampling())
    assert EvalSampling().top_p == 0.7 and EvalSampling().k == 4
    assert EvalConfig().max_tokens_per_turn == 512


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["limit=5"], {"num_problems": 5}),
        (["env=alp/Tool-v0"], {"env": EvalEnvConfig("alp/Tool-v0", {})}),
        (["env_kwargs.timeout_s=3"], {"env": EvalEnvConfig("alp/PythonTool-v0", {"timeout_s": 3})}),
        (["limit=null"], {"num_problems": None}),
    ],
)
def test_old_keys_are_deprecated_aliases(old, new):
    with pytest.warns(FutureWarning, match="is deprecated; use"):
        cfg = load_config(EvalConfig, overrides=old)
    assert {k: getattr(cfg, k) for k in new} == new


def test_train_style_dotted_keys(recwarn):
    cfg = load_config(
        EvalConfig, overrides=["env.id=alp/Tool-v0", "env.kwargs.timeout_s=3", "num_problems=7"]
    )
    assert cfg.env == EvalEnvConfig("alp/Tool-v0", {"timeout_s": 3}) and cfg.num_problems == 7
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    # replace() keeps the typed env and does not warn again
    again = dataclasses.replace(cfg, k=2)
    assert again.env == cfg.env and not recwarn.list


def test_shipped_eval_yaml_files_use_the_unified_keys(recwarn):
    quick = load_config(EvalConfig, ROOT / "train" / "configs" / "eval_quick.yaml")
    assert quick.num_problems == 50 and quick.env.id == "alp/PythonTool-v0"
    assert quick.max_tokens == 256 and quick.top_p == 0.7
    full = load_config(EvalConfig, ROOT / "train" / "configs" / "eval.yaml")
    assert full.num_problems is None and full.k == 8  # the full evaluation: every problem
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_a_yaml_file_with_the_old_keys_still_loads(tmp_path):
    old = tmp_path / "old_eval.yaml"
    old.write_text("env: alp/PythonTool-v0\nlimit: 50\nenv_kwargs: {timeout_s: 2}\nk: 4\n")
    with pytest.warns(FutureWarning):
        cfg = load_config(EvalConfig, old)
    assert cfg.num_problems == 50 and cfg.env.id == "alp/PythonTool-v0"
    assert cfg.env.kwargs == {"timeout_s": 2} and cfg.k == 4
