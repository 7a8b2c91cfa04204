"""policy_loss against hand-computed values: every preset, every ratio level, clips, masks.

Inputs are built from chosen ratios (log-probs = log of them), so each expected number below
can be checked with pencil and paper from the formulas in docs/alp.md (the ratio, the surrogate and the aggregation).
"""

from __future__ import annotations

import math

import pytest
import torch

from alp_agents.learner.objectives import (
    PolicyLossConfig,
    accumulation_normalizer,
    correction_batch_stats,
    final_loss_mask,
    policy_loss,
    policy_loss_terms,
    preset_names,
)

LN = math.log
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def lp_from(*ratios_rows: list[float], base: float = -1.0) -> torch.Tensor:
    """Log-probs ``base + ln(ratio)`` (must stay <= 0, so ratios <= e)."""
    return torch.tensor([[base + LN(r) for r in row] for row in ratios_rows], dtype=torch.float32)


def custom(**kw) -> PolicyLossConfig:
    return PolicyLossConfig.preset("bypass", name="custom", **kw)


# ---------------------------------------------------------------------------------------------
# one shared scenario for every preset: pi/pi_old = [1, 1.5, 0.5, 1.1], pi_old/mu = [1, 2, 8, 0.1]
R_OLD = [1.0, 1.5, 0.5, 1.1]
RHO = [1.0, 2.0, 8.0, 0.1]


def scenario(adv: float = 1.0):
    mu = torch.full((1, 4), -3.0)
    old = mu + torch.tensor([[LN(r) for r in RHO]])
    lp = (old + torch.tensor([[LN(r) for r in R_OLD]])).requires_grad_(True)
    return lp, mu, torch.tensor([adv]), torch.ones(1, 4), old


PRESET_EXPECTED = {
    # sequence ratio over mu: prod(pi/mu) = 1 * 3 * 4 * 0.11 = 1.32, inside [0.5, 4] -> -1.32
    "alp": -1.32,
    "bypass": -1.32,
    # token ratio vs pi_old, clip [0.8, 1.28]: max(-r, -clip r) = [-1, -1.28, -0.5, -1.1] -> mean
    "grpo": -0.97,
    # geometric sequence ratio vs pi_old: (1 * 1.5 * 0.5 * 1.1) ** (1/4) = 0.825 ** 0.25; below
    # the clip range with A > 0 the unclipped term is the max -> -0.95304518
    "gspo": -0.9530451753349615,
    # grpo terms times min(rho, 5) = [1, 2, 5, 0.1]: [-1, -2.56, -2.5, -0.11] -> mean -1.5425
    "tis": -1.5425,
    # MIS keeps rho in [1/5, 5] = tokens 0, 1: [-1, -2.56] -> mean -1.78
    "mis": -1.78,
    # token ratio over mu: pi/mu = [1, 3, 4, 0.11], clip [0.5, 4]: [-1, -3, -4, -0.11] -> mean
    "token_alp": -2.0275,
    # sequence rho = 1 * 2 * 8 * 0.1 = 1.6 (<= 5, kept): grpo terms times 1.6 -> -0.97 * 1.6
    "seq_mis": -1.552,
    # sequence rho 1.6 < C = 2: the same weight 1.6
    "seq_tis": -1.552,
    # token band [0.5, 5] keeps rho 1 and 2: [-1, -1.28 * 2] -> mean -1.78
    "icepop": -1.78,
    # geometric mean rho = 1.6 ** 0.25 = 1.125 is outside [0.999, 1.001]: all tokens rejected
    "seq_mask_tis": 0.0,
    # -min(r, 5) * A * log pi with log pi = -3 + ln(rho * r) = [-3, -3 + ln 3, -3 + ln 4,
    # -3 + ln 0.11] and r = [1, 1.5, 0.5, 1.1], token mean
    "cispo": -(-3 + 1.5 * (-3 + LN(3)) + 0.5 * (-3 + LN(4)) + 1.1 * (-3 + LN(0.11))) / 4,
    # (log rho)^2 = [0, 0.48, 4.32, 5.30]: suffix means of the sorted values 2.53, 1.60, 0.24, 0
    # -> only token 0 stays (<= 0.04); unclipped -A * pi/mu = -1 over one token
    "m2po": -1.0,
    # one sequence of T = 4 tokens: grpo token sum -3.88 / (K = 4) / 1 sequence
    "dr_grpo": -0.97,
}


@pytest.mark.parametrize("name", sorted(PRESET_EXPECTED))
def test_every_preset_hand_computed(name):
    assert set(preset_names()) == set(PRESET_EXPECTED)
    lp, mu, adv, mask, old = scenario()
    cfg = PolicyLossConfig.preset(name)
    loss, metrics = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(loss) == pytest.approx(PRESET_EXPECTED[name], rel=1e-5)
    assert metrics["loss/policy"] == pytest.approx(PRESET_EXPECTED[name], rel=1e-5)
    loss.backward()
    assert torch.isfinite(lp.grad).all()


def test_mis_and_tis_metrics():
    lp, mu, adv, mask, old = scenario()
    _, m = policy_loss(lp, mu, adv, mask, PolicyLossConfig.preset("mis"), old_logprobs=old)
    assert m["correction/masked_frac"] == pytest.approx(0.5)
    assert m["tokens"] == 2 and m["tokens_before_correction"] == 4
    # effective weights per token [1, 2, 0, 0] (dropped = 0): ESS = (sum w)^2 / (n sum w^2)
    assert m["correction/ess"] == pytest.approx(9 / (4 * 5))
    _, m = policy_loss(lp, mu, adv, mask, PolicyLossConfig.preset("tis"), old_logprobs=old)
    assert m["correction/masked_frac"] == 0.0
    # w = [1, 2, 5, 0.1]: ESS = 8.1^2 / (4 * 30.01)
    assert m["correction/ess"] == pytest.approx(8.1**2 / (4 * 30.01), rel=1e-5)
    assert m["correction/weight_max"] == pytest.approx(5.0)


def test_mis_release_variant_drops_only_high():
    lp, mu, adv, mask, old = scenario()
    cfg = PolicyLossConfig.preset("mis", correction_threshold_low=0.0)
    loss, _ = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    # keeps rho 1, 2, 0.1: [-1, -2.56, -0.11] -> mean -1.2233
    assert float(loss) == pytest.approx(-3.67 / 3, rel=1e-5)


