"""What a training run prints: the progress bar and its postfix, and the closing summary."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alp_agents.trainer.loop import TrainResult


def without_step_label(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k not in ("step", "label")}


def progress_postfix(metrics: dict[str, float]) -> dict[str, str]:
    out = {}
    for key, label, fmt in (
        ("reward/mean", "reward", "{:.3f}"),
        ("env/code_use_ratio", "tool", "{:.2f}"),
        ("ratio/q99", "r_p99", "{:.3f}"),
        ("mismatch/k3", "k3", "{:.2e}"),
        ("time/step_s", "s/step", "{:.1f}"),
    ):
        if key in metrics:
            out[label] = fmt.format(metrics[key])
    return out


def progress_bar(
    total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True
) -> Any:
    """The one progress-bar style of the project (train steps, rollout episodes, eval
    problems, study cells): a tqdm bar that adapts to the terminal and disappears when off."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
    )


def say(message: str, *, prefix: str = "") -> None:
    """A user-facing line on stderr, flushed at once (progress bars own stdout's line)."""
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


def format_summary(result: TrainResult) -> str:
    """A short before/after table printed at the end of training."""
    lines = [f"\nRun directory: {result.run_dir}  (steps: {result.steps_done})"]
    if result.eval_before or result.eval_after:
        before, after = result.eval_before or {}, result.eval_after or {}
        keys = [k for k in (before or after) if k in after or not after]
        lines.append(f"{'held-out metric':<32}{'before':>10}{'after':>10}{'change':>10}")
        for k in keys:
            b, a = before.get(k), after.get(k)
            change = f"{a - b:+.3f}" if a is not None and b is not None else ""
            fb = f"{b:.3f}" if b is not None else "-"
            fa = f"{a:.3f}" if a is not None else "-"
            lines.append(f"{k:<32}{fb:>10}{fa:>10}{change:>10}")
    if result.export_dir:
        lines.append(f"Exported model (plain from_pretrained): {result.export_dir}")
    if result.plots:
        lines.append(f"Plots: {', '.join(str(p) for p in result.plots.values())}")
    return "\n".join(lines)
