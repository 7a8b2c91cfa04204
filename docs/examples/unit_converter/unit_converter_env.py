"""A complete tool environment in one file: unit conversion with a ``convert`` tool.

Read docs/examples/unit_converter/README.md for the walk-through. In short:

1. ``convert`` is a typed, documented function; ``@envs.tool`` turns it into a tool with a
   JSON schema the model sees in its system prompt.
2. ``unit_problems`` generates seeded, disjoint train/test problem sets; ``envs.register_generator``
   makes it a dataset name (``"units"``) that ``envs.load_dataset`` and every env accept.
3. ``UnitConverterEnv`` subclasses ``envs.ToolEnv`` (which parses ``<tool_call>`` tags, runs the
   tool, reports malformed calls back to the model) and overrides ``grade_answer`` to accept a
   rounded number.
4. ``register()`` adds the id ``units/Convert-v0``; a pip-installed package does the same through
   its ``alp_agents.envs`` entry point (see pyproject.toml next to this file).

    >>> import envs, unit_converter_env
    >>> unit_converter_env.register()
    >>> env = envs.make("units/Convert-v0")
    >>> _, info = env.reset(options={"problem_id": "units-test-0"})
    >>> info["messages"][-1]["content"]
    'Convert 474.1 ft to cm. Give the result rounded to 2 decimal places.'
"""

from __future__ import annotations

import hashlib
import random

import envs

# Units per dimension: factor to the base unit (m, kg, l), or an affine map for temperatures.
LINEAR_UNITS = {
    "length": {
        "m": 1.0,
        "km": 1000.0,
        "cm": 0.01,
        "mm": 0.001,
        "mi": 1609.344,
        "yd": 0.9144,
        "ft": 0.3048,
        "in": 0.0254,
    },
    "mass": {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125},
    "volume": {"l": 1.0, "ml": 0.001, "gal": 3.785411784, "cup": 0.2365882365},
}
TEMPERATURES = ("C", "F", "K")


def _to_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": (value - 32) * 5 / 9, "K": value - 273.15}[unit]


def _from_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": value * 9 / 5 + 32, "K": value + 273.15}[unit]


@envs.tool
def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert a quantity between units of length, mass, volume or temperature.

    Args:
        value: the number to convert.
        from_unit: its unit: m, km, cm, mm, mi, yd, ft, in, kg, g, lb, oz, l, ml, gal, cup, C, F or K.
        to_unit: the unit wanted (same dimension as from_unit).
    """
    if from_unit in TEMPERATURES and to_unit in TEMPERATURES:
        return _from_celsius(_to_celsius(value, from_unit), to_unit)
    for dimension, units in LINEAR_UNITS.items():
        if from_unit in units and to_unit in units:
            return value * units[from_unit] / units[to_unit]
        if from_unit in units or to_unit in units:
            known = ", ".join(units)
            raise ValueError(
                f"cannot convert {from_unit!r} to {to_unit!r}; {dimension} units are {known}"
            )
    raise ValueError(f"unknown unit {from_unit!r} or {to_unit!r}")


def unit_problems(split: str = "train", n: int | None = None, seed: int = 0) -> list[envs.Problem]:
    """Seeded conversion problems; a question is in "test" iff its hash says so (disjoint splits)."""
    if split not in ("train", "test"):
        raise envs.DatasetError(f"units has splits ('train', 'test'), got {split!r}")
    n = {"train": 2000, "test": 200}[split] if n is None else n
    rng = random.Random(f"units:{split}:{seed}")
    problems: list[envs.Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        if rng.random() < 0.2:
            source, target = rng.sample(TEMPERATURES, 2)
            value = round(rng.uniform(-40, 250), 1)
        else:
            units = LINEAR_UNITS[rng.choice(sorted(LINEAR_UNITS))]
            source, target = rng.sample(sorted(units), 2)
            value = round(rng.uniform(0.5, 500), 1)
        question = (
            f"Convert {value} {source} to {target}. Give the result rounded to 2 decimal places."
        )
        in_test = hashlib.sha256(question.encode()).digest()[0] % 5 == 0
        if question in seen or in_test != (split == "test"):
            continue
        seen.add(question)
        answer = f"{convert(value=value, from_unit=source, to_unit=target):.2f}"
        problems.append(envs.Problem(f"units-{split}-{len(problems)}", question, answer, "units"))
    return problems


envs.register_generator("units", unit_problems)


class UnitConverterEnv(envs.ToolEnv):
    """Answer unit-conversion questions with the ``convert`` tool; finish with ``\\boxed{number}``."""

    tools = [convert]
    #: ``one_shot=True`` shows this solved episode first, in the env's call format.
    example = envs.ToolExample(
        question="Convert 3.5 mi to km. Give the result rounded to 2 decimal places.",
        tool="convert",
        arguments={"value": 3.5, "from_unit": "mi", "to_unit": "km"},
        answer="5.63",
        thought="I will use the convert tool.\n",
    )
    default_max_turns = 3
    default_instruction = ""  # the system prompt (built from the tools) says everything

    def __init__(self, dataset: str = "units", split: str | None = "test", **kwargs):
        super().__init__(dataset, split, **kwargs)

    def grade_answer(self, text: str) -> envs.Grade:
        """Correct when the boxed number is within 0.01 of the reference (it was rounded)."""
        assert self.problem is not None
        reference = self.problem.answer
        extracted = envs.extract_boxed(text)
        if extracted is None:
            return envs.Grade("wrong", None, reference, "no \\boxed{} answer found")
        try:
            value = float(extracted.replace(",", ""))
        except ValueError:
            return envs.Grade("wrong", extracted, reference, "not a number")
        close = abs(value - float(reference)) <= 0.011
        return envs.Grade("correct" if close else "wrong", extracted, reference, "within 0.01")


def register() -> None:
    """Make ``envs.make("units/Convert-v0")`` work in this process (pip users get it from the entry point)."""
    envs.register("units/Convert-v0", UnitConverterEnv)


# Importing the module registers the env, as it registers its dataset: what
# `train/evaluate.py --import unit_converter_env` relies on (register() again is harmless).
register()
