"""Step metrics: quantiles, ESS, sigma statistics, the single-sync float conversion."""

from __future__ import annotations

import math

import pytest
import torch

from alp_agents.learner import metrics as M


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


def test_mismatch_stats_hand_computed():
    """Row 0: q = log pi - log mu = [ln 2, 0]; row 1: one token, q = -ln 2; row 2: no tokens."""
    ln2 = math.log(2)
    lp = torch.tensor([[-1 + ln2, -2.0], [-2 - ln2, 5.0], [0.0, 0.0]])  # 5.0: junk, masked
    mu = torch.tensor([[-1.0, -2.0], [-2.0, -1.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1], [1, 0], [0, 0]])
    s = M.to_floats(M.mismatch_stats(lp, mu, mask, catastrophic=1.5))
    assert s["mismatch/k1"] == pytest.approx(0.0, abs=1e-6)  # mean(-q) = (-ln2 + 0 + ln2) / 3
    assert s["mismatch/k3"] == pytest.approx(((1 - ln2) + 0 + (ln2 - 0.5)) / 3, rel=1e-5)
    # per-sequence perplexities, averaged over the two sequences with tokens
    assert s["mismatch/training_ppl"] == pytest.approx(
        (math.exp((3 - ln2) / 2) + math.exp(2 + ln2)) / 2, rel=1e-5
    )
    assert s["mismatch/rollout_ppl"] == pytest.approx((math.exp(1.5) + math.exp(2)) / 2, rel=1e-5)
    # per-sequence training/rollout perplexity ratio: 2^(-1/2) and 2
    assert s["mismatch/ppl_ratio"] == pytest.approx((2**-0.5 + 2) / 2, rel=1e-5)
    assert s["mismatch/log_ppl_diff"] == pytest.approx((-ln2 / 2 + ln2) / 2, rel=1e-5)
    assert s["mismatch/log_ppl_abs_diff"] == pytest.approx((ln2 / 2 + ln2) / 2, rel=1e-5)
    assert s["mismatch/chi2_token"] == pytest.approx((4 + 1 + 0.25) / 3 - 1, rel=1e-5)
    assert s["mismatch/chi2_seq"] == pytest.approx((4 + 0.25) / 2 - 1, rel=1e-5)
    # rho = 2 > 1.5 and rho = 0.5 < 1/1.5: two of three tokens, both sequences
    assert s["mismatch/catastrophic_token_frac"] == pytest.approx(2 / 3)
    assert s["mismatch/catastrophic_seq_frac"] == 1.0
    s = M.to_floats(M.mismatch_stats(lp, mu, mask))  # default threshold 1e4: none
    assert s["mismatch/catastrophic_token_frac"] == 0.0
    with pytest.raises(ValueError, match="catastrophic"):
        M.mismatch_stats(lp, mu, mask, catastrophic=1.0)
    empty = M.to_floats(M.mismatch_stats(lp, mu, torch.zeros_like(mask)))
    assert all(math.isnan(v) for v in empty.values())


def test_weight_stats_quantiles_over_kept_units_and_dropped_sequences():
    w = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # row 1 dropped entirely
    before = torch.ones(2, 3)
    after = torch.tensor([[1.0, 0, 1], [0, 0, 0]])
    s = M.to_floats(M.weight_stats(w, before, before, after))
    assert s["correction/weight_q50"] == pytest.approx(1.5)  # kept units: 2 and 1
    assert s["correction/weight_q01"] == pytest.approx(1.01)
    assert s["correction/weight_mean"] == pytest.approx(0.5)  # dropped units weigh 0
    assert s["correction/masked_frac"] == pytest.approx(4 / 6)
    assert s["correction/seq_dropped_frac"] == 0.5


def test_truncation_fractions():
    s = M.to_floats(M.truncation_fractions(torch.tensor([[1.0, 6.0, 9.0]]), torch.ones(1, 3), 5.0))
    assert s["clip/upper"] == pytest.approx(2 / 3) and s["clip/total"] == pytest.approx(2 / 3)
    assert s["clip/lower"] == 0.0 and s["clip/dual"] == 0.0
    s = M.to_floats(M.truncation_fractions(torch.tensor([[9.0]]), torch.ones(1, 1), None))
    assert s["clip/upper"] == 0.0


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
