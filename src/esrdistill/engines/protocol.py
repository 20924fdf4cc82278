"""The interface of a rollout engine, and the rules the training loop relies on.

The kinds, each one module of this package: `hf` (hf.HFEngine: generate on the student itself) and `vllm`
(vllm.VLLMEngine: an in-process vLLM engine given the student's weights); gathering.GatheringEngine wraps either
over a student sharded with FSDP2. build.engine makes one from the config.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from esrdistill.rollout import Rollouts, Sampling


@runtime_checkable
class Engine(Protocol):
    """A rollout engine: it samples responses from the model it holds.

    The rules the loop relies on: training calls `sample` for each step's rollouts and `sync` after each optimizer
    step that changed the weights (a skipped step is not synced); evaluation and the diagnostics call `sample` only.
    `sample` with seeds gives each row a sample that depends on its seed alone (a run resumed at step s samples what
    the uninterrupted run did); its Rollouts are on the CPU whatever the engine's device."""

    name: str  # the kind: "hf" | "vllm"

    def sample(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int] | None = None) -> Rollouts:
        """One response per prompt (B lists of token ids, no padding), at most sampling.max_new_tokens long:
        Rollouts with responses (B, T) right-padded and their mask (B, T), on the CPU. seeds: one per row,
        whose sample depends on it alone; None draws from torch's global generator."""
        ...

    def sync(self, model) -> None:
        """Give the engine `model`'s current weights (the student's, after an optimizer step)."""
        ...
