"""Learner diagnostics (docs/alp.md, Metrics): pure, cheap functions on detached tensors.

Every function takes ``(B, T)`` tensors plus a 0/1 ``mask`` and returns a flat ``dict`` of
0-dim tensors keyed ``"group/name"``; `policy_loss` merges them and converts everything to
Python floats with ONE device sync (`to_floats`). A statistic over an empty set is NaN (plots
skip it); the loss itself never is.

Conventions (they match verl's rollout-correction metrics, ``rollout_corr_helper.py``):
- ``q = log pi - log mu`` per token, pi the trainer, mu the inference engine; ``rho = exp(q)``.
- ``k1 = mean_t(log mu - log pi)``, ``k3 = mean_t(exp(q) - q - 1)`` over masked tokens.
- Perplexities are per sequence, then averaged over the sequences that have loss tokens:
  ``training_ppl = mean_i exp(-mean_{t in i} log pi)``, ``rollout_ppl`` the same with mu,
  ``ppl_ratio = mean_i exp(mean_{t in i} log mu - mean_{t in i} log pi)`` (the per-sequence
  training/rollout perplexity ratio), ``log_ppl_abs_diff = mean_i |mean_t log mu - mean_t log pi|``.
- ``chi2_token = mean_t(rho^2) - 1``; ``chi2_seq = mean_i(exp(2 sum_{t in i} q_t)) - 1`` (log
  clamped to +-20 so it stays finite).
- Catastrophic tokens: ``rho < 1/c`` or ``rho > c`` (``c = 1e4`` by default).
- ESS (effective sample size fraction) ``= 1 / mean((w / mean w)^2)`` in (0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = [
    "QUANTILES",
    "SEQ_QUANTILES",
    "masked_mean",
    "masked_quantiles",
    "ratio_stats",
    "seq_log_ratio_stats",
    "clip_fractions",
    "mismatch_stats",
    "ess",
    "weight_stats",
    "truncation_fractions",
    "entropy_stats",
    "sigma_stats",
    "to_floats",
]

QUANTILES: tuple[float, ...] = (0.01, 0.02, 0.05, 0.25, 0.5, 0.75, 0.95, 0.98, 0.99)
"""Quantiles logged for the token ratio (q01 ... q99)."""
SEQ_QUANTILES: tuple[float, ...] = (0.02, 0.05, 0.25, 0.5, 0.75, 0.95, 0.98)
"""Quantiles of the sequence log-ratio; q02/q98 are the paper's P2-P98 envelope."""

_LOG_CLAMP = 20.0
_NAN = float("nan")


def _qname(q: float) -> str:
    return f"q{round(q * 100):02d}"


