"""A rollout engine over a student sharded with FSDP2 (sharding.py): each sample runs with the weights gathered."""

from __future__ import annotations

from esrdistill.sharding import gathered, is_sharded


class GatheringEngine:
    """A rollout engine (protocol.Engine) over a sharded student: `sample` runs with the weights gathered;
    `sync` is the engine's (vLLM's push reads an ordinary copy of the whole student: full tensors, gathered
    once per sync by every process, each of which holds its own engine)."""

    def __init__(self, engine, student):
        self.engine, self.student, self.name = engine, student, engine.name

    def sample(self, prompts, sampling, seeds=None):
        with gathered(self.student):
            return self.engine.sample(prompts, sampling, seeds)

    def sync(self, model) -> None:
        self.engine.sync(model)  # the vLLM push gathers (vllm.student_weights); hf has nothing to do


def gathering(engine, student):
    """`engine` itself for an unsharded student, else the engine that gathers the student's weights."""
    return GatheringEngine(engine, student) if is_sharded(student) else engine
