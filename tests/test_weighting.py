"""Soft token weights against a naive version written with Python loops; the weighted loss against one computed by
hand; the chunked loss equal to the whole one under every rule; a teacher that cannot serve a rule refused."""

import dataclasses
import math
from contextlib import nullcontext

import pytest
import torch

from esrdistill import config_window, losses, objective, rollout, weighting
from esrdistill.teachers.protocol import LossSettings
from esrdistill.teachers.same import SameTokenizer
from helpers import make_model, make_tokenizer
from test_objective import PAD, _batch, _loss_and_grads, assert_same_loss


def naive_weights(rule, mask, stats, gamma, decay):
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        counted = [t for t in range(T) if mask[b, t]]
        raw = {}
        if rule in ("iw_opd", "iw_opd_kl"):
            credit = {t: abs(stats[weighting.SIGNALS[rule]][b, t].item()) for t in counted}
            total = max(sum(credit.values()), weighting.EPSILON)
        for i, t in enumerate(counted):
            if rule == "none":
                raw[t] = 1.0
            elif rule == "decay":
                raw[t] = decay ** i
            else:
                before = sum(credit[s] for s in counted if s < t)
                raw[t] = 1.0 + gamma * (1.0 - before / total)
        scale = len(counted) / sum(raw.values()) if counted else 0.0
        for t in counted:
            out[b, t] = raw[t] * scale
    return out


def random_case(seed, B=6, T=12):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()  # holes, as across tokenizers
    mask[0] = 0  # an all-masked row
    mask[1, 2:] = 0  # a two-token row
    mask[2, :] = 0
    mask[2, 5] = 1  # a one-token row
    stats = {"sampled_kl": torch.randn(B, T, generator=g).double(),  # a_t of either sign
             "reverse_kl": torch.rand(B, T, generator=g).double()}
    stats["sampled_kl"][3] = 0.0  # a row where the student equals the teacher: no credit anywhere
    return mask, stats


@pytest.mark.parametrize("rule", weighting.RULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma, decay", [(0.5, 0.99), (2.0, 0.5), (0.0, 1.0)])
def test_every_rule_matches_the_naive_version(rule, seed, gamma, decay):
    mask, stats = random_case(seed)
    got = weighting.weights(rule, mask, stats, gamma, decay)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), naive_weights(rule, mask, stats, gamma, decay), atol=1e-6)


@pytest.mark.parametrize("rule", weighting.RULES)
def test_each_row_weighs_its_masked_positions_one_on_average_and_nothing_else(rule):
    mask, stats = random_case(3)
    w = weighting.weights(rule, mask, stats, 1.0, 0.8)
    assert (w[mask == 0] == 0).all() and (w[mask == 1] > 0).all()
    n = mask.sum(-1)
    assert torch.allclose(w.sum(-1), n, atol=1e-5)  # so a constant per-token loss keeps its value under every rule
    per_token = 2.5 * mask
    for norm, denominator in (("trajectory", mask.shape[0]), ("token", float(n.sum()))):
        plain = losses.reduce_loss(per_token, mask, norm, denominator)
        assert losses.reduce_loss(per_token * w, mask, norm, denominator).item() == pytest.approx(plain.item(), rel=1e-6)


def test_iw_opd_weighs_the_tokens_before_the_disagreement_accrues_up_to_one_plus_gamma():
    mask = torch.ones(1, 4)
    a = torch.tensor([[0.0, 2.0, 0.0, 2.0]])  # half the credit at position 1, half at position 3
    raw = weighting.raw_weights("iw_opd", mask, {"sampled_kl": a}, 0.5, 0.99)
    assert raw.tolist() == [[1.5, 1.5, 1.25, 1.25]]
    w = weighting.weights("iw_opd", mask, {"sampled_kl": a}, 0.5)
    assert w[0].tolist() == pytest.approx([1.5 / 1.375, 1.5 / 1.375, 1.25 / 1.375, 1.25 / 1.375])
    assert torch.equal(weighting.weights("iw_opd", mask, {"sampled_kl": a}, 0.0), torch.ones(1, 4))  # gamma 0: plain