def test_sequence_level_tis_and_mis():
    lp, mu, adv, mask, old = scenario()
    # sequence rho = 1 * 2 * 8 * 0.1 = 1.6 (< 5): TIS weight 1.6 on every grpo term
    cfg = PolicyLossConfig.preset("tis", correction_level="sequence")
    loss, _ = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(loss) == pytest.approx(-0.97 * 1.6, rel=1e-5)
    cfg = PolicyLossConfig.preset("mis", correction_level="sequence", correction_threshold=1.5)
    loss, m = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(loss) == 0.0 and m["correction/masked_frac"] == 1.0


def test_veto_drops_sequence_with_tiny_token_rho():
    lp, mu, adv, mask, old = scenario()
    lp2 = torch.cat([lp.detach(), lp.detach()]).requires_grad_(True)
    mu2, old2 = torch.cat([mu, mu]), torch.cat([old, old])
    old2[1, 2] = mu2[1, 2] + LN(1e-5)  # row 1 has a token with rho = 1e-5 < 1e-4
    lp2.data[1, 2] = old2[1, 2] + LN(0.5)
    cfg = PolicyLossConfig.preset("tis", veto_threshold=1e-4)
    loss, m = policy_loss(
        lp2, mu2, torch.tensor([1.0, 1.0]), torch.ones(2, 4), cfg, old_logprobs=old2
    )
    assert float(loss) == pytest.approx(-1.5425, rel=1e-5)  # only row 0 remains
    assert m["correction/masked_frac"] == 0.5
    loss.backward()
    assert torch.all(lp2.grad[1] == 0)


# ---------------------------------------------------------------------------------------------
# token level: clip and dual clip


def token_case(adv: float, mask=None, config=None):
    mu = lp_from([1, 1, 1, 1], base=-2.0)
    lp = lp_from([1.0, 2.0, 0.25, 5.0], base=-2.0).requires_grad_(True)
    m = torch.ones(1, 4) if mask is None else torch.tensor([mask], dtype=torch.float32)
    cfg = config or custom(ratio_level="token")
    return lp, policy_loss(lp, mu, torch.tensor([adv]), m, cfg)


def test_token_positive_advantage_upper_clip():
    # r = [1, 2, 0.25, 5], clip [0.5, 4]: max(-r, -clip r) = [-1, -2, -0.25, -4] -> mean -1.8125
    lp, (loss, m) = token_case(1.0)
    assert float(loss) == pytest.approx(-1.8125)
    assert m["clip/upper"] == 0.25 and m["clip/lower"] == 0.0 and m["clip/dual"] == 0.0
    loss.backward()
    # gradient of -A r_t / 4 w.r.t. log pi_t is -r_t / 4 where unclipped, 0 where clipped
    assert lp.grad[0].tolist() == pytest.approx([-0.25, -0.5, -0.0625, 0.0])


def test_token_negative_advantage_dual_clip():
    # A = -1: max(r, clip r) = [1, 2, 0.5, 5]; dual clip c = 3 caps 5 -> 3; mean 6.5 / 4
    lp, (loss, m) = token_case(-1.0)
    assert float(loss) == pytest.approx(1.625)
    assert m["clip/lower"] == 0.25 and m["clip/dual"] == 0.25 and m["clip/upper"] == 0.0
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([0.25, 0.5, 0.0, 0.0])
    # without the dual clip the 5 stays: mean 8.5 / 4
    _, (loss, m) = token_case(-1.0, config=custom(ratio_level="token", dual_clip=None))
    assert float(loss) == pytest.approx(2.125) and m["clip/dual"] == 0.0


def test_token_mask_excludes_positions_even_with_junk():
    mu = lp_from([1, 1, 1, 1], base=-2.0)
    lp = lp_from([1.0, 2.0, 0.25, 5.0], base=-2.0)
    lp[0, 2] = float("nan")  # junk under mask 0 must not matter
    mu[0, 2] = float("inf")
    lp.requires_grad_(True)
    loss, m = policy_loss(
        lp, mu, torch.tensor([1.0]), torch.tensor([[1.0, 1, 0, 1]]), custom(ratio_level="token")
    )
    assert float(loss) == pytest.approx(-7 / 3)  # (-1 - 2 - 4) / 3
    assert m["tokens"] == 3
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 2] == 0


def test_per_token_advantages():
    mu = lp_from([1, 1], base=-2.0)
    lp = lp_from([2.0, 2.0], base=-2.0)
    adv = torch.tensor([[1.0, -1.0]])
    loss, _ = policy_loss(lp, mu, adv, torch.ones(1, 2), custom(ratio_level="token"))
    assert float(loss) == pytest.approx(0.0)  # (-2 + 2) / 2


