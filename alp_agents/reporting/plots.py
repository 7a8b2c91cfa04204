"""PNG plots of a training run, readable at a glance (matplotlib, no display needed).

``plot_run(run_dir)`` reads ``run_dir/metrics.jsonl`` (one JSON object per step, written by
:class:`alp_agents.reporting.runlog.RunLogger`) and writes four figures into ``run_dir/plots/``:

* ``reward.png``  - training reward per step (and its moving average), held-out score at each
  evaluation, tool-use rate when the environment reports it;
* ``ratio_envelope.png`` - the importance ratio actually used in the loss: median with the
  P2-P98 and P1-P99 envelopes per step (token level), and the sequence-level log-ratio envelope
  when logged (the paper's headline picture: Bypass blows up, ALP stays tight);
* ``kl.png`` - trainer vs inference-engine k3 (and k1) KL per step, log scale;
* ``sigma.png`` - the perturbation scale sigma of every layer over steps.

A figure whose metrics are absent from the log (e.g. sigma for a preset without perturbation)
is drawn with a note instead of failing, so the same call works for every preset.

Example::

    from alp_agents.reporting.plots import plot_run
    paths = plot_run("runs/multi_turn-20260101-120000")
    print(paths)   # {'reward': PosixPath('.../plots/reward.png'), ...}
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Metric names the trainer writes (see alp_agents.trainer.loop._step_metrics).
REWARD_KEY = "reward/mean"
TOOL_USE_KEY = "env/code_use_ratio"
EVAL_PREFIX = "eval/"
RATIO_PREFIX = "ratio/"
SEQ_LOG_RATIO_PREFIX = "seq_log_ratio/"
K3_KEY = "mismatch/k3"
K1_KEY = "mismatch/k1"
SIGMA_LAYER = re.compile(r"^sigma/layer_(\d+)$")


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r.get("step", i))
            ys.append(float(v))
    return xs, ys


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _label(ax: Any, ylabel: str, title: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_reward(rows: Sequence[dict[str, Any]], path: Path, eval_key: str | None = None) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs, ys = _series(rows, REWARD_KEY)
    if xs:
        ax.plot(xs, ys, "o-", alpha=0.35, ms=3, label="train reward (per step)")
        ax.plot(xs, _moving_average(ys, 5), "-", lw=2, label="train reward (5-step mean)")
    ex, ey = _series(rows, eval_key) if eval_key else ([], [])
    if ex:
        ax.plot(
            ex, ey, "s--", ms=7, color="tab:red", label=f"held-out {eval_key[len(EVAL_PREFIX) :]}"
        )
    tx, ty = _series(rows, TOOL_USE_KEY)
    if tx:
        ax.plot(tx, ty, ":", color="tab:green", label="tool-use rate (train)")
    if not (xs or ex):
        _note(ax, "no reward logged")
    _label(ax, "reward / score", "Reward and held-out score")
    if ax.get_legend_handles_labels()[0]:  # an empty log has nothing to label
        ax.legend(loc="best", fontsize=8)
    _save(fig, path)


_BANDS = ((1, 99, 0.15), (2, 98, 0.3), (5, 95, 0.45))  # drawn outermost first


def _envelope(ax: Any, rows: Sequence[dict[str, Any]], prefix: str, log: bool) -> bool:
    """Median and the P1-P99 / P5-P95 / P2-P98 bands that the log has, per step."""
    drawn = False
    for lo, hi, alpha in _BANDS:
        xs, lows, highs = [], [], []
        for i, r in enumerate(rows):
            a, b = r.get(f"{prefix}q{lo:02d}"), r.get(f"{prefix}q{hi:02d}")
            if _finite(a) and _finite(b):
                xs.append(r.get("step", i))
                lows.append(a)
                highs.append(b)
        if xs:
            ax.fill_between(xs, lows, highs, alpha=alpha, color="tab:blue", label=f"P{lo}-P{hi}")
            drawn = True
    mx, my = _series(rows, f"{prefix}q50")
    if mx:
        ax.plot(mx, my, color="navy", lw=1.5, label="median")
        drawn = True
    if not drawn:
        return False
    ax.axhline(0.0 if log else 1.0, color="black", lw=0.8, ls="--")
    if not log:
        ax.set_yscale("log")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return True


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_ratio_envelope(rows: Sequence[dict[str, Any]], path: Path) -> None:
    has_seq = any(f"{SEQ_LOG_RATIO_PREFIX}q02" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_seq else 1, figsize=(12 if has_seq else 8, 4.5))
    axes = list(axes) if has_seq else [axes]
    if not _envelope(axes[0], rows, RATIO_PREFIX, log=False):
        _note(axes[0], "no ratio quantiles logged")
    axes[0].set_title("Token ratio used in the loss (quantile envelope)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("ratio (log scale)")
    if has_seq:
        _envelope(axes[1], rows, SEQ_LOG_RATIO_PREFIX, log=True)
        axes[1].set_title("Sequence log-ratio envelope")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("log ratio")
    _save(fig, path)


def plot_kl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for key, label in ((K3_KEY, "k3 (trainer vs inference)"), (K1_KEY, "|k1|")):
        xs, ys = _series(rows, key)
        if key == K1_KEY:
            ys = [abs(y) for y in ys]
        pos = [(x, y) for x, y in zip(xs, ys, strict=False) if y > 0]
        if pos:
            ax.plot(*zip(*pos, strict=False), "o-", ms=3, label=label)
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(loc="best", fontsize=8)
    else:
        _note(ax, "no KL logged")
    _label(ax, "KL estimate", "Trainer vs inference-engine KL")
    _save(fig, path)


def plot_sigma(rows: Sequence[dict[str, Any]], path: Path) -> None:
    layers = sorted({int(m.group(1)) for r in rows for k in r if (m := SIGMA_LAYER.match(k))})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if layers:
        cmap = plt.get_cmap("viridis")
        for i, layer in enumerate(layers):
            xs, ys = _series(rows, f"sigma/layer_{layer}")
            ax.plot(xs, ys, color=cmap(i / max(1, len(layers) - 1)), lw=1)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(layers[0], layers[-1]))
        fig.colorbar(sm, ax=ax, label="layer")
        ax.set_yscale("log")
    else:
        _note(ax, "no perturbation in this run (sigma not logged)")
    _label(ax, "sigma", "Perturbation scale per layer")
    _save(fig, path)


def plot_run(run_dir: str | os.PathLike, eval_metric: str | None = None) -> dict[str, Path]:
    """Write the four PNGs for a run; returns ``{name: path}``.

    ``eval_metric`` names the held-out score to draw (e.g. ``"eval/pass@1"``); by default
    ``eval/avg@k`` (else ``eval/pass@1``) when the log has held-out evaluations.
    """
    run_dir = Path(run_dir)
    from alp_agents.reporting.runlog import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    if eval_metric is None:
        eval_keys = sorted({k for r in rows for k in r if k.startswith(EVAL_PREFIX)})
        preferred = [k for k in eval_keys if k.startswith("eval/avg@")]
        preferred += [k for k in eval_keys if k == "eval/pass@1"]
        eval_metric = (preferred or [None])[0]
    paths = {
        "reward": out / "reward.png",
        "ratio_envelope": out / "ratio_envelope.png",
        "kl": out / "kl.png",
        "sigma": out / "sigma.png",
    }
    plot_reward(rows, paths["reward"], eval_metric)
    plot_ratio_envelope(rows, paths["ratio_envelope"])
    plot_kl(rows, paths["kl"])
    plot_sigma(rows, paths["sigma"])
    return paths
