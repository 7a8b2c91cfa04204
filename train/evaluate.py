#!/usr/bin/env python
"""Evaluate a model on held-out problems: unbiased pass@k, avg@n, maj@k, tool statistics.

Examples::

    # the default model, 50 GSM8K test problems, 4 samples each (a few minutes on CPU)
    python train/evaluate.py --dataset gsm8k_test --num-problems 50 --k 4

    # the procedural held-out split, a trained checkpoint, a YAML config plus overrides
    python train/evaluate.py --config train/configs/eval_quick.yaml \\
        --model runs/multi_turn-.../final --dataset arith --split test

    # the papers' Average@32 (32 samples, temperature 1.0, top_p 0.7)
    python train/evaluate.py --dataset aime24 --n 32 --k 1 --max-turns 10

Every field of `alp_agents.evaluation.EvalConfig` is an option (``--help`` lists them; dashes
and underscores are interchangeable: ``--max-turns`` = ``--max_turns``). The environment is
``env.id`` / ``env.kwargs.NAME`` as in training configs; the older ``--limit``, ``--env ID`` and
``env_kwargs.NAME`` still work with a deprecation warning (``num_problems``, ``env.id``,
``env.kwargs``). Results go to
``--run-dir`` (default ``runs/eval/<model>-<dataset>-n<n>-seed<seed>``): ``report.md``,
``report.json``, ``samples.jsonl`` and ``pass_at_k.png``. Running the same command again
resumes an interrupted evaluation without redoing finished samples. ``--import MODULE``
(repeatable) first imports a module of yours that registers environments, datasets or models.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alp_agents.common.plugins import PluginImportError, import_modules, pop_imports  # noqa: E402
from alp_agents.configs.loader import parse_cli  # noqa: E402
from alp_agents.evaluation import EvalConfig, EvaluationError, run_evaluation  # noqa: E402


def dashes_to_underscores(argv: Sequence[str]) -> list[str]:
    """``--max-turns 3`` -> ``--max_turns 3`` (keys only; values are left alone).

    >>> dashes_to_underscores(["--max-turns", "3", "--run-dir=a-b", "env_kwargs.time-out=1"])
    ['--max_turns', '3', '--run_dir=a-b', 'env_kwargs.time-out=1']
    """
    out = []
    for token in argv:
        if token.startswith("--") and token not in ("--print-config",):
            key, sep, value = token[2:].partition("=")
            token = "--" + key.replace("-", "_") + sep + value
        out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, modules = pop_imports(sys.argv[1:] if argv is None else argv)
        import_modules(modules)  # user modules that register envs, datasets or models
    except PluginImportError as exc:
        print(f"train/evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    argv = dashes_to_underscores(args)
    argv = [a if a != "--print_config" else "--print-config" for a in argv]
    cfg, _ = parse_cli(EvalConfig, argv, prog="train/evaluate.py", description=__doc__)
    try:
        report = run_evaluation(cfg)
    except EvaluationError as exc:
        print(f"train/evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    print(report.files["report_md"].read_text())
    print(f"wrote {report.run_dir}/ (report.md, report.json, samples.jsonl, pass_at_k.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
