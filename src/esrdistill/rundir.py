"""The run directory's record: refuse to start over a run, restore the newest checkpoint to resume,
and (only once setup has succeeded) trim the metrics of steps to be redone, open the metrics log and
write config.yaml, so that a run that fails to start leaves the directory as it was."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import yaml
from accelerate import Accelerator

from esrdistill import __version__, checkpoint, horizon, ranks
from esrdistill.config import Config, ConfigError, save_config, to_dict
from esrdistill.errors import UserError
from esrdistill.horizon import Adaptive
from esrdistill.learner import Learner
from esrdistill.tracking import MetricsLogger, load_metrics, read_metrics, rewrite_metrics


def check(cfg: Config, log) -> Path:
    """Refuse a run_dir that cannot be written, a run_dir that holds a run unless resuming, and a resume that
    cannot continue the run (another student, fewer steps than its newest checkpoint); warn about other settings
    that changed since it started. Nothing is written here: config.yaml is written once the whole setup has
    succeeded."""
    run_dir = Path(cfg.run_dir).expanduser()
    writable(run_dir)
    has_run = (run_dir / "metrics.jsonl").exists() or checkpoint.checkpoints_root(run_dir).exists()
    if has_run and not cfg.resume:
        raise FileExistsError(
            f"run_dir {run_dir} already holds a run: pass resume=true to continue it, or choose another run_dir"
        )
    if not cfg.resume:
        return run_dir
    load_metrics(run_dir)  # a damaged metrics.jsonl is refused now, not after the models have loaded
    newest = checkpoint.latest(run_dir)
    done = checkpoint.step_of(newest) if newest is not None else 0
    if done > cfg.steps:
        raise ConfigError(f"resume=true with steps={cfg.steps}, but {run_dir} holds a checkpoint of step {done}: there is "
                          f"nothing to train, and the run is left as it was (pass steps={done} or more to continue it)")
    if (run_dir / "config.yaml").is_file():
        before = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        if newest is not None and "student" in before and not _same_model(before["student"], cfg.student):
            raise ConfigError(f"resume=true with student={cfg.student}, but the run in {run_dir} trains student="
                              f"{before['student']}: its checkpoints belong to that model. Resume with student="
                              f"{before['student']}, or start a new run_dir")
        changed = sorted(k for k, v in to_dict(cfg).items() if k != "resume" and before.get(k, v) != v
                         and not (k == "rollout_tokens" and v == "auto") and not (k == "student"))
        if changed:
            log(f"Warning: resuming with changed settings: {', '.join(changed)}")
    return run_dir


def writable(run_dir: Path) -> None:
    """A ConfigError now, before any model loads, when run_dir is a file, lies under a file, or cannot be written
    (a read-only place); nothing is left behind by the check."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory: choose another run_dir")
    place = run_dir
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise ConfigError(f"run_dir {run_dir} lies under {place}, which is a file: choose another run_dir")
    try:
        handle, probe = tempfile.mkstemp(prefix=".esrdistill-write-check-", dir=place)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"run_dir {run_dir}: cannot write in {place} ({err.strerror or err}): choose another run_dir") from None


def _same_model(before: str, now: str) -> bool:
    """Whether two `student` values name the same model: the same text, or paths to the same directory."""
    if before == now:
        return True
    a, b = Path(str(before)).expanduser(), Path(str(now)).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def trim_metrics(run_dir: Path, last_step: int, log) -> None:
    """Drop metric lines of steps after `last_step` (they will be redone), atomically."""
    rows, torn = load_metrics(run_dir)
    kept = [m for m in rows if m.get("step", 0) <= last_step]
    if torn:
        log(f"Note: the last line of {Path(run_dir) / 'metrics.jsonl'} was cut short (a write stopped by a full disk or a "
            "kill); it is dropped")
    if len(kept) < len(rows):
        log(f"Dropping the metrics of {len(rows) - len(kept)} steps after step {last_step}, which will be redone")
    if torn or len(kept) < len(rows):
        rewrite_metrics(run_dir, kept)


def resume(cfg: Config, run_dir: Path, student: Learner, accelerator: Accelerator, say) -> int:
    """With resume=true, restore the newest checkpoint into the student, its optimizer and schedule, in place; return
    its step (0 without one). Nothing in run_dir is written."""
    with ranks.fail_together(accelerator):
        found = checkpoint.latest(run_dir) if cfg.resume else None
        if found is not None:
            step = student.load(found)
            say(f"Resumed from {found} (step {step})")
            return step
        if cfg.resume:
            say(f"No checkpoint in {run_dir}: starting at step 0")
    return 0


def open_record(cfg: Config, run_dir: Path, start_step: int, is_main: bool, say) -> tuple[MetricsLogger | None, dict]:
    """Once setup has succeeded, on the first process: drop the metrics of steps to be redone, open the
    metrics log, then write config.yaml. Returns (the logger, None on other processes; the best
    evaluation so far, {"step", "accuracy"})."""
    best = {"step": None, "accuracy": -1.0}
    if not is_main:
        return None, best
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        trim_metrics(run_dir, start_step, say)
    trackio = (cfg.trackio_project, cfg.trackio_run or run_dir.resolve().name, cfg.resume) if cfg.trackio else None
    logger = MetricsLogger(run_dir, to_dict(cfg), cfg.tensorboard, cfg.wandb, trackio)
    save_config(cfg, run_dir / "config.yaml")
    for m in read_metrics(run_dir):  # evaluations before a resume still count
        if m.get("eval/accuracy", -1.0) > best["accuracy"]:
            best = {"step": m["step"], "accuracy": m["eval/accuracy"]}
    return logger, best


def horizon_history(run_dir: Path, steps: int, rule: Adaptive) -> list[tuple[int, float | None]]:
    """rollout_tokens=adaptive on resume: the (K, tail KL) of the `steps` steps before the checkpoint, read from
    metrics.jsonl (every process reads it), checked against the rule; a UserError when they cannot be recovered."""
    rows, _ = load_metrics(run_dir)
    try:
        found = horizon.history(rows, steps)
        horizon.adaptive_k(found, rule)
    except ValueError as error:
        raise UserError(f"rollout_tokens=adaptive cannot resume from step {steps}: {error}; K is recomputed from "
                        f"{Path(run_dir) / 'metrics.jsonl'}. Start the run again in a new run_dir") from None
    return found


def commit() -> str:
    """The git commit of the code that runs (with -dirty when the checkout has changes), or the version: what a
    record (a study's runs.json, a benchmark's table) names as the code that made it."""
    where = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return f"esrdistill {__version__}"
    if rev.returncode != 0:
        return f"esrdistill {__version__}"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
