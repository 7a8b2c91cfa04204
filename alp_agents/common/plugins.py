"""``--import MODULE``: load a user's module before a command line is read.

An environment, dataset or model that a user registers in their own module (``envs.register``,
``@envs.tool``, ``register_model_factory``) exists only once that module is imported. Installed
packages can use entry points; for a module next to the user's code, the training and
evaluation scripts take ``--import MODULE`` (repeatable), imported in order before the
configuration is validated, with the current directory importable as ``python -m`` makes it.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Sequence

IMPORT_FLAG = "--import"


class PluginImportError(ImportError):
    """A ``--import`` module could not be imported; the message names it and the cause."""


def pop_imports(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--import M`` / ``--import=M`` (any number) out of ``args``: (rest, modules).

    >>> pop_imports(["--import", "my_env", "steps=2", "--import=pkg.tools"])
    (['steps=2'], ['my_env', 'pkg.tools'])
    """
    rest: list[str] = []
    modules: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == IMPORT_FLAG:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                raise PluginImportError(f"{IMPORT_FLAG} needs a module name (e.g. my_env)")
            modules.append(args[i + 1])
            i += 2
            continue
        if arg.startswith(IMPORT_FLAG + "="):
            modules.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest, modules


def import_modules(modules: Sequence[str]) -> None:
    """Import each module (current directory first on ``sys.path``, as ``python -m`` does).

    A module that is missing or raises while importing becomes a `PluginImportError` naming
    it, with the last line of its traceback, so the script can exit with status 2.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                raise PluginImportError(
                    f"{IMPORT_FLAG} {name}: no module named {exc.name!r} (looked in {cwd} "
                    "and the installed packages)"
                ) from exc
            raise PluginImportError(f"{IMPORT_FLAG} {name}: {exc}") from exc
        except Exception as exc:  # the module itself failed: say where
            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise PluginImportError(
                f"{IMPORT_FLAG} {name}: importing it raised {type(exc).__name__}: {exc} "
                f"({where.filename}:{where.lineno})"
            ) from exc
