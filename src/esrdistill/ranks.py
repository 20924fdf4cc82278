"""Several processes acting as one: a failure or a Ctrl-C on any process stops every process the same way.

Without this, an error raised on one rank (a run directory that already holds a run, say) leaves the
others waiting in a collective until gloo/NCCL times out with tracebacks of their own, and a Ctrl-C
that reaches the ranks in different steps makes one leave while another waits.
"""

from __future__ import annotations

import os

import torch

from esrdistill.config import ConfigError
from esrdistill.errors import UserError


class PeerFailed(UserError):
    """Another process failed; this one stops with that process's message."""


def rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched by torchrun/accelerate)."""
    return int(os.environ.get("RANK", "0") or 0)


class fail_together:
    """Run a block on every process; if it raises on any of them, raise on all of them.

    The process that failed re-raises its own exception (a bug keeps its traceback); the others raise
    PeerFailed with its message, so the user sees one clear message (printed by rank 0). The block
    must not itself run a collective: a process that failed before it would never join.
    """

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: every rank gets its own
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            mine = None if exc is None else f"{exc} (process {self.accelerator.process_index})"
            failed = [m for m in gather_object([mine]) if m]
            if failed and exc is None:
                raise PeerFailed(failed[0])
        return False


def check_joined(device: str, processes: int) -> None:
    """Refuse a launch whose processes did not join one process group (`processes`: those that did): accelerate
    without CUDA and without device=cpu runs each of them alone, every one training the whole run by itself."""

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched != processes:
        raise ConfigError(f"the launcher started {launched} processes but they did not join one process group "
                          f"(device={device} on a machine without CUDA): pass device=cpu")


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (a shared Ctrl-C)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0)


def leave_process_group() -> None:
    """Destroy the process group, if this process joined one, while the interpreter is still whole.

    Left to the interpreter's exit, gloo's worker threads can free the last tensors of finished collectives
    (FSDP2's reduce-scatters) after Python is gone, and the process aborts after a run that succeeded
    ("terminate called without an active exception", SIGABRT: about 1 run in 10 of a 2-process FSDP2 run on
    a busy CPU here; pytorch PR 179291 describes it).
    """
    import sys

    import torch.distributed as dist

    vllm_groups = sys.modules.get("vllm.distributed.parallel_state")
    if vllm_groups is not None:  # an in-process vLLM engine's groups first: its own teardown at exit would find them gone
        vllm_groups.destroy_model_parallel()  # and raise "Invalid process group specified" (a traceback after a run that succeeded)
        vllm_groups.destroy_distributed_environment()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
