"""``python train/study.py``: parse the grid, run it, report. See docs/study.md."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from alp_agents.configs.loader import ConfigError
from alp_agents.study.grid import StudySpec, parse_value, parse_values, read_study_section

DEFAULT_CONFIG = Path("train/configs/study_offpolicy_cpu.yaml")

EPILOG = """examples:
  python train/study.py --presets alp,bypass --seeds 0,1,2 --output runs/study-presets
  python train/study.py --presets alp,bypass --seeds 0 --sweep algorithm.mini_batches=1,2,4,8 \\
      --output runs/study-staleness
  python train/study.py --presets alp --variant early:perturbation.layers=0:10 \\
      --variant logits:perturbation.target=logits --output runs/study-layers
  python train/study.py --report runs/study-presets          # rebuild study.md / study.json

Rerunning the same command skips finished cells and resumes an interrupted one from its
newest checkpoint. Ctrl-C stops the running cell with a checkpoint."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="study.py",
        description="Run a grid of training runs (presets x variants x swept keys x seeds) on one "
        "base config and aggregate them: held-out score with intervals, ratio envelopes, knobs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("-c", "--config", type=Path, action="append",
                   help=f"base training config (repeat to layer; default {DEFAULT_CONFIG}); its "
                   "'study:' section may hold the grid")  # fmt: skip
    p.add_argument("--presets", help="comma-separated objective presets, e.g. alp,bypass,grpo")
    p.add_argument("--seeds", help="comma-separated integer seeds, e.g. 0,1,2")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept config key and its values (repeatable: every combination)")  # fmt: skip
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=V[,KEY=V]",
                   help="a named set of overrides, e.g. late:perturbation.layers=20:30")  # fmt: skip
    p.add_argument("--output", type=Path, help="the study directory (cells/, study.md, ...)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="only (re)build the report of the study in DIR")  # fmt: skip
    p.add_argument("--reference", metavar="CONFIGURATION",
                   help="the report's paired differences are taken against this configuration "
                   "(a preset or preset-variant name; default alp)")  # fmt: skip
    p.add_argument("--retry-failed", action="store_true", help="rerun cells that crashed")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished cell's checkpoints (default: deleted, ~1.6 GB each)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    return p


def _parse_variant(text: str) -> tuple[str, dict[str, object]]:
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise ConfigError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    values: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        values[key] = parse_value(value)
    return name, values


def build_spec(args: argparse.Namespace, rest: Sequence[str], base: list[Path]) -> StudySpec:
    """The grid: the YAML 'study:' section, then the command line key by key."""
    data = read_study_section(base)
    if args.presets:
        data["presets"] = [p for p in args.presets.split(",") if p]
    if args.seeds:
        try:
            data["seeds"] = [int(s) for s in args.seeds.split(",") if s]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: expected integers like 0,1,2") from None
    if args.sweep:
        data["sweep"] = {}
        for item in args.sweep:
            key, eq, values = item.partition("=")
            if not eq or not values:
                raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,...")
            data["sweep"][key] = parse_values(values)
    if args.variant:
        data["variants"] = dict(_parse_variant(v) for v in args.variant)
    overrides = dict(data.get("overrides") or {})
    for token in rest:
        key, eq, value = token.partition("=")
        if not eq or token.startswith("-"):
            raise ConfigError(f"cannot understand argument {token!r}; use key=value (see --help)")
        overrides[key] = parse_value(value)
    data["overrides"] = overrides
    source = " + ".join([str(p) for p in base] + ["command line"])
    return StudySpec.from_dict(data, source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    if args.report is not None:
        from alp_agents.study.report import write_report

        print(write_report(args.report, reference=args.reference))
        return 0
    if args.output is None and not args.dry_run:
        parser.error("--output DIR is required (where the cells and the report go)")
    base = args.config or [DEFAULT_CONFIG]
    command = "python train/study.py " + shlex.join(argv)
    try:
        spec = build_spec(args, rest, base)
        if args.dry_run:
            for cell in spec.cells():
                print(cell.id)
            return 0
        from alp_agents.study.runner import run_study

        md = run_study(
            spec,
            base,
            args.output,
            args.retry_failed,
            args.keep_checkpoints,
            command,
            reference=args.reference,
        )
    except ConfigError as exc:
        print(f"study.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"report: {md}")
    return 0
