import itertools
import math

import pytest

from esrdistill.evalstats import majority_vote, mean_interval, ngram_repetition, pass_at_k, wilson_interval
from esrdistill.evaluate import ProblemResult, summarise


def problem(correct, answers, majority_correct, lengths=None, ended=None, markers=None):
    n = len(correct)
    return ProblemResult(
        prompt="?", reference="1", responses=[""] * n, answers=answers, correct=correct,
        lengths=lengths or [10] * n, ended=ended or [True] * n, repeats=[0.0] * n, markers=markers or [1] * n,
        majority=majority_vote(answers), majority_correct=majority_correct,
    )


def test_avg_maj_pass_on_constructed_samples():
    problems = [
        problem([True, False, False, False], ["1", "2", "2", "3"], False),  # pass, majority wrong
        problem([True, True, True, False], ["1", "1", "1", "4"], True),  # pass, majority right
        problem([False] * 4, ["5", None, "5", "6"], False),  # fails
    ]
    result = summarise(problems, temperature=0.7)
    assert result.accuracy == pytest.approx((0.25 + 0.75 + 0.0) / 3)
    assert result.pass_at_n == pytest.approx(2 / 3)
    assert result.maj_at_n == pytest.approx(1 / 3)
    assert result.samples_per_problem == 4 and result.n_problems == 3
    assert result.accuracy_ci[0] <= result.accuracy <= result.accuracy_ci[1]


def test_repetition_statistics():
    problems = [problem([True, True], ["1", "1"], True, lengths=[10, 30], ended=[True, False], markers=[1, 5])]
    result = summarise(problems, temperature=0.7)
    assert result.len_mean == 20 and result.cut_frac == 0.5 and result.repeated_answer_frac == 0.5


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_vote(["2", None, None, "3", "3"]) == "3"
    assert majority_vote(["2", "3"]) == "2"
    assert majority_vote([" 1/2", "1/2 ", "3"]) == " 1/2"
    assert majority_vote([None, None]) is None


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 0, 2), (6, 6, 1), (5, 4, 2)]:
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_wilson_interval_known_values_and_edges():
    lo, hi = wilson_interval(70, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.604, 0.781)
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(100, 100)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_mean_interval_uses_the_spread_of_per_problem_scores():
    values = [0.25, 0.75, 0.5, 0.5]
    lo, hi = mean_interval(values)
    half = 1.959964 * math.sqrt(sum((v - 0.5) ** 2 for v in values) / 3 / 4)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert mean_interval([1.0, 0.0, 1.0]) == wilson_interval(2, 3)


def test_ngram_repetition():
    assert ngram_repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert ngram_repetition([1, 2, 3, 4] * 4) == pytest.approx(1 - 4 / 13)
    assert ngram_repetition([1, 2]) == 0.0
