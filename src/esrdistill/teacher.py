"""Teacher scoring: the frozen teacher's log-probabilities over the full vocabulary, at the
student's response positions only, computed in micro-batches."""

from __future__ import annotations

import torch

from esrdistill.rollout import response_logits


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
) -> torch.Tensor:
    """Teacher log-probs at the response positions: (B, T, vocab_size) fp32, on the teacher's device.

    prompts: the teacher's own prompt ids (its chat template, few-shot turns and suffix), one per row.
    responses, mask: (B, T) the student's response and its response mask.
    The teacher runs over at most `micro_batch` rows at once, and never through its LM head at
    prompt positions, so memory grows with B * T * V, not with the prompt length.
    """
    chunks = []
    for start in range(0, len(prompts), micro_batch):
        rows = slice(start, start + micro_batch)
        logits = response_logits(teacher, prompts[rows], responses[rows], mask[rows], pad_id)
        chunks.append(log_probs(logits, vocab_size))
        del logits
    return torch.cat(chunks, dim=0)
