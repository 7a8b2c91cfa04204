"""A study's grid: which training runs (cells) it is made of.

A study is a base training configuration (the YAML files of ``train/multi_turn.py``) and a grid
over it: presets x variants x swept keys x seeds. Every cell is an ordinary training run whose
configuration is the base plus the cell's own overrides, so two cells differ only in what the
grid varies.

* ``presets``: objective presets (``algorithm.preset``).
* ``variants``: named override sets, e.g. the layer ablation
  ``{"early": {"perturbation.layers": "0:10"}, "logits": {"perturbation.target": "logits"}}``.
* ``sweep``: ``{key: [values]}``; the grid takes every combination.
* ``seeds``: ``seed`` values (each seeds sampling, initial noise, data order).
* ``overrides``: applied to every cell.

The grid can be given on the command line (`from_cli`) or in the base YAML's ``study:`` section
(`read_study_section`); the command line wins key by key.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alp_agents.common import did_you_mean
from alp_agents.configs.loader import ConfigError

__all__ = ["Cell", "StudySpec", "read_study_section", "STUDY_SECTION"]

STUDY_SECTION = "study"
_SPEC_KEYS = ("presets", "seeds", "sweep", "variants", "overrides")


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    preset: str
    seed: int
    variant: str | None = None
    variant_overrides: tuple[tuple[str, Any], ...] = ()
    sweep: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        """A readable, filesystem-safe name, unique within a grid: ``alp-late-mini_batches=4-s1``."""
        parts = [self.preset]
        if self.variant:
            parts.append(self.variant)
        parts += [f"{key.rsplit('.', 1)[-1]}={_text(value)}" for key, value in self.sweep]
        parts.append(f"s{self.seed}")
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))

    @property
    def group(self) -> str:
        """The cell's configuration without the seed: the unit that seeds are averaged over."""
        return self.id.rsplit("-s", 1)[0]

    def overrides(self, common: dict[str, Any]) -> list[str]:
        """``key=value`` overrides of this cell, on top of the base configuration."""
        values: dict[str, Any] = dict(common)
        values.update(self.variant_overrides)
        values.update(self.sweep)
        values["algorithm.preset"] = self.preset
        values["seed"] = self.seed
        return [f"{key}={_yaml_value(value)}" for key, value in values.items()]


@dataclass
class StudySpec:
    """The grid of a study (see the module docstring)."""

    presets: list[str] = field(default_factory=lambda: ["alp", "bypass"])
    seeds: list[int] = field(default_factory=lambda: [0])
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every cell, seeds innermost (so a partial study has whole configurations first)."""
        variants: list[tuple[str | None, dict[str, Any]]] = list(self.variants.items()) or [
            (None, {})
        ]
        keys = list(self.sweep)
        combos = list(itertools.product(*(self.sweep[k] for k in keys))) or [()]
        out = []
        for preset, (vname, vals), combo in itertools.product(self.presets, variants, combos):
            for seed in self.seeds:
                out.append(
                    Cell(
                        preset=preset,
                        seed=int(seed),
                        variant=vname,
                        variant_overrides=tuple(vals.items()),
                        sweep=tuple(zip(keys, combo, strict=True)),
                    )
                )
        ids = [c.id for c in out]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(f"study grid: two cells would share the name(s) {dupes}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _SPEC_KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> StudySpec:
        unknown = sorted(set(data) - set(_SPEC_KEYS))
        if unknown:
            hint = "".join(did_you_mean(k, _SPEC_KEYS) for k in unknown)
            raise ConfigError(
                f"{source}: unknown key(s) {unknown} in the study section; valid: "
                f"{', '.join(_SPEC_KEYS)}.{hint}",
                source=source,
            )
        spec = cls()
        for key in _SPEC_KEYS:
            if key in data and data[key] is not None:
                setattr(spec, key, data[key])
        spec.check(source)
        return spec

    def check(self, source: str) -> None:
        """Shapes of the grid's own fields (the values are checked by the trainer's schema)."""

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"{source}: study {what}", source=source)

        need(
            isinstance(self.presets, list)
            and self.presets
            and all(isinstance(p, str) for p in self.presets),
            f"presets must be a non-empty list of names, got {self.presets!r}",
        )
        need(
            isinstance(self.seeds, list)
            and self.seeds
            and all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds),
            f"seeds must be a non-empty list of integers, got {self.seeds!r}",
        )
        need(
            isinstance(self.sweep, dict)
            and all(isinstance(v, list) and v for v in self.sweep.values()),
            f"sweep must map keys to non-empty lists of values, got {self.sweep!r}",
        )
        need(
            isinstance(self.variants, dict)
            and all(isinstance(v, dict) for v in self.variants.values()),
            f"variants must map names to {{key: value}} overrides, got {self.variants!r}",
        )
        need(
            isinstance(self.overrides, dict), f"overrides must be a mapping, got {self.overrides!r}"
        )
        need(len(set(self.presets)) == len(self.presets), f"presets repeat: {self.presets}")
        need(len(set(self.seeds)) == len(self.seeds), f"seeds repeat: {self.seeds}")


def read_study_section(paths: list[Path]) -> dict[str, Any]:
    """The ``study:`` sections of the given YAML files, later files winning key by key."""
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the study section: {exc}") from None
        section = data.get(STUDY_SECTION) if isinstance(data, dict) else None
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: '{STUDY_SECTION}' must be a mapping, got {section!r}")
        merged.update(section)
    return merged


def parse_values(text: str) -> list[Any]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (each item read as YAML: numbers, null, true, strings).

    >>> parse_values("1,2.5,null,bfloat16,0:10")
    [1, 2.5, None, 'bfloat16', '0:10']
    """
    return [parse_value(item) for item in text.split(",")]


def parse_value(text: str) -> Any:
    """One command-line value: a number, else YAML (null, true, lists), but ``"0:10"`` stays
    text (YAML 1.1 reads it as the base-60 number 10).

    >>> parse_value("1e-5"), parse_value("[0.9, 0.99]"), parse_value("20:30")
    (1e-05, [0.9, 0.99], '20:30')
    """
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    if ":" in text and not text.lstrip().startswith(("[", "{")):
        return text
    return yaml.safe_load(text)


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if yaml.safe_load(value) == value and ":" not in value else f"'{value}'"
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _text(value: Any) -> str:
    return "null" if value is None else str(value).replace(":", "-")
