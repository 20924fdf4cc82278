"""A teacher that reads the student's own token ids: the same tokenizer, or one that appends tokens to it.

`score` runs the teacher over the student's prompts-and-responses (never through its LM head at prompt positions);
`divergence_metrics` are the per-position figures every teacher that compares two distributions over one space
reports (the cross-tokenizer and served teachers reuse them on their own spaces).
"""

from __future__ import annotations

import math

import torch

from esrdistill import losses
from esrdistill.losses import log_probs
from esrdistill.rollout import head_logits, response_logits
from esrdistill.teachers.protocol import DIVERGENCE_KEYS, Comparison, LossSettings, Plan, Scores


@torch.no_grad()
def score(
    teacher,
    prompts: list[list[int]],
    responses: torch.Tensor,
    mask: torch.Tensor,
    pad_id: int,
    vocab_size: int,
    micro_batch: int,
    prefix=None,
    hidden: bool = False,
) -> torch.Tensor:
    """Teacher log-probs at the response positions: (B, T, vocab_size) fp32, on the teacher's device.

    prompts: the teacher's own prompt ids (its chat template, few-shot turns and suffix), one per row.
    responses, mask: (B, T) the response ids the teacher reads and their mask.
    The teacher runs over at most `micro_batch` rows at once, and never through its LM head at
    prompt positions, so memory grows with B * T * V, not with the prompt length. prefix: the
    rollout.PrefixCache of the prompts' shared beginning, or None. hidden=True returns the final
    hidden states (B, T, H) instead, for the chunked loss.
    """
    chunks = []
    for start in range(0, len(prompts), micro_batch):
        rows = slice(start, start + micro_batch)
        out = response_logits(teacher, prompts[rows], responses[rows], mask[rows], pad_id, prefix, hidden)
        chunks.append(out if hidden else log_probs(out, vocab_size))
        del out
    return torch.cat(chunks, dim=0)


def divergence_metrics(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                       reverse_kl: torch.Tensor | None = None, forward_kl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-position metrics of two distributions over the same space, (b, T) each, zero where masked.
    `reverse_kl` / `forward_kl`, when the loss already computed it, is reused rather than computed again.

    Every full-vocabulary pass is made once: each side's probabilities once, its negative entropy sum(p log p) once,
    and a KL the loss did not give as that negative entropy minus the cross term, KL(a||b) = sum(a log a) -
    sum(a log b). On an 8 x 32 x 49,152 step that is 5 passes over the vocabulary instead of 9 (the figures are in
    docs/how-it-works.md)."""
    counted = mask.bool()
    with torch.no_grad():
        student_logp, teacher_logp = student_logp.detach(), teacher_logp.detach()
        student_p, teacher_p = student_logp.exp(), teacher_logp.exp()
        student_neg_entropy = (student_p * student_logp).sum(-1)
        teacher_neg_entropy = (teacher_p * teacher_logp).sum(-1)
        if reverse_kl is None:
            reverse_kl = losses._masked(student_neg_entropy - (student_p * teacher_logp).sum(-1), mask)
        if forward_kl is None:
            forward_kl = losses._masked(teacher_neg_entropy - (teacher_p * student_logp).sum(-1), mask)
        teacher_top1 = teacher_logp.max(-1)  # (b, T) values and indices
        top1_prob = student_logp.gather(-1, teacher_top1.indices.unsqueeze(-1)).squeeze(-1).exp()
        return {
            "kl/reverse": reverse_kl.detach(),
            "kl/forward": forward_kl.detach(),
            "teacher/entropy": torch.where(counted, -teacher_neg_entropy, 0.0),
            "student/entropy": torch.where(counted, -student_neg_entropy, 0.0),
            "agree/top1": ((student_logp.argmax(-1) == teacher_top1.indices) & counted).float(),
            # The student's probability of the teacher's top-1 token, and where the teacher is sure
            # (>= 50%) of a token the student gives < 1%: there the reverse KL's gradient pulls toward
            # the teacher's choice in proportion to that tiny probability (d KL / d z_v = p_v (r_v - KL)),
            # so reverse KL alone barely moves the student (docs/not-learning.md).
            "agree/teacher_top1_prob": torch.where(counted, top1_prob, 0.0),
            "agree/teacher_top1_missed": ((teacher_top1.values >= math.log(0.5)) & (top1_prob < 0.01) & counted).float(),
        }


class SameTokenizer:
    """A Teacher (protocol.Teacher) that reads the student's own token ids (the same tokenizer, or one that appends tokens)."""

    kind = "same"
    constant_metrics: dict[str, float] = {}
    metric_keys = DIVERGENCE_KEYS + ("kl/sampled",)
    ratio_keys: tuple[str, ...] = ()
    topk_keys: tuple[str, ...] = ()

    def __init__(self, model, pad_id: int, vocab_size: int, micro_batch: int, settings: LossSettings, prefix=None):
        self.model, self.pad_id, self.vocab_size, self.micro_batch, self.settings = model, pad_id, vocab_size, micro_batch, settings
        self.prefix = prefix  # rollout.PrefixCache of the teacher prompts' shared beginning, or None

    def plan(self, prompts: list[list[int]], responses: torch.Tensor, mask: torch.Tensor) -> Plan:
        return Plan(prompts=prompts, responses=responses, response_mask=mask, mask=mask)

    def score(self, plan: Plan, rows: list[int], width: int, hidden: bool = False) -> Scores:
        """The teacher's log-probs of rows `rows`, positions :width (hidden=True: its hidden states, projected
        chunk by chunk later)."""
        responses, mask = plan.responses[rows, :width], plan.response_mask[rows, :width]
        out = score(self.model, [plan.prompts[r] for r in rows], responses, mask, self.pad_id, self.vocab_size, self.micro_batch,
                    self.prefix, hidden)
        counted = plan.mask[rows, :width].to(out.device)
        if not hidden:
            return Scores(logp=out, mask=counted)
        return Scores(logp=None, mask=counted, hidden=out,
                      project=lambda h: Scores(logp=log_probs(head_logits(self.model, h), self.vocab_size), mask=None))

    def comparable(self, student_logp: torch.Tensor, scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) log-probs over the same space: here the student's vocabulary."""
        return student_logp, scores.logp

    def compare(self, student_logp: torch.Tensor, scores: Scores, tokens: torch.Tensor) -> Comparison:
        s = self.settings
        mask = scores.mask
        per_token = losses.per_token_loss(s.loss, student_logp, scores.logp, tokens, mask, s.jsd_beta, s.temperature, s.top_p)
        metrics = divergence_metrics(student_logp, scores.logp, mask, per_token if s.loss == "reverse_kl" else None,
                                     per_token if s.loss == "forward_kl" else None)
        with torch.no_grad():
            metrics["kl/sampled"] = losses.sampled_kl(losses.token_logp(student_logp, tokens),
                                                      losses.token_logp(scores.logp, tokens), mask)
        return Comparison(per_token=per_token, metrics=metrics)

