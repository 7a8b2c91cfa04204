"""Typed configuration: dataclasses <- YAML files <- command-line overrides (OmegaConf).

Each entry point owns a dataclass (nested dataclasses for sections); this module turns a YAML
file plus command-line overrides into an instance of it, and reports mistakes precisely: an
unknown key names the key, where it came from (the YAML file and line, or "command line") and
the closest valid key; a value of the wrong type names the field and the expected type.

Precedence, lowest to highest: dataclass defaults, the YAML files (in order), overrides (in
order). A YAML file may name the files it builds on in a top-level ``defaults:`` list (paths
relative to the file); they are loaded first, so a preset file holds only what it changes::

    # train/configs/presets/bypass.yaml
    defaults: [../multi_turn_cpu.yaml]
    algorithm:
      preset: bypass

Example::

    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Optim:
    ...     lr: float = 1e-6
    ...     '''Learning rate of AdamW.'''
    >>> @dataclass
    ... class Train:
    ...     steps: int = 100  # optimisation steps
    ...     optim: Optim = field(default_factory=Optim)
    >>> cfg = load_config(Train, overrides=["optim.lr=3e-6", "--steps", "5"])
    >>> cfg.steps, cfg.optim.lr
    (5, 3e-06)
    >>> load_config(Train, overrides=["optim.lrr=1"])
    Traceback (most recent call last):
    ...
    alp_agents.configs.loader.ConfigError: command line: unknown key 'optim.lrr'. Did you mean 'optim.lr'?

A script's ``main`` is usually just::

    cfg, extras = parse_cli(TrainConfig, description="Train with ALP.")

which accepts ``--config FILE.yaml``, ``key=value``, ``--key value``, ``--key=value``, ``--flag``
(for booleans), ``--print-config`` and ``--help`` (lists every field with type, default and doc).
"""

import argparse
import ast
import dataclasses
import difflib
import enum
import inspect
import os
import sys
import textwrap
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    ConfigTypeError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from alp_agents.common import did_you_mean

__all__ = [
    "CLI_SOURCE",
    "CliExtras",
    "ConfigError",
    "config_help",
    "config_to_yaml",
    "field_docs",
    "load_config",
    "parse_cli",
    "save_config",
]

T = TypeVar("T")

CLI_SOURCE = "command line"


class ConfigError(ValueError):
    """A configuration mistake, with the key, its source and a suggested fix in the message.

    Attributes:
        key: dotted key the problem is about (``"trainer.lr"``), or None.
        source: ``"command line"``, ``"path/to/file.yaml:12"``, or ``"<schema name>"``.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_config(
    schema: type[T],
    config_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    overrides: Sequence[str] = (),
    extra_sections: Sequence[str] = (),
) -> T:
    """Build a ``schema`` instance from its defaults, YAML files and overrides.

    Args:
        schema: a dataclass type (nested dataclasses become YAML sections).
        config_path: optional YAML file, or several applied in order; each may set any subset
            of the fields and name the files it builds on under ``defaults:``.
        extra_sections: top-level YAML keys that belong to another reader (e.g. a study's
            ``study:`` grid) and are skipped here instead of being unknown keys.
        overrides: ``"a.b=1"``, ``"--a.b=1"`` or the pair ``"--a.b", "1"``; a lone ``--flag``
            sets a boolean field to true. Values are parsed as YAML (``1e-6``, ``[1, 2]``, ``null``).

    Raises:
        ConfigError: unknown key, wrong type, missing required value, unreadable YAML.
    """
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    try:
        merged = OmegaConf.structured(schema)
    except (OmegaConfBaseException, NameError) as exc:
        raise TypeError(f"{schema.__name__} cannot be used as a config schema: {exc}") from exc
    layers: list[tuple[DictConfig, str, Path | None]] = []
    if config_path is None:
        paths: list[Path] = []
    elif isinstance(config_path, str | os.PathLike):
        paths = [Path(config_path)]
    else:
        paths = [Path(p) for p in config_path]
    for path in paths:
        for layer, source, where in _read_layers(path, ()):
            skip = [k for k in extra_sections if k in layer]
            if skip:
                layer = OmegaConf.masked_copy(layer, [k for k in layer if k not in skip])
            layers.append((layer, source, where))
    dotlist = normalize_overrides(overrides, schema)
    if dotlist:
        try:
            cli = OmegaConf.from_dotlist(dotlist)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{CLI_SOURCE}: cannot parse overrides {dotlist}: {exc}") from exc
        layers.append((cli, CLI_SOURCE, None))
    for layer, source, path in layers:
        _check_sections(layer, schema, source, path)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, source, path) from None
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, "the merged configuration", None) from None
    except (ValueError, TypeError) as exc:  # raised by the schema's own __post_init__ checks
        sources = " + ".join(["defaults"] + [source for _, source, _ in layers])
        raise ConfigError(f"invalid configuration ({sources}): {exc}") from exc


DEFAULTS_KEY = "defaults"


def _read_layers(path: Path, chain: tuple[Path, ...]) -> list[tuple[DictConfig, str, Path | None]]:
    """``path``'s ``defaults:`` files (recursively, in order), then ``path`` itself."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"{path}: {DEFAULTS_KEY} form a cycle: {cycle}", source=str(path))
    layer = _read_yaml(path)
    layers: list[tuple[DictConfig, str, Path | None]] = []
    if DEFAULTS_KEY in layer:
        parents = OmegaConf.to_container(layer[DEFAULTS_KEY])
        where = f"{path}:{_yaml_line(path, DEFAULTS_KEY)}"
        if isinstance(parents, str):
            parents = [parents]
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise ConfigError(
                f"{where}: {DEFAULTS_KEY} must be a list of YAML file paths "
                f"(relative to this file), got {parents!r}",
                key=DEFAULTS_KEY,
                source=where,
            )
        for parent in parents:
            parent_path = path.parent / parent
            if not parent_path.is_file():
                raise ConfigError(
                    f"{where}: {DEFAULTS_KEY} names {parent!r}, but {parent_path} does not exist",
                    key=DEFAULTS_KEY,
                    source=where,
                )
            layers.extend(_read_layers(parent_path, (*chain, resolved)))
        layer = OmegaConf.masked_copy(layer, [k for k in layer if k != DEFAULTS_KEY])
    layers.append((layer, str(path), path))
    return layers


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", source=str(path))
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc}", source=where) from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not a list")
    return loaded


