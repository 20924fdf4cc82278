"""What a training step logs, and the warnings its figures call for: pure functions of the step's sums
over every process (train.py gathers them)."""

from __future__ import annotations

from esrdistill import selection, weighting
from esrdistill.config import Config

# Across tokenizers, the loss sees only the student positions paired with a teacher position
# (xtok/aligned_frac); under this share, much of each rollout teaches nothing.
MIN_ALIGNED_FRAC = 0.5

# Reverse KL's gradient pulls a student toward the teacher's choice in proportion to the student's own
# probability of it: where the teacher is sure of a token the student all but excludes, reverse KL
# barely moves it (docs/not-learning.md). Warn when such positions stay common.
STUCK_SHARE, STUCK_STEPS = 0.02, 10


def step_warnings(cfg: Config, done: int, metrics: dict, missed: list[float], warned: set) -> list[str]:
    """Warnings about this step's figures, each said once per run. missed: agree/teacher_top1_missed of
    every step of this process's run so far."""
    out = []
    for side in ("student", "teacher"):
        mass = metrics.get(f"xtok/{side}_mapped_mass")
        if mass is not None and mass < cfg.xtok_min_mapped_mass and side not in warned:
            warned.add(side)
            out.append(f"Warning: at step {done} the {side} puts only {mass:.1%} of its probability on tokens the other "
                       f"vocabulary shares (xtok/{side}_mapped_mass); the loss sees only that part")
    aligned = metrics.get("xtok/aligned_frac")
    if aligned is not None and aligned < MIN_ALIGNED_FRAC and "aligned" not in warned:
        warned.add("aligned")
        out.append(f"Warning: at step {done} only {aligned:.1%} of the response positions have a teacher position with the "
                   f"same context (xtok/aligned_frac); the loss sees only those (xtok_align=middle pairs every token with text)")
    if cfg.loss in ("reverse_kl", "sampled") and len(missed) >= STUCK_STEPS and "stuck" not in warned:
        first, recent = sum(missed[:5]) / 5, sum(missed[-5:]) / 5
        if recent >= STUCK_SHARE and recent > first / 2:
            warned.add("stuck")
            out.append(f"Warning: after {done} steps, at {recent:.1%} of the positions the teacher is sure (>= 50%) of a token "
                       f"the student gives < 1% (agree/teacher_top1_missed; {first:.1%} in the first 5 steps). loss={cfg.loss} "
                       "pulls the student toward such a token only in proportion to that tiny probability, so it may never "
                       "learn it; loss=forward_kl pulls in proportion to the teacher's (docs/not-learning.md)")
    return out


def step_metrics(totals: dict[str, float], counted: float, batch_size: int, constant: dict[str, float]) -> dict:
    """The logged figures of one step from the sums over every process.

    Per-position metrics (kl/..., agree/..., teacher/..., xtok/..._mass) are means over `counted`, every
    position with a teacher signal, whether token selection gives it the loss or not (the select/
    metrics split them); `name:num` / `name:den` pairs become their ratio.
    """
    out = {"loss": totals["loss"]}
    for key, value in totals.items():
        if "/" in key and not key.endswith((":num", ":den")) and not key.startswith(("select/", "weight/", "window/")):
            out[key] = value / max(counted, 1)
        elif key.endswith(":num"):
            name = key[: -len(":num")]
            out[name] = value / max(totals[name + ":den"], 1)
    out.update(selection.summarise(totals))
    out.update(weighting.summarise(totals))
    if "window/tail_n" in totals:  # rollout_tokens=adaptive (horizon.py): the window tail's reverse KL
        out["rollout/k_tail_n"] = int(totals["window/tail_n"])
        out["rollout/k_tail_kl"] = totals["window/tail_kl"] / max(totals["window/tail_n"], 1)
    out["loss/tokens"] = int(totals["loss_tokens"])  # positions that carried the loss
    tokens = totals["response_tokens"]
    out.update({
        "rollout/len_mean": tokens / batch_size,
        "rollout/eos_frac": totals["ended"] / batch_size,  # rollouts that ended before the length limit
        "rollout/tokens": int(tokens),
        "rollout/prompt_tokens": int(totals["prompt_tokens"]),
        **constant,
    })
    return out
