"""Pure statistics of an evaluation: intervals, avg/maj/pass@n, repetition measures."""

from __future__ import annotations

import math
from collections import Counter
from math import comb

Z95 = 1.959964


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """95% normal interval of the mean of per-problem scores in [0, 1] (clipped to [0, 1]).

    With one sample per problem the scores are 0/1 and the Wilson interval is used instead.
    """
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    if all(v in (0.0, 1.0) for v in values):
        return wilson_interval(int(sum(values)), n, z)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return (max(0.0, mean - half), min(1.0, mean + half))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def normalise_answer(answer: str) -> str:
    """Key for voting: whitespace and surrounding $ removed, so '1/2' and ' 1/2 ' vote together."""
    return "".join(answer.split()).strip("$")


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent extracted answer (None = no answer, never voted for); ties go to the
    answer seen first. Returns one of the original strings."""
    keyed = [(normalise_answer(a), a) for a in answers if a is not None]
    if not keyed:
        return None
    counts = Counter(key for key, _ in keyed)
    best = max(counts.values())
    return next(original for key, original in keyed if counts[key] == best)


def ngram_repetition(tokens: list[int], n: int = 4) -> float:
    """Fraction of a sequence's n-grams that repeat an earlier one: 0 = none, near 1 = a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
