"""The package's table of contents (alp_agents._EXPORTS) must point at real objects."""

import importlib

import pytest

import alp_agents


@pytest.mark.parametrize("name", alp_agents.__all__)
def test_every_public_name_resolves(name):
    value = getattr(alp_agents, name)
    module = importlib.import_module(alp_agents._EXPORTS[name])
    assert value is getattr(module, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        alp_agents.nope  # noqa: B018


def test_every_sandbox_name_resolves():
    import sandbox

    for name in sandbox.__all__:
        assert getattr(sandbox, name) is not None, name
