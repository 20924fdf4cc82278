"""`esrdistill quickstart [cross]`: an embedded default end to end on packaged models, with no network.

Accuracy of the teacher and the student before, distillation with a progress bar (ESR; the cross
variant also a full rollout of the same budget), accuracy of each distilled student, the time of
every phase, and (across tokenizers) how well the two tokenizers line up; the run directory is left
behind with a report.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path

from esrdistill.config import ConfigError, load_config, parse_overrides
from esrdistill.evaluate import EvalResult, run_eval
from esrdistill.packaged import is_packaged, resolve
from esrdistill.tracking import read_metrics
from esrdistill.train import train

DEFAULT_CONFIG = files("esrdistill") / "configs" / "quickstart.yaml"
CROSS_CONFIG = files("esrdistill") / "configs" / "quickstart_cross.yaml"
# name -> (config, [(arm name, overrides of the arm)])
VARIANTS = {
    "default": (DEFAULT_CONFIG, [("esr", {})]),
    "cross": (CROSS_CONFIG, [("esr", {}), ("full", {"rollout_tokens": None})]),
}
# The distilled student must gain this much accuracy for the quickstart to call it taught (CI checks
# quickstart.json against it: scripts/check_quickstart.py).
MIN_GAIN = 0.4
XTOK_KEYS = ("xtok/aligned_frac", "xtok/student_mapped_mass", "xtok/teacher_mapped_mass", "xtok/vocab_mapped")


def _line(name: str, r: EvalResult) -> str:
    lo, hi = r.accuracy_ci
    correct = sum(sum(p.correct) for p in r.problems)
    total = sum(len(p.correct) for p in r.problems)
    return f"| {name} | {r.accuracy:.1%} ({correct}/{total}) | {lo:.1%}-{hi:.1%} | {r.len_mean:.1f} | {r.cut_frac:.0%} |"


def _arm_title(arm: str, cfg) -> str:
    return f"student after ESR, K={cfg.rollout_tokens}" if cfg.rollout_tokens else f"student after a full rollout (up to {cfg.max_new_tokens})"


def quickstart(overrides: list[str] | None = None, variant: str = "default") -> dict:
    """Run an embedded default; return the report it also writes to RUN_DIR/quickstart.json."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown quickstart '{variant}': choose one of {', '.join(v for v in VARIANTS if v != 'default')}, or none")
    config_path, arms = VARIANTS[variant]
    values = parse_overrides(overrides or [])
    values.setdefault("run_dir", f"runs/quickstart{'' if variant == 'default' else '-' + variant}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = load_config(str(config_path), values)
    run_dir = Path(cfg.run_dir)
    arm_cfgs = {arm: load_config(str(config_path), {**values, **extra, "run_dir": str(run_dir if len(arms) == 1 else run_dir / arm)})
                for arm, extra in arms}
    seconds: dict[str, float] = {}
    say = print
    steps = len(arms) + 3
    say(f"esrdistill quickstart{'' if variant == 'default' else ' ' + variant}: distil {cfg.teacher} (with {cfg.teacher_fewshot} "
        f"worked examples in its prompt) into {cfg.student} on {cfg.dataset}, "
        + " and ".join(_arm_title(a, c).replace("student after ", "") for a, c in arm_cfgs.items())
        + f", {cfg.steps} steps of {cfg.batch_size} prompts.")
    say(f"Run directory: {run_dir}")

    start = time.perf_counter()
    say(f"[1/{steps}] Preparing the packaged models (converted once, then cached) ...")
    for spec in {cfg.student, cfg.teacher}:
        if is_packaged(spec):
            resolve(spec, cfg.model_cache)
    seconds["prepare_models"] = time.perf_counter() - start

    say(f"[2/{steps}] Accuracy before distillation on {cfg.eval_prompts} held-out problems (greedy) ...")
    start = time.perf_counter()
    teacher_before = run_eval(cfg, cfg.teacher, view="teacher", progress=cfg.progress)
    student_before = run_eval(cfg, cfg.student, view="student", progress=cfg.progress)
    seconds["eval_before"] = time.perf_counter() - start
    say(f"      teacher {teacher_before.accuracy:.1%}, student {student_before.accuracy:.1%}")

    after: dict[str, EvalResult] = {}
    phases: dict[str, dict[str, float]] = {}
    alignment: dict[str, dict[str, float]] = {}
    for n, (arm, arm_cfg) in enumerate(arm_cfgs.items(), start=3):
        say(f"[{n}/{steps}] Distilling: {_arm_title(arm, arm_cfg).replace('student after ', '')} ...")
        start = time.perf_counter()
        train(arm_cfg)
        seconds[f"train_{arm}"] = time.perf_counter() - start
        metrics = read_metrics(arm_cfg.run_dir)
        phases[arm] = {phase: sum(m.get(f"time/{phase}_s", 0.0) for m in metrics) for phase in ("rollout", "teacher", "train")}
        alignment[arm] = {key: sum(m[key] for m in metrics) / len(metrics) for key in XTOK_KEYS if key in metrics[0]}

    say(f"[{steps}/{steps}] Accuracy of the distilled student{'s' if len(arms) > 1 else ''} ...")
    start = time.perf_counter()
    for arm, arm_cfg in arm_cfgs.items():
        after[arm] = run_eval(cfg, str(Path(arm_cfg.run_dir) / "final"), view="student", progress=cfg.progress)
    seconds["eval_after"] = time.perf_counter() - start

    table = "\n".join([
        "| model | accuracy | 95% CI | mean length (tokens) | cut at the limit |",
        "|---|---|---|---|---|",
        _line("teacher (with worked examples)", teacher_before),
        _line("student before", student_before),
        *[_line(_arm_title(arm, arm_cfg), after[arm]) for arm, arm_cfg in arm_cfgs.items()],
    ])
    timing = "\n".join([
        "| phase | " + " | ".join(f"{arm} total s | {arm} per step s" for arm in arm_cfgs) + " |",
        "|---|" + "---|---|" * len(arm_cfgs),
        *[f"| {phase} | " + " | ".join(f"{phases[arm][phase]:.1f} | {phases[arm][phase] / cfg.steps:.2f}" for arm in arm_cfgs) + " |"
          for phase in ("rollout", "teacher", "train")],
        f"| whole quickstart | {sum(seconds.values()):.1f} |" + " |" * (2 * len(arm_cfgs) - 1),
    ])
    lines = [table, "", timing]
    if any(alignment.values()):
        lines += ["", "| alignment (mean over steps) | " + " | ".join(arm_cfgs) + " |", "|---|" + "---|" * len(arm_cfgs),
                  *[f"| {key} | " + " | ".join(f"{alignment[arm][key]:.1%}" for arm in arm_cfgs) + " |" for key in XTOK_KEYS]]
    report_text = "\n".join(lines)
    say("\n" + report_text)
    default = load_config(str(config_path), {})
    small = [f"{key}={getattr(cfg, key)} (the quickstart's: {getattr(default, key)})"
             for key in ("steps", "batch_size", "eval_prompts") if getattr(cfg, key) < getattr(default, key)]
    for arm, arm_cfg in arm_cfgs.items():
        gain = after[arm].accuracy - student_before.accuracy
        say(f"\nThe {_arm_title(arm, arm_cfg)}: {student_before.accuracy:.1%} -> {after[arm].accuracy:.1%} "
            f"({gain * 100:+.1f} points; the teacher: {teacher_before.accuracy:.1%}).")
        if gain < MIN_GAIN:
            say(f"Distillation did not teach the student here: its accuracy rose by less than {MIN_GAIN * 100:.0f} points"
                + (f". The budget is smaller than the quickstart's ({', '.join(small)}), which may be why."
                   if small else
                   f". At the quickstart's own budget this is a failure: per-step figures are in {arm_cfg.run_dir}/metrics.jsonl, "
                   "and the README's 'When the student does not learn' says what to look at."))
    say(f"Run directory: {run_dir} (config.yaml, metrics.jsonl, final/, quickstart.json, report.md)")

    report = {
        "variant": variant,
        "dataset": cfg.dataset,
        "eval_problems": student_before.n_problems,
        "teacher_before": teacher_before.to_dict(),
        "student_before": student_before.to_dict(),
        **{("student_after" if len(arms) == 1 else f"student_after_{arm}"): after[arm].to_dict() for arm in after},
        "alignment": alignment,
        "seconds": seconds,
        "phase_seconds": phases if len(arms) > 1 else phases[arms[0][0]],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "quickstart.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(f"# esrdistill quickstart{'' if variant == 'default' else ' ' + variant}\n\n{report_text}\n")
    return report
