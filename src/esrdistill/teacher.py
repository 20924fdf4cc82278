"""Teacher scoring, one interface for every kind of teacher:

    plan = teacher.plan(teacher_prompts, responses, mask)   # what the teacher reads; positions that count
    scores = teacher.score(plan, rows, width)               # the teacher's log-probs, no grad
    comparison = teacher.compare(student_logp, scores, tokens)   # per-token loss and metrics

`Teacher` (below) states that interface once. `SameTokenizer` (here) scores the student's own ids:
the teacher shares the student's vocabulary (or appends tokens to it). `CrossTokenizer` (cross_teacher.py)
re-reads the student's text with the teacher's tokenizer and compares the two on the tokens they
share. `ServedTeacher` (served_teacher.py) asks a vLLM server for its top-K log-probs of the student's
ids. The training loop calls the same names whatever the teacher is; a new kind of teacher
implements `Teacher` and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from esrdistill import losses
from esrdistill.rollout import head_logits, response_logits


def log_probs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T, V_model) logits -> (B, T, vocab_size) fp32 log-probabilities over the shared vocabulary.

    Rows past vocab_size are padding rows of the embedding (Qwen: 151936 vs 152064); they are cut
    before the softmax so both models normalise over the same tokens.
    """
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


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


@dataclass
class Plan:
    """What the teacher reads for one batch of rollouts, and which student positions count."""

    prompts: list[list[int]]  # the teacher's prompt ids, one per row
    responses: torch.Tensor  # (B, Tt) the response ids the teacher reads (the student's own, when shared)
    response_mask: torch.Tensor  # (B, Tt)
    mask: torch.Tensor  # (B, T) student positions that count: in the response and with a teacher position
    positions: torch.Tensor | None = None  # (B, T) teacher position of each student position (-1: none); None: the same
    ratios: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (numerator, denominator)


@dataclass
class Scores:
    """The teacher's view of one micro-batch: its log-probs, or (for the chunked loss) its final hidden
    states and the function that turns a chunk of them into log-probs."""

    logp: torch.Tensor | None  # (b, T, C) teacher log-probs over the space both are compared in, no grad
    mask: torch.Tensor  # (b, T) positions that count
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # what a teacher kind needs besides
    hidden: torch.Tensor | None = None  # (b, T, H) instead of logp, with `project`
    project: object = None  # hidden (b, t, H) -> Scores of those t positions (mask excluded)

    def chunk(self, positions: slice) -> "Scores":
        """The scores of a slice of positions, computed now if only hidden states are held."""
        mask = self.mask[:, positions]
        if self.logp is not None:
            return Scores(logp=self.logp[:, positions], mask=mask,
                          extra={k: v[:, positions] for k, v in self.extra.items()})
        with torch.no_grad():
            part = self.project(self.hidden[:, positions])
        return Scores(logp=part.logp, mask=mask, extra=part.extra)


@dataclass
class Comparison:
    per_token: torch.Tensor  # (b, T) loss, zero where the mask is
    metrics: dict[str, torch.Tensor]  # metric name -> (b, T) values, averaged over counted positions when logged


@dataclass(frozen=True)
class LossSettings:
    """The loss and which tokens carry it (build.loss_settings makes it from the config's keys of the same
    names). A teacher compares with the first four; objective.micro_batch_loss reduces with the rest."""

    loss: str = "reverse_kl"  # reverse_kl | forward_kl | jsd | sampled
    jsd_beta: float = 0.5  # jsd only: weight of the teacher in the mixture
    temperature: float = 1.0  # of the rollouts (the sampled loss weights by it)
    top_p: float = 1.0  # of the rollouts (the sampled loss keeps their nucleus)
    loss_norm: str = "trajectory"  # trajectory | token: how the batch loss is averaged (losses.reduce_loss)
    loss_chunk: int = 0  # positions per chunk of the loss, recomputed in backward; 0 = the whole response at once
    token_select: str = "prefix"  # selection.py's rule of which counted positions carry the loss
    select_tokens: int = 100  # token_select other than prefix: positions per trajectory that carry the loss