def normalize_overrides(tokens: Sequence[str], schema: type | None = None) -> list[str]:
    """Turn ``--a.b 1`` / ``--a.b=1`` / ``a.b=1`` / ``--flag`` tokens into OmegaConf's dotlist.

    >>> normalize_overrides(["--trainer.lr", "1e-6", "steps=3", "--eval.enabled=false"])
    ['trainer.lr=1e-6', 'steps=3', 'eval.enabled=false']
    """
    bool_keys = {k for k, t in _leaf_types(schema).items() if t is bool} if schema else set()
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            body = token[2:]
            if "=" in body:
                out.append(body)
            elif body in bool_keys and (i + 1 == len(tokens) or tokens[i + 1].startswith("--")):
                out.append(f"{body}=true")
            elif i + 1 < len(tokens):
                out.append(f"{body}={tokens[i + 1]}")
                i += 1
            else:
                raise ConfigError(
                    f"{CLI_SOURCE}: option {token} needs a value ({token} VALUE or {token}=VALUE)",
                    key=body,
                    source=CLI_SOURCE,
                )
        elif "=" in token and not token.startswith("-"):
            out.append(token)
        else:
            raise ConfigError(
                f"{CLI_SOURCE}: cannot understand argument {token!r}; use key=value, "
                "--key value or --key=value (see --help for the keys)",
                source=CLI_SOURCE,
            )
        i += 1
    return out


# ----------------------------------------------------------------------------------------------
# Error messages
# ----------------------------------------------------------------------------------------------


def _explain(
    exc: OmegaConfBaseException, schema: type, source: str, path: Path | None
) -> ConfigError:
    key = getattr(exc, "full_key", None) or None
    where = source
    if path is not None and key:
        line = _yaml_line(path, key)
        if line is not None:
            where = f"{path}:{line}"
    leaf_types = _leaf_types(schema)
    if isinstance(exc, ConfigKeyError) and key:
        return ConfigError(
            f"{where}: unknown key {key!r}.{_suggest(key, leaf_types)}",
            key=key,
            source=where,
        )
    if isinstance(exc, MissingMandatoryValue) and key:
        return ConfigError(
            f"{where}: {key!r} is required but has no value; set it in the YAML file or on the "
            f"command line ({key}=...)",
            key=key,
            source=where,
        )
    if isinstance(exc, (ValidationError, ConfigTypeError)):
        if key is None:  # e.g. a scalar given where a section was expected
            return ConfigError(f"{where}: {_first_line(exc)}", source=where)
        expected = _type_name(leaf_types.get(key)) if key in leaf_types else "a section"
        value = _plain(getattr(exc, "value", None))
        got = f"{value!r} ({type(value).__name__})" if value is not None else _first_line(exc)
        return ConfigError(f"{where}: {key!r} expects {expected}, got {got}", key=key, source=where)
    if isinstance(exc, InterpolationResolutionError):
        return ConfigError(f"{where}: {key!r}: {_first_line(exc)}", key=key, source=where)
    return ConfigError(f"{where}: {_first_line(exc)}", key=key, source=where)


