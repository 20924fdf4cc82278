"""The paper's diagnostics as pure functions on tensors and lists (the model work is in measure.py).

Shapes: B rollouts, T response positions, V vocabulary entries; mask (B, T) as in rollout.py.
"""

from __future__ import annotations

import torch

PROFILE_KEYS = ("reverse_kl", "forward_kl", "teacher_entropy", "student_entropy", "teacher_top1_prob", "agreement")


def position_stats(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position signals of a batch of rollouts, each (B, T) and zero where mask is zero.

    reverse_kl KL(s||t), forward_kl KL(t||s), the two entropies, the teacher's top-1 probability,
    agreement (student argmax == teacher argmax), and for sub-mode commitment the student's top-1
    probability and the rank of the student's top-1 token in the teacher's distribution (0 = the
    teacher's own top-1).
    """
    s_p, t_p = student_logp.exp(), teacher_logp.exp()
    student_top1 = student_logp.argmax(-1)  # (B, T)
    teacher_at_student_top1 = teacher_logp.gather(-1, student_top1.unsqueeze(-1))  # (B, T, 1)
    stats = {
        "reverse_kl": (s_p * (student_logp - teacher_logp)).sum(-1),
        "forward_kl": (t_p * (teacher_logp - student_logp)).sum(-1),
        "teacher_entropy": -(t_p * teacher_logp).sum(-1),
        "student_entropy": -(s_p * student_logp).sum(-1),
        "teacher_top1_prob": t_p.max(-1).values,
        "agreement": (student_top1 == teacher_logp.argmax(-1)).float(),
        "student_top1_prob": s_p.max(-1).values,
        "teacher_rank": (teacher_logp > teacher_at_student_top1).sum(-1).float(),
    }
    counted = mask.bool()
    return {k: torch.where(counted, v, torch.zeros((), dtype=v.dtype, device=v.device)) for k, v in stats.items()}


def bucket_means(values: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[list[float], list[int]]:
    """Mean of (B, T) values over the counted positions in each bucket [i*width, (i+1)*width).

    Returns (means, counts) for every bucket up to the last counted position; a bucket with no
    counted position has mean nan.
    """
    positions = int(mask.shape[1])
    means, counts = [], []
    for start in range(0, positions, width):
        m = mask[:, start : start + width]
        n = int(m.sum().item())
        means.append(float((values[:, start : start + width] * m).sum().item() / n) if n else float("nan"))
        counts.append(n)
    while counts and counts[-1] == 0:
        means.pop()
        counts.pop()
    return means, counts


def kl_share(kl: torch.Tensor, mask: torch.Tensor, ks: list[int], skip_first: bool = False) -> dict[int, float]:
    """For each K, the mean over trajectories of the share of a trajectory's total KL that falls in
    its first K tokens (trajectories with zero total KL are left out).

    skip_first=True leaves response position 0 out of both the share and the total: the first
    position often carries a large, template-driven KL (the student's opening against the teacher's
    own format) that inflates "the first K tokens hold most of the KL".
    """
    kl = torch.where(mask.bool(), kl, torch.zeros((), dtype=kl.dtype))
    if skip_first:
        kl = kl.clone()
        kl[:, 0] = 0
    total = kl.sum(-1)  # (B,)
    keep = total > 0
    out = {}
    for k in ks:
        share = kl[:, :k].sum(-1)[keep] / total[keep]
        out[k] = float(share.mean().item()) if keep.any() else float("nan")
    return out


def first_position_share(kl: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over trajectories of the share of a trajectory's KL at response position 0."""
    kl = torch.where(mask.bool(), kl, torch.zeros((), dtype=kl.dtype))
    total = kl.sum(-1)
    keep = total > 0
    return float((kl[:, 0][keep] / total[keep]).mean()) if keep.any() else float("nan")


def submode_commitment(stats: dict[str, torch.Tensor], mask: torch.Tensor, top_frac: float = 0.1) -> dict[str, float]:
    """On the top `top_frac` of counted tokens by reverse KL: where the student's top-1 token sits in
    the teacher's ranking (equal to the teacher's top-1 / in its top 2-5 / outside its top 5), and the
    student's mean top-1 probability there. Shares add up to 1."""
    counted = mask.bool()
    kl = stats["reverse_kl"][counted]
    n = kl.numel()
    if n == 0:
        return {"tokens": 0, "equal_top1": float("nan"), "top2_5": float("nan"), "outside_top5": float("nan"),
                "student_top1_prob": float("nan")}
    take = max(1, int(round(top_frac * n)))
    chosen = kl.topk(take).indices
    rank = stats["teacher_rank"][counted][chosen]
    return {
        "tokens": take,
        "equal_top1": float((rank == 0).float().mean().item()),
        "top2_5": float(((rank >= 1) & (rank <= 4)).float().mean().item()),
        "outside_top5": float((rank >= 5).float().mean().item()),
        "student_top1_prob": float(stats["student_top1_prob"][counted][chosen].mean().item()),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def recommend_k(
    ks: list[int],
    teacher_accuracy: list[float],
    share_ks: list[int],
    shares: list[float],
    teacher_lengths: list[int],
    decay_fraction: float = 0.9,
    share_target: float = 0.5,
    first_left_out: bool = False,
) -> dict:
    """A rollout length K from the evidence, with the reason.

    decay: the largest tested prefix length k > 0 up to which the teacher, continuing from the
        student's first k tokens, keeps at least `decay_fraction` of its own accuracy (k = 0); past
        it the teacher's signal is more continuation of the student than correction. On the paper's
        own figures (65.3 / 62.7 / 56.3 / 51.75 at k = 0 / 100 / 200 / 300) this gives K = 100.
    coverage: when the teacher keeps under that fraction even after the shortest student prefix
        tested, the student's first tokens already lead it astray and the student has to learn the
        teacher's whole answer: K = the 90th percentile of the teacher's response length, EOS
        included, so that K also reaches the point where the answer stops.
    share: the smallest K whose first K tokens hold `share_target` of a trajectory's KL; used when
        the teacher solves nothing, so that accuracy says nothing. Pass the shares without position 0
        (kl_share(skip_first=True)) and say so with `first_left_out`.
    teacher_lengths: token counts of the teacher's own responses (EOS included).
    """
    rules: dict[str, int | None] = {"decay": None, "coverage": None, "share": None}
    for k, share in zip(share_ks, shares):
        if share == share and share >= share_target:  # share == share: not nan
            rules["share"] = k
            break
    reasons = []
    solved = bool(ks) and ks[0] == 0 and bool(teacher_accuracy) and teacher_accuracy[0] > 0
    if solved:
        base = teacher_accuracy[0]
        for k, acc in zip(ks[1:], teacher_accuracy[1:]):
            if acc < decay_fraction * base:
                break
            rules["decay"] = k
    if rules["decay"] is not None:
        k = rules["decay"]
        reasons.append(f"the teacher keeps >= {decay_fraction:.0%} of its own accuracy ({teacher_accuracy[0]:.1%}) "
                       f"when it continues student prefixes of up to {k} tokens")
    elif solved and teacher_lengths:
        k = rules["coverage"] = int(percentile(teacher_lengths, 90))
        reasons.append(f"the teacher falls under {decay_fraction:.0%} of its own accuracy ({teacher_accuracy[0]:.1%}) already "
                       f"after {ks[1] if len(ks) > 1 else '-'} student tokens, so the student must learn the teacher's whole "
                       f"answer: 90% of the teacher's answers take at most {k} tokens, EOS included")
    elif rules["share"] is not None:
        k = rules["share"]
        reasons.append(f"the teacher solves none of the problems, so the first {k} tokens, which hold "
                       f">= {share_target:.0%} of a trajectory's KL"
                       + (" (response position 0 left out of the shares)" if first_left_out else "") + ", are taken")
    else:
        k = share_ks[-1] if share_ks else None
        reasons.append("no rule applies; the longest measured length is given")
    if k is not None and teacher_lengths and percentile(teacher_lengths, 50) <= k:
        covered = sum(length <= k for length in teacher_lengths) / len(teacher_lengths)
        reasons.append(f"most of the teacher's answers end within K ({covered:.0%}), so ESR at this K is close to a full rollout")
    return {"k": k, "rules": rules, "reason": "; ".join(reasons)}


def alignment_summary(aligned: torch.Tensor, response: torch.Tensor, student_mass: torch.Tensor, teacher_mass: torch.Tensor,
                      ids: torch.Tensor, unit_of: torch.Tensor, width: int, top: int = 10) -> dict:
    """How well a cross-tokenizer pair lines up on a batch of student rollouts.

    aligned, response: (B, T) masks (positions with a teacher position; positions of the response).
    student_mass, teacher_mass: (B, T) probability on shared units at the aligned positions.
    ids: (B, T) the student's tokens; unit_of: (Vs,) the unit of each student id, -1 when unmapped.
    Returns the aligned fraction, per bucket of `width` positions the aligned fraction and both mean
    mapped masses, and the `top` most frequent unaligned and unmapped student token ids with counts.
    """
    from collections import Counter

    response, aligned = response.bool(), aligned.bool() & response.bool()
    unmapped = response & (unit_of[ids.clamp(min=0)] < 0)
    return {
        "aligned_frac": float(aligned.sum() / response.sum().clamp(min=1)),
        "bucket_width": width,
        "aligned_by_bucket": bucket_means(aligned.float(), response.float(), width)[0],
        "student_mass_by_bucket": bucket_means(student_mass, aligned.float(), width)[0],
        "teacher_mass_by_bucket": bucket_means(teacher_mass, aligned.float(), width)[0],
        "student_mass": float(student_mass[aligned].mean()) if aligned.any() else float("nan"),
        "teacher_mass": float(teacher_mass[aligned].mean()) if aligned.any() else float("nan"),
        "top_unaligned": Counter(ids[response & ~aligned].tolist()).most_common(top),
        "top_unmapped": Counter(ids[unmapped].tolist()).most_common(top),
        "unmapped_frac": float(unmapped.sum() / response.sum().clamp(min=1)),
    }