def masked_quantiles(
    values: torch.Tensor, mask: torch.Tensor | None = None, qs: Sequence[float] = QUANTILES
) -> torch.Tensor:
    """Linear-interpolation quantiles (``torch.quantile``'s default) of ``values[mask > 0]``.

    One sort, no size limit (``torch.quantile`` refuses more than 16M elements). Returns a
    ``(len(qs),)`` float32 tensor, NaN where there are no values.

    >>> masked_quantiles(torch.tensor([4.0, 1.0, 3.0, 2.0]), qs=(0.0, 0.5, 1.0)).tolist()
    [1.0, 2.5, 4.0]
    """
    x = values.detach().float()
    x = x[mask > 0] if mask is not None else x.flatten()
    if x.numel() == 0:
        return torch.full((len(qs),), _NAN, device=values.device)
    x, _ = torch.sort(x)
    pos = torch.tensor(qs, dtype=torch.float32, device=x.device) * (x.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.float()
    return x[lo] + (x[hi] - x[lo]) * frac


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask > 0`` (NaN if empty); junk outside the mask is ignored."""
    n = mask.sum()
    s = torch.where(mask > 0, x, torch.zeros_like(x)).sum()
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, _NAN))


def _masked_extreme(x: torch.Tensor, mask: torch.Tensor, largest: bool) -> torch.Tensor:
    fill = -torch.inf if largest else torch.inf
    y = torch.where(mask > 0, x, torch.full_like(x, fill))
    v = y.max() if largest else y.min()
    return torch.where(mask.sum() > 0, v, torch.full_like(v, _NAN))


def ratio_stats(ratio: torch.Tensor, mask: torch.Tensor, prefix: str = "ratio") -> dict:
    """Quantiles q01..q99, mean, min, max of the ratio actually used, over masked tokens."""
    r = ratio.detach().float()
    out = dict(
        zip((f"{prefix}/{_qname(q)}" for q in QUANTILES), masked_quantiles(r, mask), strict=True)
    )
    out[f"{prefix}/mean"] = masked_mean(r, mask)
    out[f"{prefix}/min"] = _masked_extreme(r, mask, largest=False)
    out[f"{prefix}/max"] = _masked_extreme(r, mask, largest=True)
    return out


def seq_log_ratio_stats(
    log_ratio: torch.Tensor, mask: torch.Tensor, prefix: str = "seq_log_ratio"
) -> dict:
    """Quantiles, mean, min, max of ``S_i = sum_t m_t log_ratio_t`` over sequences with tokens."""
    m = mask.float()
    s = (torch.where(m > 0, log_ratio.detach().float(), torch.zeros_like(m))).sum(-1)
    has = (m.sum(-1) > 0).float()
    out = dict(
        zip(
            (f"{prefix}/{_qname(q)}" for q in SEQ_QUANTILES),
            masked_quantiles(s, has, SEQ_QUANTILES),
            strict=True,
        )
    )
    out[f"{prefix}/mean"] = masked_mean(s, has)
    out[f"{prefix}/min"] = _masked_extreme(s, has, largest=False)
    out[f"{prefix}/max"] = _masked_extreme(s, has, largest=True)
    return out


def clip_fractions(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> dict:
    """Fractions of masked tokens whose gradient the clipping removed.

    lower: ``A < 0`` and ``r < 1 - eps_low``; upper: ``A > 0`` and ``r > 1 + eps_high``;
    dual: ``A < 0`` and ``r > c`` (the dual clip caps the loss at ``-A c``).
    """
    r = ratio.detach().float()
    a = advantages.detach().float().expand_as(r)
    m = mask.float()
    lower = ((a < 0) & (r < 1 - eps_low)).float()
    upper = ((a > 0) & (r > 1 + eps_high)).float()
    dual = ((a < 0) & (r > dual_clip)).float() if dual_clip is not None else torch.zeros_like(r)
    return {
        "clip/lower": masked_mean(lower, m),
        "clip/upper": masked_mean(upper, m),
        "clip/dual": masked_mean(dual, m),
        "clip/total": masked_mean(torch.clamp(lower + upper + dual, max=1.0), m),
    }


def mismatch_stats(
    trainer_logprobs: torch.Tensor,
    infer_logprobs: torch.Tensor,
    mask: torch.Tensor,
    prefix: str = "mismatch",
    catastrophic: float = 1e4,
) -> dict:
    """Trainer-vs-inference divergence of the sampled tokens (formulas in the module docstring).

    Keys (under ``prefix/``): ``k1``, ``k3``, ``training_ppl``, ``rollout_ppl``, ``ppl_ratio``,
    ``log_ppl_diff``, ``log_ppl_abs_diff``, ``chi2_token``, ``chi2_seq``,
    ``catastrophic_token_frac`` (loss tokens with ``rho < 1/catastrophic`` or
    ``rho > catastrophic``) and ``catastrophic_seq_frac`` (sequences with at least one).

    >>> s = to_floats(mismatch_stats(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]]),
    ...                              torch.ones(1, 2)))
    >>> s["mismatch/ppl_ratio"], s["mismatch/chi2_seq"], s["mismatch/catastrophic_token_frac"]
    (1.0, 0.0, 0.0)
    """
    if not catastrophic > 1.0:
        raise ValueError(f"catastrophic={catastrophic!r}: must be > 1 (tokens with rho > it count)")
    m = mask.float()
    lp = torch.where(m > 0, trainer_logprobs.detach().float(), torch.zeros_like(m))
    mu = torch.where(m > 0, infer_logprobs.detach().float(), torch.zeros_like(m))
    q = (lp - mu).clamp(-_LOG_CLAMP, _LOG_CLAMP)
    n_tok = m.sum(-1)
    has = (n_tok > 0).float()
    seq_lp = lp.sum(-1) / n_tok.clamp(min=1.0)  # mean log pi per sequence
    seq_mu = mu.sum(-1) / n_tok.clamp(min=1.0)
    log_ppl_diff = seq_mu - seq_lp  # = log(training_ppl_i / rollout_ppl_i)
    seq_q = (q * m).sum(-1).clamp(-_LOG_CLAMP, _LOG_CLAMP)
    log_c = math.log(catastrophic)
    cata = ((q.abs() > log_c) & (m > 0)).float()
    return {
        f"{prefix}/k1": masked_mean(-q, m),
        f"{prefix}/k3": masked_mean(torch.expm1(q) - q, m),
        f"{prefix}/training_ppl": masked_mean(torch.exp(-seq_lp), has),
        f"{prefix}/rollout_ppl": masked_mean(torch.exp(-seq_mu), has),
        f"{prefix}/ppl_ratio": masked_mean(torch.exp(log_ppl_diff), has),
        f"{prefix}/log_ppl_diff": masked_mean(log_ppl_diff, has),
        f"{prefix}/log_ppl_abs_diff": masked_mean(log_ppl_diff.abs(), has),
        f"{prefix}/chi2_token": masked_mean(torch.exp(2 * q), m) - 1,
        f"{prefix}/chi2_seq": masked_mean(torch.exp(2 * seq_q), has) - 1,
        f"{prefix}/catastrophic_token_frac": masked_mean(cata, m),
        f"{prefix}/catastrophic_seq_frac": masked_mean((cata.sum(-1) > 0).float(), has),
    }


def ess(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised effective sample size ``1 / mean((w / mean w)^2)`` over ``mask > 0`` entries.

    >>> float(ess(torch.tensor([1.0, 1.0, 1.0]), torch.ones(3)))
    1.0
    """
    w = weights.detach().float()
    m = mask.float()
    mean_w = masked_mean(w, m)
    return 1.0 / masked_mean((w / mean_w) ** 2, m)


