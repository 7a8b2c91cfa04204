"""Environment registry: thin wrappers over gymnasium's, plus entry-point discovery.

``envs.register(id, entry_point, **kwargs)`` records an environment in gymnasium's own registry
(so ``gymnasium.make(id)`` works too) and remembers it as a text environment;
``envs.make(id, **kwargs)`` builds one (the kwargs override the registered ones);
``envs.registered()`` lists the ids.

Other installed packages contribute environments through the entry-point group
``alp_agents.envs``: the entry point's NAME is the environment id and its VALUE the
``"module:Class"`` (or factory) to build it. In the package's ``pyproject.toml``::

    [project.entry-points."alp_agents.envs"]
    "units/Convert-v0" = "unit_converter_env:UnitConverterEnv"

After ``pip install`` the id is available to ``envs.make`` without importing anything by hand.
The module is only imported when the environment is first made.

    >>> import envs
    >>> "alp/PythonTool-v0" in envs.registered()
    True
    >>> envs.make("alp/PythonTol-v0")
    Traceback (most recent call last):
    ...
    envs.registration.UnknownEnvError: unknown environment id 'alp/PythonTol-v0'. Did you mean 'alp/PythonTool-v0'...?...
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any

import gymnasium
from gymnasium.error import UnregisteredEnv

from .text import did_you_mean

ENTRY_POINT_GROUP = "alp_agents.envs"

logger = logging.getLogger("envs")

_ids: dict[str, str] = {}  # id -> where it came from ("envs.register" or "plugin <dist>")
_lock = threading.RLock()
_discovered = False


class UnknownEnvError(UnregisteredEnv, KeyError):
    """``make`` was given an id nobody registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def register(
    id: str, entry_point: str | Callable[..., gymnasium.Env], *, force: bool = False, **kwargs: Any
) -> None:
    """Register a text environment under ``id``.

    Args:
        id: ``"namespace/Name-vN"`` (gymnasium's id syntax).
        entry_point: ``"package.module:ClassName"`` (imported lazily) or a class / factory.
        force: replace an existing registration with a different entry point (otherwise an error,
            so two packages cannot silently shadow each other).
        **kwargs: default constructor arguments (``envs.make`` arguments override them).

    Registering the same id with the same entry point again just updates the kwargs.
    """
    with _lock:
        existing = gymnasium.registry.get(id)
        if (
            existing is not None
            and not force
            and _entry_point_name(existing.entry_point) != _entry_point_name(entry_point)
        ):
            raise ValueError(
                f"environment id {id!r} is already registered with entry point "
                f"{_entry_point_name(existing.entry_point)!r}; pass force=True to replace it"
            )
        if existing is not None:
            del gymnasium.registry[id]  # re-registering silently, without gymnasium's warning
        gymnasium.register(
            id=id,
            entry_point=entry_point,
            kwargs=dict(kwargs),
            # envs.make must return the environment itself: gymnasium's wrappers do not forward
            # attributes such as stop_sequences (envs.check_env runs gymnasium's checker instead).
            order_enforce=False,
            disable_env_checker=True,
        )
        _ids.setdefault(id, "envs.register")


def registered() -> list[str]:
    """Ids of every text environment: shipped, registered in this process, or from plugins."""
    discover_plugins()
    with _lock:
        return sorted(i for i in _ids if i in gymnasium.registry)


def make(id: str, **kwargs: Any) -> gymnasium.Env:
    """Build the environment registered as ``id`` (``kwargs`` override the registered defaults).

    Raises:
        UnknownEnvError: the id is not registered (the message lists close matches).
    """
    discover_plugins()
    if id not in gymnasium.registry:
        discover_plugins(force=True)  # a package may have been installed since the last scan
    if id not in gymnasium.registry:
        known = registered()
        hint = did_you_mean(id, known)
        raise UnknownEnvError(
            f"unknown environment id {id!r}.{hint} Registered: {', '.join(known) or '(none)'}. "
            f"Register one with envs.register(id, entry_point) or a package entry point in group "
            f"{ENTRY_POINT_GROUP!r}."
        )
    env = gymnasium.make(id, **kwargs)
    return env


def discover_plugins(force: bool = False) -> list[str]:
    """Register every environment declared in the ``alp_agents.envs`` entry-point group.

    Runs once per process (again with ``force=True``); returns the ids it added. An id already
    registered in this process wins over a plugin's (with a warning).
    """
    global _discovered
    with _lock:
        if _discovered and not force:
            return []
        _discovered = True
        added = []
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            origin = f"plugin {entry_point.dist.name if entry_point.dist else '?'}"
            if entry_point.name in gymnasium.registry:
                known_ep = _entry_point_name(gymnasium.registry[entry_point.name].entry_point)
                if known_ep != entry_point.value:
                    logger.warning(
                        "entry point %s = %s (%s) ignored: the id is already registered to %s",
                        entry_point.name,
                        entry_point.value,
                        origin,
                        known_ep,
                    )
                continue
            register(entry_point.name, entry_point.value)
            _ids[entry_point.name] = origin
            added.append(entry_point.name)
        return added


def origin(id: str) -> str | None:
    """Where ``id`` came from: ``"envs.register"`` or ``"plugin <distribution>"``."""
    return _ids.get(id)


def _entry_point_name(entry_point: Any) -> str:
    if isinstance(entry_point, str):
        return entry_point
    return f"{getattr(entry_point, '__module__', '?')}:{getattr(entry_point, '__qualname__', repr(entry_point))}"
