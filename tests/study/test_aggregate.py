"""The study's statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from alp_agents.study.aggregate import (
    envelope_width,
    hierarchical_bootstrap,
    mean_over_second_half,
    paired_differences,
    seed_interval,
)
from alp_agents.study.report import paired_with, render_markdown, summarise_groups


def test_bootstrap_of_one_seed_is_the_bootstrap_over_problems():
    """Scores [0, 1]: a resample's mean is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4), so the 95%
    percentile interval is [0, 1] and the point estimate 0.5."""
    mean, low, high = hierarchical_bootstrap([[0.0, 1.0]], resamples=4000)
    assert (mean, low, high) == (0.5, 0.0, 1.0)


def test_bootstrap_without_spread_has_no_width_and_resamples_seeds():
    assert hierarchical_bootstrap([[0.25, 0.25], [0.25, 0.25]]) == (0.25, 0.25, 0.25)
    # two seeds whose problems agree within a seed: only the seed draw varies. Means over two
    # drawn seeds: 0 (p 1/4), 0.5 (p 1/2), 1 (p 1/4) -> interval [0, 1] around the mean 0.5
    mean, low, high = hierarchical_bootstrap([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], resamples=4000)
    assert (mean, low, high) == (0.5, 0.0, 1.0)
    # the grand mean weighs seeds equally, not problems: (0 + 1/3) / 2
    assert hierarchical_bootstrap([[0.0], [0.0, 0.0, 1.0]]).mean == pytest.approx(1 / 6)
    assert all(math.isnan(x) for x in hierarchical_bootstrap([]))


def test_bootstrap_interval_narrows_with_more_problems():
    few = hierarchical_bootstrap([[0.0, 1.0] * 4])
    many = hierarchical_bootstrap([[0.0, 1.0] * 64])
    assert few.mean == many.mean == 0.5
    assert (many.high - many.low) < (few.high - few.low) / 3  # ~ 1 / sqrt(16)


def test_seed_interval_and_second_half_means():
    assert seed_interval([1.0, 3.0]).mean == 2.0
    assert seed_interval([1.0, 3.0], resamples=4000)[1:] == (1.0, 3.0)
    assert seed_interval([float("nan"), 2.0]).mean == 2.0
    assert math.isnan(seed_interval([]).mean)
    assert mean_over_second_half([4.0, 0.0, 1.0, 2.0, 3.0]) == 2.0  # last 3 of 5
    assert mean_over_second_half([5.0]) == 5.0
    assert math.isnan(mean_over_second_half([float("nan")]))


def test_envelope_width_is_p98_minus_p2_over_the_second_half():
    env = [
        {"step": 1, "p02": -40.0, "p98": 0.0},
        {"step": 2, "p02": -20.0, "p98": 0.5},
        {"step": 3, "p02": -3.0, "p98": 1.0},
        {"step": 4, "p02": -1.0, "p98": 1.0},
    ]
    assert envelope_width(env) == pytest.approx((4.0 + 2.0) / 2)


def _cell(group, seed, heldout, width, status="done"):
    return {
        "id": f"{group}-s{seed}",
        "status": status,
        "preset": group.split("-")[0],
        "seed": seed,
        "variant": None,
        "sweep": {},
        "group": group,
        "heldout_per_problem": heldout,
        "steps": 6,
        "heldout": sum(heldout.values()) / len(heldout) if heldout else float("nan"),
        "envelope_width": width,
        "envelope_engine_width": width,
        **{k: 0.5 for k in ("train_reward", "ratio_q99", "ratio_max", "mismatch_k3", "clip_total")},
        **{k: float("nan") for k in ("ess", "sigma", "noise_logprob_change", "grad_norm")},
    }


def test_groups_pool_seeds_and_count_diverged_runs():
    cells = [
        _cell("alp", 0, {"a": 1.0, "b": 0.0}, 2.0),
        _cell("alp", 1, {"a": 1.0, "b": 1.0}, 4.0),
        _cell("bypass", 0, {"a": 0.0, "b": 0.0}, 30.0),
        _cell("bypass", 1, {}, float("nan"), status="diverged"),
        _cell("grpo", 0, {}, float("nan"), status="unfinished"),
    ]
    summary = summarise_groups(cells)
    assert set(summary) == {"alp", "bypass"}  # unfinished cells are not results
    assert summary["alp"]["heldout"]["mean"] == pytest.approx(0.75)
    assert summary["alp"]["envelope"]["mean"] == pytest.approx(3.0)
    assert summary["bypass"]["diverged"] == 1 and summary["bypass"]["seeds"] == [0, 1]
    assert summary["bypass"]["heldout"]["mean"] == 0.0
    md = render_markdown({"cells": cells, "summary": summary, "spec": {}}, "python train/study.py")
    lines = [line for line in md.splitlines() if line.startswith("| 1 |")]
    assert "`alp`" in lines[0] and "0.750" in lines[0]  # ranked first by held-out score
    assert "1 unfinished" in md and "1 diverged" in md


def test_paired_differences_match_seeds_and_problems():
    """Only seeds both ran, only problems both scored, in problem order."""
    a = {0: {"p1": 1.0, "p2": 0.5, "p3": 0.0}, 1: {"p1": 0.0}, 3: {"p9": 1.0}}
    ref = {0: {"p2": 0.25, "p1": 0.5}, 1: {"p2": 1.0}, 2: {"p1": 1.0}}
    assert paired_differences(a, ref) == {0: [0.5, 0.25]}  # seed 1 shares no problem
    assert paired_differences(a, {}) == {}


def test_pairing_removes_the_spread_two_unpaired_intervals_carry():
    """x scores alp + 0.25 on every problem of every seed while the seeds and problems differ
    a lot: x's own interval is wide, the paired difference has none. bypass differs from alp
    by -1 on one problem of each seed: per seed -0.5, and a drawn seed's problem mean is
    -1, -0.5 or 0, so its interval is [-1, 0]."""
    alp = {0: {"a": 0.75, "b": 0.0}, 1: {"a": 0.25, "b": 0.5}}
    cells = [_cell("alp", s, h, 1.0) for s, h in alp.items()]
    cells += [_cell("x", s, {p: v + 0.25 for p, v in h.items()}, 1.0) for s, h in alp.items()]
    cells += [
        _cell("bypass", 0, {"a": -0.25, "b": 0.0}, 1.0),
        _cell("bypass", 1, {"a": 0.25, "b": -0.5}, 1.0),
        _cell("grpo", 2, {"a": 1.0, "b": 1.0}, 1.0),  # no seed in common with alp: not paired
        _cell("gspo", 0, {}, float("nan"), status="diverged"),
    ]
    rows = paired_with(cells, "alp")
    assert set(rows) == {"x", "bypass"}
    assert rows["x"]["difference"] == {"mean": 0.25, "low": 0.25, "high": 0.25}
    assert rows["x"]["per_seed"] == {0: 0.25, 1: 0.25} and rows["x"]["seeds"] == [0, 1]
    unpaired = summarise_groups(cells)["x"]["heldout"]
    assert unpaired["high"] - unpaired["low"] >= 0.5
    assert rows["bypass"]["difference"] == pytest.approx({"mean": -0.5, "low": -1.0, "high": 0.0})
    assert rows["bypass"]["per_seed"] == {0: -0.5, 1: -0.5}
    assert paired_with(cells, "no-such-configuration") == {}

    report = {"cells": cells, "summary": summarise_groups(cells), "spec": {}}
    report["paired"] = {"reference": "alp", "rows": rows}
    md = render_markdown(report)
    assert "## Paired with `alp`" in md
    x_line = next(line for line in md.splitlines() if line.startswith("| `x` | 2 |"))
    assert "+0.250 [+0.250, +0.250]" in x_line and "s0 +0.250, s1 +0.250" in x_line
    # without a reference configuration the section is left out
    report["paired"] = {"reference": "alp", "rows": {}}
    assert "Paired with" not in render_markdown(report)


def test_cell_summary_reads_non_finite_metrics_written_by_the_run_log(tmp_path):
    """A step where a rejection rule drops every sequence logs nan for its ratio statistics;
    the run log writes them as "nan" strings. The summary must read them back as numbers
    (a study crashed here on seq_mask_tis) and skip them in the means."""
    import json

    from alp_agents.reporting.runlog import RunLogger
    from alp_agents.study.report import cell_summary

    with RunLogger(tmp_path, tensorboard=False) as log:
        for step, clip in ((1, 0.5), (2, float("nan")), (3, 0.25), (4, float("inf"))):
            log.log(
                step,
                {
                    "reward/mean": 0.5,
                    "clip/total": clip,
                    "seq_log_ratio/q02": -1.0,
                    "seq_log_ratio/q98": 1.0,
                },
            )
    (tmp_path / "cell.json").write_text(json.dumps({"status": "done", "preset": "x", "seed": 0}))
    out = cell_summary(tmp_path)
    assert out["steps"] == 4 and out["status"] == "done"
    # second half = steps 3 and 4; inf is kept (finite-or-not is not nan), nan is skipped
    assert out["clip_total"] == math.inf
    assert out["envelope_width"] == pytest.approx(2.0)


def test_the_base_configuration_joins_the_knob_curve_at_the_value_it_ran_with(tmp_path):
    """--sweep algorithm.mini_batches=1,8 on a base config of 4: the K = 4 point of each
    preset's line is its plain cells (read from their config.yaml), not a rerun; a variant
    that never swept the key does not become a one-point line."""
    from alp_agents.study.figures import knob_lines
    from alp_agents.study.report import add_base_values

    def cell(group, preset, width, sweep=None, variant=None):
        c = _cell(group, 0, {"a": 1.0}, width)
        c.update(preset=preset, sweep=sweep or {}, variant=variant)
        return c

    cells = [
        cell("alp", "alp", 4.0),
        cell("alp-early", "alp", 9.0, variant="early"),
        cell("alp-mini_batches=1", "alp", 1.0, {"algorithm.mini_batches": 1}),
        cell("alp-mini_batches=8", "alp", 8.0, {"algorithm.mini_batches": 8}),
        cell("bypass-mini_batches=1", "bypass", 2.0, {"algorithm.mini_batches": 1}),
        cell("bypass", "bypass", 3.0),
    ]
    dirs = []
    for c in cells:
        d = tmp_path / c["id"]
        d.mkdir()
        (d / "config.yaml").write_text("algorithm:\n  mini_batches: 4\n  lr: 1.0e-5\n")
        dirs.append(d)
    add_base_values(cells, dirs)
    assert cells[0]["base_values"] == {"algorithm.mini_batches": 4}
    assert cells[2]["base_values"] == {}  # it swept the key itself
    lines = knob_lines(summarise_groups(cells), "algorithm.mini_batches")
    assert sorted(lines) == ["alp", "bypass"]
    assert sorted(lines["alp"]) == [(1, 1.0), (4, 4.0), (8, 8.0)]
    assert sorted(lines["bypass"]) == [(1, 2.0), (4, 3.0)]


def test_the_envelope_panels_have_one_panel_per_configuration(tmp_path):
    import struct

    from alp_agents.study.figures import plot_study

    envelope = [{"step": s, "p02": -float(s), "p98": 0.5 * s} for s in (1, 2, 3)]
    cells = []
    for group in ("alp", "bypass", "grpo", "gspo", "tis"):
        c = _cell(group, 0, {"a": 1.0}, 2.0)
        c["envelope"] = envelope
        cells.append(c)
    written = plot_study({"cells": cells, "summary": summarise_groups(cells)}, tmp_path)
    assert {"envelope.png", "envelope_panels.png", "heldout.png"} <= set(written)
    header = (tmp_path / "envelope_panels.png").read_bytes()[:24]
    width, height = struct.unpack(">II", header[16:24])
    # 5 configurations: 4 columns x 2 rows of 3.2 x 2.4 inches at 100 dpi
    assert (width, height) == (1280, 480)
