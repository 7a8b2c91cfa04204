"""Policy losses for ALP and every baseline: one function, presets are configuration.

The loss follows docs/alp.md, sections 2-4 (the ratio, the surrogate and the aggregation, the
off-policy corrections):

1. per-token log-ratio ``d_t = log pi(y_t) - log den(y_t)`` on loss tokens, where ``den`` is the
   inference engine's ``mu`` (``denominator="infer"``: ALP, Bypass) or the trainer's recomputed
   ``pi_old`` (``denominator="old"``: GRPO, GSPO, TIS, MIS);
2. a ratio level turns ``d`` into the log-ratio ``l_t`` each token uses: ``token``, ``sequence``
   (full product), ``sequence_geometric`` (GSPO), ``cum_token`` (prefix products) or ``cum_turn``
   (prefix product up to the end of the token's turn). The non-token levels use the
   stop-gradient trick ``l_t = sg[S] + log pi_t - sg[log pi_t]`` so the value is the aggregated
   ratio and the gradient at ``t`` is ``r_t * grad log pi_t``;
3. ``l_t`` is clamped to ``[-log_ratio_clamp, log_ratio_clamp]`` and ``r_t = exp(l_t)``;
4. the surrogate: PPO clipped (``ppo``: asymmetric clip ``[1 - eps_low, 1 + eps_high]`` and,
   for negative advantages, the dual clip ``min(., -A c)``), CISPO (``cispo``:
   ``-sg(min(r, 1 + eps_high)) A log pi``, every token keeps a gradient) or the plain
   importance-weighted policy gradient (``unclipped``: ``-A r``);
5. optional off-policy correction of the ``pi_old / mu`` factor (``rho``, detached): TIS
   multiplies by ``w = min(rho, C)``, MIS additionally drops tokens/sequences with ``rho`` outside
   ``[C_low, C]``; independent rejection rules drop tokens or sequences whose token, sequence or
   geometric-mean ``rho`` leaves ``[rejection_low, rejection_high]``; M2PO drops the tokens with
   the largest ``(log rho)^2`` until the mean over the kept ones is ``<= m2_threshold``; an
   optional veto drops a sequence if any token has ``rho < veto_threshold``;
6. aggregation (``token_mean``, ``seq_mean_token_mean`` or Dr. GRPO's
   ``seq_mean_token_sum_norm``) over the final loss mask, plus ``kl_coef * k3(pi_ref || pi)`` and
   ``- entropy_coef * entropy``.

Every rejection depends only on ``rho = pi_old / mu``, which is fixed before the update:
`final_loss_mask` computes the final mask of a whole step up front, `accumulation_normalizer` the
denominator micro-batches share (see docs/alp.md for the presets and their sources).

Behaviour on degenerate input (tested): an all-zero mask gives ``loss == 0`` with zero gradients
(the graph stays connected, so DDP and ``backward()`` still work); NaN/inf log-probs or
advantages on loss tokens raise ``ValueError``; values at masked-out positions are ignored (they
may be anything, NaN included); shape mismatches raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from alp_agents.learner import metrics as M

__all__ = [
    "LossTerms",
    "PolicyLossConfig",
    "PRESETS",
    "SETTINGS",
    "accumulation_normalizer",
    "correction_batch_stats",
    "final_loss_mask",
    "policy_loss",
    "policy_loss_terms",
    "preset_names",
]

RATIO_LEVELS = ("token", "sequence", "sequence_geometric", "cum_token", "cum_turn")
DENOMINATORS = ("infer", "old")
CORRECTIONS = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")
REJECTIONS = ("none", "token", "sequence", "geometric")
SURROGATES = ("ppo", "cispo", "unclipped")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
SETTINGS = ("multi_turn", "single_turn")


@dataclass
class PolicyLossConfig:
    """Every knob of the policy loss; the defaults are the ``alp`` preset (multi-turn).

    Build one with ``PolicyLossConfig.preset("grpo", setting="single_turn", eps_high=0.3)``.
    The field names are the user-facing config keys (``objective.eps_low=...`` on the command
    line of the training scripts).

    >>> cfg = PolicyLossConfig.preset("gspo")
    >>> cfg.ratio_level, cfg.denominator, cfg.needs_old_logprobs, cfg.perturbation
    ('sequence_geometric', 'old', True, False)
    """

    name: str = "alp"
    """Preset this config came from (for logs); ``custom`` if built by hand."""
    perturbation: bool = True
    """Numerator comes from the perturbed forward (``LayerwisePerturbation`` on). True only for ALP."""
    ratio_level: str = "sequence"
    """token | sequence | sequence_geometric | cum_token | cum_turn."""
    denominator: str = "infer"
    """infer (mu, the rollout engine's log-probs) | old (pi_old, recomputed by the trainer)."""
    eps_low: float = 0.5
    """Lower clip: ratio clipped below at ``1 - eps_low`` (must be in [0, 1))."""
    eps_high: float = 3.0
    """Upper clip: ratio clipped above at ``1 + eps_high``."""
    dual_clip: float | None = 3.0
    """Dual-clip constant c (> 1) for negative advantages; None disables it."""
    log_ratio_clamp: float = 20.0
    """Clamp of the per-token log-ratio before ``exp`` (overflow guard)."""
    cum_mean: bool = False
    """cum_token / cum_turn: divide prefix sums by the prefix token count (geometric mean)."""
    correction: str = "none"
    """none | tis (truncated IS weight) | mis (masked IS) on rho = pi_old / mu."""
    correction_level: str = "token"
    """token (per-token rho) | sequence (product of rho over the sequence)."""
    correction_threshold: float = 5.0
    """C: TIS/MIS weights are ``min(rho, C)``; MIS drops rho > C."""
    correction_threshold_low: float | None = None
    """MIS lower bound: drop rho < this. None means 1 / C; 0 keeps all low ratios (the release's
    multi-turn Seq-MIS only drops rho > 5)."""
    veto_threshold: float | None = None
    """Drop a whole sequence if any of its tokens has rho < this (None: off)."""
    rejection: str = "none"
    """none | token | sequence | geometric: drop tokens (token rho) or whole sequences (product of
    rho, or its geometric mean ``exp(mean_t log rho)``) outside ``[rejection_low,
    rejection_high]``, independently of the weight ``correction`` applies."""
    rejection_low: float | None = None
    """Lower bound of the rejection band; None means ``1 / rejection_high``."""
    rejection_high: float = 2.0
    """Upper bound of the rejection band."""
    m2_threshold: float | None = None
    """M2PO's tau: drop the loss tokens with the largest ``(log rho)^2`` until the mean of
    ``(log rho)^2`` over the kept tokens of the batch is ``<= tau`` (None: off)."""
    surrogate: str = "ppo"
    """ppo (clipped, dual clip) | cispo (``-sg(min(r, 1 + eps_high)) A log pi``, no PPO clip) |
    unclipped (``-A r``: the plain importance-weighted policy gradient, M2PO's objective)."""
    aggregation: str = "token_mean"
    """token_mean (over all loss tokens of the batch) | seq_mean_token_mean | seq_mean_token_sum_norm
    (Dr. GRPO: each sequence's token SUM divided by ``token_sum_norm``, mean over sequences)."""
    token_sum_norm: float | None = None
    """The constant of seq_mean_token_sum_norm (the max response length); None: the padded width
    of the mask the loss (or `accumulation_normalizer`) sees."""
    scale_advantages_by_std: bool = True
    """Divide group-centred rewards by the group std (GRPO); False only centres them (Dr. GRPO).
    Read by the trainer's `grpo_advantages` call, not by the loss."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to a reference policy (needs ``ref_logprobs``)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (needs ``entropy``)."""

    def __post_init__(self) -> None:
        choices = {
            "ratio_level": RATIO_LEVELS,
            "denominator": DENOMINATORS,
            "correction": CORRECTIONS,
            "correction_level": CORRECTION_LEVELS,
            "rejection": REJECTIONS,
            "surrogate": SURROGATES,
            "aggregation": AGGREGATIONS,
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(
                    f"PolicyLossConfig.{key}={value!r} is not valid; choose one of {', '.join(allowed)}"
                )

        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ValueError(f"PolicyLossConfig.{key}={getattr(self, key)!r}: {what}")

        need(0.0 <= self.eps_low < 1.0, "eps_low", "must be in [0, 1) so the lower clip is > 0")
        need(self.eps_high >= 0.0, "eps_high", "must be >= 0")
        need(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip", "must be > 1 or None")
        need(self.log_ratio_clamp > 0.0, "log_ratio_clamp", "must be > 0")
        need(self.correction_threshold > 0.0, "correction_threshold", "must be > 0")
        need(
            self.correction_threshold_low is None
            or 0.0 <= self.correction_threshold_low <= self.correction_threshold,
            "correction_threshold_low",
            "must be None or in [0, correction_threshold]",
        )
        need(self.veto_threshold is None or self.veto_threshold > 0, "veto_threshold", "> 0")
        need(self.rejection_high > 0.0, "rejection_high", "must be > 0")
        need(
            self.rejection_low is None or 0.0 <= self.rejection_low <= self.rejection_high,
            "rejection_low",
            "must be None or in [0, rejection_high]",
        )
        need(self.m2_threshold is None or self.m2_threshold > 0, "m2_threshold", "must be > 0")
        need(
            self.surrogate == "ppo" or self.dual_clip is None,
            "dual_clip",
            f"must be None when surrogate={self.surrogate!r} (the dual clip bounds the PPO "
            "surrogate only)",
        )
        need(
            self.token_sum_norm is None or self.token_sum_norm > 0,
            "token_sum_norm",
            "must be None or > 0",
        )
        need(
            isinstance(self.scale_advantages_by_std, bool),
            "scale_advantages_by_std",
            "must be true or false",
        )
        need(self.kl_coef >= 0.0, "kl_coef", "must be >= 0")
        need(self.entropy_coef >= 0.0, "entropy_coef", "must be >= 0")

    # -- what the trainer must provide -------------------------------------------------------
    @property
    def needs_old_logprobs(self) -> bool:
        """True when the trainer must recompute pi_old (unperturbed, no grad) before the update."""
        return self.denominator == "old" or self.uses_rho

    @property
    def uses_rho(self) -> bool:
        """True when the loss weights or rejects by ``rho = pi_old / mu`` (TIS, MIS, a rejection
        rule, M2PO, the veto): `final_loss_mask` and `correction_batch_stats` then need pi_old."""
        return (
            self.correction != "none"
            or self.veto_threshold is not None
            or self.rejection != "none"
            or self.m2_threshold is not None
        )

    @property
    def needs_ref_logprobs(self) -> bool:
        """True when a reference policy's log-probs are needed (KL term)."""
        return self.kl_coef > 0

    @property
    def needs_entropy(self) -> bool:
        """True when the entropy of the trainer policy enters the loss."""
        return self.entropy_coef > 0

    @property
    def needs_turn_index(self) -> bool:
        """True for the cum_turn ratio level."""
        return self.ratio_level == "cum_turn"

    @property
    def clip_range(self) -> tuple[float, float]:
        """The ratio interval of the PPO clip, ``(1 - eps_low, 1 + eps_high)``."""
        return (1.0 - self.eps_low, 1.0 + self.eps_high)

    @classmethod
    def preset(
        cls, name: str, /, setting: str = "multi_turn", **overrides: Any
    ) -> PolicyLossConfig:
        """A named method's configuration (values from the paper and the authors' release; docs/alp.md, Presets), then ``overrides``.

        Args:
            name: one of ``alp, bypass, grpo, gspo, tis, mis, token_alp, seq_mis, seq_tis,
                icepop, seq_mask_tis, cispo, m2po, dr_grpo`` (`preset_names`; definitions,
                defaults and sources in docs/alp.md).
            setting: ``multi_turn`` (the release's tool-integrated runs: dual clip c = 3 for
                ALP/Bypass, no KL) or ``single_turn`` (c = 10 and k3 KL 0.001 to the reference,
                for every method).
            **overrides: any field, applied last.
        """
        key = name.lower().replace("-", "_")
        if key not in PRESETS:
            raise ValueError(f"Unknown policy-loss preset {name!r}; valid: {', '.join(PRESETS)}")
        if setting not in SETTINGS:
            raise ValueError(f"Unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
        values: dict[str, Any] = {"name": key, **PRESETS[key]}
        if setting == "single_turn":
            values["kl_coef"] = 0.001
            if values.get("dual_clip", cls.dual_clip) is not None:
                values["dual_clip"] = 10.0
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"Unknown PolicyLossConfig field(s) {unknown}; valid: {', '.join(sorted(fields))}"
            )
        values.update(overrides)
        return cls(**values)


_GRPO: dict[str, Any] = {
    "perturbation": False,
    "ratio_level": "token",
    "denominator": "old",
    "eps_low": 0.2,
    "eps_high": 0.28,
    "dual_clip": 10.0,
}
PRESETS: dict[str, dict[str, Any]] = {
    # ALP: perturbed numerator over the inference denominator, one ratio, sequence level (Seq-ALP).
    "alp": {
        "perturbation": True,
        "ratio_level": "sequence",
        "denominator": "infer",
        "eps_low": 0.5,
        "eps_high": 3.0,
        "dual_clip": 3.0,
    },
    # Bypass: exactly ALP with the perturbation off.
    "bypass": {
        "perturbation": False,
        "ratio_level": "sequence",
        "denominator": "infer",
        "eps_low": 0.5,
        "eps_high": 3.0,
        "dual_clip": 3.0,
    },
    "grpo": dict(_GRPO),
    "gspo": {
        "perturbation": False,
        "ratio_level": "sequence_geometric",
        "denominator": "old",
        "eps_low": 3e-4,
        "eps_high": 4e-4,
        "dual_clip": None,
    },
    "tis": {**_GRPO, "correction": "tis", "correction_threshold": 5.0},
    "mis": {**_GRPO, "correction": "mis", "correction_threshold": 5.0},
    # The paper's Token-ALP (49.62): ALP with the token ratio (release train_perturb.sh, vanilla).
    "token_alp": {
        "perturbation": True,
        "ratio_level": "token",
        "denominator": "infer",
        "eps_low": 0.5,
        "eps_high": 3.0,
        "dual_clip": 3.0,
    },
    # The release's multi-turn Seq-MIS (train_mis.sh): GRPO token ratio, clip 0.2/0.28, c = 3,
    # sequence rho, weight min(rho, 5), drop sequences with rho > 5 only (lower bound 0).
    "seq_mis": {
        **_GRPO,
        "dual_clip": 3.0,
        "correction": "mis",
        "correction_level": "sequence",
        "correction_threshold": 5.0,
        "correction_threshold_low": 0.0,
    },
    # Sequence-level TIS: loss x min(prod rho, 2) (verl rollout_is=sequence, threshold 2.0).
    "seq_tis": {
        **_GRPO,
        "correction": "tis",
        "correction_level": "sequence",
        "correction_threshold": 2.0,
    },
    # IcePop: weight rho_t, tokens with rho_t outside [0.5, 5] leave the loss (Ring-1T report).
    "icepop": {
        **_GRPO,
        "correction": "mis",
        "correction_threshold": 5.0,
        "correction_threshold_low": 0.5,
    },
    # Geometric rejection + token TIS (verl decoupled_geo_rs_token_tis: 0.999_1.001, C = 2).
    "seq_mask_tis": {
        **_GRPO,
        "correction": "tis",
        "correction_threshold": 2.0,
        "rejection": "geometric",
        "rejection_low": 0.999,
        "rejection_high": 1.001,
    },
    # CISPO (MiniMax-M1): -sg(min(r, 5)) A log pi, token mean; eps_high = 4 is TRL's
    # epsilon_high = 5 (ScaleRL's eps_max), no lower bound.
    "cispo": {
        **_GRPO,
        "surrogate": "cispo",
        "eps_high": 4.0,
        "dual_clip": None,
    },
    # M2PO (AReaL m2_threshold 0.04): unclipped token ratio against the behaviour policy (mu)
    # on the tokens the second-moment mask keeps.
    "m2po": {
        **_GRPO,
        "denominator": "infer",
        "surrogate": "unclipped",
        "dual_clip": None,
        "m2_threshold": 0.04,
    },
    # Dr. GRPO: no std in the advantage, per-sequence token sum / constant, mean over sequences.
    "dr_grpo": {
        **_GRPO,
        "aggregation": "seq_mean_token_sum_norm",
        "scale_advantages_by_std": False,
    },
}
"""Field values per preset (everything not named keeps the dataclass default)."""


def preset_names() -> tuple[str, ...]:
    """The valid preset names."""
    return tuple(PRESETS)


# ---------------------------------------------------------------------------------------------
# validation


def _check_inputs(
    logprobs: torch.Tensor,
    infer_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    optional: dict[str, torch.Tensor | None],
) -> None:
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        shape = tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs)
        raise ValueError(f"logprobs must be a (B, T) tensor, got {shape}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be floating point, got {logprobs.dtype}")
    shape = tuple(logprobs.shape)
    for key, value in {"infer_logprobs": infer_logprobs, "mask": mask, **optional}.items():
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)}, logprobs has {shape}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"advantages must have shape ({shape[0]},) or {shape}, got {tuple(advantages.shape)}"
        )
    needed = {
        "old_logprobs": config.needs_old_logprobs,
        "ref_logprobs": config.needs_ref_logprobs,
        "entropy": config.needs_entropy,
        "turn_index": config.needs_turn_index,
    }
    for key, required in needed.items():
        if required and optional.get(key) is None:
            raise ValueError(f"{key} is required by this config ({_why(key, config)})")


