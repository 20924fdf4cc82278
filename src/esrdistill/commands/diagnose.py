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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esrdistill import build, diagnostics, measure, models
from esrdistill.commands import plots
from esrdistill.config import Config, ConfigError
from esrdistill.data import DataError


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
    scorer = build.teacher(cfg, pair)
    ps = build.prompt_set(cfg, pair, task, problems, cfg.max_new_tokens, "max_new_tokens")
    ps.require("problems to diagnose")
    pad, eos, progress = pair.tokenizer.pad_token_id, pair.eos_ids, cfg.progress
    micro = cfg.teacher_micro_batch or cfg.micro_batch_size
    k_mark = options.k if options.k is not None else (cfg.rollout_tokens if isinstance(cfg.rollout_tokens, int) else None)
    ks = sorted({k for k in options.prefixes if k < cfg.max_new_tokens} | {0})
    say = tqdm.write
    say(pair.describe())
    if ps.dropped:
        say(f"Note: {ps.dropped} problems dropped: {ps.why_dropped}")
    m = measure.measure(cfg, pair, scorer, ps, grade, ks, options.bucket, say, progress, steps="5")
    decay, stats, mask, student_rollouts, gen = m.decay, m.stats, m.mask, m.student_rollouts, m.gen
    n = len(ps.problems)
    profile_before = _profile_summary(stats, mask, options.bucket)
    profile_before["kl_share"] = {str(k): v for k, v in m.shares.items()}
    profile_before["kl_share_without_first"] = {str(k): v for k, v in m.shares_without_first.items()}
    profile_before["first_position_kl_share"] = m.first_share
    alignment = None
    if pair.cross:
        alignment = diagnostics.alignment_summary(mask, m.response_mask, stats["student_mapped_mass"], stats["teacher_mapped_mass"],
                                                  m.ids, scorer.map.student_unit_of.cpu(), options.bucket)
        for key in ("top_unaligned", "top_unmapped"):
            alignment[key] = [[pair.tokenizer.convert_ids_to_tokens(i), c] for i, c in alignment[key]]
        alignment.update(vocab_mapped=scorer.map.vocab_mapped, units=scorer.map.units, student_vocab=pair.vocab_size,
                         teacher_vocab=len(pair.teacher_tokenizer), rule=cfg.xtok_align)
        say(f"Alignment: {alignment['aligned_frac']:.1%} of student positions aligned, mapped mass "
            f"{alignment['student_mass']:.1%} (student) / {alignment['teacher_mass']:.1%} (teacher), "
            f"{alignment['vocab_mapped']:.1%} of the student's vocabulary shared")

    lengths = {"student": statistics.median(len(r) for r in student_rollouts), "teacher": statistics.median(m.teacher_lengths)}
    submode = {"student": diagnostics.submode_commitment(stats, mask, options.top_frac)}
    cascading = None
    if options.student_after:
        say(f"[3/5] Cascading alignment: fresh rollouts of {options.student_after} ...")
        after = models.load_model(options.student_after, pair.dtype, device, cfg.model_cache)
        after_rollouts = gen(after, ps.student_ids, "trained student rollouts")
        after_stats, after_mask, _, _ = measure.profile(after, scorer, ps.student_ids, ps.teacher_ids, after_rollouts, pad, eos,
                                                pair.vocab_size, micro, progress, "profile (trained)")
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
    recommendation = measure.recommend(m, options.decay_fraction, options.share_target)
    result = {
        "teacher": cfg.teacher, "student": cfg.student, "student_after": options.student_after, "dataset": cfg.dataset,
        "problems": n, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "options": asdict(options),
        "decay": decay, "profile": profile_before, "cascading": cascading, "submode": submode,
        "median_lengths": lengths, "recommendation": recommendation, "alignment": alignment,
        "tokenizers": pair.describe(), "seconds": time.perf_counter() - started,
    }
    (out / "diagnostics.json").write_text(json.dumps(_json_safe(result), indent=2))
    (out / "recommended_k.txt").write_text(f"{recommendation['k']}\n{recommendation['reason']}\n")
    pngs = plots.write_all(result, out)
    (out / "report.md").write_text(plots.report_markdown(result, pngs))
    say(f"Recommended K = {recommendation['k']}: {recommendation['reason']}")
    say(f"Wrote {out / 'report.md'}, diagnostics.json and {len(pngs)} plots")
    return result
