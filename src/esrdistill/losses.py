"""Distillation losses as pure tensor functions.

Shapes: B trajectories, T response positions, V vocabulary entries.
Every per-token function returns (B, T) values that are exactly zero where `mask` is zero, so a
padded position or a token after EOS never contributes, whatever the logits there hold.
"""

from __future__ import annotations

import math

import torch


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(student || teacher) over the full vocabulary (mode seeking; the paper's loss).

    student_logp, teacher_logp: (B, T, V) log-probabilities; the teacher's are detached.
    mask: (B, T) 1.0 for response tokens that count, 0.0 for padding and after EOS.
    Returns (B, T), zero where mask is zero.
    """
    kl = (student_logp.exp() * (student_logp - teacher_logp.detach())).sum(-1)
    return kl * mask


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) (mean seeking, as in supervised KD). Same shapes as reverse_kl."""
    teacher_logp = teacher_logp.detach()
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return kl * mask


def generalized_jsd(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024).

    With the mixture M = beta * p_teacher + (1 - beta) * p_student:
        JSD_beta = beta * KL(teacher || M) + (1 - beta) * KL(student || M).
    beta must lie strictly in (0, 1); use forward_kl / reverse_kl for the end points.
    Same shapes as reverse_kl.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be strictly between 0 and 1, got {beta}")
    teacher_logp = teacher_logp.detach()
    mix_logp = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta)]), dim=0
    )  # (B, T, V)
    kl_teacher = (teacher_logp.exp() * (teacher_logp - mix_logp)).sum(-1)
    kl_student = (student_logp.exp() * (student_logp - mix_logp)).sum(-1)
    return (beta * kl_teacher + (1.0 - beta) * kl_student) * mask


def sampled_token_pg(
    student_token_logp: torch.Tensor, teacher_token_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Sampled-token estimator of reverse KL used as a per-token policy-gradient advantage.

    student_token_logp, teacher_token_logp: (B, T) log-probabilities of the sampled tokens y_t.
    The advantage A_t = -(log p_s(y_t) - log p_t(y_t)) is detached, and the per-token loss is
    -A_t * log p_s(y_t): its gradient is (log p_s(y_t) - log p_t(y_t)) * grad log p_s(y_t), whose
    expectation under the student's sampling is the gradient of the reverse KL at that position.
    The returned value is not the KL itself (see `sampled_kl` for the estimate to log).
    Returns (B, T), zero where mask is zero.
    """
    advantage = -(student_token_logp - teacher_token_logp).detach()
    return -advantage * student_token_logp * mask


def sampled_kl(student_token_logp: torch.Tensor, teacher_token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sampled-token KL estimate log p_s(y_t) - log p_t(y_t), (B, T), zero where masked."""
    return (student_token_logp - teacher_token_logp).detach() * mask


def token_logp(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probabilities and (B, T) token ids -> (B, T) log-probability of each token."""
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def per_token_loss(
    name: str,
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Dispatch on the loss name; (B, T, V) log-probs, (B, T) tokens and mask -> (B, T) losses."""
    if name == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp, mask)
    if name == "forward_kl":
        return forward_kl(student_logp, teacher_logp, mask)
    if name == "jsd":
        return generalized_jsd(student_logp, teacher_logp, mask, jsd_beta)
    if name == "sampled":
        return sampled_token_pg(token_logp(student_logp, tokens), token_logp(teacher_logp, tokens), mask)
    raise ValueError(f"unknown loss '{name}'")


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, norm: str, denominator: float) -> torch.Tensor:
    """Sum the share of one micro-batch in the batch loss.

    per_token, mask: (b, T) for a micro-batch of b trajectories out of a whole batch.
    norm="trajectory": each trajectory's mean over its own tokens, summed; `denominator` is the
        number of trajectories in the whole batch (the paper: mean over tokens, then trajectories).
    norm="token": the sum over tokens; `denominator` is the number of counted tokens in the batch.
    Summing this over the micro-batches of a batch gives the batch loss exactly, whatever the
    micro-batch size. A trajectory with no counted token contributes 0; so does an all-masked batch.
    """
    if norm == "trajectory":
        tokens_per_row = mask.sum(-1)  # (b,)
        row_mean = per_token.sum(-1) / tokens_per_row.clamp(min=1)
        total = row_mean.sum()
    elif norm == "token":
        total = per_token.sum()
    else:
        raise ValueError(f"unknown loss_norm '{norm}'")
    return total / max(float(denominator), 1.0)
