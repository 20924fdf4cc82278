"""rollout_tokens=adaptive: K from the logged history by the stated rule, the window tail's KL against a naive sum,
and a run whose K is the rule's, which resumes bit-identically."""

import json
import math
from contextlib import nullcontext

import pytest
import torch

from esrdistill import horizon, objective, rollout, tracking
from esrdistill.config import ConfigError, make_config
from esrdistill.horizon import Adaptive, adaptive_k
from esrdistill.teachers.protocol import LossSettings
from esrdistill.teachers.same import SameTokenizer
from helpers import make_model, make_tokenizer, tiny_overrides, train_interrupted_then_resumed
from test_objective import PAD, _batch

RULE = Adaptive(k_min=8, k_max=40, kl_drop=0.5, patience=2, growth=2.0)


def test_k_starts_at_the_minimum_and_grows_after_patience_learned_steps():
    assert adaptive_k([], RULE) == 8
    # step 1 sets the reference 1.0; step 2 (0.6) is not learned; steps 3, 4 (0.5, 0.4) are: K grows after step 4
    history = [(8, 1.0), (8, 0.6), (8, 0.5)]
    assert adaptive_k(history, RULE) == 8
    assert adaptive_k(history + [(8, 0.4)], RULE) == 16
    # at K=16 a new reference (2.0) is set by its first step; learned steps must be in a row
    history += [(8, 0.4), (16, 2.0), (16, 0.9), (16, 1.5), (16, 1.0)]
    assert adaptive_k(history, RULE) == 16
    assert adaptive_k(history + [(16, 0.3)], RULE) == 32
    # ceil(32 * 2) = 64 is capped at max_new_tokens = 40, and K stays there
    capped = history + [(16, 0.3), (32, 1.0), (32, 0.1), (32, 0.1)]
    assert adaptive_k(capped, RULE) == 40
    assert adaptive_k(capped + [(40, 1.0), (40, 0.1), (40, 0.1), (40, 0.1)], RULE) == 40


def test_a_step_with_no_tail_position_counts_as_learned_and_can_set_no_reference():
    assert adaptive_k([(8, None), (8, None)], RULE) == 16  # every rollout ended before the tail: K no longer binds
    assert adaptive_k([(8, None), (8, 1.0), (8, 0.2)], RULE) == 8  # the first real figure becomes the reference
    assert adaptive_k([(8, None), (8, 1.0), (8, 0.2), (8, None)], RULE) == 16
    assert adaptive_k([(8, 1.0), (8, 0.0), (8, 0.0)], Adaptive(k_min=8, k_max=40, growth=1.01)) == 9  # ceil(8.08)
    nan = float("nan")
    assert adaptive_k([(8, nan), (8, 1.0), (8, 0.1), (8, nan), (8, 0.1)], RULE) == 8  # a skipped step breaks the run
    assert adaptive_k([(8, nan), (8, 1.0), (8, 0.1), (8, nan), (8, 0.1), (8, 0.1)], RULE) == 16


def test_a_peak_reference_measures_learning_from_the_largest_tail_kl_at_this_k():
    peak = Adaptive(k_min=8, k_max=40, kl_drop=0.5, patience=2, growth=2.0, reference="peak")
    # the study's failure: the tail KL rises after K is set (0.25 -> 1.2) and comes back only to 0.24
    history = [(8, 0.25), (8, 0.7), (8, 1.2), (8, 0.9), (8, 0.24), (8, 0.22)]
    assert adaptive_k(history, RULE) == 8  # never half of the first figure, 0.25: K stays
    assert adaptive_k(history, peak) == 16  # half of the peak, 1.2, twice in a row: K grows
    assert adaptive_k(history[:5], peak) == 8  # one learned step is not patience=2
    # a falling KL: the peak is the first figure, and both references give the same K
    falling = [(8, 1.0), (8, 0.6), (8, 0.5), (8, 0.4), (16, 2.0), (16, 0.9), (16, 0.8)]
    assert adaptive_k(falling, peak) == adaptive_k(falling, RULE) == 32
    # a new peak breaks a run of learned steps; a skipped step's figure is no peak
    assert adaptive_k([(8, 1.0), (8, 0.4), (8, 3.0), (8, 1.4)], peak) == 8
    assert adaptive_k([(8, 1.0), (8, float("nan")), (8, 0.4), (8, 0.4)], peak) == 16