@pytest.mark.parametrize("rule", ["decay", "iw_opd", "iw_opd_kl"])
def test_the_weights_never_grow_along_a_row(rule):
    mask, stats = random_case(4)
    w = weighting.weights(rule, mask, stats, 0.5, 0.9)
    for b in range(mask.shape[0]):
        kept = w[b][mask[b] == 1]
        assert (kept[1:] <= kept[:-1] + 1e-7).all()


def test_decay_counts_ranks_among_the_masked_positions():
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert weighting.raw_weights("decay", mask, None, 0.5, 0.5)[0, [0, 2, 3]].tolist() == [1.0, 0.5, 0.25]


def test_signal_rules_need_their_statistic_and_names_are_checked():
    with pytest.raises(ValueError, match="needs the per-token statistic 'sampled_kl'"):
        weighting.weights("iw_opd", torch.ones(1, 3), {"reverse_kl": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="unknown token_weight 'nope'"):
        weighting.weights("nope", torch.ones(1, 3))
    assert config_window.WEIGHT_RULES == weighting.RULES


def test_weight_metrics_say_where_the_weight_sits():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    w = weighting.weights("decay", mask, None, decay=0.5)  # raw 1, 0.5, 0.25 -> x 3 / 1.75
    sums = weighting.weight_metrics(w, mask)
    out = weighting.summarise(sums)
    assert out["weight/mean_position"] == pytest.approx((0.5 * 1 + 0.25 * 2) / 1.75)
    assert out["weight/max_mean"] == pytest.approx(3 / 1.75)  # the empty row is not a row
    assert weighting.summarise({"loss": 1.0}) == {}


def _scorer(loss="reverse_kl", **settings):
    tok = make_tokenizer()
    student, teacher = make_model(len(tok), 1), make_model(len(tok), 2)
    return student, SameTokenizer(teacher, PAD, len(tok), 2, LossSettings(loss=loss, temperature=0.7, top_p=0.9, **settings))


@pytest.mark.parametrize("rule", ["decay", "iw_opd", "iw_opd_kl"])
@pytest.mark.parametrize("norm", ["trajectory", "token"])
def test_the_weighted_loss_is_the_per_token_loss_times_the_naive_weights(rule, norm):
    student, scorer = _scorer(token_weight=rule, token_weight_gamma=0.7, token_weight_decay=0.8)
    prompts, responses, mask = _batch()
    plan = scorer.plan(prompts, responses, mask)
    scores = scorer.score(plan, [0, 1, 2], responses.shape[1])
    denominator = 3 if norm == "trajectory" else float(mask.sum())
    settings = dataclasses.replace(scorer.settings, loss_norm=norm)
    got, sums = objective.micro_batch_loss(objective.Student(student, PAD, scorer.vocab_size, nullcontext), scorer, scores,
                                           rollout.Rollouts(prompts, responses, mask), settings, denominator)
    with torch.no_grad():  # by hand, in float64: the student's log-probs, the KL per token, the naive weights
        logits = rollout.response_logits(student, prompts, responses, mask, PAD).double()
        s_logp, t_logp = torch.log_softmax(logits, -1), scores.logp.double()
        token = responses.unsqueeze(-1)
        stats = {"sampled_kl": (s_logp.gather(-1, token) - t_logp.gather(-1, token)).squeeze(-1) * mask,
                 "reverse_kl": (s_logp.exp() * (s_logp - t_logp)).sum(-1) * mask}
        w = naive_weights(rule, mask, stats, 0.7, 0.8)
        per_token = stats["reverse_kl"] * w
        if norm == "trajectory":
            expected = sum(per_token[b].sum() / mask[b].sum() for b in range(3)) / 3
        else:
            expected = per_token.sum() / mask.sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sums["weight/total"] == pytest.approx(float(mask.sum()), rel=1e-6)


@pytest.mark.parametrize("rule", ["decay", "iw_opd", "iw_opd_kl"])
@pytest.mark.parametrize("select", [{}, {"token_select": "top_reverse_kl", "select_tokens": 3},
                                    {"token_select": "prefix_mask", "select_tokens": 4}])
def test_chunked_weighted_loss_equals_the_whole_one(rule, select):
    student, scorer = _scorer(token_weight=rule, **select)
    prompts, responses, mask = _batch()
    whole = _loss_and_grads(student, scorer, 0, "trajectory", prompts, responses, mask)
    unweighted = _loss_and_grads(student, _scorer(**select)[1], 0, "trajectory", prompts, responses, mask)
    assert not math.isclose(whole[0], unweighted[0], rel_tol=1e-4)  # the weights change the loss
    for chunk in (1, 3):
        assert_same_loss(_loss_and_grads(student, scorer, chunk, "trajectory", prompts, responses, mask), whole)


def test_a_teacher_without_the_sampled_tokens_log_prob_is_refused_for_iw_opd():
    from esrdistill import build
    from esrdistill.config import ConfigError, make_config

    class Cross:
        kind = "cross"
        metric_keys = ("kl/reverse", "kl/forward", "teacher/entropy", "student/entropy")

    with pytest.raises(ConfigError, match="token_weight=iw_opd reads each sampled token's log-prob.*use token_weight=iw_opd_kl"):
        build.weighable(make_config({"token_weight": "iw_opd"}), Cross())
    assert isinstance(build.weighable(make_config({"token_weight": "iw_opd_kl"}), Cross()), Cross)


@pytest.mark.parametrize("values, message", [
    ({"token_weight": "soft"}, "token_weight must be one of none, decay, iw_opd, iw_opd_kl, got 'soft'"),
    ({"token_weight_gamma": -1}, "token_weight_gamma must be >= 0"),
    ({"token_weight_decay": 0}, r"token_weight_decay must be in \(0, 1\]"),
    ({"token_weight_decay": 1.5}, r"token_weight_decay must be in \(0, 1\]"),
])
def test_bad_weighting_settings_are_refused(values, message):
    from esrdistill.config import ConfigError, make_config

    with pytest.raises(ConfigError, match=message):
        make_config(values)


def test_a_run_with_iw_opd_weights_resumes_bit_identically_and_decay_one_equals_no_weights(tiny_dirs, tmp_path,
                                                                                            monkeypatch):
    from transformers import AutoModelForCausalLM

    from esrdistill import tracking
    from esrdistill.config import make_config
    from esrdistill.train import train
    from helpers import tiny_overrides, train_interrupted_then_resumed

    student, teacher = tiny_dirs
    common = dict(steps=4, lora_r=0, lr=5e-3, temperature=1.0, rollout_tokens=None, max_new_tokens=10)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_config(tiny_overrides(student, teacher, straight, token_weight="iw_opd", **common)))
    train_interrupted_then_resumed(tiny_overrides(student, teacher, resumed, token_weight="iw_opd", **common), 2, monkeypatch)
    a, b = (AutoModelForCausalLM.from_pretrained(run / "final").state_dict() for run in (straight, resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)
    metrics = tracking.read_metrics(straight)
    assert [m["loss"] for m in tracking.read_metrics(resumed)] == [m["loss"] for m in metrics]
    assert all(1 < m["weight/max_mean"] <= 1.5 for m in metrics)  # the first token's 1 + gamma, over the row's mean

    for name, extra in {"none": {}, "decay1": {"token_weight": "decay", "token_weight_decay": 1.0}}.items():
        train(make_config(tiny_overrides(student, teacher, tmp_path / name, steps=2, **extra)))
    plain, flat = (tracking.read_metrics(tmp_path / name) for name in ("none", "decay1"))
    assert [m["loss"] for m in flat] == pytest.approx([m["loss"] for m in plain], rel=1e-6)
    assert "weight/mean_position" not in plain[0] and flat[0]["weight/max_mean"] == pytest.approx(1.0)
