"""The measurements behind `esrdistill diagnose` and `rollout_tokens=auto`: both models' rollouts, the teacher's
decay by prefix continuation, the per-position profile of the student's rollouts under the teacher, and the K they
recommend (diagnostics.py holds the pure maths on their tensors). commands/diagnose.py writes them into a report;
train() asks auto_k for its K.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from esrdistill import build, diagnostics, rollout
from esrdistill.config import Config
from esrdistill.engines.hf import HFEngine
from esrdistill.evalstats import wilson_interval
from esrdistill.losses import log_probs
from esrdistill.teachers import xtok


def generate_all(engine, prompts, sampling: rollout.Sampling, batch_size, desc, progress):
    """Sample one response per prompt with a rollout engine; token lists without padding (EOS kept when
    it came)."""
    out = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, unit="seq")
    for start in range(0, len(prompts), batch_size):
        batch = engine.sample(prompts[start : start + batch_size], sampling)
        out += [batch.responses[row, : int(batch.mask[row].sum())].tolist() for row in range(batch.responses.shape[0])]
        bar.update(batch.responses.shape[0])
    bar.close()
    return out


def _as_batch(responses: list[list[int]], pad_id: int, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in responses))
    ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    for row, r in enumerate(responses):
        ids[row, : len(r)] = torch.tensor(r, dtype=torch.long)
    mask = rollout.response_mask(ids, eos_ids) * (torch.arange(width)[None, :] < torch.tensor([len(r) for r in responses])[:, None])
    return ids, mask


@torch.no_grad()
def profile(student, scorer, student_prompts, teacher_prompts, responses, pad_id, eos_ids, vocab_size, micro_batch, progress, desc):
    """position_stats of every rollout, as (B, T) tensors over the longest response, and the mask of
    the positions they cover (across tokenizers: the aligned ones, compared on the shared units, with
    the mapped masses as two more stats). Returns (stats, mask, response ids, response mask)."""
    ids, response_mask = _as_batch(responses, pad_id, eos_ids)
    plan = scorer.plan(teacher_prompts, ids, response_mask)
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(responses), micro_batch), desc=desc, disable=not progress, leave=False):
        rows = list(range(start, min(start + micro_batch, len(responses))))
        logits = rollout.response_logits(student, [student_prompts[r] for r in rows], ids[rows], response_mask[rows], pad_id)
        s_logp = log_probs(logits, vocab_size)
        scores = scorer.score(plan, rows, ids.shape[1])
        s_lp, t_lp = scorer.comparable(s_logp, scores)
        stats = diagnostics.position_stats(s_lp, t_lp.to(s_lp.device), scores.mask.to(s_lp.device))
        if scorer.kind == "cross":
            metrics = scorer.compare(s_logp, scores, ids[rows].to(s_logp.device)).metrics
            stats["student_mapped_mass"] = metrics["xtok/student_mapped_mass"]
            stats["teacher_mapped_mass"] = metrics["xtok/teacher_mapped_mass"]
        for key, value in stats.items():
            chunks.setdefault(key, []).append(value.cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}, plan.mask, ids, response_mask


def _strip_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos_ids else tokens


def prefix_continuation(engine, prompts, responses, ks, sampling: rollout.Sampling, batch_size, tokenizer, grade, problems,
                        progress, desc, bridge: xtok.TextBridge | None = None, source_eos: list[int] | None = None):
    """Accuracy after the model of `engine` continues from the first k tokens of each response, for each k.

    sampling: how the continuation is drawn (with `model`'s EOS and vocabulary); its max_new_tokens is
    the whole response's budget, so a continuation from k tokens gets max_new_tokens - k more.
    responses: token ids of the model that wrote them; `bridge` turns them into `model`'s ids through
    their text when the two tokenizers differ (None: the same tokenizer), and source_eos are the
    writer's EOS ids (default: the sampling's). A response that ended (EOS) within k tokens is graded
    as it is: there is nothing to continue. Returns {k: accuracy}, and the texts graded.
    """
    eos_ids = list(source_eos if source_eos is not None else sampling.eos_ids)
    bridge = bridge or xtok.TextBridge(tokenizer, tokenizer, same=True)
    accuracy, texts = {}, {}
    for k in ks:
        prefixes = [_strip_eos(r, eos_ids)[:k] for r in responses]
        finished = [len(_strip_eos(r, eos_ids)) <= k and r and r[-1] in eos_ids for r in responses]
        todo = [i for i, done in enumerate(finished) if not done]
        budget = replace(sampling, max_new_tokens=max(1, sampling.max_new_tokens - k))
        continued = dict(zip(todo, generate_all(engine, [prompts[i] + bridge.ids(prefixes[i]) for i in todo], budget, batch_size,
                                                f"{desc} k={k}", progress)))
        if bridge.same:
            texts[k] = [tokenizer.decode(prefixes[i] + continued[i] if i in continued else responses[i], skip_special_tokens=True)
                        for i in range(len(responses))]
        else:
            texts[k] = [bridge.text(prefixes[i]) + tokenizer.decode(continued[i], skip_special_tokens=True) if i in continued
                        else bridge.text(responses[i]) for i in range(len(responses))]
        accuracy[k] = sum(bool(grade(t, p)) for t, p in zip(texts[k], problems)) / max(len(problems), 1)
    return accuracy, texts


@dataclass
class Measured:
    """The rollouts of both models, the teacher's decay curve and the per-position profile."""

    decay: dict
    stats: dict
    mask: torch.Tensor  # (B, T) positions the profile covers
    ids: torch.Tensor
    response_mask: torch.Tensor
    student_rollouts: list
    teacher_rollouts: list
    teacher_lengths: list[int]  # the teacher's answers in student tokens, EOS included
    share_ks: list[int]
    shares: dict
    shares_without_first: dict
    first_share: float
    gen: object  # gen(model, prompts, desc, side="student") -> token lists


