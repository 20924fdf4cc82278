"""The run directory's record: refuse to start over a run, restore the newest checkpoint to resume,
and (only once setup has succeeded) trim the metrics of steps to be redone, open the metrics log and
write config.yaml, so that a run that fails to start leaves the directory as it was."""

from __future__ import annotations

from pathlib import Path

import yaml
from accelerate import Accelerator

from esrdistill import checkpoint, ranks, sharding
from esrdistill.config import Config, save_config, to_dict
from esrdistill.tracking import MetricsLogger, read_metrics, rewrite_metrics


def check(cfg: Config, log) -> Path:
    """Refuse to start over a run unless resuming; warn about settings that changed since it started.
    Nothing is written here: config.yaml is written once the whole setup has succeeded."""
    run_dir = Path(cfg.run_dir).expanduser()
    has_run = (run_dir / "metrics.jsonl").exists() or checkpoint.checkpoints_root(run_dir).exists()
    if has_run and not cfg.resume:
        raise FileExistsError(
            f"run_dir {run_dir} already holds a run: pass resume=true to continue it, or choose another run_dir"
        )
    if cfg.resume and (run_dir / "config.yaml").is_file():
        before = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        changed = sorted(k for k, v in to_dict(cfg).items() if k != "resume" and before.get(k, v) != v
                         and not (k == "rollout_tokens" and v == "auto"))
        if changed:
            log(f"Warning: resuming with changed settings: {', '.join(changed)}")
    return run_dir


def trim_metrics(run_dir: Path, last_step: int, log) -> None:
    """Drop metric lines of steps after `last_step` (they will be redone), atomically."""
    rows = read_metrics(run_dir)
    kept = [m for m in rows if m.get("step", 0) <= last_step]
    if len(kept) < len(rows):
        log(f"Dropping the metrics of {len(rows) - len(kept)} steps after step {last_step}, which will be redone")
        rewrite_metrics(run_dir, kept)


def resume(cfg: Config, run_dir: Path, student, optimizer, scheduler, accelerator: Accelerator, say) -> int:
    """With resume=true, restore the newest checkpoint in place; return its step (0 without one).
    Nothing in run_dir is written."""
    with ranks.fail_together(accelerator):
        found = checkpoint.latest(run_dir) if cfg.resume else None
        if found is not None:
            step = (sharding.load if sharding.is_sharded(student) else checkpoint.load)(found, student, optimizer, scheduler)
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
    logger = MetricsLogger(run_dir, to_dict(cfg), cfg.tensorboard, cfg.wandb)
    save_config(cfg, run_dir / "config.yaml")
    for m in read_metrics(run_dir):  # evaluations before a resume still count
        if m.get("eval/accuracy", -1.0) > best["accuracy"]:
            best = {"step": m["step"], "accuracy": m["eval/accuracy"]}
    return logger, best
