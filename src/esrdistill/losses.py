"""Distillation losses as pure tensor functions.

Shapes: B trajectories, T response positions, V vocabulary entries.
Every per-token function returns (B, T) values that are exactly zero where `mask` is zero, so a
padded position or a token after EOS never contributes, whatever the logits there hold (NaN and inf
included: masking is a select, never a multiplication).
"""

from __future__ import annotations

import math

import torch


def log_probs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T, V_model) logits -> (B, T, vocab_size) fp32 log-probabilities over the shared vocabulary.

    Rows past vocab_size are padding rows of the embedding (Qwen: 151936 vs 152064); they are cut
    before the softmax so both models normalise over the same tokens.
    """
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) values where mask is set, exact zeros elsewhere (a NaN under the mask does not leak)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(student || teacher) over the full vocabulary (mode seeking; the paper's loss).

    student_logp, teacher_logp: (B, T, V) log-probabilities; the teacher's are detached.
    mask: (B, T) 1.0 for response tokens that count, 0.0 for padding and after EOS.
    Returns (B, T), zero where mask is zero.
    """
    kl = (student_logp.exp() * (student_logp - teacher_logp.detach())).sum(-1)
    return _masked(kl, mask)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || student) (mean seeking, as in supervised KD). Same shapes as reverse_kl."""
    teacher_logp = teacher_logp.detach()
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return _masked(kl, mask)


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
    return _masked(beta * kl_teacher + (1.0 - beta) * kl_student, mask)


def sampling_logp(student_logp: torch.Tensor, temperature: float, top_p: float, top_k_first: int = 256) -> torch.Tensor:
    """(..., V) log-probabilities -> the log-probabilities of the distribution rollouts are drawn from.

    The same steps, in the same order, as generation: divide the logits by the temperature, then keep
    the smallest set of most likely tokens whose probability reaches top_p (at least one token; a
    token is dropped when the probability of the tokens less likely than it, itself included, is at
    most 1 - top_p, i.e. when the tokens more likely than it already hold top_p), renormalise.
    Dropped tokens get -inf. A row of NaN log-probabilities (a diverging student) stays NaN, so that
    the loss is NaN and the step is skipped, as with the other losses.

    The nucleus is looked for among the `top_k_first` most likely tokens first (a top-k instead of
    sorting the whole vocabulary: 49,152 entries sort in 18 ms for 8 rows on this CPU); only rows whose
    nucleus is larger than that are sorted in full.
    """
    tempered = torch.log_softmax(student_logp / temperature, dim=-1)
    if top_p >= 1.0:
        return tempered
    flat = tempered.reshape(-1, tempered.shape[-1])
    k = min(top_k_first, flat.shape[-1])
    top = flat.topk(k, dim=-1).values  # (N, k) descending
    probs = top.exp()
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens strictly more likely
    kept = (before < top_p).sum(-1).clamp(min=1)  # nucleus size; a NaN row (no comparison holds) keeps its NaNs
    threshold = top.gather(-1, (kept - 1).unsqueeze(-1))  # log-prob of the least likely kept token
    drop = flat < threshold
    large = kept == k  # the nucleus may reach past the top k: decide by a full sort
    if large.any():
        rows = flat[large]
        sorted_logp, order = rows.sort(dim=-1)  # ascending
        tail_mass = sorted_logp.exp().cumsum(dim=-1)  # this token and every less likely one
        drop_sorted = tail_mass <= 1.0 - top_p
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop[large] = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(flat.masked_fill(drop, float("-inf")), dim=-1).reshape(tempered.shape)


def importance_weight(student_logp: torch.Tensor, tokens: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, T) p(y_t) / q(y_t): the student's probability of each sampled token over the probability
    of the distribution q that sampled it (temperature, then top_p), detached.

    A token outside q's nucleus as recomputed here (it can only happen at a numerical boundary, or
    with dropout on) is weighted against the tempered distribution without truncation instead.
    """
    with torch.no_grad():
        p = token_logp(student_logp, tokens)
        q = token_logp(sampling_logp(student_logp, temperature, top_p), tokens)
        if top_p < 1.0:
            q = torch.where(torch.isfinite(q), q, token_logp(torch.log_softmax(student_logp / temperature, -1), tokens))
        return (p - q).exp()


