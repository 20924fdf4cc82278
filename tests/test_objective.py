"""The chunked loss equals the whole one: loss and gradients, for every loss, both normalisations and
a cross-tokenizer teacher; and a training run with loss_chunk gives the same losses and weights."""

import dataclasses
import math
from contextlib import nullcontext

import pytest
import torch

from esrdistill import objective, rollout, tracking
from esrdistill.teachers.protocol import LossSettings
from esrdistill.teachers.same import SameTokenizer
from helpers import make_model, make_tokenizer, tiny_overrides

EOS, PAD = 4, 0


def _batch():
    responses = torch.tensor([[60, 61, 62, 63, 64, 65, 66, 67], [70, 71, EOS, PAD, PAD, PAD, PAD, PAD],
                              [75, 76, 77, 78, 79, EOS, PAD, PAD]])
    return [[3, 40, 41, 42], [3, 50], [3, 60, 61]], responses, rollout.response_mask(responses, [EOS])


def _loss_and_grads(student, scorer, chunk, norm, prompts, responses, mask):
    student.zero_grad()
    plan = scorer.plan(prompts, responses, mask)
    scores = scorer.score(plan, [0, 1, 2], responses.shape[1], hidden=chunk > 0)
    denominator = 3 if norm == "trajectory" else float(plan.mask.sum())
    settings = dataclasses.replace(scorer.settings, loss_norm=norm, loss_chunk=chunk)
    loss, sums = objective.micro_batch_loss(objective.Student(student, PAD, scorer_vocab(scorer), nullcontext), scorer, scores,
                                            rollout.Rollouts(prompts, responses, mask), settings, denominator)
    loss.backward()
    return loss.item(), sums, [p.grad.clone() for p in student.parameters()]


def scorer_vocab(scorer):
    return getattr(scorer, "vocab_size", None) or scorer.map.student_vocab


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "jsd", "sampled"])
@pytest.mark.parametrize("norm", ["trajectory", "token"])
def test_chunked_loss_equals_the_whole_loss(loss, norm):
    tok = make_tokenizer()
    student, teacher = make_model(len(tok), 1), make_model(len(tok), 2)
    scorer = SameTokenizer(teacher, PAD, len(tok), 2, LossSettings(loss=loss, temperature=0.7, top_p=0.9))
    prompts, responses, mask = _batch()
    whole = _loss_and_grads(student, scorer, 0, norm, prompts, responses, mask)
    for chunk in (1, 3, 5):
        assert_same_loss(_loss_and_grads(student, scorer, chunk, norm, prompts, responses, mask), whole)


