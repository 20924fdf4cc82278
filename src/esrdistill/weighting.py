"""Soft token weights: how much each response token's loss counts, instead of keeping or dropping it.

`token_weight` is applied after token selection (selection.py): the positions that carry the loss keep it, each
multiplied by a weight. Every rule is a pure function of (B, T) per-token statistics and the (B, T) mask of the
positions that carry the loss, returning (B, T) weights, zero where the mask is:
- none: every weight 1 (the plain loss).
- decay: w_t = decay ** t, t the position's rank among the row's masked positions (0, 1, ...): the simplest soft
  form of ESR's prefix (the first tokens count most; decay=1 is `none`).
- iw_opd: IW-OPD's cumulative-credit weight (arXiv 2606.22600): with a_t = log p_T(y_t) - log p_S(y_t) at the
  sampled token y_t, w_t = 1 + gamma * (1 - sum_{s<t} |a_s| / sum_s |a_s|). A token before most of the row's
  disagreement has accrued weighs up to 1 + gamma; the last ones weigh about 1. Needs the teacher's log-prob of
  each sampled student token (same tokenizer, a served teacher); across tokenizers use iw_opd_kl.
- iw_opd_kl: the same cumulative form with |a_t| replaced by the per-position reverse KL, its expectation over the
  student's sampling: available from every teacher, across tokenizers too.

Normalisation: each row's weights are rescaled to mean 1 over its masked positions (sum = their count), so a
constant per-token loss gives the same batch loss under every rule and loss_norm, and only the weights' shape
within a row changes what is learned. A row with no masked position has all weights 0. Weights carry no gradient.
"""

from __future__ import annotations

import torch

from esrdistill.selection import counted_rank

SIGNALS = {"iw_opd": "sampled_kl", "iw_opd_kl": "reverse_kl"}  # rule -> the per-token statistic it reads
RULES = ("none", "decay") + tuple(SIGNALS)
EPSILON = 1e-8  # IW-OPD's floor on a row's total credit (a row where the student equals the teacher: all weights equal)


def cumulative_credit(credit: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, T) w_t = 1 + gamma * (1 - sum_{s<t} c_s / max(sum_s c_s, EPSILON)) over the masked positions (c >= 0)."""
    counted = mask.bool()
    c = torch.where(counted, credit.double().abs(), torch.zeros((), dtype=torch.float64, device=credit.device))
    before = c.cumsum(-1) - c  # credit strictly before t
    total = c.sum(-1, keepdim=True).clamp(min=EPSILON)
    return 1.0 + gamma * (1.0 - before / total)


def raw_weights(rule: str, mask: torch.Tensor, stats: dict[str, torch.Tensor] | None, gamma: float,
                decay: float) -> torch.Tensor:
    """(B, T) float64 weights of `rule` before normalisation (see the module docstring)."""
    if rule == "none":
        return torch.ones(mask.shape, dtype=torch.float64, device=mask.device)
    if rule == "decay":
        rank = counted_rank(mask).clamp(min=0).double()
        return torch.full_like(rank, float(decay)) ** rank
    if rule in SIGNALS:
        if stats is None or SIGNALS[rule] not in stats:
            raise ValueError(f"token_weight={rule} needs the per-token statistic '{SIGNALS[rule]}'")
        return cumulative_credit(stats[SIGNALS[rule]], mask, gamma)
    raise ValueError(f"unknown token_weight '{rule}'")


def weights(rule: str, mask: torch.Tensor, stats: dict[str, torch.Tensor] | None = None, gamma: float = 0.5,
            decay: float = 0.99) -> torch.Tensor:
    """(B, T) float32 weights of the positions in `mask` under `rule`, each row rescaled to mean 1 over its masked
    positions, 0 elsewhere. stats: the (B, T) statistic SIGNALS names (for iw_opd, iw_opd_kl)."""
    counted = mask.bool()
    with torch.no_grad():
        raw = torch.where(counted, raw_weights(rule, mask, stats, gamma, decay),
                          torch.zeros((), dtype=torch.float64, device=mask.device))
        n = counted.sum(-1, keepdim=True).double()
        scaled = raw * n / raw.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return scaled.float()


def weight_metrics(w: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sums to log where the weight sits: 'weight/position' (sum of w * rank), 'weight/total' (sum of w) and
    'weight/max' (sum over rows of each row's largest weight), 'weight/rows' (rows with a masked position)."""
    counted = mask.bool()
    rank = counted_rank(mask).clamp(min=0).double()
    w = torch.where(counted, w.double(), torch.zeros((), dtype=torch.float64, device=w.device))
    rows = counted.any(-1)
    return {"weight/position": float((w * rank).sum()), "weight/total": float(w.sum()),
            "weight/max": float(w.max(-1).values[rows].sum()), "weight/rows": float(rows.sum())}


def summarise(totals: dict[str, float]) -> dict[str, float]:
    """The logged weight figures from summed `weight_metrics`: weight/mean_position (the weighted mean rank of the
    tokens that carry the loss; select/mean_position's soft counterpart) and weight/max_mean (the mean over rows of
    the largest weight). Empty without a weighting rule."""
    if "weight/total" not in totals:
        return {}
    return {"weight/mean_position": totals["weight/position"] / max(totals["weight/total"], 1e-12),
            "weight/max_mean": totals["weight/max"] / max(totals["weight/rows"], 1)}
