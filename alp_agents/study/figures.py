"""The study's figures: envelopes over steps, held-out scores with intervals, knob curves."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["plot_study"]


def _finite(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _mean_by_step(envelopes: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    per_step: dict[int, list[float]] = defaultdict(list)
    for env in envelopes:
        for row in env:
            if _finite(row.get(key)):
                per_step[int(row["step"])].append(float(row[key]))
    steps = sorted(per_step)
    return steps, [sum(per_step[s]) / len(per_step[s]) for s in steps]


def _draw_envelope(
    ax: Any, members: list[dict[str, Any]], color: Any, band_alpha: float, label: str | None = None
) -> None:
    """One configuration's envelope: a light P2-P98 band per seed, the mean over seeds as lines."""
    for c in members:
        steps = [r["step"] for r in c["envelope"]]
        ax.fill_between(
            steps, [r["p02"] for r in c["envelope"]], [r["p98"] for r in c["envelope"]],
            color=color, alpha=band_alpha, linewidth=0,
        )  # fmt: skip
    envs = [c["envelope"] for c in members]
    steps, low = _mean_by_step(envs, "p02")
    _, high = _mean_by_step(envs, "p98")
    ax.plot(steps, low, color=color, label=label)
    ax.plot(steps, high, color=color)


def plot_study(report: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the PNGs; returns their names relative to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in report["cells"] if c["status"] == "done"]
    if not cells:
        return []
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[c.get("group") or c["id"].rsplit("-s", 1)[0]].append(c)
    # 20 distinct colours: a grid easily has more configurations than the default cycle's 10
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    written = []

    # 1. P2-P98 envelope of the sequence log-ratio, every configuration overlaid
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (group, members) in enumerate(sorted(groups.items())):
        _draw_envelope(ax, members, colors[i % len(colors)], band_alpha=0.08, label=group)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("sequence log-ratio (P2 and P98)")
    ax.set_title("Ratio envelope per configuration (line: mean over seeds; band: each seed)")
    ax.legend(fontsize=7, ncol=1 + len(groups) // 16, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out_dir / "envelope.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append("envelope.png")

    # 1b. the same, one panel per configuration (shared axes), with Bypass's mean envelope in
    # grey in every panel when the study has it: readable where the overlay has too many lines
    if len(groups) > 1:
        written.append(_envelope_panels(plt, groups, out_dir))

    # 2. held-out score with intervals
    summary = report["summary"]
    ranked = sorted(
        ((g, r) for g, r in summary.items() if r["heldout"]["mean"] is not None),
        key=lambda kv: kv[1]["heldout"]["mean"],
    )
    if ranked:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(ranked) + 1.5))
        for y, (_, row) in enumerate(ranked):
            h = row["heldout"]
            ax.plot([h["mean"]], [y], "o", color="black")
            if h["low"] is not None:
                ax.plot([h["low"], h["high"]], [y, y], color="black")
        ax.set_yticks(range(len(ranked)), [g for g, _ in ranked], fontsize=8)
        ax.set_xlabel("held-out score (mean, 95% interval)")
        ax.set_title("Held-out score per configuration")
        fig.tight_layout()
        fig.savefig(out_dir / "heldout.png", dpi=110)
        plt.close(fig)
        written.append("heldout.png")

    # 3. one figure per swept key: envelope width against the knob, one line per preset/variant
    keys = sorted({k for row in summary.values() for k in (row["sweep"] or {})})
    for key in keys:
        lines = knob_lines(summary, key)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        values = sorted({v for pts in lines.values() for v, _ in pts}, key=str)
        numeric = all(isinstance(v, (int, float)) for v in values)
        for name, pts in sorted(lines.items()):
            pts.sort(key=lambda p: p[0] if numeric else values.index(p[0]))
            xs = [p[0] if numeric else values.index(p[0]) for p in pts]
            ax.plot(xs, [p[1] for p in pts], "o-", label=name)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel("envelope width (P98 - P2, 2nd half)")
        ax.set_title(f"Ratio tail against {key}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"knob_{key.rsplit('.', 1)[-1]}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def knob_lines(summary: dict[str, dict[str, Any]], key: str) -> dict[str, list[tuple[Any, float]]]:
    """Points (knob value, envelope width) per line of ``knob_<key>.png``: one line per
    preset/variant/other swept values. A configuration that did not sweep ``key`` joins the
    line it belongs to at the value it ran with (``base_values``), but never starts a line."""
    swept: dict[str, list[tuple[Any, float]]] = defaultdict(list)
    unswept: dict[str, list[tuple[Any, float]]] = defaultdict(list)
    for row in summary.values():
        width = row["envelope"]["mean"]
        sweep = row["sweep"] or {}
        value = sweep[key] if key in sweep else (row.get("base_values") or {}).get(key)
        if width is None or value is None:
            continue
        others = {k: v for k, v in sweep.items() if k != key}
        name = "-".join(
            [row["preset"], *([row["variant"]] if row["variant"] else [])]
            + [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(others.items())]
        )
        (swept if key in sweep else unswept)[name].append((value, width))
    return {name: pts + unswept.get(name, []) for name, pts in swept.items()}


def _envelope_panels(plt: Any, groups: dict[str, list[dict[str, Any]]], out_dir: Path) -> str:
    """``envelope_panels.png``: small multiples of the envelope figure."""
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows), sharex=True, sharey=True, squeeze=False
    )
    reference = groups.get("bypass")
    for ax, (group, members) in zip(axes.flat, sorted(groups.items()), strict=False):
        if reference and group != "bypass":
            envs = [c["envelope"] for c in reference]
            for key in ("p02", "p98"):
                steps, values = _mean_by_step(envs, key)
                ax.plot(steps, values, color="0.6", linewidth=1)
        _draw_envelope(ax, members, "tab:blue", band_alpha=0.15)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"{group} ({len(members)} seed{'s' if len(members) > 1 else ''})", fontsize=9)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    note = "; grey: bypass" if reference else ""
    fig.suptitle(
        f"Sequence log-ratio P2/P98 per configuration (blue: mean over seeds, band: each seed{note})",
        fontsize=10,
    )
    fig.supxlabel("step", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "envelope_panels.png", dpi=100)
    plt.close(fig)
    return "envelope_panels.png"
