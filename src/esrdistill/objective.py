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

import torch
from torch.utils.checkpoint import checkpoint

from esrdistill import losses
from esrdistill.rollout import head_logits, response_logits
from esrdistill.teacher import log_probs


def micro_batch_loss(student, teacher, scores, prompts, responses: torch.Tensor, mask: torch.Tensor, pad_id: int,
                     vocab_size: int, autocast, norm: str, denominator: float, chunk: int = 0) -> tuple[torch.Tensor, dict]:
    """(this micro-batch's share of the batch loss, with gradient; {metric: sum over its positions}).

    scores: the teacher's Scores of these rows (log-probs, or hidden states when chunk > 0).
    responses, mask: (b, T) on the CPU; autocast: the student's compute context.
    """
    device = next(student.parameters()).device
    tokens = responses.to(device)
    if not chunk:
        with autocast():
            logits = response_logits(student, prompts, responses, mask, pad_id)
        comparison = teacher.compare(log_probs(logits, vocab_size), scores, tokens)
        loss = losses.reduce_loss(comparison.per_token, scores.mask, norm, denominator)
        return loss, {k: v.sum().item() for k, v in comparison.metrics.items()}

    with autocast():
        hidden = response_logits(student, prompts, responses, mask, pad_id, hidden=True)  # (b, T, H)
    row_tokens = scores.mask.sum(-1)  # the trajectory mean divides by the whole row's count
    sums: dict[str, float] = {}
    recorded: set[int] = set()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        positions = slice(start, start + chunk)
        part = scores.chunk(positions)

        def chunk_loss(h: torch.Tensor, start: int = start, part=part, positions=positions) -> torch.Tensor:
            comparison = teacher.compare(log_probs(head_logits(student, h), vocab_size), part, tokens[:, positions])
            if start not in recorded:  # the backward pass runs this again: count the metrics once
                recorded.add(start)
                for key, value in comparison.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.sum().item()
            return losses.reduce_loss(comparison.per_token, part.mask, norm, denominator, row_tokens)

        total = total + checkpoint(chunk_loss, hidden[:, positions], use_reentrant=False)
    return total, sums
