"""Which prompts a step uses and how it seeds its random draws: pure functions of (seed, step).

Because nothing here is state, a run resumed at step s draws exactly the prompts and samples the
uninterrupted run would have drawn; checkpoints need no data position and no RNG state.
"""

from __future__ import annotations

import random


def batch_indices(step: int, batch_size: int, num_prompts: int, seed: int, shuffle: bool = True) -> list[int]:
    """Prompt indices of optimizer step `step` (0-based).

    The prompts are visited epoch by epoch, each epoch in its own seeded permutation (shuffle=False:
    in their own order, 0..num_prompts-1 every epoch); a batch that straddles two epochs takes the
    end of one and the start of the next.
    """
    if num_prompts <= 0:
        raise ValueError("no training prompts")
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_prompts)
        out.append(_permutation(num_prompts, seed, epoch)[offset] if shuffle else offset)
    return out


_PERMUTATIONS: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        order = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        _PERMUTATIONS.clear()  # one epoch's permutation at a time is all a run needs
        _PERMUTATIONS[key] = order
    return _PERMUTATIONS[key]


def step_seed(seed: int, step: int, process_index: int = 0) -> int:
    """The seed of everything random in one step (sampling, dropout) on one process."""
    return random.Random(f"step-{seed}-{step}-{process_index}").getrandbits(31)


def row_seed(seed: int, step: int, position: int) -> int:
    """The seed of the rollout at `position` (0..batch_size-1) of step `step`: a row's sample depends on
    it alone, not on the process that draws it or on the rows beside it."""
    return random.Random(f"row-{seed}-{step}-{position}").getrandbits(63)


def rollout_k(step: int, k: int, schedule: str = "fixed", start: int = 1, schedule_steps: int = 1) -> int:
    """ESR's K at optimizer step `step` (0-based): `k` for a fixed schedule; for a progressive one,
    linear from `start` at step 0 to `k` at step `schedule_steps` and after (rounded down). A pure
    function of the step, so a resumed run draws the same K."""
    if schedule == "fixed" or step >= schedule_steps:
        return k
    return start + (k - start) * step // schedule_steps


def micro_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Rows grouped into micro-batches of at most `size`, longest responses first.

    Grouping similar lengths means each micro-batch is cut to its own longest response, so a
    long rollout does not make every micro-batch pay for its padding. The batch loss is a sum
    over micro-batches with batch-wide denominators, so the grouping does not change it.
    """
    ranked = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    return [ranked[start : start + size] for start in range(0, len(ranked), size)]