def test_log_ratio_clamp_at_20():
    mu = torch.tensor([[-30.0, -0.0]])
    lp = torch.tensor([[-5.0, -25.0]], requires_grad=True)  # d = +25, -25
    cfg = custom(ratio_level="token", dual_clip=None)
    loss, m = policy_loss(lp, mu, torch.tensor([-1.0]), torch.ones(1, 2), cfg)
    # r = [e^20, e^-20]; A = -1: max(r, clip r) = [e^20, 0.5] -> mean
    assert float(loss) == pytest.approx((485165195.4097903 + 0.5) / 2, rel=1e-5)
    assert m["ratio/max"] == pytest.approx(485165195.4097903, rel=1e-5)
    assert m["ratio/min"] == pytest.approx(2.061153622438558e-09, rel=1e-4)
    assert m["clip/log_ratio_clamped"] == 1.0
    loss.backward()
    assert torch.all(lp.grad == 0)  # clamped entries carry no gradient
    cfg10 = custom(ratio_level="token", dual_clip=None, log_ratio_clamp=10.0)
    loss, _ = policy_loss(lp, mu, torch.tensor([-1.0]), torch.ones(1, 2), cfg10)
    assert float(loss) == pytest.approx((math.exp(10) + 0.5) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# sequence-type levels


def seq_case():
    mu = torch.full((2, 3), -2.0)
    lp = torch.tensor([[-2 + LN(2), -2.0, -2 - LN(4)], [-2 + LN(3), -2 + LN(3), -2.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    return lp.requires_grad_(True), mu, mask


def test_sequence_ratio_value_and_clip():
    lp, mu, mask = seq_case()
    # row 0: S = ln2 - ln4 -> r = 0.5 (in range); row 1: S = ln 9 -> r = 9, clipped to 4
    loss, m = policy_loss(lp, mu, torch.tensor([1.0, 1.0]), mask, PolicyLossConfig.preset("alp"))
    assert float(loss) == pytest.approx((-0.5 * 3 - 4 * 2) / 5)
    assert m["ratio/min"] == pytest.approx(0.5) and m["ratio/max"] == pytest.approx(9.0)
    assert m["seq_log_ratio/min"] == pytest.approx(-LN(2), abs=1e-6)
    assert m["seq_log_ratio/max"] == pytest.approx(LN(9), abs=1e-6)
    assert m["clip/upper"] == pytest.approx(2 / 5)


def test_sequence_gradient_is_r_times_grad_log_pi():
    """d loss / d log pi_t = -A * r_seq / N for an unclipped sequence ratio (autograd check)."""
    lp, mu, mask = seq_case()
    cfg = PolicyLossConfig.preset("alp", eps_high=100.0)
    adv = torch.tensor([1.0, -0.5])
    loss, _ = policy_loss(lp, mu, adv, mask, cfg)
    loss.backward()
    r = torch.tensor([0.5, 9.0])
    expected = (-adv * r)[:, None] / 5 * mask
    # row 1 has A < 0 and r = 9 > c = 3: the dual clip removes its gradient
    expected[1] = 0.0
    assert torch.allclose(lp.grad, expected, atol=1e-6)
    # and with the dual clip off the same identity holds for the negative advantage
    lp.grad = None
    loss, _ = policy_loss(
        lp, mu, adv, mask, PolicyLossConfig.preset("alp", eps_high=100.0, dual_clip=None)
    )
    loss.backward()
    assert torch.allclose(lp.grad, (-adv * r)[:, None] / 5 * mask, atol=1e-6)


def test_sequence_geometric():
    lp, mu, mask = seq_case()
    cfg = custom(ratio_level="sequence_geometric", eps_low=0.9, eps_high=100.0)
    loss, m = policy_loss(lp, mu, torch.tensor([1.0, 1.0]), mask, cfg)
    # row 0: (0.5)^(1/3) = 0.7937005; row 1: 9^(1/2) = 3
    assert float(loss) == pytest.approx(-(0.7937005259840998 * 3 + 3.0 * 2) / 5, rel=1e-6)


def test_cum_token_and_cum_mean():
    mu = torch.full((1, 4), -2.0)
    lp = torch.tensor([[-2 + LN(2), -2 + LN(2), -2 - LN(4), -2 + LN(3)]], requires_grad=True)
    cfg = custom(ratio_level="cum_token", eps_high=100.0)
    # prefix products: [2, 4, 1, 3]
    loss, m = policy_loss(lp, mu, torch.tensor([1.0]), torch.ones(1, 4), cfg)
    assert float(loss) == pytest.approx(-(2 + 4 + 1 + 3) / 4, rel=1e-6)
    assert m["ratio/q50"] == pytest.approx(2.5, rel=1e-6)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-0.5, -1.0, -0.25, -0.75], rel=1e-5)
    # prefix geometric means: [2, 2, 1, 3^(1/4)]
    cfg = custom(ratio_level="cum_token", cum_mean=True, eps_high=100.0)
    loss, _ = policy_loss(lp, mu, torch.tensor([1.0]), torch.ones(1, 4), cfg)
    assert float(loss) == pytest.approx(-(2 + 2 + 1 + 1.3160740129524924) / 4, rel=1e-6)


def test_cum_turn():
    mu = torch.full((1, 5), -2.0)
    lp = torch.tensor([[-2 + LN(2), -2 + LN(2), -9.0, -2 + LN(3), -2 + LN(0.5)]])
    mask = torch.tensor([[1.0, 1, 0, 1, 1]])  # position 2: an observation token
    turn = torch.tensor([[0, 0, 0, 1, 1]])
    cfg = custom(ratio_level="cum_turn", eps_high=100.0)
    # turn 0 ends at prod 4, turn 1 at 4 * 3 * 0.5 = 6: ratios [4, 4, -, 6, 6]
    loss, _ = policy_loss(lp, mu, torch.tensor([1.0]), mask, cfg, turn_index=turn)
    assert float(loss) == pytest.approx(-(4 + 4 + 6 + 6) / 4, rel=1e-6)
    cfg = custom(ratio_level="cum_turn", cum_mean=True, eps_high=100.0)
    # geometric means up to the turn end: 4^(1/2) = 2, 6^(1/4)
    loss, _ = policy_loss(lp, mu, torch.tensor([1.0]), mask, cfg, turn_index=turn)
    assert float(loss) == pytest.approx(-(2 + 2 + 2 * 6**0.25) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="turn_index is required"):
        policy_loss(lp, mu, torch.tensor([1.0]), mask, cfg)


# ---------------------------------------------------------------------------------------------
# aggregation, KL, entropy


def test_seq_mean_token_mean():
    mu = torch.full((2, 2), -2.0)
    lp = torch.tensor([[-2.0, -2 + LN(2)], [-2 + LN(4), -5.0]])
    mask = torch.tensor([[1.0, 1], [1, 0]])
    base = custom(ratio_level="token", eps_high=100.0)
    loss, _ = policy_loss(lp, mu, torch.tensor([1.0, 1.0]), mask, base)
    assert float(loss) == pytest.approx(-7 / 3)
    cfg = custom(ratio_level="token", eps_high=100.0, aggregation="seq_mean_token_mean")
    loss, _ = policy_loss(lp, mu, torch.tensor([1.0, 1.0]), mask, cfg)
    assert float(loss) == pytest.approx((-1.5 - 4) / 2)
    # a global normaliser (gradient accumulation) replaces the token count
    loss, _ = policy_loss(lp, mu, torch.tensor([1.0, 1.0]), mask, base, normalizer=7.0)
    assert float(loss) == pytest.approx(-1.0)


def test_kl_k3_and_entropy_bonus():
    lp = torch.full((1, 2), -2.0, requires_grad=True)
    ref = torch.tensor([[-2 + LN(2), -2.0]])  # q = ln 2, 0: k3 = 2 - ln2 - 1, 0
    ent = torch.tensor([[2.0, 4.0]])
    cfg = custom(ratio_level="token", kl_coef=0.1, entropy_coef=0.01)
    loss, m = policy_loss(
        lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), cfg, ref_logprobs=ref, entropy=ent
    )
    k3 = (2 - LN(2) - 1) / 2
    assert m["loss/kl"] == pytest.approx(k3, rel=1e-6)
    assert m["entropy"] == pytest.approx(3.0)
    assert float(loss) == pytest.approx(0.1 * k3 - 0.01 * 3.0, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        policy_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), cfg, entropy=ent)


