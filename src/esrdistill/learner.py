"""The student as the training loop holds it: the model that trains (DDP-wrapped under several processes, sharded in
place under an FSDP2 accelerate config), the student itself (generation, evaluation, checkpoints), its AdamW and its
schedule. What sharding changes (sharding.py: gathering the weights for generation and evaluation, a whole copy for
checkpoints and the final model, loading a checkpoint into shards) is asked of this object, so that the loop reads
the same with one process, DDP or FSDP2.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup

from esrdistill import checkpoint, cpumem, objective, ranks, sharding
from esrdistill.config import Config
from esrdistill.engines.gathering import gathering
from esrdistill.engines.protocol import Engine


def check(cfg: Config, processes: int) -> None:
    """An FSDP accelerate config is refused now, with what works instead, if esrdistill cannot follow it."""
    if sharding.requested():
        sharding.check(cfg, processes)


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (135M parameters on this CPU: 0.09-0.12 s per step
    fused against 0.64-0.85 s for the default implementation)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


@dataclass
class Learner:
    trained: torch.nn.Module  # what the loss's forward and backward run on (DDP-wrapped, or the sharded student)
    model: torch.nn.Module  # the student itself: generate, evaluate, save
    optimizer: torch.optim.Optimizer  # AdamW over the trainable parameters (this process's shards under FSDP2)
    scheduler: object  # warmup then cosine, stepped once per step
    loss_view: objective.Student  # the student as the loss sees it
    sharded: bool

    def gathered(self) -> AbstractContextManager:
        """A block in which every process holds the whole weights (every process enters it; nothing when not sharded)."""
        return sharding.gathered(self.model)

    def engine(self, engine: Engine) -> Engine:
        """`engine` over this student: itself, or (sharded) one that gathers the weights for each sample."""
        return gathering(engine, self.model)

    def whole(self) -> torch.nn.Module | None:
        """An ordinary model with the full weights (sharded: on the first process, every process joining; None on the
        others), for final/."""
        return sharding.whole(self.model)

    def save(self, accelerator: Accelerator, run_dir: Path, done: int, keep: int, best_step: int | None) -> Path | None:
        """Checkpoint step `done` (keeping the newest `keep` and the best evaluation's): the first process writes it
        while the others wait (a sharded student and optimizer are gathered to it first). Returns its path on the
        first process, None on the others."""
        model, optimizer = self.model, self.optimizer
        if self.sharded:
            model, optimizer = sharding.whole(self.model), sharding.WholeOptimizer(self.model, self.optimizer)
        with ranks.fail_together(accelerator):  # the others wait; a full disk on the first process stops them all
            path = (checkpoint.save(run_dir, done, model, optimizer, self.scheduler, keep, best_step)
                    if accelerator.is_main_process else None)
        accelerator.wait_for_everyone()
        return path

    def load(self, path: Path) -> int:
        """Restore a checkpoint in place (sharded: each process keeps its shards of it); returns its step."""
        return (sharding.load if self.sharded else checkpoint.load)(path, self.model, self.optimizer, self.scheduler)


def prepare(cfg: Config, pair, accelerator: Accelerator) -> Learner:
    """The Learner of pair.student: sharded in place under an FSDP accelerate config (checked by `check`), else prepared
    by accelerate (DDP under several processes); AdamW and the warmup-then-cosine schedule. On the CPU, glibc keeps
    freed memory for the next step (cpu_keep_memory)."""
    # glibc: no mmapped blocks, no heap trim, so each train step reuses the pages the last one freed (docs/training.md);
    # one process only, a precaution: an FSDP2 test over gloo aborts at times, with and without it (docs/training.md)
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1 and cfg.cpu_keep_memory:
        cpumem.keep_freed_memory()
    model = pair.student
    sharded = sharding.requested()
    if sharded:
        with ranks.fail_together(accelerator):
            model = sharding.shard(model, accelerator.device, accelerator.num_processes)
    optimizer = _adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process on every call.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
    if sharded:  # FSDP2 averages the gradients itself, as DDP does
        trained = model
    else:
        trained, optimizer = accelerator.prepare(model, optimizer)
        model = accelerator.unwrap_model(trained)
    loss_view = objective.Student(trained, pair.tokenizer.pad_token_id, pair.vocab_size, pair.autocast)
    return Learner(trained=trained, model=model, optimizer=optimizer, scheduler=scheduler, loss_view=loss_view, sharded=sharded)
