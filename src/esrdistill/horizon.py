"""rollout_tokens=adaptive: ESR's K chosen during training from what the run measures on its own rollouts.

The rule (a signal-driven form of TOPD's progressive horizon, arXiv 2605.31490, and of ADWIN's online choice of
the horizon, arXiv 2605.28396; neither paper's exact procedure, which needs full-rollout probes):
- K starts at `rollout_tokens_min`.
- Every step logs `rollout/k_tail_kl`: the mean reverse KL over the window's tail, the counted positions in the
  last quarter of the current window, [K - ceil(K / 4), K). The first step at a K sets the reference r.
- A later step at the same K whose tail KL is at most `adaptive_kl_drop` * r counts as "learned"; after
  `adaptive_patience` such steps in a row, K grows to min(max_new_tokens, ceil(K * adaptive_growth)) and the
  next step sets a new reference. K never shrinks.
- `adaptive_reference=peak` takes as r the largest tail KL at this K so far instead of the first: learning a prefix
  first pushes the positions at its end away from the teacher (the diagnostics' cascading alignment), so the
  tail KL often rises after K is set and comes back down; "learned" is then measured from that peak. A step whose tail holds no counted position (every rollout
  ended before it: K no longer binds) counts as learned; one whose tail KL is not finite (a skipped step) sets no
  reference and breaks the run of learned steps.

So the student works on a short prefix until it has roughly halved its disagreement with the teacher at the
prefix's end, then the window moves out. K of the next step is a pure function of the (K, tail KL) of the steps
before it (`adaptive_k`), which the run logs in metrics.jsonl: a resumed run recomputes it from there and
draws the same K, and every process computes the same K from the same reduced figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Adaptive:
    """The rule's settings (build.adaptive from the config's keys of the same names)."""

    k_min: int = 16  # rollout_tokens_min: K at the first step
    k_max: int = 1024  # max_new_tokens: K never grows past it
    kl_drop: float = 0.5  # adaptive_kl_drop: a step is "learned" when its tail KL <= kl_drop * the reference
    patience: int = 2  # adaptive_patience: learned steps in a row before K grows
    growth: float = 2.0  # adaptive_growth: K -> ceil(K * growth)
    reference: str = "first"  # adaptive_reference: first (the first figure at a K) or peak (the largest so far at it)


def tail_start(k: int) -> int:
    """The first position of the window's tail: the last quarter of [0, k), at least one position."""
    return k - math.ceil(k / 4)


def adaptive_k(history: list[tuple[int, float | None]], rule: Adaptive) -> int:
    """K of the next step from the (K, tail KL) of every step before it, in order (tail KL None: no tail position).

    Raises ValueError when a step's K is not the one this rule gave it (a history from other settings)."""
    k, reference, learned = min(rule.k_min, rule.k_max), None, 0
    for step, (used, tail) in enumerate(history):
        if used != k:
            raise ValueError(f"step {step + 1} ran with K={used} where rollout_tokens=adaptive gives K={k}: the run's "
                             "metrics.jsonl comes from other settings")
        if tail is not None and not math.isfinite(tail):  # a skipped step's figure: no reference, breaks the run
            learned = 0
            continue
        if tail is not None and reference is None:  # the first figure at this K: the reference, not a learned step
            reference, learned = tail, 0
            continue
        if tail is not None and rule.reference == "peak":
            reference = max(reference, tail)
        learned = learned + 1 if tail is None or tail <= rule.kl_drop * reference else 0
        if learned >= rule.patience and k < rule.k_max:
            k, reference, learned = min(rule.k_max, math.ceil(k * rule.growth)), None, 0
    return k


def observed(metrics: dict) -> tuple[int, float | None]:
    """One step's (K, tail KL) from its logged metrics (None: the tail held no counted position)."""
    return int(metrics["rollout/k"]), (metrics["rollout/k_tail_kl"] if metrics["rollout/k_tail_n"] else None)


def history(rows: list[dict], steps: int) -> list[tuple[int, float | None]]:
    """The (K, tail KL) of steps 1..steps from their logged metrics rows. Raises ValueError when a step is missing or
    was logged without the adaptive rule's figures."""
    by_step = {row.get("step"): row for row in rows}
    missing = [s for s in range(1, steps + 1) if "rollout/k_tail_n" not in by_step.get(s, {})]
    if missing:
        raise ValueError(f"the metrics of step {missing[0]} ({len(missing)} steps in all) are missing or were not "
                         "logged under rollout_tokens=adaptive")
    return [observed(by_step[s]) for s in range(1, steps + 1)]
