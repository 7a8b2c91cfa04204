"""Step metrics: quantiles, ESS, sigma statistics, the single-sync float conversion."""

from __future__ import annotations

import math

import pytest
import torch

from alp_agents import metrics as M


def test_quantiles_match_torch_quantile_and_respect_mask():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(50) % 3 != 0).float().expand(3, 50)
    got = M.masked_quantiles(x, mask)
    want = torch.quantile(x[mask > 0], torch.tensor(M.QUANTILES))
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.isnan(M.masked_quantiles(x, torch.zeros_like(x))).all()


def test_ratio_stats_keys_and_values():
    r = torch.tensor([[1.0, 2.0, 100.0], [0.5, 1.5, 3.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    s = M.to_floats(M.ratio_stats(r, mask))
    assert set(s) == {f"ratio/q{q:02d}" for q in (1, 2, 5, 25, 50, 75, 95, 98, 99)} | {
        "ratio/mean",
        "ratio/min",
        "ratio/max",
    }
    assert s["ratio/max"] == 3.0 and s["ratio/min"] == 0.5 and s["ratio/q50"] == 1.5
    assert s["ratio/mean"] == pytest.approx(8 / 5)


def test_seq_log_ratio_envelope():
    lr = torch.tensor([[0.1, 0.2, 9.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0]])
    s = M.to_floats(M.seq_log_ratio_stats(lr, mask))
    assert s["seq_log_ratio/max"] == pytest.approx(0.3) and s["seq_log_ratio/min"] == -1.0
    assert s["seq_log_ratio/q02"] == pytest.approx(-1.0 + 0.02 * 1.3)


def test_ess_and_weight_stats():
    w = torch.tensor([[2.0, 0.25, 1.0, 1.0]])
    m = torch.ones(1, 4)
    # (sum w)^2 / (n sum w^2) = 4.25^2 / (4 * 6.0625)
    assert float(M.ess(w, m)) == pytest.approx(4.25**2 / (4 * 6.0625))
    s = M.to_floats(M.weight_stats(w, m, m, torch.tensor([[1.0, 0, 1, 1]])))
    assert s["correction/masked_frac"] == 0.25 and s["correction/weight_max"] == 2.0


def test_sigma_stats_with_and_without_grad():
    s = torch.nn.Parameter(torch.log(torch.tensor([0.1, 0.2, 0.4])))
    out = M.to_floats(M.sigma_stats(s, layers=[3, 4, 5]))
    assert out["sigma/layer_04"] == pytest.approx(0.2)
    assert out["sigma/mean"] == pytest.approx(0.7 / 3) and out["sigma/grad_norm"] == 0.0
    (s.exp().sum()).backward()
    out = M.to_floats(M.sigma_stats(s))
    assert out["sigma/grad_norm"] == pytest.approx(math.sqrt(0.01 + 0.04 + 0.16))


def test_to_floats_mixes_tensors_and_numbers():
    assert M.to_floats({"a": torch.tensor(1.5), "b": 2, "c": torch.tensor([3.0])}) == {
        "a": 1.5,
        "b": 2.0,
        "c": 3.0,
    }
