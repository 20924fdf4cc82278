"""The `esrdistill` command: train, eval, quickstart, bench, models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from esrdistill.config import ConfigError, describe_fields, load_config
from esrdistill.errors import UserError


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] key=value ... -> (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args) -> int:
    from esrdistill.train import TrainingInterrupted, train

    path, overrides = _split_config_args(args.args)
    cfg = load_config(path, overrides)
    try:
        train(cfg)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return 130
    return 0


def cmd_eval(args) -> int:
    from esrdistill.evaluate import run_eval

    path, overrides = _split_config_args(args.args)
    cfg = load_config(path, overrides)
    result = run_eval(cfg, model=args.model or cfg.student, view=args.view, progress=cfg.progress)
    lo, hi = result.ci95
    print(f"{args.model or cfg.student} on {cfg.dataset} ({args.view} prompt): accuracy {result.accuracy:.3f} "
          f"({result.correct}/{result.n}, 95% CI {lo:.3f}-{hi:.3f}), mean length {result.mean_len:.1f} tokens, "
          f"{result.cut_frac:.0%} cut at the length limit")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.out}")
    return 0


def cmd_quickstart(args) -> int:
    from esrdistill.quickstart import quickstart

    quickstart(args.overrides)
    return 0


def cmd_bench(args) -> int:
    from esrdistill.bench import bench

    bench(args.overrides, out=args.out)
    return 0


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
    p.add_argument("--out", help="write the result with every response to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quickstart", help="the embedded default end to end on packaged models (CPU, ~10 min)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="change the embedded default's config")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("bench", help="time per phase of ESR (K=32) vs a full rollout (256 tokens)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="change the benchmark's config")
    p.add_argument("--out", default="runs/bench", help="directory for the benchmark's runs and report")
    p.set_defaults(func=cmd_bench)

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "args"):  # key=value after an option: argparse leaves them over
        args.args += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-") or "=" not in e]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    if getattr(args, "help_config", False):
        print(describe_fields())
        return 0
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