def measure(cfg: Config, pair, scorer, ps, grade, ks: list[int], bucket: int, say, progress: bool, steps: str = "5") -> Measured:
    """Roll both models out on the prompt set, run the decay analysis and profile the student."""
    pad, eos = pair.tokenizer.pad_token_id, pair.eos_ids
    micro = cfg.teacher_micro_batch or cfg.micro_batch_size
    to_teacher = xtok.TextBridge(pair.tokenizer, pair.teacher_tokenizer, same=not pair.cross)
    to_student = xtok.TextBridge(pair.teacher_tokenizer, pair.tokenizer, same=not pair.cross)

    def gen(model, prompts, desc, side="student"):
        sampling = build.rollout_sampling(cfg, pair, cfg.max_new_tokens, side)
        return generate_all(HFEngine(model), prompts, sampling, cfg.eval_batch_size, desc, progress)

    say(f"Rolling out student and teacher on {len(ps.problems)} problems (up to {cfg.max_new_tokens} tokens) ...")
    student_rollouts = gen(pair.student, ps.student_ids, "student rollouts")
    teacher_rollouts = gen(pair.teacher, ps.teacher_ids, "teacher rollouts", side="teacher")

    say(f"[1/{steps}] Teacher decay by prefix continuation ...")
    teacher_continues = build.eval_sampling(cfg, pair.teacher_tokenizer, pair.teacher_eos_ids, len(pair.teacher_tokenizer))
    student_continues = build.eval_sampling(cfg, pair.tokenizer, eos, pair.vocab_size)
    t_acc, _ = prefix_continuation(HFEngine(pair.teacher), ps.teacher_ids, student_rollouts, ks, teacher_continues, cfg.eval_batch_size,
                                   pair.teacher_tokenizer, grade, ps.problems, progress, "teacher continues student",
                                   bridge=to_teacher, source_eos=eos)
    s_acc, _ = prefix_continuation(HFEngine(pair.student), ps.student_ids, teacher_rollouts, ks, student_continues, cfg.eval_batch_size,
                                   pair.tokenizer, grade, ps.problems, progress, "student continues teacher",
                                   bridge=to_student, source_eos=pair.teacher_eos_ids)
    n = len(ps.problems)
    decay = {
        "ks": ks, "n": n,
        "teacher_continues_student": [t_acc[k] for k in ks],
        "teacher_ci": [wilson_interval(round(t_acc[k] * n), n) for k in ks],
        "student_continues_teacher": [s_acc[k] for k in ks],
        "student_ci": [wilson_interval(round(s_acc[k] * n), n) for k in ks],
    }

    say(f"[2/{steps}] Per-position profile of the student's rollouts ...")
    stats, mask, ids, response_mask = profile(pair.student, scorer, ps.student_ids, ps.teacher_ids, student_rollouts, pad, eos,
                                              pair.vocab_size, micro, progress, "profile")
    share_ks = sorted({*range(bucket, mask.shape[1] + bucket, bucket)})
    # the teacher's answer lengths in student tokens (the K rule counts student tokens)
    teacher_lengths = [len(to_student.ids(r)) + (1 if r and r[-1] in pair.teacher_eos_ids else 0) if pair.cross else len(r)
                       for r in teacher_rollouts]
    return Measured(decay=decay, stats=stats, mask=mask, ids=ids, response_mask=response_mask, student_rollouts=student_rollouts,
                     teacher_rollouts=teacher_rollouts, teacher_lengths=teacher_lengths, share_ks=share_ks,
                     shares=diagnostics.kl_share(stats["reverse_kl"], mask, share_ks),
                     shares_without_first=diagnostics.kl_share(stats["reverse_kl"], mask, share_ks, skip_first=True),
                     first_share=diagnostics.first_position_share(stats["reverse_kl"], mask), gen=gen)


def recommend(m: Measured, decay_fraction: float, share_target: float) -> dict:
    """The recommended K from a measurement; the KL-share rule leaves response position 0 out."""
    return diagnostics.recommend_k(m.decay["ks"], m.decay["teacher_continues_student"], m.share_ks,
                                   [m.shares_without_first[k] for k in m.share_ks], m.teacher_lengths, decay_fraction,
                                   share_target, first_left_out=True)


def auto_k(cfg: Config, pair, task, grade, say=tqdm.write) -> tuple[int, str]:
    """rollout_tokens=auto: the diagnostics' recommended K for this teacher, student and task, measured
    on `auto_k_problems` held-out problems (the training prompts when there are none), prefixes at
    powers of two up to max_new_tokens."""
    problems = (task.eval or task.train)[: cfg.auto_k_problems]
    ps = build.prompt_set(cfg, pair, task, problems, cfg.max_new_tokens, "max_new_tokens")
    ps.require("problems to choose K on")
    ks = [0] + [2**i for i in range(2, 16) if 2**i < cfg.max_new_tokens]
    bucket = max(1, cfg.max_new_tokens // 32)
    m = measure(cfg, pair, build.teacher(cfg, pair), ps, grade, ks, bucket, say, cfg.progress, steps="2")
    rec = recommend(m, 0.9, 0.5)
    k = max(1, min(int(rec["k"] or cfg.max_new_tokens), cfg.max_new_tokens))
    return k, f"{rec['reason']} (measured on {len(ps.problems)} problems)"
