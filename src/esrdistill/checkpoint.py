"""Atomic checkpoints of a run: the student (LoRA adapter or full weights), optimizer and scheduler.

A checkpoint is written to a temporary directory and renamed into place, so `latest` never sees a
half-written one. Nothing else needs saving: the data order and every random draw of a step are
derived from (seed, step) in the training loop, so a resumed run repeats exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model

from esrdistill.errors import UserError

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return sorted(found)


def latest(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def step_of(path: str | Path) -> int:
    """The number of optimizer steps a checkpoint holds."""
    return int(json.loads((Path(path) / "state.json").read_text())["step"])


class NonFiniteWeights(RuntimeError):
    """The model holds NaN or inf: it is never written over a good checkpoint."""


def check_finite(model) -> None:
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise NonFiniteWeights(f"{len(bad)} parameter tensors hold NaN or inf (first: {bad[0]}); not saving them")


class DiskFull(UserError):
    """A checkpoint or final/ that did not fit on its disk: the partial copy is removed, the earlier ones kept."""


# what a write that ran out of room says: OSError's strerror, safetensors' message, torch's short-write checks
_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "unexpected pos", "file write failed")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(err) for text in _FULL_MESSAGES)


def _gigabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e7 else f"{n_bytes / 1e6:.2f} MB"


def _write_or_clean_up(write, tmp: Path, run_dir: Path, what: str) -> None:
    """Run write(); on any failure remove the partial `tmp`, and raise DiskFull when the disk ran out of room
    (naming the directory, the free space and the newest intact checkpoint); re-raise anything else."""
    try:
        write()
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(err):
            raise
        where = tmp.parent if tmp.parent.exists() else run_dir
        free = _gigabytes(shutil.disk_usage(where).free)
        found = list_checkpoints(run_dir)
        intact = (f"the newest intact checkpoint is {found[-1][1]} (step {found[-1][0]})" if found
                  else "there is no earlier checkpoint")
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
        reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "torch: ", reason)  # torch's short-write check
        raise DiskFull(f"{what} could not be written: the disk holding {where} is full ({reason}); removed the partial "
                       f"{tmp}, {free} free now; {intact}. Free some space (or lower keep_checkpoints) and resume") from None


def save(run_dir: str | Path, step: int, model, optimizer, scheduler, keep: int, protect: int | None = None) -> Path:
    """Write the checkpoint after `step` completed optimizer steps; keep the newest `keep`, and also
    the checkpoint of step `protect` (the best evaluation so far) when there is one. A full disk is a
    DiskFull error, the partial copy removed and the earlier checkpoints untouched."""
    check_finite(model)
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)

    def write() -> None:
        tmp.mkdir()
        if _is_peft(model):
            model.save_pretrained(tmp / "adapter")  # a loadable peft adapter directory
        else:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))

    _write_or_clean_up(write, tmp, Path(run_dir), f"the checkpoint of step {step}")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    rotate(run_dir, keep, protect)
    return final


def rotate(run_dir: str | Path, keep: int, protect: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints and the one of step `protect`."""
    for old_step, old in list_checkpoints(run_dir)[:-keep]:
        if old_step != protect:
            shutil.rmtree(old, ignore_errors=True)


def find(run_dir: str | Path, step: int) -> Path | None:
    return next((path for found, path in list_checkpoints(run_dir) if found == step), None)


class CheckpointMismatch(UserError):
    """A checkpoint that does not fit the model being trained (lora_r or the student changed since)."""


def load(path: str | Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer and scheduler from a checkpoint in place; return its step. A checkpoint
    of another shape (a LoRA adapter of another rank, full weights for LoRA) raises CheckpointMismatch."""
    path = Path(path)
    wanted, this_run = ("adapter", "trains a LoRA adapter") if _is_peft(model) else ("model.safetensors", "trains full weights")
    if not (path / wanted).exists():
        raise CheckpointMismatch(f"{path} holds no {wanted}, and this run {this_run}: {_MISMATCH_HINT}")
    try:
        if _is_peft(model):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
        else:
            load_model(model, str(path / "model.safetensors"))
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as err:  # size mismatch, missing keys, another number of parameters
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(err).__name__)
        raise CheckpointMismatch(f"{path} does not fit this student ({first}): {_MISMATCH_HINT}") from None
    scheduler.load_state_dict(state["scheduler"])
    return int(json.loads((path / "state.json").read_text())["step"])


_MISMATCH_HINT = ("resume with the lora_r and student the run started with (its config.yaml), or start a new run_dir "
                  "(resume=false)")


def save_final(out_dir: str | Path, model, tokenizer, merge_lora: bool, dtype: torch.dtype | None = None) -> Path:
    """The trained student in a from_pretrained-loadable directory (LoRA merged unless asked not to),
    in `dtype` when given (train passes final_dtype, by default the run's dtype).

    Full fine-tuning in bf16 trains fp32 master weights; cast back to bf16 here, an update smaller than
    bf16's spacing vanishes (3 steps at lr 5e-6 changed 95% of the master weights, but 2% of the bf16
    ones): final_dtype=float32 keeps them, as does every checkpoint's model.safetensors. A merged LoRA
    model is merged in the base model's dtype; an unmerged adapter is saved as trained."""
    check_finite(model)
    out = Path(out_dir)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    if _is_peft(model) and merge_lora:
        model = model.merge_and_unload()
    if dtype is not None and not _is_peft(model):
        model = model.to(dtype)

    def write() -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_or_clean_up(write, tmp, out.parent, f"the final model {out}")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out