def _why(key: str, c: PolicyLossConfig) -> str:
    return {
        "old_logprobs": f"denominator={c.denominator!r}, correction={c.correction!r}, "
        f"veto_threshold={c.veto_threshold!r}, rejection={c.rejection!r}, "
        f"m2_threshold={c.m2_threshold!r}",
        "ref_logprobs": f"kl_coef={c.kl_coef}",
        "entropy": f"entropy_coef={c.entropy_coef}",
        "turn_index": "ratio_level='cum_turn'",
    }[key]


def _check_values(named: dict[str, torch.Tensor], valid: torch.Tensor, mask: torch.Tensor) -> None:
    """One device sync: count non-finite / positive log-probs on loss tokens and non-0/1 masks."""
    counts = []
    for key, x in named.items():
        xv = x.detach()
        counts.append((~torch.isfinite(xv) & valid).sum())
        if key.endswith("logprobs"):
            counts.append(((xv > 1e-3) & valid).sum())
        else:
            counts.append(torch.zeros((), dtype=torch.long, device=xv.device))
    counts.append(((mask != 0) & (mask != 1)).sum())
    values = torch.stack([c.to(valid.device) for c in counts]).tolist()
    for i, key in enumerate(named):
        if values[2 * i]:
            raise ValueError(
                f"{key} has {values[2 * i]} NaN/inf value(s) on loss tokens (mask == 1); "
                "refusing to compute a NaN loss. Check the forward pass (dtype overflow?) or the "
                "engine's reported log-probs."
            )
        if values[2 * i + 1]:
            raise ValueError(
                f"{key} has {values[2 * i + 1]} value(s) > 0 on loss tokens: log-probabilities "
                "must be <= 0 (were probabilities or logits passed?)"
            )
    if values[-1]:
        raise ValueError(f"mask must contain only 0 and 1; found {values[-1]} other value(s)")