def weight_stats(
    weights: torch.Tensor,
    weight_mask: torch.Tensor,
    mask_before: torch.Tensor,
    mask_after: torch.Tensor,
    prefix: str = "correction",
    kept_units: torch.Tensor | None = None,
) -> dict:
    """Importance weights of a weighting/rejecting correction, and what its rejection dropped.

    ``weights`` are the effective weights of the sampling units (tokens or sequences; a dropped
    unit weighs 0) over ``weight_mask``; ``kept_units`` marks the units that survived the
    rejection (default: ``weight_mask`` and ``weights > 0``). Keys: ``weight_mean``,
    ``weight_min``, ``weight_max`` and ``ess`` over all units (dropped = 0), quantiles
    ``weight_q01 ... q99`` over the kept units, ``masked_frac`` (fraction of loss tokens dropped)
    and ``seq_dropped_frac`` (fraction of sequences with loss tokens that lost all of them).
    """
    w = weights.detach().float()
    kept = (weight_mask > 0) & (w > 0) if kept_units is None else kept_units > 0
    before = mask_before.float().sum()
    dropped = before - mask_after.float().sum()
    had = (mask_before.float().sum(-1) > 0).float()
    lost = had * (mask_after.float().sum(-1) == 0).float()
    out = {
        f"{prefix}/weight_mean": masked_mean(w, weight_mask),
        f"{prefix}/weight_min": _masked_extreme(w, weight_mask, False),
        f"{prefix}/weight_max": _masked_extreme(w, weight_mask, True),
        f"{prefix}/ess": ess(w, weight_mask),
        f"{prefix}/masked_frac": torch.where(
            before > 0, dropped / before.clamp(min=1), torch.full_like(before, _NAN)
        ),
        f"{prefix}/seq_dropped_frac": masked_mean(lost, had),
    }
    quantiles = masked_quantiles(w, kept.float())
    out.update(
        {f"{prefix}/weight_{_qname(q)}": v for q, v in zip(QUANTILES, quantiles, strict=True)}
    )
    return out


def truncation_fractions(
    ratio: torch.Tensor, mask: torch.Tensor, cap: float | None, prefix: str = "clip"
) -> dict:
    """``clip/*`` for surrogates without the PPO clip: ``upper`` is the fraction of loss tokens
    whose weight the cap truncated (CISPO's ``r > cap``; 0 when ``cap`` is None), the others 0."""
    m = mask.float()
    zero = masked_mean(torch.zeros_like(m), m)
    upper = zero if cap is None else masked_mean((ratio.detach().float() > cap).float(), m)
    return {
        f"{prefix}/lower": zero,
        f"{prefix}/upper": upper,
        f"{prefix}/dual": zero,
        f"{prefix}/total": upper,
    }


def entropy_stats(entropy: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mean per-token entropy (nats) of the trainer policy over masked tokens."""
    return {"entropy": masked_mean(entropy.detach().float(), mask.float())}


def sigma_stats(
    log_sigma: torch.Tensor, layers: Iterable[int] | None = None, prefix: str = "sigma"
) -> dict:
    """Per-layer sigma = exp(s_l), its mean/min/max over layers, and the gradient norm of s.

    ``layers`` names the entries (``sigma/layer_07``); the gradient norm is 0 before backward.
    """
    s = log_sigma.detach().float()
    sig = s.exp()
    names = list(layers) if layers is not None else list(range(s.numel()))
    out = {f"{prefix}/layer_{i:02d}": v for i, v in zip(names, sig.flatten(), strict=True)}
    out[f"{prefix}/mean"] = sig.mean()
    out[f"{prefix}/min"] = sig.min()
    out[f"{prefix}/max"] = sig.max()
    grad = log_sigma.grad
    out[f"{prefix}/grad_norm"] = (
        grad.detach().float().norm() if grad is not None else torch.zeros((), device=s.device)
    )
    return out


def to_floats(metrics: Mapping[str, torch.Tensor | float | int]) -> dict[str, float]:
    """Convert a dict of 0-dim tensors and numbers to floats with a single device sync."""
    keys = list(metrics)
    tensors = [
        v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else None
        for v in metrics.values()
    ]
    present = [t for t in tensors if t is not None]
    device = present[0].device if present else None
    values = iter(torch.stack([t.to(device) for t in present]).tolist() if present else [])
    return {
        k: (next(values) if t is not None else float(v))
        for k, t, v in zip(keys, tensors, metrics.values(), strict=True)
    }