def naive_k(history, rule):
    """The rule step by step as the docs state it: a reference per K (its first figure, or the largest so far with
    reference=peak), a run of learned steps, growth."""
    ks = [rule.k_min]
    for step in range(len(history)):
        k = ks[-1]
        at_k = [tail for used, tail in history[: step + 1] if used == k]
        first = next((i for i, tail in enumerate(at_k) if tail is not None and math.isfinite(tail)), None)
        after_reference = at_k if first is None else at_k[first + 1:]
        run = 0
        for i, tail in enumerate(after_reference):
            if tail is not None and not math.isfinite(tail):
                run = 0
                continue
            if tail is None:
                run += 1
                continue
            so_far = [t for t in at_k[: first + 2 + i] if t is not None and math.isfinite(t)]  # up to this step
            reference = max(so_far) if rule.reference == "peak" else at_k[first]
            run = run + 1 if tail <= rule.kl_drop * reference else 0
        grow = run >= rule.patience and k < rule.k_max
        ks.append(min(rule.k_max, math.ceil(k * rule.growth)) if grow else k)
    return ks


@pytest.mark.parametrize("reference", ["first", "peak"])
@pytest.mark.parametrize("seed", range(5))
def test_the_rule_matches_a_naive_replay_on_random_histories(seed, reference):
    g = torch.Generator().manual_seed(seed)
    rule = Adaptive(k_min=4, k_max=50, kl_drop=0.6, patience=1 + seed % 3, growth=1.5, reference=reference)
    history, expected = [], [rule.k_min]
    for step in range(40):  # each step at the K the naive replay gives; the KL falls as a run's would, with noise
        k = naive_k(history, rule)[-1]
        tail = None if torch.rand(1, generator=g).item() < 0.1 else torch.rand(1, generator=g).item() * 0.9 ** step
        history.append((k, tail))
        assert adaptive_k(history, rule) == naive_k(history, rule)[-1]
        expected.append(adaptive_k(history, rule))
    assert expected == sorted(expected) and expected[-1] > rule.k_min  # it never shrinks, and grew


def test_a_history_from_other_settings_is_refused():
    with pytest.raises(ValueError, match="step 2 ran with K=16 where rollout_tokens=adaptive gives K=8"):
        adaptive_k([(8, 1.0), (16, 1.0)], RULE)


@pytest.mark.parametrize("k, start", [(1, 0), (4, 3), (10, 7), (16, 12), (100, 75)])
def test_the_tail_is_the_last_quarter_of_the_window(k, start):
    assert horizon.tail_start(k) == start


@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_the_tail_kl_is_the_reverse_kl_summed_past_the_tail_start(chunk):
    tok = make_tokenizer()
    student, teacher = make_model(len(tok), 1), make_model(len(tok), 2)
    scorer = SameTokenizer(teacher, PAD, len(tok), 2, LossSettings(loss_chunk=chunk))
    prompts, responses, mask = _batch()
    scores = scorer.score(scorer.plan(prompts, responses, mask), [0, 1, 2], responses.shape[1], hidden=chunk > 0)
    _, sums = objective.micro_batch_loss(objective.Student(student, PAD, len(tok), nullcontext), scorer, scores,
                                         rollout.Rollouts(prompts, responses, mask), scorer.settings, 3, tail_from=4)
    with torch.no_grad():
        s = torch.log_softmax(rollout.response_logits(student, prompts, responses, mask, PAD).double(), -1)
        t = torch.log_softmax(rollout.response_logits(teacher, prompts, responses, mask, PAD).double(), -1)
        kl = (s.exp() * (s - t)).sum(-1)
    expected = sum(kl[b, p].item() for b in range(3) for p in range(4, 8) if mask[b, p])
    assert sums["window/tail_n"] == sum(1 for b in range(3) for p in range(4, 8) if mask[b, p]) == 6
    assert sums["window/tail_kl"] == pytest.approx(expected, rel=1e-4)