# ---------------------------------------------------------------------------------------------
# pure pieces


def _sum_norm(mask: torch.Tensor, token_sum_norm: float | None) -> float:
    """The constant seq_mean_token_sum_norm divides each sequence's token sum by."""
    return float(mask.shape[-1]) if token_sum_norm is None else float(token_sum_norm)


def _aggregate(
    x: torch.Tensor,
    mask: torch.Tensor,
    how: str,
    normalizer: float | None,
    token_sum_norm: float | None = None,
) -> torch.Tensor:
    """token_mean: sum over loss tokens / their number; seq_mean_token_mean: mean over sequences
    (that have loss tokens) of each sequence's token mean; seq_mean_token_sum_norm: mean over
    sequences (that have loss tokens) of each sequence's token sum / K (``token_sum_norm``, else
    the mask's width). ``normalizer`` replaces the whole denominator (token count, sequence count,
    or K x sequence count), e.g. the global one under gradient accumulation."""
    xm = torch.where(mask > 0, x, torch.zeros_like(x))
    if how == "token_mean":
        denom = mask.sum() if normalizer is None else torch.as_tensor(float(normalizer))
        return xm.sum() / denom.to(xm.device).clamp(min=1.0)
    per_seq_n = mask.sum(-1)
    if how == "seq_mean_token_sum_norm":
        if normalizer is None:
            n_seq = (per_seq_n > 0).sum().clamp(min=1)
            denom = n_seq * _sum_norm(mask, token_sum_norm)
        else:
            denom = torch.as_tensor(float(normalizer))
        return xm.sum() / denom.to(xm.device)
    per_seq = xm.sum(-1) / per_seq_n.clamp(min=1.0)
    n_seq = (per_seq_n > 0).sum() if normalizer is None else torch.as_tensor(float(normalizer))
    return per_seq.sum() / n_seq.to(xm.device).clamp(min=1.0)