def assert_same_loss(part, whole):
    """Two (loss, metric sums, gradients) of _loss_and_grads agree: the loss and gradients to 1e-5, every metric to 1e-4."""
    assert part[0] == pytest.approx(whole[0], rel=1e-5, abs=1e-5)
    assert part[1].keys() == whole[1].keys()
    for key in whole[1]:
        assert part[1][key] == pytest.approx(whole[1][key], abs=1e-4), key
    for a, b in zip(part[2], whole[2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("xtok_loss", ["matched_kl", "hybrid"])
def test_chunked_loss_equals_the_whole_loss_across_tokenizers(xtok_loss):
    from xtok_tokenizers import byte_level_tokenizer, sentencepiece_tokenizer

    from esrdistill.teachers.cross import CrossTokenizer, XtokSettings

    s_tok, t_tok = byte_level_tokenizer(), sentencepiece_tokenizer()
    student, teacher = make_model(len(s_tok), 1), make_model(len(t_tok), 2)
    scorer = CrossTokenizer(teacher, s_tok, t_tok, [s_tok.eos_token_id], [t_tok.eos_token_id], 2, LossSettings(),
                            XtokSettings(loss=xtok_loss))
    texts = ["What is 3 + 4? 7", "café 中文", "12 + 30 = 42"]
    rows = [s_tok(t, add_special_tokens=False)["input_ids"][:8] for t in texts]
    responses = torch.full((3, 8), s_tok.pad_token_id)
    mask = torch.zeros(3, 8)
    for b, r in enumerate(rows):
        responses[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    prompts = [[s_tok.bos_token_id, 10, 11]] * 3
    whole = _loss_and_grads(student, scorer, 0, "trajectory", prompts, responses, mask)
    part = _loss_and_grads(student, scorer, 3, "trajectory", prompts, responses, mask)
    assert part[0] == pytest.approx(whole[0], rel=1e-5, abs=1e-5)
    for a, b in zip(part[2], whole[2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_training_with_a_chunked_loss_equals_training_without(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from esrdistill.config import make_config
    from esrdistill.train import train

    student, teacher = tiny_dirs
    runs = {}
    for chunk in (0, 3):
        run = tmp_path / f"chunk{chunk}"
        train(make_config(tiny_overrides(student, teacher, run, steps=2, lora_r=0, lr=1e-2, loss_chunk=chunk)))
        runs[chunk] = (tracking.read_metrics(run), AutoModelForCausalLM.from_pretrained(run / "final").state_dict())
    assert [m["loss"] for m in runs[3][0]] == pytest.approx([m["loss"] for m in runs[0][0]], abs=1e-5)
    # Adam moves a weight by about lr whatever the size of its gradient, so a gradient of ~0 summed in
    # another order can flip the sign of its step: nearly every weight agrees to 1e-5, none by more than 2 lr per step
    diff = torch.cat([(runs[3][1][k] - v).abs().flatten() for k, v in runs[0][1].items()])
    assert (diff < 1e-5).float().mean().item() > 0.99 and diff.max().item() <= 2 * 2 * 1e-2


def test_a_model_whose_logits_cannot_be_rebuilt_is_refused():
    from esrdistill.errors import UserError

    model = make_model(len(make_tokenizer()), 1)
    rollout.check_hidden_path(model, "student")  # a Llama passes
    model.config.logit_scale = 0.5  # a post-head step this model's forward does not actually do
    with pytest.raises(UserError, match="loss_chunk: the student's logits cannot be rebuilt"):
        rollout.check_hidden_path(model, "student")


def test_divergence_metrics_equal_a_position_by_position_reference():
    from esrdistill.teachers.same import divergence_metrics

    torch.manual_seed(0)
    student = torch.log_softmax(torch.randn(3, 5, 7) * 3, -1)
    teacher = torch.log_softmax(torch.randn(3, 5, 7) * 3, -1)
    teacher[0, 1] = torch.log_softmax(torch.tensor([9.0, 0, 0, 0, 0, 0, 0]), -1)  # sure of token 0 ...
    student[0, 1] = torch.log_softmax(torch.tensor([-9.0, 0, 0, 0, 0, 0, 0]), -1)  # ... which the student all but excludes
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    got = divergence_metrics(student, teacher, mask)
    for b in range(3):
        for t in range(5):
            if not mask[b, t]:
                assert all(float(v[b, t]) == 0.0 for v in got.values())
                continue
            p, q = student[b, t].exp().tolist(), teacher[b, t].exp().tolist()
            top = max(range(7), key=lambda v: q[v])
            assert abs(float(got["kl/reverse"][b, t]) - sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(7))) < 1e-5
            assert abs(float(got["kl/forward"][b, t]) - sum(q[v] * (math.log(q[v]) - math.log(p[v])) for v in range(7))) < 1e-5
            assert abs(float(got["student/entropy"][b, t]) + sum(x * math.log(x) for x in p)) < 1e-5
            assert abs(float(got["teacher/entropy"][b, t]) + sum(x * math.log(x) for x in q)) < 1e-5
            assert float(got["agree/top1"][b, t]) == float(max(range(7), key=lambda v: p[v]) == top)
            assert abs(float(got["agree/teacher_top1_prob"][b, t]) - p[top]) < 1e-6
            assert float(got["agree/teacher_top1_missed"][b, t]) == float(q[top] >= 0.5 and p[top] < 0.01)
    assert float(got["agree/teacher_top1_missed"][0, 1]) == 1.0
    # the loss's own KL, handed over, is what is logged; the rest is unchanged
    from esrdistill import losses

    reused = divergence_metrics(student, teacher, mask, losses.reverse_kl(student, teacher, mask),
                                losses.forward_kl(student, teacher, mask))
    assert all(torch.allclose(reused[k], got[k], atol=1e-6) for k in got)
