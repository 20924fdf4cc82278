"""Metrics: one JSON object per step in metrics.jsonl, optionally TensorBoard, wandb and trackio; timers and
memory readings for the per-phase figures."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from esrdistill.errors import UserError


class PhaseTimer:
    """Accumulates wall-clock seconds per phase name; CUDA work is synchronised before reading."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MB: CUDA memory allocated on `device` since the last reset, else the process's
    peak resident set size (which never goes down on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _clean(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash
    return value


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise UserError(f"tensorboard=true needs the tensorboard package: `pip install tensorboard`, or set "
                        f"tensorboard=false ({err})") from None
    return SummaryWriter


def _wandb():
    try:
        import wandb
    except ImportError as err:
        raise UserError(f"wandb=true needs the wandb package: `pip install wandb`, or set wandb=false ({err})") from None
    return wandb


def _trackio():
    try:
        import trackio
    except ImportError as err:
        raise UserError(f"trackio=true needs the trackio package: `pip install trackio`, or set trackio=false ({err})") from None
    return trackio


def check_loggers(tensorboard: bool, wandb: bool, trackio: bool = False) -> None:
    """Raise a UserError now, before a run starts, when a logger it asks for is not installed."""
    if tensorboard:
        _summary_writer()
    if wandb:
        _wandb()
    if trackio:
        _trackio()


class MetricsLogger:
    """Appends one JSON line per call to run_dir/metrics.jsonl (flushed at once), and mirrors the
    numbers to TensorBoard, wandb and trackio when asked. None of those needs a network: wandb runs
    offline unless WANDB_MODE is set, trackio writes its local store unless TRACKIO_SPACE_ID or
    TRACKIO_SERVER_URL says otherwise. They start first: when one fails, metrics.jsonl is not created.

    trackio: (project, run name, resuming) or None; a resumed run continues the trackio run of that name."""

    def __init__(self, run_dir: str | Path, config: dict, tensorboard: bool = False, wandb: bool = False,
                 trackio: tuple[str, str, bool] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = _summary_writer()(str(Path(run_dir) / "tb")) if tensorboard else None
        self._wandb = None
        if wandb:
            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = _wandb().init(project="esrdistill", dir=str(run_dir), config=config)
        self._trackio = None
        if trackio is not None:
            project, name, resuming = trackio
            self._trackio = _trackio().init(project=project, name=name, config=config, resume="allow" if resuming else "never",
                                            embed=False, auto_log_gpu=False, auto_log_cpu=False)
        self._file = self.path.open("a")

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._trackio is not None:
            self._trackio.log(numbers, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()


class MetricsError(UserError):
    """A line of metrics.jsonl before its last is not a JSON row: the file was edited or damaged."""


def load_metrics(run_dir: str | Path) -> tuple[list[dict], bool]:
    """(metrics.jsonl's rows, whether its last line was torn and left out).

    A last line that is not a whole JSON row is a write cut short (a full disk, a kill mid-write): it is left
    out, and resume rewrites the file without it. A line before it that is not one is a MetricsError naming it.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return [], False
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == len(lines) - 1:
                return rows, True
            raise MetricsError(f"{path}, line {number} of {lines[-1][0]}, is not a metrics row ({err}): repair or delete "
                               "that line (only the last line of a run cut short is dropped by itself)") from None
        rows.append(row)
    return rows, False


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's rows, one per logged step (load_metrics: a torn last line is left out)."""
    return load_metrics(run_dir)[0]


def rewrite_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    """Replace metrics.jsonl by `rows`, atomically (a temporary file renamed over it)."""
    path = Path(run_dir) / "metrics.jsonl"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)
