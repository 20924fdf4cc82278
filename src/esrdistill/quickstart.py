"""`esrdistill quickstart`: the embedded default end to end on packaged models, with no network.

Accuracy of the teacher and the student before, ESR distillation with a progress bar, accuracy of
the student after, and the time of every phase; the run directory is left behind with a report.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path

from esrdistill.config import load_config, parse_overrides
from esrdistill.evaluate import EvalResult, run_eval
from esrdistill.packaged import is_packaged, resolve
from esrdistill.tracking import read_metrics
from esrdistill.train import train

DEFAULT_CONFIG = files("esrdistill") / "configs" / "quickstart.yaml"


def _line(name: str, r: EvalResult) -> str:
    lo, hi = r.accuracy_ci
    correct = sum(sum(p.correct) for p in r.problems)
    total = sum(len(p.correct) for p in r.problems)
    return f"| {name} | {r.accuracy:.1%} ({correct}/{total}) | {lo:.1%}-{hi:.1%} | {r.len_mean:.1f} | {r.cut_frac:.0%} |"


def quickstart(overrides: list[str] | None = None) -> dict:
    """Run the embedded default; return the report it also writes to RUN_DIR/quickstart.json."""
    values = parse_overrides(overrides or [])
    values.setdefault("run_dir", f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = load_config(str(DEFAULT_CONFIG), values)
    run_dir = Path(cfg.run_dir)
    seconds: dict[str, float] = {}
    say = print
    say(f"esrdistill quickstart: distil {cfg.teacher} (with {cfg.teacher_fewshot} worked examples in its prompt) "
        f"into {cfg.student} on {cfg.dataset}, ESR K={cfg.rollout_tokens}, {cfg.steps} steps of {cfg.batch_size} prompts.")
    say(f"Run directory: {run_dir}")

    start = time.perf_counter()
    say("[1/4] Preparing the packaged models (converted once, then cached) ...")
    for spec in {cfg.student, cfg.teacher}:
        if is_packaged(spec):
            resolve(spec, cfg.model_cache)
    seconds["prepare_models"] = time.perf_counter() - start

    say(f"[2/4] Accuracy before distillation on {cfg.eval_prompts} held-out problems (greedy) ...")
    start = time.perf_counter()
    teacher_before = run_eval(cfg, cfg.teacher, view="teacher", progress=cfg.progress)
    student_before = run_eval(cfg, cfg.student, view="student", progress=cfg.progress)
    seconds["eval_before"] = time.perf_counter() - start
    say(f"      teacher {teacher_before.accuracy:.1%}, student {student_before.accuracy:.1%}")

    say(f"[3/4] Distilling with ESR (K={cfg.rollout_tokens} tokens per rollout) ...")
    start = time.perf_counter()
    train(cfg)
    seconds["train"] = time.perf_counter() - start

    say("[4/4] Accuracy of the distilled student ...")
    start = time.perf_counter()
    student_after = run_eval(cfg, str(run_dir / "final"), view="student", progress=cfg.progress)
    seconds["eval_after"] = time.perf_counter() - start

    metrics = read_metrics(run_dir)
    phases = {phase: sum(m.get(f"time/{phase}_s", 0.0) for m in metrics) for phase in ("rollout", "teacher", "train")}
    per_step = {phase: total / max(len(metrics), 1) for phase, total in phases.items()}
    table = "\n".join([
        "| model | accuracy | 95% CI | mean length (tokens) | cut at the limit |",
        "|---|---|---|---|---|",
        _line("teacher (with worked examples)", teacher_before),
        _line("student before", student_before),
        _line("student after ESR", student_after),
    ])
    timing = "\n".join([
        "| phase | total s | per step s |",
        "|---|---|---|",
        *[f"| {phase} | {phases[phase]:.1f} | {per_step[phase]:.2f} |" for phase in phases],
        f"| whole quickstart | {sum(seconds.values()):.1f} | |",
    ])
    say("\n" + table + "\n\n" + timing)
    if student_after.accuracy > student_before.accuracy:
        say(f"\nThe student rose from {student_before.accuracy:.1%} to {student_after.accuracy:.1%} "
            f"(the teacher: {teacher_before.accuracy:.1%}).")
    else:
        say("\nThe student did not improve in this run; with a tiny budget (few steps or problems) that is expected.")
    say(f"Run directory: {run_dir} (config.yaml, metrics.jsonl, final/, quickstart.json, report.md)")

    report = {
        "dataset": cfg.dataset,
        "eval_problems": student_after.n_problems,
        "teacher_before": teacher_before.to_dict(),
        "student_before": student_before.to_dict(),
        "student_after": student_after.to_dict(),
        "seconds": seconds,
        "phase_seconds": phases,
    }
    (run_dir / "quickstart.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(f"# esrdistill quickstart\n\n{table}\n\n{timing}\n")
    return report