def test_mismatch_metrics():
    mu = torch.tensor([[-1.0, -2.0]])
    lp = torch.tensor([[-1.0 + LN(2), -2.0]])  # q = [ln2, 0]
    _, m = policy_loss(lp, mu, torch.tensor([1.0]), torch.ones(1, 2), custom(ratio_level="token"))
    assert m["mismatch/k1"] == pytest.approx(-LN(2) / 2)
    assert m["mismatch/k3"] == pytest.approx((2 - LN(2) - 1) / 2)
    assert m["mismatch/chi2_token"] == pytest.approx((4 + 1) / 2 - 1)
    assert m["mismatch/chi2_seq"] == pytest.approx(4 - 1)
    assert m["mismatch/rollout_ppl"] == pytest.approx(math.exp(1.5))
    assert m["mismatch/ppl_ratio"] == pytest.approx(math.exp(-LN(2) / 2))


# ---------------------------------------------------------------------------------------------
# presets and configuration errors


@pytest.mark.parametrize("name", sorted(PRESET_EXPECTED))
def test_every_preset_with_an_empty_row_and_a_zero_advantage_row(name):
    """Rows: the shared scenario (A = 1), a row without loss tokens, the scenario again with
    A = 0. Row 2 keeps the same tokens as row 0 (its rho are the same) and adds 0 to every
    surrogate, row 1 adds nothing: the denominator doubles (token_mean: kept tokens; dr_grpo:
    sequences with tokens, K = T = 4), so every loss is half of the one-row value by hand. M2PO
    ranks the 8 tokens together: (log rho)^2 = [0, 0, .48, .48, 4.32, 4.32, 5.3, 5.3] keeps the
    two zeros (mean of the rest > 0.04), so (-1 + 0) / 2 too. seq_mask_tis rejects all rows."""
    lp, mu, _, mask, old = scenario()
    lp3 = torch.cat([lp.detach(), torch.full((1, 4), -1.0), lp.detach()]).requires_grad_(True)
    mu3, old3 = torch.cat([mu, mu, mu]), torch.cat([old, old, old])
    mask3 = torch.cat([mask, torch.zeros(1, 4), mask])
    adv = torch.tensor([1.0, 1.0, 0.0])
    cfg = PolicyLossConfig.preset(name)
    loss, m = policy_loss(lp3, mu3, adv, mask3, cfg, old_logprobs=old3)
    assert float(loss) == pytest.approx(PRESET_EXPECTED[name] / 2, rel=1e-5, abs=1e-7)
    loss.backward()
    assert torch.isfinite(lp3.grad).all()
    assert torch.all(lp3.grad[1:] == 0)  # no tokens, and A = 0 (pushes nothing)
    assert m["tokens_before_correction"] == 8


def test_preset_flags_and_settings():
    alp = PolicyLossConfig.preset("alp")
    assert alp.perturbation and not alp.needs_old_logprobs and alp.dual_clip == 3.0
    assert alp.clip_range == (0.5, 4.0) and alp.kl_coef == 0.0
    assert not PolicyLossConfig.preset("bypass").perturbation
    for name in ("grpo", "gspo", "tis", "mis"):
        assert PolicyLossConfig.preset(name).needs_old_logprobs
    single = PolicyLossConfig.preset("alp", setting="single_turn")
    assert single.dual_clip == 10.0 and single.kl_coef == 0.001 and single.needs_ref_logprobs
    assert PolicyLossConfig.preset("gspo", setting="single_turn").dual_clip is None
    assert PolicyLossConfig.preset("grpo", eps_high=0.3).eps_high == 0.3
    assert PolicyLossConfig() == PolicyLossConfig.preset("alp")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="alp, bypass, grpo, gspo, tis, mis"):
        PolicyLossConfig.preset("ppo")
    with pytest.raises(TypeError, match="eps_hgh"):
        PolicyLossConfig.preset("alp", eps_hgh=1.0)
    with pytest.raises(ValueError, match="ratio_level='tok'.*token"):
        PolicyLossConfig(ratio_level="tok")
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="eps_low"):
        PolicyLossConfig(eps_low=1.0)
    with pytest.raises(ValueError, match="setting"):
        PolicyLossConfig.preset("alp", setting="two_turn")


# ---------------------------------------------------------------------------------------------
# bad input: clear errors or documented behaviour, never a silent NaN


def test_shape_mismatches():
    lp = torch.zeros(2, 3) - 1
    cfg = custom(ratio_level="token")
    with pytest.raises(ValueError, match="infer_logprobs has shape"):
        policy_loss(lp, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 3), cfg)
    with pytest.raises(ValueError, match="mask has shape"):
        policy_loss(lp, lp, torch.ones(2), torch.ones(3, 3), cfg)
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_loss(lp, lp, torch.ones(3), torch.ones(2, 3), cfg)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        policy_loss(lp[0], lp[0], torch.ones(2), torch.ones(3), cfg)
    with pytest.raises(ValueError, match="old_logprobs is required"):
        policy_loss(lp, lp, torch.ones(2), torch.ones(2, 3), PolicyLossConfig.preset("grpo"))


def test_all_zero_mask_gives_zero_loss_and_zero_grad():
    lp = torch.full((2, 3), -1.0, requires_grad=True)
    for name in preset_names():
        cfg = PolicyLossConfig.preset(name)
        loss, m = policy_loss(
            lp, lp.detach() - 0.3, torch.ones(2), torch.zeros(2, 3), cfg, old_logprobs=lp.detach()
        )
        assert float(loss) == 0.0 and m["tokens"] == 0.0
        assert math.isnan(m["ratio/q50"])  # statistics of nothing are NaN, the loss is not
        loss.backward()
        assert torch.all(lp.grad == 0)


