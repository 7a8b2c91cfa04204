"""The training command line: `train/multi_turn.py` and `train/single_turn.py` call `cli_main`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from alp_agents.configs.train import OTHER_SECTIONS, TrainConfig, TrainConfigError
from alp_agents.trainer import checkpoint as ckpt
from alp_agents.trainer.loop import ALPTrainer, TrainingDivergedError
from alp_agents.trainer.validation import validate_config


def cli_main(
    argv: Sequence[str] | None, default_config: str | os.PathLike | None, description: str
) -> int:
    """Parse ``--config/--preset/--resume/--import`` plus dotted overrides, train, print the summary.

    ``--preset NAME`` is a shortcut for ``algorithm.preset=NAME``; ``--resume RUN_DIR``
    continues the newest checkpoint of ``RUN_DIR`` with its saved configuration (later
    overrides still apply, e.g. ``steps=40`` to train longer). ``--import MODULE``
    (repeatable) imports a module that registers environments, datasets or models before the
    configuration is read (`alp_agents.common.plugins`). Configuration mistakes exit with
    status 2 before any model is loaded.
    """
    from alp_agents.common.plugins import PluginImportError, import_modules, pop_imports
    from alp_agents.configs.loader import parse_cli

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args, modules = pop_imports(args)
        import_modules(modules)
    except PluginImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args, preset = pop_option(args, "--preset")
    args, resume_dir = pop_option(args, "--resume")
    if preset is not None:
        args.append(f"algorithm.preset={preset}")
    checkpoint = None
    if resume_dir is not None:
        checkpoint = ckpt.latest_checkpoint(resume_dir)
        if checkpoint is None:
            print(
                f"error: --resume {resume_dir}: no checkpoint found under "
                f"{Path(resume_dir) / ckpt.CHECKPOINT_DIRNAME}",
                file=sys.stderr,
            )
            return 2
        if any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
            print(
                "error: --resume uses the run's saved configuration; give overrides only, "
                "not --config",
                file=sys.stderr,
            )
            return 2
        args = ["--config", str(checkpoint / "config.yaml"), *args]
    prog = Path(sys.argv[0]).name if argv is None else None
    cfg, _ = parse_cli(
        TrainConfig,
        args,
        description=description,
        prog=prog,
        default_config=default_config,
        extra_sections=OTHER_SECTIONS,
    )
    try:
        validate_config(cfg)
    except TrainConfigError as exc:
        print(f"{prog or 'train'}: error: {exc}", file=sys.stderr)
        return 2
    try:
        trainer = ALPTrainer(cfg, resume_from=checkpoint)
    except TrainConfigError as exc:  # e.g. prompts that do not split over the processes
        print(f"{prog or 'train'}: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = trainer.train()
    except TrainingDivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0


def pop_option(args: list[str], name: str) -> tuple[list[str], str | None]:
    """Remove ``NAME VALUE`` / ``NAME=VALUE`` from ``args``; returns (rest, value)."""
    rest, value, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == name:
            if i + 1 >= len(args):
                raise SystemExit(f"error: {name} needs a value")
            value, i = args[i + 1], i + 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return rest, value
