"""What a served teacher's per-position metrics are over (docs/served-teacher.md's table): at K = V they are the
local teacher's; agreement is over its real tokens, never the bucket; beside a local teacher, its top-K KLs are not
averaged with full-vocabulary ones."""

import pytest
import torch

from esrdistill import losses
from esrdistill.teachers import served as served_teacher
from esrdistill.teachers.served import Client, ServedSettings, Server

B, T, V = 2, 3, 40


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "jsd", "sampled"])
def test_the_served_teachers_comparison_at_k_equal_v_is_the_local_teachers(loss):
    """compare() on Scores as score() builds them: at K = V every loss (sampled: with the exact token log-probs the
    server returns, temperature 0.7 and top_p 0.9 weights) equals the same-tokenizer teacher's, loss and gradient."""
    from esrdistill.teachers.protocol import LossSettings, Scores
    from esrdistill.teachers.same import SameTokenizer

    settings = LossSettings(loss=loss, temperature=0.7, top_p=0.9)
    served = served_teacher.ServedTeacher(Client(ServedSettings(url="http://127.0.0.1:1", top_k=V), Server("m", 512), V),
                                          settings, torch.device("cpu"))
    local = SameTokenizer(None, 0, V, 2, settings)
    teacher_logp = torch.log_softmax(_logits(7).float(), -1)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T)
    mask[0, 2] = 0
    top = teacher_logp.topk(V, dim=-1)
    scores = Scores(logp=losses.topk_teacher(top.values, "tail"), mask=mask,
                    extra={"ids": top.indices, "token_logp": losses.token_logp(teacher_logp, tokens), "topk_logp": top.values})
    results = []
    for scorer, given in ((served, scores), (local, Scores(logp=teacher_logp, mask=mask))):
        logits = _logits(8).float().requires_grad_()
        comparison = scorer.compare(torch.log_softmax(logits, -1), given, tokens)
        comparison.per_token.sum().backward()
        results.append((comparison, logits.grad))
    (ours, our_grad), (theirs, their_grad) = results
    assert (ours.per_token - theirs.per_token).abs().max() < 1e-5 and (our_grad - their_grad).abs().max() < 1e-5
    for key in ("kl/reverse", "kl/forward", "kl/sampled", "student/entropy", "teacher/entropy", "agree/top1",
                "agree/teacher_top1_prob", "agree/teacher_top1_missed"):
        assert (ours.metrics[key] - theirs.metrics[key]).abs().max() < 1e-4, key
    assert torch.allclose(ours.metrics["teacher/topk_mass"], mask, atol=1e-5)


# ---- what the metrics are over --------------------------------------------------------------------------

def _one_position(teacher_top, student_probs, mode="tail"):
    """A served teacher's Scores and the student's log-probs at one position (b = T = 1): the teacher's top-K
    probabilities `teacher_top` on ids 0..K-1 (the rest of the vocabulary is its bucket)."""
    from esrdistill.teachers.protocol import Scores

    k = len(teacher_top)
    topk_logp = torch.tensor(teacher_top).log().reshape(1, 1, k)
    ids = torch.arange(k).reshape(1, 1, k)
    scores = Scores(logp=losses.topk_teacher(topk_logp, mode), mask=torch.ones(1, 1),
                    extra={"ids": ids, "token_logp": topk_logp[..., 0], "topk_logp": topk_logp})
    return scores, torch.tensor(student_probs).log().reshape(1, 1, -1)


@pytest.mark.parametrize("mode", losses.TOPK_MODES)
def test_agreement_is_over_the_teachers_real_tokens_never_its_bucket(mode):
    """Teacher [0.3, 0.2, bucket 0.5]; the student's top token (id 3) is outside the teacher's top 2. Naive reference,
    token by token: the teacher's top-1 is token 0, which is not the student's, whose probability of it is 0.1; the
    teacher is sure of no token; its entropy over the two tokens and the rest as one category is -sum p log p."""
    import math

    from esrdistill.teachers.protocol import LossSettings

    served = served_teacher.ServedTeacher(Client(ServedSettings(url="http://127.0.0.1:1", top_k=2, mode=mode), Server("m", 512), 5),
                                          LossSettings(), torch.device("cpu"))
    scores, student = _one_position([0.3, 0.2], [0.1, 0.1, 0.1, 0.6, 0.1], mode)
    metrics = served.compare(student, scores, torch.tensor([[3]])).metrics
    assert set(metrics) == set(served.metric_keys)
    assert metrics["agree/top1"].item() == 0.0  # over the K + 1 categories both argmaxes were the bucket: 1.0
    assert metrics["agree/teacher_top1_prob"].item() == pytest.approx(0.1, abs=1e-6)
    assert metrics["agree/teacher_top1_missed"].item() == 0.0
    assert metrics["teacher/entropy"].item() == pytest.approx(-sum(p * math.log(p) for p in (0.3, 0.2, 0.5)), abs=1e-6)
    assert metrics["teacher/topk_mass"].item() == pytest.approx(0.5, abs=1e-6)

    # the bucket holds 55% and the student's bucket < 1%: the teacher is sure of no token (its top-1 has 30%)
    scores, student = _one_position([0.3, 0.15], [0.992, 0.004, 0.002, 0.001, 0.001], mode)
    metrics = served.compare(student, scores, torch.tensor([[0]])).metrics
    assert metrics["agree/teacher_top1_missed"].item() == 0.0 and metrics["agree/top1"].item() == 1.0
    # sure of token 0 (60%), which the student gives 0.5%: missed, over the teacher's own probability in either mode
    scores, student = _one_position([0.6, 0.1], [0.005, 0.005, 0.49, 0.49, 0.01], mode)
    metrics = served.compare(student, scores, torch.tensor([[2]])).metrics
    assert metrics["agree/teacher_top1_missed"].item() == 1.0 and metrics["agree/teacher_top1_prob"].item() == pytest.approx(0.005)
    # renorm makes [0.3, 0.2] a top-1 of 60%: still not sure, since the teacher gives it 30%
    scores, student = _one_position([0.3, 0.2], [0.005, 0.005, 0.49, 0.49, 0.01], mode)
    assert served.compare(student, scores, torch.tensor([[2]])).metrics["agree/teacher_top1_missed"].item() == 0.0