def test_nan_inputs_raise():
    lp = torch.full((1, 3), -1.0)
    cfg = custom(ratio_level="token")
    bad = lp.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="logprobs has 1 NaN/inf"):
        policy_loss(bad, lp, torch.ones(1), torch.ones(1, 3), cfg)
    with pytest.raises(ValueError, match="infer_logprobs has 1 NaN/inf"):
        policy_loss(lp, bad, torch.ones(1), torch.ones(1, 3), cfg)
    with pytest.raises(ValueError, match="advantages has"):
        policy_loss(lp, lp, torch.tensor([float("nan")]), torch.ones(1, 3), cfg)
    with pytest.raises(ValueError, match="must be <= 0"):
        policy_loss(lp.abs(), lp, torch.ones(1), torch.ones(1, 3), cfg)
    with pytest.raises(ValueError, match="only 0 and 1"):
        policy_loss(lp, lp, torch.ones(1), torch.full((1, 3), 0.5), cfg)


def test_bool_mask_and_bf16_logprobs():
    lp = lp_from([1.0, 2.0], base=-2.0).to(torch.bfloat16)
    mu = lp_from([1.0, 1.0], base=-2.0)
    loss, _ = policy_loss(
        lp, mu, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), custom(ratio_level="token")
    )
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(-1.5, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# gradient accumulation: micro-batch losses must add up to the single-call loss


def test_mis_micro_batches_sum_to_the_full_batch_loss_when_tokens_are_dropped():
    """Two rows, MIS drops token 2 of row 0 (rho 8 > 5). Split into one row per micro-batch with
    the shared normaliser counted AFTER dropping, the pieces add up to the one-call loss
    (counted before dropping, they would be 3/4 of it: 3 kept of 4 tokens)."""
    cfg = PolicyLossConfig.preset("mis")
    mu = torch.full((2, 2), -3.0)
    old = mu + torch.tensor([[LN(1.0), LN(8.0)], [LN(2.0), LN(1.0)]])
    lp = old + torch.tensor([[LN(1.1), LN(1.0)], [LN(1.2), LN(0.9)]])
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    full, _ = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    kept = final_loss_mask(old, mu, mask, cfg)
    assert kept.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    norm = accumulation_normalizer(kept, cfg)
    assert norm == 3.0
    parts = [
        policy_loss(lp[i : i + 1], mu[i : i + 1], adv[i : i + 1], mask[i : i + 1], cfg,
                    old_logprobs=old[i : i + 1], normalizer=norm)[0]
        for i in range(2)
    ]  # fmt: skip
    # by hand: row 0 keeps r = 1.1 with w = 1 -> -1.1 ... clip [0.8, 1.28] keeps 1.1 -> -1.1
    # row 1 (A = -1): w = min(2, 5) = 2, r = 1.2 -> max(1.2, 1.2) * 2 = 2.4; r = 0.9 -> 0.9
    assert float(full) == pytest.approx((-1.1 + 2.4 + 0.9) / 3)
    assert float(sum(parts)) == pytest.approx(float(full))


def test_accumulation_normalizer_counts_sequences_for_seq_mean():
    cfg = PolicyLossConfig.preset("bypass", aggregation="seq_mean_token_mean")
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    assert accumulation_normalizer(mask, cfg) == 2.0
    assert accumulation_normalizer(torch.zeros(2, 2), PolicyLossConfig.preset("alp")) == 1.0


def test_final_loss_mask_without_rejection_is_the_mask_and_veto_drops_sequences():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    mu = torch.full((1, 3), -2.0)
    assert final_loss_mask(None, mu, mask, PolicyLossConfig.preset("alp")).tolist() == [
        [1.0, 1.0, 0.0]
    ]
    old = mu + torch.tensor([[0.0, LN(1e-5), 0.0]])
    cfg = PolicyLossConfig.preset("tis", veto_threshold=1e-4)
    assert final_loss_mask(old, mu, mask, cfg).tolist() == [[0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="old_logprobs are required"):
        final_loss_mask(None, mu, mask, cfg)


def test_loss_terms_split_the_regularizer_from_the_policy_term():
    """kl_coef > 0: total = policy + kl_coef * k3; with A = 0 the policy term is exactly 0."""
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]])
    cfg = PolicyLossConfig.preset("alp", setting="single_turn")
    terms = policy_loss_terms(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), cfg,
                              ref_logprobs=ref)  # fmt: skip
    q = -0.5  # log pi_ref - log pi on token 0; token 1 has q = 0
    k3 = (math.exp(q) - q - 1) / 2
    assert float(terms.policy) == 0.0
    assert float(terms.regularizer) == pytest.approx(0.001 * k3)
    assert float(terms.total) == pytest.approx(0.001 * k3)
    (grad,) = torch.autograd.grad(terms.policy, lp)
    assert grad.abs().sum() == 0.0  # A = 0: nothing for sigma to learn from the policy term


def test_correction_batch_stats_are_values_of_the_whole_batch():
    """The shared scenario plus a second row all of whose tokens MIS drops (rho 10, 0.1)."""
    from alp_agents.learner.objectives import correction_batch_stats

    lp, mu, _, _, old = scenario()
    mu2 = torch.cat([mu, torch.full((1, 4), -3.0)])
    old2 = torch.cat([old, mu2[1:] + torch.tensor([[LN(10.0), LN(0.1), LN(10.0), LN(0.1)]])])
    s = correction_batch_stats(old2, mu2, torch.ones(2, 4), PolicyLossConfig.preset("mis"))
    assert s["correction/masked_frac"] == pytest.approx(6 / 8)  # row 0 keeps rho 1 and 2 only
    assert s["correction/seq_dropped_frac"] == pytest.approx(0.5)
    assert s["correction/weight_max"] == pytest.approx(2.0)  # dropped units weigh 0
    assert correction_batch_stats(old2, mu2, torch.ones(2, 4), PolicyLossConfig.preset("alp")) == {}


# ---------------------------------------------------------------------------------------------
# the corrections the big frameworks ship: each preset on inputs that tell it apart