def _turn_prefix_sums(
    d: torch.Tensor, mask: torch.Tensor, turn_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token, the sum of ``d`` (and the count of loss tokens) over all loss tokens in
    turns up to and including its own turn (turns are numbered in order, 0-based)."""
    ti = torch.where(mask > 0, turn_index.long(), torch.zeros_like(turn_index, dtype=torch.long))
    if (ti < 0).any():
        raise ValueError("turn_index must be >= 0 on loss tokens")
    k = int(ti.max().item()) + 1 if ti.numel() else 1
    zeros = torch.zeros(d.shape[0], k, dtype=d.dtype, device=d.device)
    per_turn = zeros.scatter_add(1, ti, d)
    per_turn_n = zeros.scatter_add(1, ti, mask)
    return per_turn.cumsum(-1).gather(1, ti), per_turn_n.cumsum(-1).gather(1, ti)


def log_ratio(
    lp: torch.Tensor,
    den: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    turn_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-token log-ratio ``l_t`` of the configured level, before clamping.

    ``lp`` carries the gradient; ``den`` is treated as a constant. Masked-out positions of
    ``lp``/``den`` must already be zero (see `policy_loss`).
    """
    d = lp - den.detach()
    level = config.ratio_level
    if level == "token":
        return d
    if level in ("sequence", "sequence_geometric"):
        agg = d.sum(-1, keepdim=True)
        if level == "sequence_geometric":
            agg = agg / mask.sum(-1, keepdim=True).clamp(min=1.0)
    elif level == "cum_token":
        agg = d.cumsum(-1)
        if config.cum_mean:
            agg = agg / mask.cumsum(-1).clamp(min=1.0)
    else:  # cum_turn
        assert turn_index is not None
        agg, n = _turn_prefix_sums(d, mask, turn_index)
        if config.cum_mean:
            agg = agg / n.clamp(min=1.0)
    return agg.detach() + lp - lp.detach()


def clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> torch.Tensor:
    """Per-token PPO loss with asymmetric clip and dual clip (docs/alp.md, section 3)."""
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss1, loss2)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def surrogate_loss(
    ratio: torch.Tensor, lp: torch.Tensor, adv: torch.Tensor, config: PolicyLossConfig
) -> torch.Tensor:
    """Per-token loss of the configured surrogate.

    ``ppo``: `clipped_surrogate`. ``cispo``: ``-sg(min(r, 1 + eps_high)) * A * log pi`` (the
    weight is detached, the gradient flows through ``log pi``, so no token loses its gradient).
    ``unclipped``: ``-A * r`` (gradient ``r A grad log pi``).
    """
    if config.surrogate == "ppo":
        return clipped_surrogate(ratio, adv, config.eps_low, config.eps_high, config.dual_clip)
    if config.surrogate == "cispo":
        return -ratio.detach().clamp(max=1.0 + config.eps_high) * adv * lp
    return -adv * ratio