def _plain(value: Any) -> Any:
    """A node or container from OmegaConf as plain Python, for error messages."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value)
    return value._value() if hasattr(value, "_value") else value


def _check_sections(
    layer: DictConfig, schema: type, source: str, path: Path | None, prefix: str = ""
) -> None:
    """A section (nested dataclass) must be given a mapping, not a scalar or list."""
    for f, tp in _fields(schema):
        nested = _nested_schema(tp)
        if nested is None or f.name not in layer:
            continue
        node = layer._get_node(f.name)  # the raw node: no interpolation is resolved here
        key = prefix + f.name
        if isinstance(node, DictConfig):
            _check_sections(node, nested, source, path, key + ".")
            continue
        value = node._value()
        if value is None and nested is not tp:  # Optional section set to null
            continue
        line = _yaml_line(path, key) if path is not None else None
        where = f"{path}:{line}" if line is not None else source
        example = next(iter(_leaf_types(nested)), "field")
        raise ConfigError(
            f"{where}: {key!r} is a section ({nested.__name__}), so it needs a mapping of its "
            f"fields, got {_plain(value)!r}; e.g. {key}.{example}=...",
            key=key,
            source=where,
        )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _suggest(key: str, leaf_types: dict[str, Any]) -> str:
    """' Did you mean ...?' using the full dotted key, then its last component."""
    valid = list(leaf_types)
    sections = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    hint = did_you_mean(key, valid + sorted(sections))
    if hint:
        return hint
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    if match:  # a misspelt last component under the wrong section: suggest the full key
        return did_you_mean(by_leaf[match[0]], [by_leaf[match[0]]])
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in valid if k.startswith(parent + ".")] if parent else valid
    return f" Valid keys here: {', '.join(siblings[:20])}" if siblings else ""


def _yaml_line(path: Path, dotted_key: str) -> int | None:
    """1-based line of ``dotted_key`` in a YAML file (the deepest part that exists), or None."""
    try:
        node = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for part in dotted_key.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line


def _type_name(tp: Any) -> str:
    if tp is None:
        return "a value"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"{tp.__name__} (one of {', '.join(tp.__members__)})"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X] -> "X | None"
        rest = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(rest + ["None"])
    return str(tp).replace("typing.", "").replace("pathlib.", "")


# ----------------------------------------------------------------------------------------------
# Schema introspection (types, defaults, docs) for --help and suggestions
# ----------------------------------------------------------------------------------------------


def _fields(schema: type) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        yield f, hints.get(f.name, f.type)


def _nested_schema(tp: Any) -> type | None:
    """The dataclass behind ``tp`` (also inside Optional[...]), or None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _leaf_types(schema: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> annotated type for every non-section field."""
    out: dict[str, Any] = {}
    for f, tp in _fields(schema):
        nested = _nested_schema(tp)
        if nested is not None:
            out.update(_leaf_types(nested, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def field_docs(schema: type) -> dict[str, str]:
    """Field name -> documentation, from (in order of preference) ``field(metadata={"help":
    ...})``, a string literal right below the field, a trailing ``# comment`` on its line, or
    ``#`` comment lines right above it."""
    docs: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(schema))
    except (OSError, TypeError):
        source = ""
    lines = source.splitlines()
    if source:
        class_def = ast.parse(source).body[0]
        body = getattr(class_def, "body", [])
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            name = stmt.target.id
            nxt = body[i + 1] if i + 1 < len(body) else None
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[name] = inspect.cleandoc(nxt.value.value)
                continue
            end_line = lines[(stmt.end_lineno or stmt.lineno) - 1]
            if "#" in end_line:
                docs[name] = end_line.split("#", 1)[1].strip()
                continue
            above: list[str] = []
            j = stmt.lineno - 2
            while j >= 0 and lines[j].strip().startswith("#"):
                above.insert(0, lines[j].strip().lstrip("#").strip())
                j -= 1
            if above:
                docs[name] = " ".join(above)
    for f in dataclasses.fields(schema):
        if f.metadata.get("help"):
            docs[f.name] = str(f.metadata["help"])
    return docs