def rows(log_rho, r, adv, mask=None, base=-3.0):
    """(lp, mu, adv, mask, old) from per-token log rho = log pi_old/mu and r = pi/pi_old."""
    log_rho = torch.tensor(log_rho, dtype=torch.float32)
    mu = torch.full_like(log_rho, base)
    old = mu + log_rho
    lp = (old + torch.tensor([[LN(x) for x in row] for row in r])).requires_grad_(True)
    m = torch.ones_like(mu) if mask is None else torch.tensor(mask, dtype=torch.float32)
    return lp, mu, torch.tensor(adv), m, old


def test_new_preset_flags():
    token_alp = PolicyLossConfig.preset("token_alp")
    assert token_alp.perturbation and token_alp.ratio_level == "token"
    assert token_alp.denominator == "infer" and not token_alp.needs_old_logprobs
    assert token_alp.clip_range == (0.5, 4.0) and token_alp.dual_clip == 3.0
    for name in ("seq_mis", "seq_tis", "icepop", "seq_mask_tis", "cispo", "m2po", "dr_grpo"):
        cfg = PolicyLossConfig.preset(name)
        assert cfg.needs_old_logprobs and not cfg.perturbation, name
        assert cfg.scale_advantages_by_std == (name != "dr_grpo"), name
    m2po = PolicyLossConfig.preset("m2po")
    assert m2po.denominator == "infer" and m2po.surrogate == "unclipped"  # ratio vs mu
    assert PolicyLossConfig.preset("cispo", setting="single_turn").dual_clip is None
    assert PolicyLossConfig.preset("seq_mis", setting="single_turn").dual_clip == 10.0
    # any preset takes any new field: ALP with Dr. GRPO's aggregation
    alp_sum = PolicyLossConfig.preset("alp", aggregation="seq_mean_token_sum_norm")
    assert alp_sum.perturbation and alp_sum.aggregation == "seq_mean_token_sum_norm"


def test_seq_mis_drops_only_high_sequences_and_seq_tis_truncates():
    # row 0: sequence rho 8 (> 5); row 1: sequence rho 0.01 (tiny, kept: no lower bound)
    lp, mu, adv, mask, old = rows(
        [[LN(8.0), 0.0], [LN(0.1), LN(0.1)]], [[1.0, 1.0]] * 2, [1.0, 1.0]
    )
    loss, m = policy_loss(lp, mu, adv, mask, PolicyLossConfig.preset("seq_mis"), old_logprobs=old)
    assert float(loss) == pytest.approx(-0.01, rel=1e-5)  # row 1 only: weight 0.01, r = 1
    assert m["correction/seq_dropped_frac"] == 0.5 and m["correction/masked_frac"] == 0.5
    # seq_tis keeps both: weights min(8, 2) = 2 and 0.01 -> (-2 - 2 - 0.01 - 0.01) / 4
    loss, m = policy_loss(lp, mu, adv, mask, PolicyLossConfig.preset("seq_tis"), old_logprobs=old)
    assert float(loss) == pytest.approx(-4.02 / 4, rel=1e-5)
    assert m["correction/masked_frac"] == 0.0 and m["correction/weight_max"] == pytest.approx(2)


def test_icepop_band_is_half_to_five():
    # rho = [0.3, 1, 6]: MIS ([0.2, 5]) keeps 0.3, IcePop ([0.5, 5]) drops it; both drop 6
    lp, mu, adv, mask, old = rows([[LN(0.3), 0.0, LN(6.0)]], [[1.0, 1.0, 1.0]], [1.0])
    loss, m = policy_loss(lp, mu, adv, mask, PolicyLossConfig.preset("icepop"), old_logprobs=old)
    assert float(loss) == pytest.approx(-1.0)  # only rho = 1 stays: weight 1, r = 1
    assert m["correction/masked_frac"] == pytest.approx(2 / 3)
    loss, _ = policy_loss(lp, mu, adv, mask, PolicyLossConfig.preset("mis"), old_logprobs=old)
    assert float(loss) == pytest.approx(-(0.3 + 1.0) / 2, rel=1e-5)


def test_seq_mask_tis_keeps_near_one_sequences_and_truncates_token_weights():
    # row 0: rho = [4, 0.25], geometric mean 1 (kept), weights min(rho, 2) = [2, 0.25];
    # row 1: rho = [1.01, 1.01], geometric mean 1.01 > 1.001 (dropped)
    lp, mu, adv, mask, old = rows(
        [[LN(4.0), LN(0.25)], [LN(1.01), LN(1.01)]], [[1.0, 1.0]] * 2, [1.0, 1.0]
    )
    cfg = PolicyLossConfig.preset("seq_mask_tis")
    loss, m = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(loss) == pytest.approx(-(2 + 0.25) / 2, rel=1e-5)
    assert m["correction/seq_dropped_frac"] == 0.5
    assert final_loss_mask(old, mu, mask, cfg).tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_rejection_rules_token_and_sequence_and_lower_bound_default():
    lp, mu, adv, mask, old = rows(
        [[LN(3.0), 0.0], [LN(0.4), LN(0.4)]], [[1.0, 1.0]] * 2, [1.0, 1.0]
    )
    # token band [1/2, 2] (rejection_low None = 1 / rejection_high): keeps rho 1, 1 of rows 0
    cfg = PolicyLossConfig.preset("grpo", rejection="token", rejection_high=2.0)
    assert final_loss_mask(old, mu, mask, cfg).tolist() == [[0.0, 1.0], [0.0, 0.0]]
    # sequence products 3 and 0.16 against [0.1, 2]: row 1 stays
    cfg = PolicyLossConfig.preset("grpo", rejection="sequence", rejection_low=0.1)
    assert final_loss_mask(old, mu, mask, cfg).tolist() == [[0.0, 0.0], [1.0, 1.0]]
    loss, m = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(loss) == pytest.approx(-1.0) and m["correction/weight_mean"] == 0.5


