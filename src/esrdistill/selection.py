"""Token selection: which response tokens carry the loss, at a budget of tokens per trajectory.

`prefix` is ESR itself (generation stops at K: nothing to select). The others apply to full rollouts
and pick `budget` of each trajectory's counted positions:
- by position: prefix_mask (the first), middle (the centre), last, random (uniform, seeded);
- by a per-token signal, highest first: top_reverse_kl, top_forward_kl, top_teacher_entropy,
  top_student_entropy, and the products kl_x_student_entropy, teacher_x_student_entropy,
  kl_x_teacher_x_student_entropy (KL is the reverse KL).

Every rule is a pure function of (B, T) statistics and the (B, T) mask of counted positions, returning
a (B, T) mask. Positions are counted among the counted ones (across tokenizers the mask may have
holes). A trajectory with no more than `budget` counted positions keeps them all; an all-masked one
keeps none. Ties of a signal go to the earlier position. Signals are computed without gradient.
"""

from __future__ import annotations

import torch

POSITIONAL = ("prefix_mask", "random", "middle", "last")
SIGNALS = {
    "top_reverse_kl": ("reverse_kl",),
    "top_forward_kl": ("forward_kl",),
    "top_teacher_entropy": ("teacher_entropy",),
    "top_student_entropy": ("student_entropy",),
    "kl_x_student_entropy": ("reverse_kl", "student_entropy"),
    "teacher_x_student_entropy": ("teacher_entropy", "student_entropy"),
    "kl_x_teacher_x_student_entropy": ("reverse_kl", "teacher_entropy", "student_entropy"),
}
RULES = ("prefix",) + POSITIONAL + tuple(SIGNALS)


def counted_rank(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) rank of each counted position among the counted ones of its row (0, 1, ...)."""
    counted = mask.bool()
    return torch.where(counted, counted.long().cumsum(-1) - 1, torch.full_like(mask, -1, dtype=torch.long))


def _by_rank(mask: torch.Tensor, start: torch.Tensor, budget: int) -> torch.Tensor:
    rank = counted_rank(mask)
    return (rank >= start[:, None]) & (rank < start[:, None] + budget)


def select(rule: str, mask: torch.Tensor, budget: int, stats: dict[str, torch.Tensor] | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T) mask of the positions that carry the loss under `rule` (see the module docstring).

    mask: (B, T) counted positions. budget: positions per trajectory. stats: (B, T) signals named in
    SIGNALS (for the top_* and product rules). generator: for `random`.
    """
    counted = mask.bool()
    n = counted.sum(-1)  # (B,)
    if rule == "prefix":
        return counted
    if rule == "prefix_mask":
        return _by_rank(mask, torch.zeros_like(n), budget) & counted
    if rule == "last":
        return _by_rank(mask, (n - budget).clamp(min=0), budget) & counted
    if rule == "middle":
        return _by_rank(mask, ((n - budget) // 2).clamp(min=0), budget) & counted
    if rule == "random":
        noise = torch.rand(mask.shape, generator=generator, device=generator.device if generator else mask.device)
        score = torch.where(counted, noise.to(mask.device), torch.full_like(noise.to(mask.device), -1.0))
        return _top(score, counted, budget)
    if rule in SIGNALS:
        if stats is None:
            raise ValueError(f"token_select={rule} needs the per-token statistics {SIGNALS[rule]}")
        score = torch.ones(mask.shape, dtype=torch.float64, device=mask.device)
        for name in SIGNALS[rule]:
            score = score * stats[name].double()
        return _top(score, counted, budget)
    raise ValueError(f"unknown token_select '{rule}'")


def _top(score: torch.Tensor, counted: torch.Tensor, budget: int) -> torch.Tensor:
    """The `budget` highest-scoring counted positions of each row; ties go to the earlier position."""
    score = torch.where(counted, score, torch.full_like(score, float("-inf")))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # stable: earlier first among ties
    chosen = torch.zeros_like(counted)
    take = min(budget, score.shape[-1])
    chosen.scatter_(-1, order[:, :take], True)
    return chosen & counted


def selected_count(mask: torch.Tensor, rule: str, budget: int) -> torch.Tensor:
    """(B,) how many positions each trajectory contributes, known before any statistic is computed."""
    n = mask.bool().sum(-1)
    return n if rule == "prefix" else n.clamp(max=budget)


def selection_metrics(selected: torch.Tensor, mask: torch.Tensor, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sums to log what was selected: positions, counts, and the signals on selected against unselected tokens.

    Returns sums over the micro-batch, keyed so that the training loop can divide them by counts:
    'select/position' (sum of counted ranks), 'select/n', 'select/n_counted', and for each signal
    'select/<name>_in' and 'select/<name>_out' (sums over selected and unselected counted tokens).
    """
    counted = mask.bool()
    chosen = selected.bool() & counted
    rest = counted & ~chosen
    out = {"select/position": float(counted_rank(mask)[chosen].sum()), "select/n": float(chosen.sum()),
           "select/n_counted": float(counted.sum())}
    for name, values in stats.items():
        out[f"select/{name}_in"] = float(values[chosen].sum())
        out[f"select/{name}_out"] = float(values[rest].sum())
    return out


def summarise(totals: dict[str, float]) -> dict[str, float]:
    """The logged selection figures from summed `selection_metrics`: select/mean_position,
    select/frac_selected, and select/<signal>_selected / _unselected (means). Empty without a selection."""
    if "select/n" not in totals:
        return {}
    n, counted = totals["select/n"], totals["select/n_counted"]
    out = {"select/mean_position": totals["select/position"] / max(n, 1), "select/frac_selected": n / max(counted, 1)}
    for key, value in totals.items():
        if key.endswith("_in"):
            name = key[len("select/"): -len("_in")]
            out[f"select/{name}_selected"] = value / max(n, 1)
            out[f"select/{name}_unselected"] = totals[f"select/{name}_out"] / max(counted - n, 1)
    return out
