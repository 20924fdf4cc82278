"""The interface every kind of teacher implements, and every rule the training loop relies on:

    plan = teacher.plan(teacher_prompts, responses, mask)        # what the teacher reads; positions that count
    scores = teacher.score(plan, rows, width)                    # the teacher's log-probs, no grad
    comparison = teacher.compare(student_logp, scores, tokens)   # per-token loss and metrics

The kinds, each one module of this package: `SameTokenizer` (same.py: the student's own ids), `CrossTokenizer`
(cross.py: the student's text re-read with the teacher's tokenizer, aligned by xtok.py), `ServedTeacher` (served.py:
a vLLM server's top-K log-probs) and `Routed` (routed.py: several teachers, each row scored by the one its data
names). build.teacher makes one from the config. A new kind of teacher is one module with one class that has what
`Teacher` lists; nothing else is registered anywhere (tests/test_layout.py trains a teacher defined in that file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

# The per-position figures of two distributions over one space (same.divergence_metrics): what a teacher that
# compares distributions reports from compare. Token selection (selection.py, through objective.py) reads the
# SIGNAL_KEYS among them at every counted position, so every teacher's compare must return those four.
DIVERGENCE_KEYS = ("kl/reverse", "kl/forward", "teacher/entropy", "student/entropy", "agree/top1",
                   "agree/teacher_top1_prob", "agree/teacher_top1_missed")
SIGNAL_KEYS = {"reverse_kl": "kl/reverse", "forward_kl": "kl/forward", "teacher_entropy": "teacher/entropy",
               "student_entropy": "student/entropy"}  # selection's signal name -> the metric key it is read from
# Every per-token statistic a rule of the loss reads (token selection's signals, and token weighting's: weighting.SIGNALS),
# by name -> the metric key it is read from. kl/sampled is optional: a teacher without it (across tokenizers) cannot
# serve token_weight=iw_opd, and build.weighable says so before training.
STAT_KEYS = {**SIGNAL_KEYS, "sampled_kl": "kl/sampled"}


@dataclass
class Plan:
    """What the teacher reads for one batch of rollouts, and which student positions count.

    `ratios` holds figures that are a sum over the batch divided by another ({key: (numerator, denominator)}): the
    loop sums both parts over processes and logs numerator / max(denominator, 1) under `key` (so (n, 0) logs the
    count n). The teacher puts every key it declares (Teacher.ratio_keys) into ratios in `plan`,
    may add to them in `score` (a served teacher adds each request's seconds as its answer is read), and the loop
    reads them once, after the step's last `score`.
    """

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
    token_weight: str = "none"  # weighting.py's rule of how much each selected position's loss counts
    token_weight_gamma: float = 0.5  # token_weight=iw_opd, iw_opd_kl: the largest extra weight of an early token
    token_weight_decay: float = 0.99  # token_weight=decay: w_t = decay ** t


@runtime_checkable
class Teacher(Protocol):
    """What the training loop, the loss and the diagnostics call on a teacher, whatever its kind.

    B rows, T student response positions (b rows and T' <= T positions for one micro-batch), V the
    student's vocabulary, C the space the two are compared in (V, the shared units across tokenizers, or a
    served teacher's top-K categories), H the teacher's hidden size.

    The rules the loop relies on:
    - one step calls `plan` once for the batch, then `score` once for each micro-batch (disjoint rows of that
      plan), each followed by `compare` (and, with loss_chunk, `Scores.chunk` and compare per chunk);
    - `score` may be called again for rows it has scored before, and gives the same Scores (a served teacher
      keeps its answers until the next `plan`); rows past the plan are an IndexError;
    - `compare` returns, for every position, each key of `metric_keys` and no other (the four of SIGNAL_KEYS
      among them: token selection reads them); per_token and every metric are zero where scores.mask is;
    - the plan's ratios hold each key of `ratio_keys` (see Plan); the loop reads them after the last `score`;
    - `constant_metrics` are logged unchanged with every step.
    """

    kind: str  # a name for messages: "same" | "cross" | "served" | "routed" (nothing dispatches on it)
    constant_metrics: dict[str, float]  # figures fixed for the run (xtok/vocab_mapped), logged with every step
    metric_keys: tuple[str, ...]  # the per-position metrics compare returns
    ratio_keys: tuple[str, ...]  # the Plan.ratios keys plan puts there
    topk_keys: tuple[str, ...]  # those of metric_keys computed over the teacher's top-K tokens only, not the
    # vocabulary (a served teacher with teacher_top_k below it): beside teachers that compute them over the
    # vocabulary, a routed teacher does not average the two (routed.Routed)

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
        (routed.Routed) holds each one's Scores instead of log-probs of its own (logp None)."""
        ...

    def comparable(self, student_logp: torch.Tensor, scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T', V) student log-probs -> (student, teacher) log-probs over the same space, (b, T', C) each."""
        ...

    def compare(self, student_logp: torch.Tensor, scores: Scores, tokens: torch.Tensor) -> Comparison:
        """The per-token loss (b, T'), with the gradient of `student_logp` (b, T', V), and the metrics
        {name: (b, T')} (the keys of metric_keys). tokens: (b, T') the sampled ids, on the student's device."""
        ...