def test_cispo_every_token_keeps_a_gradient():
    """r = [1, 8] over pi_old, A = 1: PPO clips token 1 (no gradient); CISPO weights it by
    min(8, 5) = 5 and keeps d loss / d log pi_t = -w_t A / 2."""
    lp, mu, adv, mask, old = rows([[0.0, 0.0]], [[1.0, 8.0]], [1.0])
    cfg = PolicyLossConfig.preset("cispo")
    loss, m = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(loss) == pytest.approx(-(1 * -3.0 + 5 * (-3 + LN(8))) / 2, rel=1e-5)
    assert m["clip/upper"] == 0.5 and m["cispo/weight_mean"] == pytest.approx(3.0)
    assert m["cispo/ess"] == pytest.approx(36 / (2 * 26))
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad[0].tolist() == pytest.approx([-0.5, -2.5])
    # negative advantage: the same weights, the sign flips (no dual clip in CISPO)
    loss, _ = policy_loss(lp, mu, -adv, mask, cfg, old_logprobs=old)
    assert torch.autograd.grad(loss, lp)[0][0].tolist() == pytest.approx([0.5, 2.5])
    ppo_grad = torch.autograd.grad(
        policy_loss(lp, mu, adv, mask, PolicyLossConfig.preset("grpo"), old_logprobs=old)[0], lp
    )[0]
    assert ppo_grad[0, 1] == 0.0


def test_m2po_drops_the_largest_second_moments_until_the_mean_is_below_tau():
    # (log rho)^2 = [0.01, 0.16, 0.04, 0]: mean 0.0525 > 0.04 -> drop 0.16 -> mean 0.0167
    lp, mu, adv, mask, old = rows([[0.1, 0.4, 0.2, 0.0]], [[1.0] * 4], [1.0])
    cfg = PolicyLossConfig.preset("m2po")
    assert final_loss_mask(old, mu, mask, cfg).tolist() == [[1.0, 0.0, 1.0, 1.0]]
    loss, m = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    # unclipped -A * pi/mu with pi/mu = rho (r = 1): exp(0.1), exp(0.2), 1
    assert float(loss) == pytest.approx(-(math.exp(0.1) + math.exp(0.2) + 1) / 3, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad[0].tolist() == pytest.approx([-math.exp(0.1) / 3, 0, -math.exp(0.2) / 3, -1 / 3])
    s = correction_batch_stats(old, mu, mask, cfg)
    assert s["correction/m2"] == pytest.approx(0.0525, rel=1e-5)
    assert s["correction/m2_kept"] == pytest.approx(0.05 / 3, rel=1e-5)
    assert s["correction/masked_frac"] == 0.25


def test_m2po_boundary_is_inclusive_and_a_batch_above_tau_everywhere_is_dropped():
    # (log rho)^2 = 0.25 exactly, tau = 0.25: the mean equals tau, every token stays (<=)
    lp, mu, adv, mask, old = rows([[0.5, -0.5]], [[1.0, 1.0]], [1.0])
    cfg = PolicyLossConfig.preset("m2po", m2_threshold=0.25)
    assert final_loss_mask(old, mu, mask, cfg).tolist() == [[1.0, 1.0]]
    # tau below the smallest (log rho)^2: no remainder qualifies, all tokens leave the loss
    cfg = PolicyLossConfig.preset("m2po", m2_threshold=0.2)
    loss, m = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(loss) == 0.0 and m["tokens"] == 0.0 and m["correction/masked_frac"] == 1.0
    assert torch.all(torch.autograd.grad(loss, lp)[0] == 0)


def test_m2po_ranks_the_whole_batch_so_micro_batches_take_the_final_mask():
    """Row 0: (log rho)^2 = [0.09, 0.09]; row 1: [0, 0]. Over the batch, mean 0.045 > 0.04 drops
    one 0.09 and keeps 3 tokens (mean 0.03); row 0 on its own would lose both tokens."""
    lp, mu, adv, mask, old = rows([[0.3, 0.3], [0.0, 0.0]], [[1.0, 1.0]] * 2, [1.0, 1.0])
    cfg = PolicyLossConfig.preset("m2po")
    kept = final_loss_mask(old, mu, mask, cfg)
    assert kept.sum(-1).tolist() == [1.0, 2.0]
    assert final_loss_mask(old[:1], mu[:1], mask[:1], cfg).sum() == 0  # recomputed alone
    full, _ = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(full) == pytest.approx(-(math.exp(0.3) + 2) / 3, rel=1e-5)
    norm = accumulation_normalizer(kept, cfg)
    parts = [
        policy_loss(lp[i : i + 1], mu[i : i + 1], adv[i : i + 1], mask[i : i + 1], cfg,
                    old_logprobs=old[i : i + 1], normalizer=norm, final_mask=kept[i : i + 1])[0]
        for i in range(2)
    ]  # fmt: skip
    assert float(sum(parts)) == pytest.approx(float(full), rel=1e-6)


def test_dr_grpo_token_sum_over_a_constant_and_uncentred_std():
    # rows of 2 and 1 loss tokens (T = 2), r = 1.1 everywhere (inside the clip), A = 1, -1
    lp, mu, adv, mask, old = rows(
        [[0.0, 0.0], [0.0, 0.0]], [[1.1, 1.1], [1.1, 1.1]], [1.0, -1.0], [[1, 1], [1, 0]]
    )
    cfg = PolicyLossConfig.preset("dr_grpo")
    loss, _ = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    # token sums -2.2 and +1.1, each / K = T = 2, mean over 2 sequences
    assert float(loss) == pytest.approx((-2.2 + 1.1) / 2 / 2, rel=1e-5)
    cfg8 = PolicyLossConfig.preset("dr_grpo", token_sum_norm=8.0)
    loss, _ = policy_loss(lp, mu, adv, mask, cfg8, old_logprobs=old)
    assert float(loss) == pytest.approx((-2.2 + 1.1) / 8 / 2, rel=1e-5)
    # gradient: -A r / (K * n_seq) on every loss token, whatever the sequence's length
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.flatten().tolist() == pytest.approx([-1.1 / 16, -1.1 / 16, 1.1 / 16, 0.0])
    from alp_agents.learner.advantages import grpo_advantages

    adv = grpo_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], [0, 0, 0, 0, 1, 1],
                          scale_by_std=cfg.scale_advantages_by_std)  # fmt: skip
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]  # R - group mean, A = 0 group


