"""The loss of one micro-batch: the student's forward, the comparison with the teacher, the reduction.

With loss_chunk = 0 the student's logits are computed for every response position at once: (b, T, V)
fp32, as are the teacher's. With loss_chunk = c > 0 only the final hidden states (b, T, H) of both
models are held; the LM heads, log-softmaxes and the loss run c positions at a time under activation
checkpointing, so the backward pass recomputes a chunk's logits instead of keeping them, and peak
memory grows with c, not with the rollout length (the paper's full rollouts reach 3,584 tokens over a
152k vocabulary: tens of GB per micro-batch in fp32). Both give the same loss and gradients (tested
to 1e-5 for every loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch.utils.checkpoint import checkpoint

from esrdistill import losses, selection, weighting
from esrdistill.losses import log_probs
from esrdistill.rollout import Rollouts, head_logits, response_logits
from esrdistill.teachers.protocol import SIGNAL_KEYS, STAT_KEYS, LossSettings, Scores, Teacher


@dataclass(frozen=True)
class Student:
    """The student as the loss sees it."""

    model: torch.nn.Module  # the model being trained (DDP-wrapped under several processes)
    pad_id: int  # the student tokenizer's padding id
    vocab_size: int  # the student's vocabulary: logits past it (padding rows of the head) are cut
    autocast: Callable[[], ContextManager]  # the student's compute context (build.Pair.autocast)


def micro_batch_loss(student: Student, teacher: Teacher, scores: Scores, batch: Rollouts, settings: LossSettings,
                     denominator: float, tail_from: int | None = None) -> tuple[torch.Tensor, dict]:
    """(this micro-batch's share of the batch loss, with gradient; {metric: sum over its positions}).

    scores: the teacher's Scores of these rows (log-probs, or hidden states when settings.loss_chunk > 0).
    batch: the micro-batch's student prompts, and its responses and mask (b, T) on the CPU.
    settings: loss_norm and `denominator` (losses.reduce_loss: the batch's, not the micro-batch's),
    loss_chunk, token selection (token_select, select_tokens: selection.py) and soft token weights (token_weight and
    its parameters: weighting.py, applied to the selected positions); the metrics cover every counted position, the
    loss only the selected ones, each times its weight.
    tail_from: with rollout_tokens=adaptive, the first position of the window's tail (horizon.tail_start): the sums
    then hold 'window/tail_kl' and 'window/tail_n', the reverse KL summed over the counted positions from there on
    and their number.
    """
    model, pad_id, vocab_size, autocast = student.model, student.pad_id, student.vocab_size, student.autocast
    prompts, responses, mask = batch.prompts, batch.responses, batch.mask
    norm, chunk, select_rule, budget = settings.loss_norm, settings.loss_chunk, settings.token_select, settings.select_tokens
    weight_rule = settings.token_weight
    device = next(model.parameters()).device
    tokens = responses.to(device)
    needs_signals = select_rule in selection.SIGNALS
    if not chunk:
        with autocast():
            logits = response_logits(model, prompts, responses, mask, pad_id)
        comparison = teacher.compare(log_probs(logits, vocab_size), scores, tokens)
        sums = {k: v.sum().item() for k, v in comparison.metrics.items()}
        if tail_from is not None:
            sums.update(_tail_sums(comparison.metrics["kl/reverse"], scores.mask, tail_from, 0))
        per_token, chosen = comparison.per_token, scores.mask.bool()
        if select_rule != "prefix":
            signals = {name: comparison.metrics[key] for name, key in SIGNAL_KEYS.items()}
            chosen = selection.select(select_rule, scores.mask, budget, signals if needs_signals else None)
            per_token = torch.where(chosen, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
            sums.update(selection.selection_metrics(chosen, scores.mask, signals))
        if weight_rule != "none":
            w = _weights(settings, chosen, _stats(comparison.metrics, weight_rule))
            per_token = per_token * w.to(per_token.dtype)
            sums.update(weighting.weight_metrics(w, chosen))
        return losses.reduce_loss(per_token, chosen.float(), norm, denominator), sums

    with autocast():
        hidden = response_logits(model, prompts, responses, mask, pad_id, hidden=True)  # (b, T, H)
    width = hidden.shape[1]
    sums: dict[str, float] = {}
    chosen = scores.mask.bool()
    needs_stats = weight_rule in weighting.SIGNALS
    stats: dict[str, torch.Tensor] = {}
    if needs_signals or needs_stats:  # a first pass without gradient: the signals of every position, chunk by chunk
        names = list(SIGNAL_KEYS) * needs_signals + ([weighting.SIGNALS[weight_rule]] if needs_stats else [])
        parts = []
        with torch.no_grad():
            for start in range(0, width, chunk):
                positions = slice(start, start + chunk)
                metrics = teacher.compare(log_probs(head_logits(model, hidden[:, positions].detach()), vocab_size),
                                          scores.chunk(positions), tokens[:, positions]).metrics
                parts.append({name: metrics[STAT_KEYS[name]] for name in names})
        stats = {name: torch.cat([p[name] for p in parts], dim=1) for name in names}
    if select_rule != "prefix":
        signals = {name: stats[name] for name in SIGNAL_KEYS} if needs_signals else None
        chosen = selection.select(select_rule, scores.mask, budget, signals)
        if signals is not None:
            sums.update(selection.selection_metrics(chosen, scores.mask, signals))
    w = None
    if weight_rule != "none":
        w = _weights(settings, chosen, stats).to(device)
        sums.update(weighting.weight_metrics(w, chosen))
    row_tokens = chosen.sum(-1).float()  # the trajectory mean divides by the whole row's count
    recorded: set[int] = set()
    positional_signals: dict[str, list[torch.Tensor]] = {}
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, width, chunk):
        positions = slice(start, start + chunk)
        part = scores.chunk(positions)
        picked = chosen[:, positions]
        weight = None if w is None else w[:, positions]

        def chunk_loss(h: torch.Tensor, start: int = start, part=part, positions=positions, picked=picked,
                       weight=weight) -> torch.Tensor:
            comparison = teacher.compare(log_probs(head_logits(model, h), vocab_size), part, tokens[:, positions])
            if start not in recorded:  # the backward pass runs this again: count the metrics once
                recorded.add(start)
                for key, value in comparison.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.sum().item()
                if tail_from is not None:
                    for key, value in _tail_sums(comparison.metrics["kl/reverse"], part.mask, tail_from, start).items():
                        sums[key] = sums.get(key, 0.0) + value
                if select_rule in selection.POSITIONAL:
                    for name, key in SIGNAL_KEYS.items():
                        positional_signals.setdefault(name, []).append(comparison.metrics[key].detach())
            per_token = torch.where(picked, comparison.per_token, torch.zeros((), dtype=comparison.per_token.dtype,
                                                                               device=comparison.per_token.device))
            if weight is not None:
                per_token = per_token * weight.to(per_token.dtype)
            return losses.reduce_loss(per_token, picked.float(), norm, denominator, row_tokens)

        total = total + checkpoint(chunk_loss, hidden[:, positions], use_reentrant=False)
    if positional_signals:
        signals = {name: torch.cat(values, dim=1) for name, values in positional_signals.items()}
        sums.update(selection.selection_metrics(chosen, scores.mask, signals))
    return total, sums


def _tail_sums(reverse_kl: torch.Tensor, mask: torch.Tensor, tail_from: int, offset: int) -> dict[str, float]:
    """The reverse KL summed over the counted positions at or past `tail_from`, and their number; `offset`: the
    response position of these positions' first column (a chunk's start)."""
    columns = torch.arange(offset, offset + mask.shape[1], device=mask.device)
    tail = mask.bool() & (columns >= tail_from)[None, :]
    return {"window/tail_kl": float(reverse_kl[tail].sum()), "window/tail_n": float(tail.sum())}


def _stats(metrics: dict[str, torch.Tensor], weight_rule: str) -> dict[str, torch.Tensor]:
    """The per-token statistic the weighting rule reads, from a comparison's metrics."""
    name = weighting.SIGNALS.get(weight_rule)
    return {} if name is None else {name: metrics[STAT_KEYS[name]]}


def _weights(settings: LossSettings, chosen: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return weighting.weights(settings.token_weight, chosen, stats, settings.token_weight_gamma, settings.token_weight_decay)