def sampled_token_pg(
    student_token_logp: torch.Tensor,
    teacher_token_logp: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled-token estimator of the reverse-KL gradient, as a per-token policy-gradient loss.

    student_token_logp, teacher_token_logp: (B, T) log-probabilities of the sampled tokens y_t under
    the student p (with gradient) and the teacher. weight: (B, T) importance weights p(y_t) / q(y_t)
    when y_t was drawn from a distribution q other than p (temperature != 1 or top_p < 1; see
    `importance_weight`); None means q = p.
    The per-token loss is -w_t * A_t * log p(y_t) with the advantage A_t = -(log p(y_t) - log t(y_t))
    and w_t detached, so its expected gradient under q is
        sum_{v in q's support} p(v) (log p(v) - log t(v)) grad log p(v),
    the gradient of KL(p || t) exactly when q's support is the whole vocabulary (any temperature,
    top_p = 1). With top_p < 1 the tokens q never samples are missing from the sum: a bias that no
    weight can remove (train warns). The returned value is not the KL (`sampled_kl` is the estimate
    to log). Returns (B, T), zero where mask is zero.
    """
    advantage = -(student_token_logp - teacher_token_logp).detach()
    if weight is not None:
        advantage = advantage * weight.detach()
    return _masked(-advantage * student_token_logp, mask)


def sampled_kl(student_token_logp: torch.Tensor, teacher_token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sampled-token KL estimate log p_s(y_t) - log p_t(y_t), (B, T), zero where masked."""
    return _masked((student_token_logp - teacher_token_logp).detach(), mask)


def token_logp(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probabilities and (B, T) token ids -> (B, T) log-probability of each token."""
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def uld(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al., 2024): per token, the L1 distance between the two
    distributions' probabilities sorted in decreasing order, the shorter vocabulary padded with zeros.

    It needs no mapping between the vocabularies: only the shapes of the distributions are compared.
    student_probs: (B, T, Vs) with gradient; teacher_probs: (B, T, Vt), any Vs and Vt (probabilities
    need not sum to 1: the hybrid loss passes the unmapped part). Returns (B, T), zero where masked.
    """
    s_sorted = student_probs.sort(dim=-1, descending=True).values
    t_sorted = teacher_probs.detach().sort(dim=-1, descending=True).values
    width = max(s_sorted.shape[-1], t_sorted.shape[-1])
    s_sorted = torch.nn.functional.pad(s_sorted, (0, width - s_sorted.shape[-1]))
    t_sorted = torch.nn.functional.pad(t_sorted, (0, width - t_sorted.shape[-1]))
    return _masked((s_sorted - t_sorted).abs().sum(-1), mask)


def per_token_loss(
    name: str,
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Dispatch on the loss name; (B, T, V) log-probs, (B, T) tokens and mask -> (B, T) losses.

    temperature and top_p are those the rollouts were sampled with (used by `sampled` only).
    The teacher's log-probs at masked positions are replaced by zeros first, so junk there (NaN,
    -inf) reaches neither the loss nor the student's gradient.
    """
    teacher_logp = teacher_logp.detach().masked_fill(~mask.bool().unsqueeze(-1), 0.0)
    if name == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp, mask)
    if name == "forward_kl":
        return forward_kl(student_logp, teacher_logp, mask)
    if name == "jsd":
        return generalized_jsd(student_logp, teacher_logp, mask, jsd_beta)
    if name == "sampled":
        exact = temperature == 1.0 and top_p >= 1.0
        weight = None if exact else importance_weight(student_logp, tokens, temperature, top_p)
        return sampled_token_pg(token_logp(student_logp, tokens), token_logp(teacher_logp, tokens), mask, weight)
    raise ValueError(f"unknown loss '{name}'")


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, norm: str, denominator: float,
                row_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Sum the share of one micro-batch in the batch loss.

    per_token, mask: (b, T) for a micro-batch of b trajectories out of a whole batch.
    norm="trajectory": each trajectory's mean over its own tokens, summed; `denominator` is the
        number of trajectories in the whole batch (the paper: mean over tokens, then trajectories).
    norm="token": the sum over tokens; `denominator` is the number of counted tokens in the batch.
    Summing this over the micro-batches of a batch gives the batch loss exactly, whatever the
    micro-batch size. A trajectory with no counted token contributes 0; so does an all-masked batch.
    row_tokens: (b,) counted tokens of each whole trajectory, when per_token holds only a chunk of
    its positions (the chunked loss); default mask.sum(-1).
    """
    if norm == "trajectory":
        tokens_per_row = mask.sum(-1) if row_tokens is None else row_tokens  # (b,)
        row_mean = per_token.sum(-1) / tokens_per_row.clamp(min=1)
        total = row_mean.sum()
    elif norm == "token":
        total = per_token.sum()
    else:
        raise ValueError(f"unknown loss_norm '{norm}'")
    return total / max(float(denominator), 1.0)


# ---- a teacher that gives only its top-K log-probs (teachers/served.py) ------------------------------
#
# A served teacher returns, at each position, the log-probs of its K most likely tokens, not its whole
# distribution. Two ways to compare the student with it, both over a small set of C categories:
#   tail:   C = K + 1, the K tokens and one bucket for the rest of the vocabulary, on both sides. Merging
#           tokens into a bucket can only lower an f-divergence (the data-processing inequality), so the
#           loss is a lower bound on the full-vocabulary one, equal to it when K = V.
#   renorm: C = K, both distributions renormalised over the K tokens (the student's mass elsewhere is
#           ignored, so the loss does not push it back onto the teacher's tokens).
# Both return log-probabilities, so reverse_kl, forward_kl and generalized_jsd above apply unchanged.

TOPK_MODES = ("tail", "renorm")
TAIL_FLOOR = 1e-8  # the smallest mass a "rest of the vocabulary" bucket is given, on both sides (see topk_teacher)


def topk_teacher(teacher_topk_logp: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, K) the teacher's top-K log-probs -> (B, T, C) its log-probs over the C categories of `mode`.

    tail: the K log-probs and log(1 - their mass). The rest is floored at TAIL_FLOOR on both sides: the
    server's K probabilities can sum to 1 plus a rounding error, and a zero bucket where the student has
    mass would make the reverse KL infinite. 1 - mass is only known to fp32's ~1e-7 anyway, so the floor
    hides nothing the teacher's answer holds.
    renorm: the K log-probs renormalised to sum to one.
    """
    if mode == "renorm":
        return torch.log_softmax(teacher_topk_logp, dim=-1)
    if mode != "tail":
        raise ValueError(f"unknown top-K mode '{mode}'")
    mass = teacher_topk_logp.logsumexp(-1, keepdim=True).exp()  # (B, T, 1)
    rest = (1.0 - mass).clamp(min=TAIL_FLOOR).log()
    return torch.cat([teacher_topk_logp, rest], dim=-1)


def topk_student(student_logp: torch.Tensor, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, V) student log-probs (with gradient) and (B, T, K) the teacher's top-K ids -> (B, T, C) the
    student's log-probs over the same C categories as topk_teacher.

    tail: the student's rest is the log-sum-exp over every token not in `ids`, computed directly (not as
    1 - mass, which loses everything below fp32's 1e-7), floored at TAIL_FLOOR like the teacher's. When
    `ids` covers the whole vocabulary the rest is empty and is the floor itself, with no gradient.
    """
    picked = student_logp.gather(-1, ids)  # (B, T, K)
    if mode == "renorm":
        return torch.log_softmax(picked, dim=-1)
    if mode != "tail":
        raise ValueError(f"unknown top-K mode '{mode}'")
    others = student_logp.scatter(-1, ids, float("-inf"))  # (B, T, V): the K tokens removed
    empty = torch.isneginf(others).all(-1, keepdim=True)  # (B, T, 1): nothing left
    # logsumexp over only -inf has a NaN gradient: take it over zeros there, and drop it
    rest = torch.where(empty, torch.zeros((), dtype=others.dtype, device=others.device), others).logsumexp(-1, keepdim=True)
    floor = math.log(TAIL_FLOOR)
    rest = torch.where(empty, torch.full_like(rest, floor), rest.clamp(min=floor))
    return torch.cat([picked, rest], dim=-1)
