"""policy_loss against hand-computed values: every preset, every ratio level, clips, masks.

Inputs are built from chosen ratios (log-probs = log of them), so each expected number below
can be checked with pencil and paper from the formulas in ALP_SPEC section 2-3.
"""

from __future__ import annotations

import math

import pytest
import torch

from alp_agents.objectives import (
    PolicyLossConfig,
    accumulation_normalizer,
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
    from alp_agents.objectives import correction_batch_stats

    lp, mu, _, _, old = scenario()
    mu2 = torch.cat([mu, torch.full((1, 4), -3.0)])
    old2 = torch.cat([old, mu2[1:] + torch.tensor([[LN(10.0), LN(0.1), LN(10.0), LN(0.1)]])])
    s = correction_batch_stats(old2, mu2, torch.ones(2, 4), PolicyLossConfig.preset("mis"))
    assert s["correction/masked_frac"] == pytest.approx(6 / 8)  # row 0 keeps rho 1 and 2 only
    assert s["correction/seq_dropped_frac"] == pytest.approx(0.5)
    assert s["correction/weight_max"] == pytest.approx(2.0)  # dropped units weigh 0
    assert correction_batch_stats(old2, mu2, torch.ones(2, 4), PolicyLossConfig.preset("alp")) == {}
