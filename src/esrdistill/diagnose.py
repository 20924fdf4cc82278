"""`esrdistill diagnose`: why a teacher's signal decays along a student's rollout, and what K to use.

1. teacher decay by prefix continuation (and the reverse direction),
2. per-position profile of student rollouts under student and teacher,
3. cascading alignment: the KL profile of a second (trained) student against the first,
4. sub-mode commitment on the highest-KL tokens, with response lengths,
5. a recommended K with its reason.
Writes diagnostics.json, report.md and one PNG per analysis to the output directory.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esrdistill import build, diagnostics, models, rollout, teacher as teacher_scoring
from esrdistill.config import Config, ConfigError
from esrdistill.data import DataError
from esrdistill.evalstats import wilson_interval


@dataclass(frozen=True)
class DiagnoseOptions:
    out: str  # output directory
    student_after: str | None = None  # a second student (e.g. the trained one) for analyses 3 and 4
    problems: int = 32  # held-out problems to roll out on
    prefixes: tuple[int, ...] = (0, 25, 50, 100, 200)  # prefix lengths k of the decay analysis
    bucket: int = 25  # positions per bucket of the per-position profile
    k: int | None = None  # the K to mark on plots; None = the config's rollout_tokens
    decay_fraction: float = 0.9  # decay rule: keep this fraction of the teacher's own accuracy
    share_target: float = 0.5  # share rule: the first K tokens hold this share of the KL
    top_frac: float = 0.1  # sub-mode commitment looks at this fraction of highest-KL tokens

    def __post_init__(self):
        checks = [(self.problems >= 1, f"--problems must be >= 1, got {self.problems}"),
                  (self.bucket >= 1, f"--bucket must be >= 1, got {self.bucket}"),
                  (all(k >= 0 for k in self.prefixes), f"--prefixes must be >= 0, got {self.prefixes}"),
                  (0 < self.decay_fraction <= 1, f"--decay-fraction must be in (0, 1], got {self.decay_fraction}"),
                  (0 < self.share_target <= 1, f"--share-target must be in (0, 1], got {self.share_target}"),
                  (0 < self.top_frac <= 1, f"--top-frac must be in (0, 1], got {self.top_frac}")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def generate_all(model, prompts, sampling: rollout.Sampling, batch_size, desc, progress):
    """Sample one response per prompt; token lists without padding (EOS kept when it came)."""
    out = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, unit="seq")
    for start in range(0, len(prompts), batch_size):
        batch = rollout.sample(model, prompts[start : start + batch_size], sampling)
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
def profile(student, teacher, student_prompts, teacher_prompts, responses, pad_id, eos_ids, vocab_size, micro_batch, progress, desc):
    """position_stats of every rollout, as (B, T) tensors over the longest response, plus the mask."""
    ids, mask = _as_batch(responses, pad_id, eos_ids)
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(responses), micro_batch), desc=desc, disable=not progress, leave=False):
        rows = slice(start, start + micro_batch)
        s_logp = teacher_scoring.log_probs(rollout.response_logits(student, student_prompts[rows], ids[rows], mask[rows], pad_id), vocab_size)
        t_logp = teacher_scoring.score(teacher, teacher_prompts[rows], ids[rows], mask[rows], pad_id, vocab_size, micro_batch)
        for key, value in diagnostics.position_stats(s_logp, t_logp.to(s_logp.device), mask[rows].to(s_logp.device)).items():
            chunks.setdefault(key, []).append(value.cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}, mask


def _strip_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos_ids else tokens


def prefix_continuation(model, prompts, responses, ks, sampling: rollout.Sampling, batch_size, tokenizer, grade, problems, progress, desc):
    """Accuracy after `model` continues from the first k tokens of each response, for each k.

    sampling: how the continuation is drawn; its max_new_tokens is the whole response's budget, so a
    continuation from k tokens gets max_new_tokens - k more. A response that ended (EOS) within k
    tokens is graded as it is: there is nothing to continue. Returns {k: accuracy}, and the texts graded.
    """
    eos_ids = list(sampling.eos_ids)
    accuracy, texts = {}, {}
    for k in ks:
        prefixes = [_strip_eos(r, eos_ids)[:k] for r in responses]
        finished = [len(_strip_eos(r, eos_ids)) <= k and r and r[-1] in eos_ids for r in responses]
        todo = [i for i, done in enumerate(finished) if not done]
        budget = replace(sampling, max_new_tokens=max(1, sampling.max_new_tokens - k))
        continued = generate_all(model, [prompts[i] + prefixes[i] for i in todo], budget, batch_size, f"{desc} k={k}", progress)
        full = {i: prefixes[i] + c for i, c in zip(todo, continued)}
        texts[k] = [tokenizer.decode(full.get(i, responses[i]), skip_special_tokens=True) for i in range(len(responses))]
        accuracy[k] = sum(bool(grade(t, p)) for t, p in zip(texts[k], problems)) / max(len(problems), 1)
    return accuracy, texts


def _profile_summary(stats, mask, width):
    buckets = {key: diagnostics.bucket_means(stats[key], mask, width)[0] for key in diagnostics.PROFILE_KEYS}
    counts = diagnostics.bucket_means(stats["reverse_kl"], mask, width)[1]
    return {"bucket_width": width, "bucket_starts": [i * width for i in range(len(counts))], "counts": counts, **buckets}


def _json_safe(value):
    """NaN and infinities (an empty bucket's mean) become null, so any JSON reader takes the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def diagnose(cfg: Config, options: DiagnoseOptions) -> dict:
    """Run the five analyses; write diagnostics.json, report.md and the plots into options.out."""
    from esrdistill import plots

    started = time.perf_counter()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    device = models.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    task = build.task(cfg, need_train=False)  # held-out problems only: no training rows needed
    grade = build.grader(cfg, task)  # a bad grader fails before the models load
    problems = task.eval[: options.problems]
    if not problems:
        raise DataError("no problems to diagnose: set eval_prompts > 0 (diagnose uses the held-out problems)")
    pair = build.pair(cfg, device, trainable=False)
    ps = build.prompt_set(cfg, pair, task, problems, cfg.max_new_tokens, "max_new_tokens")
    ps.require("problems to diagnose")
    pad, eos, progress = pair.tokenizer.pad_token_id, pair.eos_ids, cfg.progress
    micro = cfg.teacher_micro_batch or cfg.micro_batch_size
    k_mark = options.k if options.k is not None else cfg.rollout_tokens
    ks = sorted({k for k in options.prefixes if k < cfg.max_new_tokens} | {0})
    say = tqdm.write
    if ps.dropped:
        say(f"Note: {ps.dropped} problems dropped: {ps.why_dropped}")

    say(f"Rolling out student and teacher on {len(ps.problems)} problems (up to {cfg.max_new_tokens} tokens) ...")
    rollouts = build.rollout_sampling(cfg, pair, cfg.max_new_tokens)
    continuation = build.eval_sampling(cfg, pair.tokenizer, eos, pair.vocab_size)
    gen = lambda model, prompts, desc: generate_all(model, prompts, rollouts, cfg.eval_batch_size, desc, progress)  # noqa: E731
    student_rollouts = gen(pair.student, ps.student_ids, "student rollouts")
    teacher_rollouts = gen(pair.teacher, ps.teacher_ids, "teacher rollouts")

    say("[1/5] Teacher decay by prefix continuation ...")
    t_acc, _ = prefix_continuation(pair.teacher, ps.teacher_ids, student_rollouts, ks, continuation, cfg.eval_batch_size,
                                   pair.tokenizer, grade, ps.problems, progress, "teacher continues student")
    s_acc, _ = prefix_continuation(pair.student, ps.student_ids, teacher_rollouts, ks, continuation, cfg.eval_batch_size,
                                   pair.tokenizer, grade, ps.problems, progress, "student continues teacher")
    n = len(ps.problems)
    decay = {
        "ks": ks, "n": n,
        "teacher_continues_student": [t_acc[k] for k in ks],
        "teacher_ci": [wilson_interval(round(t_acc[k] * n), n) for k in ks],
        "student_continues_teacher": [s_acc[k] for k in ks],
        "student_ci": [wilson_interval(round(s_acc[k] * n), n) for k in ks],
    }

    say("[2/5] Per-position profile of the student's rollouts ...")
    stats, mask = profile(pair.student, pair.teacher, ps.student_ids, ps.teacher_ids, student_rollouts, pad, eos, pair.vocab_size, micro, progress, "profile")
    share_ks = sorted({*range(options.bucket, mask.shape[1] + options.bucket, options.bucket)})
    shares = diagnostics.kl_share(stats["reverse_kl"], mask, share_ks)
    profile_before = _profile_summary(stats, mask, options.bucket)
    profile_before["kl_share"] = {str(k): v for k, v in shares.items()}

    lengths = {"student": statistics.median(len(r) for r in student_rollouts),
               "teacher": statistics.median(len(r) for r in teacher_rollouts)}
    submode = {"student": diagnostics.submode_commitment(stats, mask, options.top_frac)}
    cascading = None
    if options.student_after:
        say(f"[3/5] Cascading alignment: fresh rollouts of {options.student_after} ...")
        after = models.load_model(options.student_after, pair.dtype, device, cfg.model_cache)
        after_rollouts = gen(after, ps.student_ids, "trained student rollouts")
        after_stats, after_mask = profile(after, pair.teacher, ps.student_ids, ps.teacher_ids, after_rollouts, pad, eos, pair.vocab_size, micro, progress, "profile (trained)")
        after_profile = _profile_summary(after_stats, after_mask, options.bucket)
        width = min(len(profile_before["reverse_kl"]), len(after_profile["reverse_kl"]))
        change = [(a - b) / b if b and b == b and a == a else float("nan")
                  for a, b in zip(after_profile["reverse_kl"][:width], profile_before["reverse_kl"][:width])]
        cascading = {"before": profile_before["reverse_kl"], "after": after_profile["reverse_kl"],
                     "bucket_starts": after_profile["bucket_starts"], "relative_change": change, "k": k_mark,
                     "after_profile": after_profile}
        lengths["trained_student"] = statistics.median(len(r) for r in after_rollouts)
        submode["trained_student"] = diagnostics.submode_commitment(after_stats, after_mask, options.top_frac)
        del after
    else:
        say("[3/5] Cascading alignment: skipped (give --student-after, e.g. RUN_DIR/final)")

    say("[4/5] Sub-mode commitment and [5/5] the recommended K ...")
    recommendation = diagnostics.recommend_k(ks, decay["teacher_continues_student"], share_ks, [shares[k] for k in share_ks],
                                             [len(r) for r in teacher_rollouts], options.decay_fraction, options.share_target)
    result = {
        "teacher": cfg.teacher, "student": cfg.student, "student_after": options.student_after, "dataset": cfg.dataset,
        "problems": n, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "options": asdict(options),
        "decay": decay, "profile": profile_before, "cascading": cascading, "submode": submode,
        "median_lengths": lengths, "recommendation": recommendation, "seconds": time.perf_counter() - started,
    }
    (out / "diagnostics.json").write_text(json.dumps(_json_safe(result), indent=2))
    (out / "recommended_k.txt").write_text(f"{recommendation['k']}\n{recommendation['reason']}\n")
    pngs = plots.write_all(result, out)
    (out / "report.md").write_text(plots.report_markdown(result, pngs))
    say(f"Recommended K = {recommendation['k']}: {recommendation['reason']}")
    say(f"Wrote {out / 'report.md'}, diagnostics.json and {len(pngs)} plots")
    return result