def test_adaptive_settings_are_checked():
    for values, message in (
            ({"rollout_tokens": "adaptive", "rollout_tokens_schedule": "progressive"}, "chooses K itself"),
            ({"rollout_tokens": "adaptive", "rollout_tokens_min": 0}, "rollout_tokens_min must be between 1 and"),
            ({"rollout_tokens": "adaptive", "rollout_tokens_min": 2000}, "max_new_tokens=1024"),
            ({"rollout_tokens": "adaptive", "adaptive_kl_drop": 1}, "adaptive_kl_drop must be strictly between 0 and 1"),
            ({"rollout_tokens": "adaptive", "adaptive_patience": 0}, "adaptive_patience must be >= 1"),
            ({"rollout_tokens": "adaptive", "adaptive_growth": 1}, "adaptive_growth must be > 1"),
            ({"rollout_tokens": "adaptive", "adaptive_reference": "last"}, "adaptive_reference must be first or peak"),
            ({"rollout_tokens": "adaptive", "token_select": "top_reverse_kl"}, "picks tokens of full rollouts"),
            ({"rollout_tokens": "sometimes"}, "rollout_tokens")):
        with pytest.raises(ConfigError, match=message):
            make_config(values)
    assert make_config({"rollout_tokens": "Adaptive"}).rollout_tokens == "adaptive"


@pytest.mark.parametrize("reference", ["first", "peak"])
def test_an_adaptive_run_uses_the_rules_k_logs_its_figures_and_resumes_bit_identically(tiny_dirs, tmp_path, monkeypatch, reference):
    from transformers import AutoModelForCausalLM

    from esrdistill.train import train

    student, teacher = tiny_dirs
    common = dict(steps=6, lora_r=0, lr=3e-2, temperature=1.0, rollout_tokens="adaptive", rollout_tokens_min=3,
                  max_new_tokens=12, adaptive_patience=1, adaptive_kl_drop=0.99, save_every=0,
                  adaptive_reference=reference)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_config(tiny_overrides(student, teacher, straight, **common)))
    metrics = tracking.read_metrics(straight)
    rule = Adaptive(k_min=3, k_max=12, kl_drop=0.99, patience=1, reference=reference)
    history = horizon.history(metrics, 6)
    assert [k for k, _ in history] == [adaptive_k(history[:s], rule) for s in range(6)]  # each step's K is the rule's
    assert history[0][0] == 3 and all(m["rollout/len_mean"] <= m["rollout/k"] for m in metrics)
    assert all(m["rollout/k_tail_n"] >= 0 and m["rollout/k_tail_kl"] >= 0 for m in metrics)

    train_interrupted_then_resumed(tiny_overrides(student, teacher, resumed, **common), 3, monkeypatch)
    assert [m["rollout/k"] for m in tracking.read_metrics(resumed)] == [m["rollout/k"] for m in metrics]
    assert [m["loss"] for m in tracking.read_metrics(resumed)] == [m["loss"] for m in metrics]
    a, b = (AutoModelForCausalLM.from_pretrained(run / "final").state_dict() for run in (straight, resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resuming_without_the_steps_metrics_is_a_clear_error(tiny_dirs, tmp_path, monkeypatch, capsys):
    from esrdistill import cli

    student, teacher = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=3, save_every=1, rollout_tokens="adaptive", rollout_tokens_min=4)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    assert cli.main(["train", *args]) == 0
    (run / "metrics.jsonl").write_text("")  # the record lost, the checkpoint kept
    assert cli.main(["train", *args, "resume=true"]) == 1
    assert "rollout_tokens=adaptive cannot resume from step 3: the metrics of step 1" in capsys.readouterr().err