def _band_keep(log_x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``low <= exp(log_x) <= high``, compared in log space (exact at any magnitude)."""
    lo = math.log(low) if low > 0 else -math.inf
    return (log_x >= lo) & (log_x <= math.log(high))


def _rejection_keep(
    log_rho_tok: torch.Tensor, mask: torch.Tensor, config: PolicyLossConfig
) -> torch.Tensor:
    """0/1 mask of the tokens the ``rejection`` rule keeps (statistics over ``mask``)."""
    high = config.rejection_high
    low = 1.0 / high if config.rejection_low is None else config.rejection_low
    if config.rejection == "token":
        return _band_keep(log_rho_tok, low, high).to(mask.dtype)
    seq = (log_rho_tok * mask).sum(-1, keepdim=True)
    if config.rejection == "geometric":
        seq = seq / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return _band_keep(seq, low, high).to(mask.dtype).expand_as(mask)


def _m2_keep(log_rho_tok: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """M2PO's second-moment mask over ALL loss tokens of the batch: sort ``(log rho)^2`` in
    descending order and drop the largest until the mean over the remaining ones is ``<= tau``;
    if no non-empty remainder qualifies, every token is dropped."""
    valid = mask > 0
    m2 = (log_rho_tok.double() ** 2)[valid]
    n = m2.numel()
    keep = torch.ones_like(mask)
    if n == 0:
        return keep
    sorted_m2, order = torch.sort(m2, descending=True, stable=True)
    suffix_mean = sorted_m2.flip(0).cumsum(0).flip(0) / torch.arange(
        n, 0, -1, device=m2.device, dtype=m2.dtype
    )
    ok = suffix_mean <= tau
    n_drop = int(ok.to(torch.int8).argmax()) if bool(ok.any()) else n
    kept_sorted = torch.arange(n, device=m2.device) >= n_drop
    kept = torch.empty_like(kept_sorted)
    kept[order] = kept_sorted
    keep[valid] = kept.to(mask.dtype)
    return keep


def correction_weights(
    old: torch.Tensor,
    infer: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detached TIS/MIS weights and the loss mask after every rejection.

    ``rho = pi_old / mu`` per token (``correction_level="token"``) or its product over the
    sequence (``"sequence"``, broadcast to every token), log clamped to ``+-log_ratio_clamp``.
    The loss mask drops, in this order: MIS (rho outside ``[C_low, C]``), the veto, the
    ``rejection`` rule, then M2PO over the tokens still kept. ``kept`` (a precomputed final
    mask, e.g. `final_loss_mask` of the whole step sliced to this micro-batch) replaces the
    rejections: M2PO's rule is batch-global, so a micro-batch must not recompute it.

    Returns ``(weights, new_mask, unit_weights, unit_mask)``: ``(B, T)`` per-token weights and
    the new loss mask, plus the effective weight of each sampling unit (token or sequence; 0 if
    dropped) and which units exist, for the ESS.
    """
    log_rho_tok = (old - infer).detach()
    clamp = config.log_ratio_clamp
    if config.correction_level == "token":
        log_rho = log_rho_tok
    else:
        log_rho = (log_rho_tok * mask).sum(-1, keepdim=True).expand_as(log_rho_tok)
    rho = log_rho.clamp(-clamp, clamp).exp()
    c_high = config.correction_threshold
    weights = torch.ones_like(rho) if config.correction == "none" else rho.clamp(max=c_high)
    if kept is not None:
        new_mask = mask * kept.to(mask.dtype)
    else:
        new_mask = mask
        if config.correction == "mis":
            low = config.correction_threshold_low
            low = 1.0 / c_high if low is None else low
            new_mask = new_mask * ((rho >= low) & (rho <= c_high)).to(mask.dtype)
        if config.veto_threshold is not None:
            tok_rho = log_rho_tok.clamp(-clamp, clamp).exp()
            vetoed = ((tok_rho < config.veto_threshold) & (mask > 0)).any(-1, keepdim=True)
            new_mask = new_mask * (~vetoed).to(mask.dtype)
        if config.rejection != "none":
            new_mask = new_mask * _rejection_keep(log_rho_tok, mask, config)
        if config.m2_threshold is not None:
            new_mask = new_mask * _m2_keep(log_rho_tok, new_mask, config.m2_threshold)
    if config.correction_level == "token":
        unit_weights, unit_mask = weights * new_mask, mask
    else:
        unit_weights = weights[:, :1] * (new_mask.sum(-1, keepdim=True) > 0)
        unit_mask = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
    return weights, new_mask, unit_weights, unit_mask


def _clean(old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor):
    m = mask.detach().float()
    valid = m > 0
    zeros = torch.zeros_like(m)
    old, infer = (torch.where(valid, x.detach().float(), zeros) for x in (old, infer))
    return old, infer, m


def final_loss_mask(
    old: torch.Tensor | None,
    infer: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
) -> torch.Tensor:
    """The loss mask after the config's rejections (MIS, veto, rejection rule, M2PO).

    Every rejection depends only on ``rho = pi_old / mu``, which is known before the update, so
    a trainer computes it for the whole step's batch up front, takes `accumulation_normalizer`
    of it, and passes each micro-batch's slice to `policy_loss` as ``final_mask`` (required for
    ``m2_threshold``, whose rule ranks all tokens of the batch together).
    """
    m = mask.detach().float()
    if not config.uses_rho:
        return m
    if old is None:
        raise ValueError(
            f"old_logprobs are required by this config ({_why('old_logprobs', config)})"
        )
    old, infer, m = _clean(old, infer, mask)
    return correction_weights(old, infer, m, config)[1]


def accumulation_normalizer(final_mask: torch.Tensor, config: PolicyLossConfig) -> float:
    """The denominator every micro-batch loss of one optimiser step must share.

    ``final_mask`` is the step's loss mask AFTER rejection (`final_loss_mask`): the count of
    loss tokens (``token_mean``), of sequences with loss tokens (``seq_mean_token_mean``), or
    that count times the constant K (``seq_mean_token_sum_norm``: ``token_sum_norm``, else
    ``final_mask``'s width, so pass the mask at the width the single call would see). With it,
    micro-batch losses sum to the loss of one call on the whole mini-batch; counting before
    rejection would shrink every MIS loss by the dropped fraction. At least 1 (K for the sum).
    """
    m = final_mask.detach()
    if config.aggregation == "token_mean":
        return max(1.0, float(m.sum()))
    n_seq = max(1.0, float((m.sum(-1) > 0).sum()))
    if config.aggregation == "seq_mean_token_sum_norm":
        return n_seq * _sum_norm(m, config.token_sum_norm)
    return n_seq


def correction_batch_stats(
    old: torch.Tensor,
    infer: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
) -> dict[str, float]:
    """``correction/*`` diagnostics of a whole step's batch, as batch values (not means of
    micro-batch values): weight mean/min/max, ESS and quantiles over the sampling units, the
    fraction of loss tokens and of sequences the rejection dropped, and for M2PO the mean
    ``(log rho)^2`` before (``m2``) and after (``m2_kept``) its mask. Empty when the config
    neither weights nor rejects by rho."""
    if not config.uses_rho:
        return {}
    old, infer, m = _clean(old, infer, mask)
    _, kept, unit_w, unit_m = correction_weights(old, infer, m, config)
    stats = M.weight_stats(unit_w, unit_m, m, kept)
    if config.m2_threshold is not None:
        m2 = (old - infer) ** 2
        stats["correction/m2"] = M.masked_mean(m2, m)
        stats["correction/m2_kept"] = M.masked_mean(m2, kept)
    return M.to_floats(stats)


@dataclass
class LossTerms:
    """The parts of a policy loss (`policy_loss_terms`).

    ``policy`` is the clipped, corrected surrogate: the only term the perturbation scale sigma
    may learn from (docs/alp.md, section 1: sigma "learns only through the policy-loss gradient").
    ``regularizer`` is ``kl_coef * KL - entropy_coef * entropy`` (a zero tensor when both are
    off); a trainer keeps its gradient away from sigma. ``total = policy + regularizer``.
    """

    policy: torch.Tensor
    regularizer: torch.Tensor
    metrics: dict[str, float]

    @property
    def total(self) -> torch.Tensor:
        return self.policy + self.regularizer


# ---------------------------------------------------------------------------------------------
# the loss


def policy_loss(
    logprobs: torch.Tensor,
    infer_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    old_logprobs: torch.Tensor | None = None,
    turn_index: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normalizer: float | None = None,
    final_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of any method and its diagnostics.

    Every method is a preset of this one function (`preset_names`: ``alp, bypass, grpo, gspo,
    tis, mis, token_alp, seq_mis, seq_tis, icepop, seq_mask_tis, cispo, m2po, dr_grpo``).

    ``(loss, metrics)`` with ``loss = policy + regularizer`` of `policy_loss_terms` (see there
    for the arguments); the convenient form when nothing needs the parts apart.

    >>> import torch
    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    >>> cfg = PolicyLossConfig.preset("bypass", ratio_level="token")
    >>> loss, m = policy_loss(lp, torch.tensor([[-1.0, -2.0]]), torch.tensor([1.0]),
    ...                       torch.ones(1, 2), cfg)
    >>> float(loss.detach()), m["ratio/mean"]
    (-1.0, 1.0)
    """
    terms = policy_loss_terms(
        logprobs,
        infer_logprobs,
        advantages,
        mask,
        config,
        old_logprobs=old_logprobs,
        turn_index=turn_index,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        normalizer=normalizer,
        final_mask=final_mask,
    )
    return terms.total, terms.metrics


def policy_loss_terms(
    logprobs: torch.Tensor,
    infer_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: PolicyLossConfig,
    old_logprobs: torch.Tensor | None = None,
    turn_index: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normalizer: float | None = None,
    final_mask: torch.Tensor | None = None,
) -> LossTerms:
    """The policy loss of any method, split into its terms, and its diagnostics.

    Args:
        logprobs: ``(B, T)`` trainer log-probs of the sampled tokens, with grad (the perturbed
            forward for ALP). Column ``t`` is ``log pi(y_t | y_<t)``.
        infer_logprobs: ``(B, T)`` the inference engine's log-probs ``log mu`` of the same tokens.
        advantages: ``(B,)`` per trajectory or ``(B, T)`` per token.
        mask: ``(B, T)`` 1 on loss tokens (model-generated tokens of kept trajectories), else 0.
        config: a `PolicyLossConfig` (``PolicyLossConfig.preset(name)``).
        old_logprobs: ``(B, T)`` pi_old (unperturbed, no grad); required when
            ``config.needs_old_logprobs``.
        turn_index: ``(B, T)`` assistant turn of each token; required for ``cum_turn``.
        ref_logprobs: ``(B, T)`` reference-policy log-probs; required when ``kl_coef > 0``.
        entropy: ``(B, T)`` per-token entropy of the trainer policy (with grad for the bonus);
            required when ``entropy_coef > 0``, logged when given.
        normalizer: replaces the loss-token count (token_mean), the sequence count
            (seq_mean_token_mean) or K x the sequence count (seq_mean_token_sum_norm) in the
            mean, e.g. `accumulation_normalizer` of a gradient-accumulation step, so micro-batch
            losses sum to the full-batch loss.
        final_mask: ``(B, T)`` the loss mask after rejection, precomputed by `final_loss_mask`
            on the whole step's batch (sliced to these rows); when given, the rejections are
            not recomputed here. Required for a micro-batch of ``m2_threshold`` (M2PO ranks the
            tokens of the whole batch); for every other rule it equals the local result.

    Returns:
        `LossTerms`: the scalar float32 policy term and regulariser, and a dict of floats (keys
        documented in docs/alp.md: ``loss/*``, ``ratio/*``, ``seq_log_ratio/*``, ``clip/*``,
        ``mismatch/*``, ``mismatch_old/*``, ``correction/*``, ``entropy``, ``tokens``, ...).
    """
    optional = {
        "old_logprobs": old_logprobs,
        "ref_logprobs": ref_logprobs,
        "entropy": entropy,
        "turn_index": turn_index,
    }
    advantages = torch.as_tensor(advantages, device=logprobs.device)
    _check_inputs(logprobs, infer_logprobs, advantages, mask, config, optional)
    if final_mask is not None and tuple(final_mask.shape) != tuple(logprobs.shape):
        raise ValueError(
            f"final_mask has shape {tuple(final_mask.shape)}, logprobs has {tuple(logprobs.shape)}"
        )
    m = mask.detach().to(device=logprobs.device, dtype=torch.float32)
    valid = m > 0
    adv = advantages.detach().float()
    adv = adv[:, None].expand_as(m) if adv.dim() == 1 else adv
    named = {"logprobs": logprobs, "infer_logprobs": infer_logprobs, "advantages": adv}
    for key in ("old_logprobs", "ref_logprobs", "entropy"):
        if optional[key] is not None:
            named[key] = optional[key]
    _check_values(named, valid, mask.to(logprobs.device))
    zeros = torch.zeros_like(m)

    def on_mask(x: torch.Tensor) -> torch.Tensor:
        """float32, zero (and gradient-free) off the loss tokens, so junk there cannot leak."""
        return torch.where(valid, x.float(), zeros)

    lp = on_mask(logprobs)
    infer = on_mask(infer_logprobs.detach())
    old = on_mask(old_logprobs.detach()) if old_logprobs is not None else None
    den = infer if config.denominator == "infer" else old
    assert den is not None
    adv = torch.where(valid, adv, zeros)

    raw = log_ratio(lp, den, m, config, turn_index)
    clamp = config.log_ratio_clamp
    lr = raw.clamp(-clamp, clamp)
    ratio = lr.exp()
    per_token = surrogate_loss(ratio, lp, adv, config)

    stats: dict[str, Any] = {}
    loss_mask = m
    kept = None if final_mask is None else final_mask.detach().to(m.device, m.dtype)
    if config.uses_rho:
        assert old is not None
        weights, loss_mask, unit_w, unit_m = correction_weights(old, infer, m, config, kept)
        per_token = per_token * weights
        stats.update(M.weight_stats(unit_w, unit_m, m, loss_mask))
    elif kept is not None:
        loss_mask = m * kept

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        return _aggregate(x, loss_mask, config.aggregation, normalizer, config.token_sum_norm)

    pg_loss = aggregate(per_token)
    regularizer = (lp * 0.0).sum()  # zero, but on the graph (DDP and backward() still work)
    stats["loss/policy"] = pg_loss.detach()
    if config.kl_coef > 0:
        assert ref_logprobs is not None
        q = (on_mask(ref_logprobs.detach()) - lp).clamp(-clamp, clamp)
        kl = aggregate(torch.expm1(q) - q)
        regularizer = regularizer + config.kl_coef * kl
        stats["loss/kl"] = kl.detach()
    if entropy is not None:
        ent = aggregate(on_mask(entropy))
        if config.entropy_coef > 0:
            regularizer = regularizer - config.entropy_coef * ent
        stats["loss/entropy"] = ent.detach()
        stats.update(M.entropy_stats(entropy, loss_mask))
    stats["loss/total"] = (pg_loss + regularizer).detach()

    stats.update(M.ratio_stats(ratio, loss_mask))
    stats.update(M.seq_log_ratio_stats(lp - den, m))
    if config.surrogate == "ppo":
        stats.update(
            M.clip_fractions(
                ratio, adv, loss_mask, config.eps_low, config.eps_high, config.dual_clip
            )
        )
    else:
        cap = 1.0 + config.eps_high if config.surrogate == "cispo" else None
        stats.update(M.truncation_fractions(ratio, loss_mask, cap))
    if config.surrogate == "cispo":  # weights of this micro-batch: they depend on pi_theta
        w = ratio.detach().clamp(max=1.0 + config.eps_high)
        stats["cispo/weight_mean"] = M.masked_mean(w, loss_mask)
        stats["cispo/ess"] = M.ess(w, loss_mask)
    stats["clip/log_ratio_clamped"] = M.masked_mean((raw.detach().abs() > clamp).float(), loss_mask)
    stats.update(M.mismatch_stats(lp, infer, m))
    if old is not None:
        stats.update(M.mismatch_stats(old, infer, m, prefix="mismatch_old"))
    stats["tokens"] = loss_mask.sum()
    stats["tokens_before_correction"] = m.sum()
    stats["sequences"] = (loss_mask.sum(-1) > 0).sum()
    stats["advantage/mean"] = M.masked_mean(adv, loss_mask)
    stats["advantage/abs_mean"] = M.masked_mean(adv.abs(), loss_mask)
    return LossTerms(pg_loss, regularizer, M.to_floats(stats))