@runtime_checkable
class Teacher(Protocol):
    """What the training loop, the loss and the diagnostics call on a teacher, whatever its kind:
    `SameTokenizer` (here), `CrossTokenizer` (cross_teacher.py), `ServedTeacher` (served_teacher.py: a vLLM
    server's top-K log-probs). build.teacher picks one from the config.

    B rows, T student response positions (b rows and T' <= T positions for one micro-batch), V the
    student's vocabulary, C the space the two are compared in (V, or the shared units across
    tokenizers), H the teacher's hidden size.
    """

    kind: str  # "same" | "cross" | "served"
    constant_metrics: dict[str, float]  # figures fixed for the run (xtok/vocab_mapped), logged with every step

    def plan(self, prompts: list[list[int]], responses: torch.Tensor, mask: torch.Tensor) -> Plan:
        """What the teacher reads for one batch of rollouts. prompts: the teacher's own prompt ids, one per
        row; responses, mask: (B, T) the student's response ids and response mask, on the CPU. The plan's
        mask (B, T) marks the student positions that have a teacher signal."""
        ...

    def score(self, plan: Plan, rows: list[int], width: int, hidden: bool = False) -> Scores:
        """The teacher's view of rows `rows`, student positions :width, without gradient: log-probs
        (b, T', C) and the mask (b, T') of the positions that count; hidden=True: hidden states
        (b, T', H) instead, projected chunk by chunk by the chunked loss. The loop reads only the mask and
        hands the Scores back to this teacher's compare, comparable and Scores.chunk: a teacher of several
        (teachers.Routed) holds each one's Scores instead of log-probs of its own (logp None)."""
        ...

    def comparable(self, student_logp: torch.Tensor, scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T', V) student log-probs -> (student, teacher) log-probs over the same space, (b, T', C) each."""
        ...

    def compare(self, student_logp: torch.Tensor, scores: Scores, tokens: torch.Tensor) -> Comparison:
        """The per-token loss (b, T'), with the gradient of `student_logp` (b, T', V), and the metrics
        {name: (b, T')}. tokens: (b, T') the sampled ids, on the student's device."""
        ...


def divergence_metrics(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                       reverse_kl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-position metrics of two distributions over the same space, (b, T) each, zero where masked.
    `reverse_kl`, when the loss already computed it, is reused rather than computed again."""
    counted = mask.bool()
    with torch.no_grad():
        if reverse_kl is None:
            reverse_kl = losses.reverse_kl(student_logp, teacher_logp, mask)
        student_logp = student_logp.detach()
        teacher_top1 = teacher_logp.max(-1)  # (b, T) values and indices
        top1_prob = student_logp.gather(-1, teacher_top1.indices.unsqueeze(-1)).squeeze(-1).exp()
        entropy = -(teacher_logp.exp() * teacher_logp).sum(-1)
        return {
            "kl/reverse": reverse_kl.detach(),
            "kl/forward": losses.forward_kl(student_logp, teacher_logp, mask),
            "teacher/entropy": torch.where(counted, entropy, 0.0),
            "student/entropy": torch.where(counted, -(student_logp.exp() * student_logp).sum(-1), 0.0),
            "agree/top1": ((student_logp.argmax(-1) == teacher_logp.argmax(-1)) & counted).float(),
            # The student's probability of the teacher's top-1 token, and where the teacher is sure
            # (>= 50%) of a token the student gives < 1%: there the reverse KL's gradient pulls toward
            # the teacher's choice in proportion to that tiny probability (d KL / d z_v = p_v (r_v - KL)),
            # so reverse KL alone barely moves the student (docs/not-learning.md).
            "agree/teacher_top1_prob": torch.where(counted, top1_prob, 0.0),
            "agree/teacher_top1_missed": ((teacher_top1.values >= math.log(0.5)) & (top1_prob < 0.01) & counted).float(),
        }


class SameTokenizer:
    """A Teacher that reads the student's own token ids (the same tokenizer, or one that appends tokens)."""

    kind = "same"
    constant_metrics: dict[str, float] = {}

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
        metrics = divergence_metrics(student_logp, scores.logp, mask, per_token if s.loss == "reverse_kl" else None)
        with torch.no_grad():
            metrics["kl/sampled"] = losses.sampled_kl(losses.token_logp(student_logp, tokens),
                                                      losses.token_logp(scores.logp, tokens), mask)
        return Comparison(per_token=per_token, metrics=metrics)
