"""`esrdistill quickstart [cross|teachers]`: an embedded default end to end on packaged models, with no network.

Accuracy of the teacher and the student before, distillation with ESR and a progress bar, accuracy of
the distilled student, the time of every phase, (across tokenizers) how well the two tokenizers line up,
and (several teachers) each task's figures; the run directory is left behind with a report.
"""

from __future__ import annotations

import json
import shlex
import time
from importlib.resources import files
from pathlib import Path

from esrdistill import build, routing
from esrdistill.commands import runreport
from esrdistill.commands.evaluation import run_eval
from esrdistill.config import ConfigError, load_config, parse_overrides
from esrdistill.evaluate import EvalResult, summarise
from esrdistill.tracking import read_metrics
from esrdistill.train import TrainingInterrupted, train

DEFAULT_CONFIG = files("esrdistill") / "configs" / "quickstart.yaml"
CROSS_CONFIG = files("esrdistill") / "configs" / "quickstart_cross.yaml"
TEACHERS_CONFIG = files("esrdistill") / "configs" / "quickstart_teachers.yaml"
VARIANTS = {"default": DEFAULT_CONFIG, "cross": CROSS_CONFIG, "teachers": TEACHERS_CONFIG}
# The distilled student must gain this much accuracy for the quickstart to call it taught (CI checks
# quickstart.json against it: scripts/check_quickstart.py).
MIN_GAIN = 0.4
XTOK_KEYS = ("xtok/aligned_frac", "xtok/student_mapped_mass", "xtok/teacher_mapped_mass", "xtok/vocab_mapped")


def _line(name: str, r: EvalResult) -> str:
    lo, hi = r.accuracy_ci
    correct = sum(sum(p.correct) for p in r.problems)
    total = sum(len(p.correct) for p in r.problems)
    return f"| {name} | {r.accuracy:.1%} ({correct}/{total}) | {lo:.1%}-{hi:.1%} | {r.len_mean:.1f} | {r.cut_frac:.0%} |"


def _title(cfg) -> str:
    return f"student after ESR, K={cfg.rollout_tokens}" if cfg.rollout_tokens else f"student after a full rollout (up to {cfg.max_new_tokens})"


def _parts(cfg) -> list[str | None]:
    """The evaluation's parts: each teacher's rows when rows are routed (teacher_field), else the whole set."""
    return list(cfg.teachers) if cfg.teacher_field else [None]


def _run_eval(cfg, model: str | None, view: str) -> dict[str | None, EvalResult]:
    """{part: its evaluation} (model None: each part's own teacher), and the whole set's under None."""
    out = {}
    for part in _parts(cfg):
        own = model or (routing.views(cfg)[part].teacher if part else cfg.teacher)
        out[part] = run_eval(cfg, own, view=view, progress=cfg.progress, teacher=part)
    if None not in out:
        first = next(iter(out.values()))
        out[None] = summarise([p for r in out.values() for p in r.problems], first.temperature)
    return out


def _described(cfg) -> str:
    if not cfg.teacher_field:
        return f"{cfg.teacher} (with {cfg.teacher_fewshot} worked examples in its prompt)"
    views = routing.views(cfg)
    return (f"{len(views)} teachers, each row scored by the one its {cfg.teacher_field} names ("
            + "; ".join(f"{name}: {v.teacher} with {v.teacher_fewshot} worked examples of its own rows" for name, v in views.items())
            + ")")