MICRO = {  # hand-computed full-batch losses of micro_scenario()
    # row 0 dropped (sequence rho 8 > 5); row 1 (A = -1): weight 2 x [1.2, 0.9]; row 2: [-1, -1]
    "seq_mis": (2.4 + 1.8 - 2) / 4,
    # token band keeps row 0 token 0 (-1.1), row 1 (2 x 1.2, 1 x 0.9), row 2 (-1, -1)
    "icepop": (-1.1 + 2.4 + 0.9 - 2) / 5,
    # geometric means sqrt(8), sqrt(2), 1: only row 2 stays
    "seq_mask_tis": -1.0,
    # (log rho)^2 = [0, 4.32 | 0.48, 0 | 0, 0] keeps the four zeros; -A pi/mu: -1.1, 0.9, -1, -1
    "m2po": (-1.1 + 0.9 - 2) / 4,
    # token sums -2.1, 2.1, -2 over K = T = 2 and 3 sequences
    "dr_grpo": (-2.1 + 2.1 - 2) / 6,
}


def micro_scenario():
    return rows(
        [[0.0, LN(8.0)], [LN(2.0), 0.0], [0.0, 0.0]],
        [[1.1, 1.0], [1.2, 0.9], [1.0, 1.0]],
        [1.0, -1.0, 1.0],
    )


@pytest.mark.parametrize("name", sorted(MICRO))
def test_micro_batches_sum_to_the_full_batch_loss_for_every_rejection_and_aggregation(name):
    lp, mu, adv, mask, old = micro_scenario()
    cfg = PolicyLossConfig.preset(name)
    full, _ = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(full) == pytest.approx(MICRO[name], rel=1e-5)
    kept = final_loss_mask(old, mu, mask, cfg)
    norm = accumulation_normalizer(kept, cfg)
    parts = [
        policy_loss(lp[i : i + 1], mu[i : i + 1], adv[i : i + 1], mask[i : i + 1], cfg,
                    old_logprobs=old[i : i + 1], normalizer=norm, final_mask=kept[i : i + 1])[0]
        for i in range(3)
    ]  # fmt: skip
    assert float(sum(parts)) == pytest.approx(float(full), rel=1e-6, abs=1e-7)


def test_dr_grpo_micro_batches_at_their_own_padded_width_share_the_normaliser():
    """The full batch is padded to T = 3; a micro-batch cut to its own width (2) alone would
    divide by K = 2. With the normaliser of the whole step (K = 3 x 2 sequences) it adds up."""
    lp, mu, adv, mask, old = rows(
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1.1, 1.1, 1.1], [1.1, 1.1, 1.1]], [1.0, 1.0],
        [[1, 1, 1], [1, 1, 0]],
    )  # fmt: skip
    cfg = PolicyLossConfig.preset("dr_grpo")
    full, _ = policy_loss(lp, mu, adv, mask, cfg, old_logprobs=old)
    assert float(full) == pytest.approx(-(3.3 + 2.2) / 3 / 2, rel=1e-5)
    norm = accumulation_normalizer(final_loss_mask(old, mu, mask, cfg), cfg)
    assert norm == 6.0
    part0, _ = policy_loss(lp[:1], mu[:1], adv[:1], mask[:1], cfg, old_logprobs=old[:1],
                           normalizer=norm)  # fmt: skip
    part1, _ = policy_loss(lp[1:, :2], mu[1:, :2], adv[1:], mask[1:, :2], cfg,
                           old_logprobs=old[1:, :2], normalizer=norm)  # fmt: skip
    assert float(part0 + part1) == pytest.approx(float(full), rel=1e-6)
    alone, _ = policy_loss(lp[1:, :2], mu[1:, :2], adv[1:], mask[1:, :2], cfg,
                           old_logprobs=old[1:, :2])  # fmt: skip
    assert float(alone) == pytest.approx(-2.2 / 2, rel=1e-5)  # K = its own width


def test_correction_batch_stats_cover_every_weighting_or_rejecting_preset():
    lp, mu, adv, mask, old = micro_scenario()
    for name in ("seq_mis", "seq_tis", "icepop", "seq_mask_tis", "m2po"):
        s = correction_batch_stats(old, mu, mask, PolicyLossConfig.preset(name))
        for key in ("ess", "weight_q50", "masked_frac", "seq_dropped_frac", "weight_mean"):
            assert f"correction/{key}" in s, (name, key)
    s = correction_batch_stats(old, mu, mask, PolicyLossConfig.preset("icepop"))
    # kept token weights: 1 | 2, 1 | 1, 1 (rho 8 dropped): median 1, max 2, 1 of 6 dropped
    assert s["correction/weight_q50"] == 1.0 and s["correction/weight_max"] == 2.0
    assert s["correction/masked_frac"] == pytest.approx(1 / 6)
    assert s["correction/seq_dropped_frac"] == 0.0
    s = correction_batch_stats(old, mu, mask, PolicyLossConfig.preset("seq_mask_tis"))
    assert s["correction/seq_dropped_frac"] == pytest.approx(2 / 3)
    for name in ("cispo", "dr_grpo", "token_alp"):
        assert correction_batch_stats(old, mu, mask, PolicyLossConfig.preset(name)) == {}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"surrogate": "clip"}, r"surrogate='clip'.*ppo, cispo, unclipped"),
        ({"rejection": "geo"}, r"rejection='geo'.*none, token, sequence, geometric"),
        ({"aggregation": "sum"}, r"aggregation='sum'.*seq_mean_token_sum_norm"),
        ({"rejection_high": 0.0}, r"rejection_high=0.0: must be > 0"),
        ({"rejection_low": 3.0, "rejection_high": 2.0}, r"rejection_low=3.0: must be None or in"),
        ({"m2_threshold": 0.0}, r"m2_threshold=0.0: must be > 0"),
        ({"surrogate": "cispo", "dual_clip": 3.0}, r"dual_clip=3.0: must be None when surrogate"),
        ({"surrogate": "unclipped"}, r"dual_clip=3.0: must be None when surrogate='unclipped'"),
        ({"token_sum_norm": -1.0}, r"token_sum_norm=-1.0: must be None or > 0"),
        ({"scale_advantages_by_std": "no"}, r"scale_advantages_by_std='no': must be true or"),
    ],
)
def test_new_fields_are_validated_with_field_value_and_choices(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


def test_final_mask_shape_is_checked():
    lp, mu, adv, mask, old = micro_scenario()
    with pytest.raises(ValueError, match="final_mask has shape"):
        policy_loss(lp, mu, adv, mask, PolicyLossConfig.preset("m2po"), old_logprobs=old,
                    final_mask=mask[:, :1])  # fmt: skip
