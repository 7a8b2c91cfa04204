"""Registry: register/make/registered over gymnasium, unknown ids, entry-point plugins."""

from __future__ import annotations

import sys
import textwrap

import gymnasium
import pytest

import envs
from envs.datasets import _GENERATORS, DATASET_ENTRY_POINT_GROUP
from envs.registration import ENTRY_POINT_GROUP, discover_plugins, origin


def test_shipped_ids_are_registered_in_gymnasium_too():
    assert {"alp/Math-v0", "alp/PythonTool-v0"} <= set(envs.registered())
    assert gymnasium.spec("alp/Math-v0").entry_point == "envs.math_env:MathEnv"


def test_unknown_id_lists_close_matches():
    with pytest.raises(envs.UnknownEnvError, match="Did you mean 'alp/PythonTool-v0'") as excinfo:
        envs.make("alp/PythonTol-v0")
    assert isinstance(excinfo.value, gymnasium.error.Error) and isinstance(excinfo.value, KeyError)
    with pytest.raises(envs.UnknownEnvError, match="Registered: .*alp/Math-v0"):
        envs.make("completely/Different-v9")


def test_register_with_default_kwargs_that_make_overrides():
    envs.register("test/SmallMath-v0", "envs.math_env:MathEnv", dataset="aime24", instruction="Go.")
    try:
        env = envs.make("test/SmallMath-v0")
        assert len(env.problems) == 30 and env.instruction == "Go."
        assert envs.make("test/SmallMath-v0", dataset="amc23").problems[0].source == "amc2023"
        assert (
            "test/SmallMath-v0" in envs.registered()
            and origin("test/SmallMath-v0") == "envs.register"
        )
        envs.register(
            "test/SmallMath-v0", "envs.math_env:MathEnv", dataset="amc23"
        )  # same entry point: fine
        with pytest.raises(ValueError, match="already registered"):
            envs.register("test/SmallMath-v0", "envs.python_tool_env:PythonToolEnv")
    finally:
        del gymnasium.registry["test/SmallMath-v0"]
    assert "test/SmallMath-v0" not in envs.registered()


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    """A package installed with an ``alp_agents.envs`` entry point: what pip writes to site-packages."""
    (tmp_path / "my_plugin_env.py").write_text(
        textwrap.dedent('''
        import envs

        class EchoMath(envs.MathEnv):
            """MathEnv with a fixed instruction (stands for a third-party environment)."""
            default_instruction = "Plugin says: solve it."

        def squares(split="train", n=3):
            offset = 0 if split == "train" else 100
            return [envs.Problem(f"sq-{split}-{i}", f"What is {i + offset} squared?", str((i + offset) ** 2))
                    for i in range(n)]
    ''')
    )
    dist = tmp_path / "my_plugin_env-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin-env\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nplugin/EchoMath-v0 = my_plugin_env:EchoMath\n\n"
        f"[{DATASET_ENTRY_POINT_GROUP}]\nplugin_squares = my_plugin_env:squares\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        env = envs.make("plugin/EchoMath-v0", dataset="aime24")  # make() rescans for new plugins
        _, info = env.reset(seed=0)
        assert info["messages"][0]["content"].startswith("Plugin says: solve it.")
        assert origin("plugin/EchoMath-v0") == "plugin my-plugin-env"
        assert "plugin/EchoMath-v0" in envs.registered()
        assert discover_plugins(force=True) == []  # already registered: nothing new
        squares = envs.load_dataset("plugin_squares", split="test", n=2)  # the dataset entry point
        assert [p.answer for p in squares] == ["10000", "10201"]
        env = envs.make("plugin/EchoMath-v0", dataset="plugin_squares", split="train")
        assert len(env.problems) == 3
    finally:
        gymnasium.registry.pop("plugin/EchoMath-v0", None)
        sys.modules.pop("my_plugin_env", None)
        _GENERATORS.pop("plugin_squares", None)