def quickstart(overrides: list[str] | None = None, variant: str = "default") -> dict:
    """Run an embedded default; return the report it also writes to RUN_DIR/quickstart.json."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown quickstart '{variant}': choose one of {', '.join(v for v in VARIANTS if v != 'default')}, or none")
    config_path = VARIANTS[variant]
    name = "esrdistill quickstart" + ("" if variant == "default" else " " + variant)
    values = parse_overrides(overrides or [])
    values.setdefault("run_dir", f"runs/quickstart{'' if variant == 'default' else '-' + variant}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = load_config(str(config_path), values)
    run_dir = Path(cfg.run_dir)
    seconds: dict[str, float] = {}
    say = print
    say(f"{name}: distil {_described(cfg)} into {cfg.student} on "
        f"{cfg.dataset}, {_title(cfg).replace('student after ', '')}, {cfg.steps} steps of {cfg.batch_size} prompts.")
    say(f"Run directory: {run_dir}")

    start = time.perf_counter()
    say("[1/4] Preparing the packaged models (converted once, then cached) ...")
    build.prepare_models(cfg)
    seconds["prepare_models"] = time.perf_counter() - start

    say(f"[2/4] Accuracy before distillation on {cfg.eval_prompts} held-out problems (greedy) ...")
    start = time.perf_counter()
    teachers_before = _run_eval(cfg, None, "teacher")
    students_before = _run_eval(cfg, cfg.student, "student")
    teacher_before, student_before = teachers_before[None], students_before[None]
    seconds["eval_before"] = time.perf_counter() - start
    say(f"      teacher {teacher_before.accuracy:.1%}, student {student_before.accuracy:.1%}")

    say(f"[3/4] Distilling: {_title(cfg).replace('student after ', '')} ...")
    start = time.perf_counter()
    try:
        train(cfg)
    except TrainingInterrupted as stop:  # the quickstart's own command continues it, in the same run directory
        again = ["esrdistill", "quickstart", *([variant] if variant != "default" else []),
                 *(o for o in overrides or [] if o.split("=")[0].strip() not in ("run_dir", "resume")),
                 f"run_dir={run_dir}", "resume=true"]
        raise TrainingInterrupted(stop.step, stop.checkpoint, f"`{shlex.join(again)}`") from None
    seconds["train"] = time.perf_counter() - start
    metrics = read_metrics(cfg.run_dir)
    phases = {phase: sum(m.get(f"time/{phase}_s", 0.0) for m in metrics) for phase in ("rollout", "teacher", "train")}
    alignment = {key: sum(m[key] for m in metrics) / len(metrics) for key in XTOK_KEYS if key in metrics[0]}

    say("[4/4] Accuracy of the distilled student ...")
    start = time.perf_counter()
    afters = _run_eval(cfg, str(run_dir / "final"), "student")
    after = afters[None]
    seconds["eval_after"] = time.perf_counter() - start

    lines = [
        "| model | accuracy | 95% CI | mean length (tokens) | cut at the limit |",
        "|---|---|---|---|---|",
        _line("teacher (with worked examples)" if not cfg.teacher_field else "teachers (each on its rows)", teacher_before),
        _line("student before", student_before),
        _line(_title(cfg), after),
        "",
        "| phase | total s | per step s |",
        "|---|---|---|",
        *[f"| {phase} | {total:.1f} | {total / cfg.steps:.2f} |" for phase, total in phases.items()],
        f"| whole quickstart | {sum(seconds.values()):.1f} | |",
    ]
    per_teacher = {part: {"problems": afters[part].n_problems, "teacher_before": teachers_before[part].accuracy,
                          "student_before": students_before[part].accuracy, "student_after": afters[part].accuracy}
                   for part in _parts(cfg) if part is not None}
    if per_teacher:
        lines += ["", f"| rows whose {cfg.teacher_field} is | problems | their teacher | student before | student after |",
                  "|---|---|---|---|---|",
                  *[f"| {part} | {f['problems']} | {f['teacher_before']:.1%} | {f['student_before']:.1%} | {f['student_after']:.1%} |"
                    for part, f in per_teacher.items()]]
    if alignment:
        lines += ["", "| alignment (mean over steps) | value |", "|---|---|", *[f"| {key} | {value:.1%} |" for key, value in alignment.items()]]
    report_text = "\n".join(lines)
    say("\n" + report_text)
    gain = after.accuracy - student_before.accuracy
    say(f"\nThe {_title(cfg)}: {student_before.accuracy:.1%} -> {after.accuracy:.1%} "
        f"({gain * 100:+.1f} points; the teacher: {teacher_before.accuracy:.1%}).")
    behind = [part for part, f in per_teacher.items() if f["student_after"] - f["student_before"] < MIN_GAIN]
    if behind and gain >= MIN_GAIN:  # one task taught can hide another that was not
        say(f"The rows of {', '.join(behind)} gained less than {MIN_GAIN * 100:.0f} points: distillation did not teach "
            "the student those (their figures are in the table above).")
    if gain < MIN_GAIN:
        default = load_config(str(config_path), {})
        small = [f"{key}={getattr(cfg, key)} (the quickstart's: {getattr(default, key)})"
                 for key in ("steps", "batch_size", "eval_prompts") if getattr(cfg, key) < getattr(default, key)]
        say(f"Distillation did not teach the student here: its accuracy rose by less than {MIN_GAIN * 100:.0f} points"
            + (f". The budget is smaller than the quickstart's ({', '.join(small)}), which may be why." if small else
               f". At the quickstart's own budget this is a failure: per-step figures are in {run_dir}/metrics.jsonl, "
               "and docs/not-learning.md says what to look at."))
    say(f"Run directory: {run_dir} (config.yaml, metrics.jsonl, final/, quickstart.json, report.md, curves.png)")

    report = {
        "variant": variant,
        "dataset": cfg.dataset,
        "eval_problems": student_before.n_problems,
        "teacher_before": teacher_before.to_dict(),
        "student_before": student_before.to_dict(),
        "student_after": after.to_dict(),
        "per_teacher": per_teacher,
        "alignment": alignment,
        "seconds": seconds,
        "phase_seconds": phases,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "quickstart.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(f"# {name}\n\n{report_text}\n")
    curves = runreport.report([str(run_dir)])  # the training curves (esrdistill report RUN_DIR)
    say(f"Training curves: {curves.with_name('curves.png')} ({curves.name} beside it)")
    return report
