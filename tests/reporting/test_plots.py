"""plot_run: the four PNGs of a run, and a note (not a failure) for each panel whose metrics
are missing from the log."""

from __future__ import annotations

import json

import pytest

from alp_agents.reporting import plots
from alp_agents.reporting.plots import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PANELS = {"reward", "ratio_envelope", "kl", "sigma"}


def _write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _full_rows(steps=6):
    rows = []
    for step in range(steps):
        row = {
            "step": step,
            "reward/mean": 0.1 * step,
            "env/code_use_ratio": 0.5,
            "mismatch/k3": 1e-3 * (step + 1),
            "mismatch/k1": 2e-3 * (step + 1),
            **{f"ratio/q{q:02d}": 1.0 + (q - 50) / 500 for q in (1, 2, 5, 50, 95, 98, 99)},
            "seq_log_ratio/q02": -0.1,
            "seq_log_ratio/q50": 0.0,
            "seq_log_ratio/q98": 0.1,
            **{f"sigma/layer_{layer}": 1e-3 * (layer + 1) for layer in range(3)},
        }
        if step % 3 == 2:
            row["eval/pass@1"] = 0.2
            row["eval/avg@4"] = 0.25
        rows.append(row)
    rows[1]["reward/mean"] = "nan"  # written by RunLogger for a NaN; read back and skipped
    return rows


@pytest.fixture
def notes(monkeypatch):
    """The notes drawn on panels whose metrics are missing."""
    drawn: list[str] = []
    original = plots._note

    def spy(ax, text):
        drawn.append(text)
        original(ax, text)

    monkeypatch.setattr(plots, "_note", spy)
    return drawn


def _assert_pngs(paths, run_dir):
    assert set(paths) == PANELS
    for name, path in paths.items():
        assert path == run_dir / "plots" / f"{name}.png"
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name


def test_plot_run_draws_every_panel_of_a_full_log(tmp_path, notes):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir, _full_rows())
    paths = plot_run(run_dir)
    _assert_pngs(paths, run_dir)
    assert notes == []  # every panel had its metrics


def test_missing_metrics_get_a_note_instead_of_an_error(tmp_path, notes):
    run_dir = tmp_path / "bypass"
    # a preset without perturbation or engine KL: only the reward is logged
    _write_metrics(run_dir, [{"step": s, "reward/mean": 0.5} for s in range(3)])
    paths = plot_run(run_dir)
    _assert_pngs(paths, run_dir)
    assert sorted(notes) == sorted(
        [
            "no ratio quantiles logged",
            "no KL logged",
            "no perturbation in this run (sigma not logged)",
        ]
    )


def test_an_empty_log_still_gives_four_annotated_pngs(tmp_path, notes):
    run_dir = tmp_path / "empty"
    _write_metrics(run_dir, [])
    _assert_pngs(plot_run(run_dir), run_dir)
    assert "no reward logged" in notes and len(notes) == 4


def test_eval_metric_defaults_to_avg_at_k_then_pass_at_1(tmp_path, monkeypatch):
    seen: list[str | None] = []
    monkeypatch.setattr(plots, "plot_reward", lambda rows, path, key=None: seen.append(key))
    run_dir = tmp_path / "run"
    _write_metrics(run_dir, _full_rows())
    plot_run(run_dir)
    rows = [r for r in _full_rows() if "eval/avg@4" not in r]
    for r in rows:
        r.pop("eval/pass@1", None)
    rows.append({"step": 9, "eval/pass@1": 0.3})
    _write_metrics(run_dir, rows)
    plot_run(run_dir)
    plot_run(run_dir, eval_metric="eval/custom")
    assert seen == ["eval/avg@4", "eval/pass@1", "eval/custom"]


def test_missing_metrics_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_run(tmp_path)