def _local_and_served(top_k):
    """A Routed teacher of a local teacher (rows 0, 2) and a served one (rows 1, 3) of vocabulary V, over hand-made
    Scores of one position per row; the (b, 1, V) student log-probs."""
    from esrdistill.teachers.protocol import LossSettings, Scores
    from esrdistill.teachers.routed import RoutedScores
    from esrdistill.teachers.same import SameTokenizer

    g = torch.Generator().manual_seed(0)
    teacher_logp = torch.log_softmax(torch.randn(4, 1, V, generator=g) * 3, -1)
    student = torch.log_softmax(torch.randn(4, 1, V, generator=g) * 3, -1)
    local = SameTokenizer(None, 0, V, 2, LossSettings())
    served = served_teacher.ServedTeacher(Client(ServedSettings(url="http://127.0.0.1:1", top_k=top_k), Server("m", 512), V),
                                          LossSettings(), torch.device("cpu"))
    top = teacher_logp[[1, 3]].topk(top_k, dim=-1)
    parts = [("local", torch.tensor([0, 2]), Scores(logp=teacher_logp[[0, 2]], mask=torch.ones(2, 1))),
             ("served", torch.tensor([1, 3]), Scores(logp=losses.topk_teacher(top.values, "tail"), mask=torch.ones(2, 1),
                                                     extra={"ids": top.indices, "token_logp": top.values[..., 0],
                                                            "topk_logp": top.values}))]
    alone = {"local": local.compare(student[[0, 2]], parts[0][2], torch.zeros(2, 1, dtype=torch.long)).metrics,
             "served": served.compare(student[[1, 3]], parts[1][2], torch.zeros(2, 1, dtype=torch.long)).metrics}
    return {"local": local, "served": served}, RoutedScores(logp=None, mask=torch.ones(4, 1), parts=parts), student, alone


def test_several_teachers_never_average_a_top_k_kl_with_a_full_vocabulary_one():
    """A served teacher with K < V beside a local one: kl/reverse, kl/forward and teacher/entropy are the local
    teacher's alone, the served one's are <key>/served; agreement (exact for both) is over every row. At K = V, and
    when token selection reads the keys per position, they stay over every row."""
    from esrdistill.teachers.routed import Routed

    subs, scores, student, alone = _local_and_served(top_k=3)
    tokens = torch.zeros(4, 1, dtype=torch.long)
    out = Routed(subs).compare(student, scores, tokens).metrics
    for key in ("kl/reverse", "kl/forward", "teacher/entropy"):
        assert key not in out
        assert out[key + ":num"].sum() / out[key + ":den"].sum() == pytest.approx(alone["local"][key].mean().item(), abs=1e-6)
        assert out[f"{key}/served:num"].sum() / out[f"{key}/served:den"].sum() == pytest.approx(alone["served"][key].mean().item(), abs=1e-6)
        assert abs(alone["served"][key].mean() - alone["local"][key].mean()) > 1e-3  # they would have been averaged
    assert out["agree/teacher_top1_prob"].sum() / 4 == pytest.approx(
        (alone["local"]["agree/teacher_top1_prob"].sum() + alone["served"]["agree/teacher_top1_prob"].sum()).item() / 4)
    assert "kl/reverse" in Routed(subs, signals=True).compare(student, scores, tokens).metrics  # token selection's signal
    subs, scores, student, _ = _local_and_served(top_k=V)
    out = Routed(subs).compare(student, scores, tokens).metrics
    assert "kl/reverse" in out and "kl/forward/served:num" not in out