def _default_repr(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, enum.Enum):
        return value.name
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def config_help(schema: type, prefix: str = "") -> str:
    """One line per field: dotted key, type, default and documentation (used by ``--help``)."""
    rows: list[str] = []
    sections: list[str] = []
    docs = field_docs(schema)
    for f, tp in _fields(schema):
        nested = _nested_schema(tp)
        doc = docs.get(f.name, "")
        if nested is not None:
            title = doc or (inspect.getdoc(nested) or "").split("\n")[0]
            sections.append(f"\n[{prefix}{f.name}]" + (f"  {title}" if title else ""))
            sections.append(config_help(nested, f"{prefix}{f.name}."))
            continue
        head = f"  --{prefix}{f.name} ({_type_name(tp)}, default: {_default_repr(f)})"
        rows.append(head + (f"\n      {doc}" if doc else ""))
    return "\n".join(rows + sections)


# ----------------------------------------------------------------------------------------------
# Command line and snapshots
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CliExtras:
    """What `parse_cli` learned besides the configuration itself.

    Attributes:
        config_path: the last ``--config`` file (or the default one), if any.
        config_paths: every ``--config`` file, in the order they were applied.
        overrides: the normalised overrides that were applied (``["trainer.lr=1e-6"]``).
        passthrough: tokens after a bare ``--`` (left for the script, e.g. to forward).
    """

    config_path: Path | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    config_paths: list[Path] = dataclasses.field(default_factory=list)
    passthrough: list[str] = dataclasses.field(default_factory=list)


def parse_cli(
    schema: type[T],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
    default_config: str | os.PathLike[str] | None = None,
    extra_sections: Sequence[str] = (),
) -> tuple[T, CliExtras]:
    """Parse a script's command line into a ``schema`` instance.

    Accepts ``--config FILE.yaml`` (``-c``; repeat it to layer files, later ones win), overrides as ``key=value``, ``--key value``,
    ``--key=value`` or ``--flag``, ``--print-config`` (print the resolved YAML and exit) and
    ``--help`` (every field with type, default and doc). Configuration mistakes print the
    `ConfigError` message and exit with status 2, like any argparse error.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        default_config: YAML file used when ``--config`` is not given.
        extra_sections: top-level YAML keys to skip (see `load_config`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or _own_doc(schema),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="configuration fields (override with key=value, --key value or --key=value;"
        " later ones win):\n" + config_help(schema),
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        action="append",
        help="YAML file with field values; repeat to layer files (later ones win)"
        + (f"; default: {default_config}" if default_config else ""),
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )
    known, rest = parser.parse_known_args(argv)
    paths = known.config or ([Path(default_config)] if default_config else [])
    try:
        dotlist = normalize_overrides(rest, schema)
        config = load_config(schema, paths, dotlist, extra_sections=extra_sections)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if known.print_config:
        print(config_to_yaml(config), end="")
        parser.exit(0)
    return config, CliExtras(
        config_path=paths[-1] if paths else None,
        overrides=dotlist,
        passthrough=passthrough,
        config_paths=list(paths),
    )


def _own_doc(schema: type) -> str | None:
    """The class docstring, unless it is the signature dataclasses writes when there is none."""
    doc = inspect.getdoc(schema)
    return None if doc is None or doc.startswith(f"{schema.__name__}(") else doc


def config_to_yaml(config: Any) -> str:
    """YAML text of a config instance (or dict); `load_config` reads it back unchanged.

    Enums are written by name and paths as strings, so the file is plain, safe YAML.
    """
    node = OmegaConf.create(config) if isinstance(config, dict) else OmegaConf.structured(config)
    plain = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return yaml.safe_dump(_stringify_paths(plain), sort_keys=False, allow_unicode=True)


def _stringify_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stringify_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_paths(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value


def save_config(config: Any, path: str | os.PathLike[str]) -> Path:
    """Write `config_to_yaml` to ``path`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(config))
    return path
