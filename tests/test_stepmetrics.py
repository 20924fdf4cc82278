"""What a step logs and warns about (stepmetrics.py): the warnings' thresholds, and per-position means over
every counted position."""

import pytest

from esrdistill import tracking
from esrdistill.config import make_config
from esrdistill.train import train
from helpers import tiny_overrides


def test_a_student_stuck_away_from_the_teachers_choice_is_warned_about_once():
    from esrdistill.stepmetrics import step_warnings as _warnings

    cfg = make_config({})
    warned: set = set()
    stuck = [0.05] * 9
    assert _warnings(cfg, 9, {}, stuck, warned) == []  # too early to say
    said = _warnings(cfg, 10, {}, stuck + [0.05], warned)
    assert len(said) == 1 and "agree/teacher_top1_missed" in said[0] and "loss=forward_kl" in said[0]
    assert _warnings(cfg, 11, {}, stuck + [0.05, 0.05], warned) == []  # once
    assert _warnings(cfg, 10, {}, [0.2] * 5 + [0.05] * 5, set()) == []  # falling: it is learning
    assert _warnings(cfg, 10, {}, [0.01] * 10, set()) == []  # rare
    assert _warnings(make_config({"loss": "forward_kl"}), 10, {}, [0.05] * 10, set()) == []


def test_a_low_share_of_aligned_positions_is_warned_about_once():
    from esrdistill.stepmetrics import step_warnings as _warnings

    cfg, warned = make_config({}), set()
    assert _warnings(cfg, 1, {"xtok/aligned_frac": 0.62}, [], warned) == []
    said = _warnings(cfg, 2, {"xtok/aligned_frac": 0.11}, [], warned)
    assert len(said) == 1 and "11.0%" in said[0] and "xtok/aligned_frac" in said[0]
    assert _warnings(cfg, 3, {"xtok/aligned_frac": 0.11}, [], warned) == []  # once


def test_per_position_metrics_average_over_every_counted_position_selected_or_not(tiny_dirs, tmp_path):
    """With token selection, kl/reverse is the mean over all the counted positions (what _step_metrics
    says), not over the ones that carry the loss: the selected and unselected means, weighted."""
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    train(make_config(tiny_overrides(student, teacher, run, steps=2, rollout_tokens=None, max_new_tokens=10, min_new_tokens=10,
                                     token_select="top_reverse_kl", select_tokens=3)))
    for m in tracking.read_metrics(run):
        share = m["select/frac_selected"]
        assert 0 < share < 1
        mixed = share * m["select/reverse_kl_selected"] + (1 - share) * m["select/reverse_kl_unselected"]
        assert m["kl/reverse"] == pytest.approx(mixed, rel=1e-5)
