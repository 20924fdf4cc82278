"""The `esrdistill` command: train, eval, diagnose, quickstart, bench, sweep, study, lab, report, launch, models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from esrdistill.config import ConfigError, describe_fields, load_config
from esrdistill.errors import UserError

# Under `accelerate launch` / torchrun a process that exits with an error makes the launcher print a
# ChildFailedError traceback of its own after our message; no exit status of ours avoids it but 0.
LAUNCHER_NOTE = ("\n(torch's launcher reports below that the processes failed, with a ChildFailedError traceback of its "
                 "own: the error is the message above; `esrdistill launch` ends without it)")


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] key=value ... -> (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _output_dir(path: str) -> str:
    """`path` created if needed and checked writable: a clear error now, not a traceback later."""
    target = Path(path).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".esrdistill-write-check"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"--out {path}: cannot write there ({err.strerror or err})") from None
    return path


def cmd_train(args) -> int:
    from esrdistill.train import TrainingInterrupted, train

    path, overrides = _split_config_args(args.args)
    cfg = load_config(path, overrides)
    try:
        train(cfg)
    except TrainingInterrupted as stop:
        _report(str(stop), launcher_note=False)  # every process stopped after the same step: one message
        return 130
    return 0


def cmd_eval(args) -> int:
    from esrdistill.commands.evaluation import run_eval

    path, overrides = _split_config_args(args.args)
    cfg = load_config(path, overrides)
    model = args.model or cfg.student
    if args.teacher is not None and args.teacher not in cfg.teachers:
        raise ConfigError(f"--teacher {args.teacher} is not one of teachers: "
                          + (", ".join(cfg.teachers) or "the config names no teachers"))
    result = run_eval(cfg, model=model, view=args.view, progress=cfg.progress, teacher=args.teacher)
    title = f"{model} on {cfg.dataset} ({args.view} prompt{f', the rows of teacher {args.teacher}' if args.teacher else ''})"
    print(result.markdown(title))
    if args.out:
        json_path, md_path = result.save(args.out, title)
        print(f"wrote {json_path} and {md_path}")
    return 0


def cmd_diagnose(args) -> int:
    from esrdistill.commands.diagnose import DiagnoseOptions, diagnose

    path, overrides = _split_config_args(args.args)
    for key in ("teacher", "student", "dataset"):
        if getattr(args, key):
            overrides.append(f"{key}={getattr(args, key)}")
    cfg = load_config(path, overrides)
    try:
        prefixes = tuple(int(k) for k in args.prefixes.split(","))
    except ValueError:
        raise ConfigError(f"--prefixes takes comma-separated token counts, got '{args.prefixes}'") from None
    options = DiagnoseOptions(out=args.out, student_after=args.student_after, problems=args.problems, prefixes=prefixes,
                              bucket=args.bucket, k=args.k, decay_fraction=args.decay_fraction,
                              share_target=args.share_target, top_frac=args.top_frac)
    diagnose(cfg, options)
    return 0


def cmd_quickstart(args) -> int:
    from esrdistill.commands.quickstart import quickstart
    from esrdistill.train import TrainingInterrupted

    items = list(args.overrides)
    variant = items.pop(0) if items and "=" not in items[0] else "default"
    try:
        quickstart(items, variant)
    except TrainingInterrupted as stop:
        _report(str(stop), launcher_note=False)
        return 130
    return 0


def cmd_bench(args) -> int:
    from esrdistill.commands.bench import bench

    engines = ("hf", "vllm") if args.engine == "both" else (args.engine,)
    if args.against:
        from esrdistill.commands.bench import against_trl

        if args.job != "equal-work" or args.force_length:
            raise ConfigError("--against trl runs the equal-work job (every rollout forced to N tokens): "
                              "use `esrdistill bench --job equal-work --against trl`")
        try:
            lengths = tuple(int(n) for n in args.lengths.split(",")) if args.lengths else None
        except ValueError:
            raise ConfigError(f"--lengths takes comma-separated token counts, got '{args.lengths}'") from None
        against_trl(args.overrides, out=args.out if args.out != "runs/bench" else "runs/bench-trl", engines=engines,
                    rounds=args.rounds, lengths=lengths)
        return 0
    if args.rounds != 2 or args.lengths:
        raise ConfigError("--rounds and --lengths go with --against trl")
    bench(args.overrides, out=args.out, job=args.job, engines=engines, force_length=args.force_length)
    return 0


def cmd_sweep(args) -> int:
    from esrdistill.commands.sweep import sweep

    path, overrides = _split_config_args(args.args)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if "," in args.seeds else int(args.seeds)
    except ValueError:
        raise ConfigError(f"--seeds takes a number of seeds or a comma-separated list of seeds, got '{args.seeds}'") from None
    sweep(path, args.grid, seeds, overrides, out=_output_dir(args.out), parallel=args.parallel, grid_file=args.grid_file)
    return 0


def cmd_study(args) -> int:
    from esrdistill.commands.study import study
    from esrdistill.train import TrainingInterrupted

    try:
        study(args.name, args.overrides, out=args.out, report=args.report, quick=args.quick, arms=args.arms, seeds=args.seeds)
    except TrainingInterrupted as stop:
        _report(str(stop), launcher_note=False)
        return 130
    return 0


def cmd_lab(args) -> int:
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    out = _output_dir(args.out or ("runs/lab-quick" if args.quick else "runs/lab"))
    if args.what == "models":
        from esrdistill.commands import lab

        if args.quick:
            lab.models(out, teacher=lab.QUICK_TEACHER, student=lab.QUICK_STUDENT, eval_problems=16)
        else:
            lab.models(out)
    else:
        from esrdistill.commands.lab_repro import repro

        only = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else None
        repro(out, quick=args.quick, parallel=args.parallel, only=only)
    return 0


def cmd_report(args) -> int:
    from esrdistill.commands.runreport import report

    path = report(args.run_dirs, out=args.out, target=args.target)
    print(f"wrote {path} and {path.with_name('curves.png')}")
    return 0


def cmd_launch(args) -> int:
    from esrdistill.commands.launch import launch

    return launch(args.rest)


def cmd_models(args) -> int:
    import importlib.util

    from esrdistill.packaged import PACKAGED, converted_dir

    for name, model in PACKAGED.items():
        converted = (converted_dir(name) / "config.json").is_file()
        installed = importlib.util.find_spec(model.module) is not None
        state = "converted" if converted else ("installed, not converted yet" if installed else "not installed")
        print(f"packaged:{name}\n    {model.description}\n    license: {model.license}; {state}; install: {model.install}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esrdistill", description="On-policy distillation with Early Stopping Rollout.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="distil a teacher into a student (ESR by default)")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value", help="an optional YAML config, then overrides")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a model on a task's held-out problems")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value", help="config giving dataset, prompts, grader")
    p.add_argument("--model", help="model to evaluate (default: the config's student)")
    p.add_argument("--view", choices=("student", "teacher"), default="student",
                   help="prompt the model as the student or as the teacher (teacher_fewshot, suffix)")
    p.add_argument("--teacher", metavar="NAME", help="several teachers: only the rows routed to NAME, and --view teacher "
                                                     "prompts them as NAME sees them")
    p.add_argument("--out", help="write the result with every response to this JSON file (and a .md table beside it)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("diagnose", help="teacher decay, per-position KL, cascading alignment, sub-mode commitment, a K")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value", help="config giving prompts, grader, lengths")
    p.add_argument("--teacher", help="teacher model (overrides the config)")
    p.add_argument("--student", help="student model (overrides the config)")
    p.add_argument("--dataset", help="dataset (overrides the config)")
    p.add_argument("--student-after", help="a second student, e.g. RUN_DIR/final, for cascading alignment")
    p.add_argument("--out", required=True, help="output directory for diagnostics.json, report.md and plots")
    p.add_argument("--problems", type=int, default=32, help="held-out problems to roll out on (default 32)")
    p.add_argument("--prefixes", default="0,25,50,100,200", help="prefix lengths k of the decay analysis")
    p.add_argument("--bucket", type=int, default=25, help="positions per bucket of the profile (default 25)")
    p.add_argument("--k", type=int, help="the K to mark on plots (default: the config's rollout_tokens)")
    p.add_argument("--decay-fraction", type=float, default=0.9, help="decay rule threshold (default 0.9)")
    p.add_argument("--share-target", type=float, default=0.5, help="KL-share rule threshold (default 0.5)")
    p.add_argument("--top-frac", type=float, default=0.1, help="highest-KL token fraction for sub-mode commitment")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("quickstart", help="the embedded default end to end on packaged models (CPU, ~10 min); "
                                          "`quickstart cross`: across tokenizers (Gemma-3-270M student, SmolLM2 teacher); "
                                          "`quickstart teachers`: two tasks, each routed to its own teacher")
    p.add_argument("overrides", nargs="*", metavar="[cross|teachers] key=value",
                   help="`cross` or `teachers` for those demos, then changes to the embedded config")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("bench", help="time per phase, tokens/s, peak memory: ESR (K=32) vs a full rollout, or the equal-work job")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="change the benchmark's config (student=..., teacher=...)")
    p.add_argument("--job", default="esr-vs-full", choices=("esr-vs-full", "equal-work"),
                   help="esr-vs-full (default) or equal-work (57M student, 135M teacher, N = 32/128/256 forced tokens)")
    p.add_argument("--engine", default="hf", choices=("hf", "vllm", "both"), help="rollout engine(s) to time")
    p.add_argument("--force-length", action="store_true", help="hold EOS back: every rollout has exactly its length limit")
    p.add_argument("--against", choices=("trl",), help="trl: TRL's DistillationTrainer on the same job, interleaved "
                                                       "with esrdistill's runs (equal-work; needs the [trl] extra)")
    p.add_argument("--rounds", type=int, default=2, help="--against trl: runs of each tool per N, interleaved (default 2)")
    p.add_argument("--lengths", help="--against trl: the forced lengths N, comma-separated (default 32,128,256)")
    p.add_argument("--out", default="runs/bench", help="directory for the benchmark's runs and report "
                                                       "(--against trl: default runs/bench-trl)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="every combination of a grid with several seeds; a table of accuracy over seeds")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value", help="the base config, then overrides for every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a config key and its values (repeat)")
    p.add_argument("--grid-file", help="a YAML file mapping config keys to lists of values")
    p.add_argument("--seeds", default="3", help="number of seeds (0, 1, ...) or a comma-separated list (default 3)")
    p.add_argument("--out", default="runs/sweep", help="directory of the runs and the report (default runs/sweep)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1: one after another)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("study", help="ESR against a full rollout on a pair of models: arms x seeds, runs.json and report.md "
                                     "(shipped: same, cross; resumable)")
    p.add_argument("name", metavar="NAME|FILE", help="a shipped study (same: SmolLM2 context distillation; cross: Gemma-3-270M "
                                                    "from SmolLM2) or a study file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the study's config for every run")
    p.add_argument("--quick", action="store_true", help="the study's short check (its quick section: few steps and problems)")
    p.add_argument("--out", help="the runs' directory (default runs/study/NAME)")
    p.add_argument("--report", help="where runs.json, report.md and the pictures go (default: --out)")
    p.add_argument("--arms", help="only these arms (comma-separated)")
    p.add_argument("--seeds", help="only these seeds (comma-separated)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("lab", help="small models trained from scratch on a synthetic task; `lab repro`: the paper's claims "
                                   "re-checked with seeds (about an hour on 2 CPU cores)")
    p.add_argument("what", choices=("models", "repro"), help="models: train (or reuse) the teacher and student and report "
                                                              "their accuracy; repro: the ablation grid, diagnostics, claims")
    p.add_argument("--quick", action="store_true", help="tiny models and a reduced grid (a few minutes; for the tests)")
    p.add_argument("--out", help="the lab's directory (default runs/lab, runs/lab-quick with --quick)")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--arms", help="repro: only these arms (comma-separated); the others' rows come from OUT/lab.json, "
                                  "an earlier repro's, which must have the same models")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("report", help="a run's curves (loss, KL, length, cut-offs, evaluations against steps and time, "
                                      "phase times), several runs side by side: curves.png and curves.md")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of `esrdistill train`")
    p.add_argument("--out", help="where to write (default: the run directory for one run, runs/report for several)")
    p.add_argument("--target", type=float, help="an accuracy (0-1): report the first evaluation that reaches it, with "
                                                "its seconds and generated tokens")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("launch", help="several processes (accelerate launch's options, then `train ...`), ending as one "
                                      "process does: one message, its exit status", prefix_chars="+")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[accelerate launch options] train [CONFIG.yaml] [key=value ...]")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("models", help="list the packaged models")
    p.set_defaults(func=cmd_models)
    return parser


def _quiet_libraries() -> None:
    """Hide per-load progress bars and deprecation chatter of the libraries; our own bars stay."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def _report(text: str, launcher_note: bool = True) -> None:
    """Print a message for the user on stderr once: from the first process when several run."""
    from esrdistill.ranks import rank

    if rank() == 0:
        under_accelerate = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not os.environ.get("ESRDISTILL_LAUNCH")
        print(text + (LAUNCHER_NOTE if launcher_note and under_accelerate else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    listed = "args" if hasattr(args, "args") else "overrides" if hasattr(args, "overrides") else None
    if extra and listed:  # key=value after an option: argparse leaves them over
        setattr(args, listed, getattr(args, listed) + [e for e in extra if "=" in e and not e.startswith("-")])
        extra = [e for e in extra if e.startswith("-") or "=" not in e]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    from esrdistill.ranks import leave_process_group

    try:
        if getattr(args, "help_config", False):
            print(describe_fields())
            return 0
        return args.func(args)
    except ConfigError as err:
        _report(f"config error: {err}")
        return 2
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    except (UserError, FileExistsError) as err:
        _report(f"error: {err}")
        return 1
    finally:
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
