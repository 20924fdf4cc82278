"""`esrdistill report RUN_DIR [RUN_DIR ...] [--out DIR] [--target ACC]`: a run's curves from its metrics.jsonl,
several runs side by side: loss, reverse KL, response length and cut-off rate per step, the evaluations against
steps and against wall-clock time, and the time of each phase; curves.png and curves.md.

The figures are pure functions of the logged rows (`summary`, `time_to`), so a report says exactly what the run
logged: time is the sum of time/step_s (the checkpoint writes of time/save_s included, evaluations included),
generated tokens the sum of rollout/tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

from esrdistill.errors import UserError
from esrdistill.tracking import read_metrics

PHASES = ("rollout", "align", "teacher", "train", "sync", "eval", "save")


def _rows(run_dir: Path) -> list[dict]:
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir} holds no metrics.jsonl: give the run directories of `esrdistill train` runs")
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{run_dir / 'metrics.jsonl'} holds no step yet")
    return rows


def elapsed(rows: list[dict]) -> list[float]:
    """Wall-clock seconds at the end of each logged step: the running sum of time/step_s."""
    out, total = [], 0.0
    for row in rows:
        total += float(row.get("time/step_s", 0.0))
        out.append(total)
    return out


def time_to(rows: list[dict], target: float) -> dict | None:
    """The first evaluation at or above `target` accuracy: {"step", "seconds", "generated_tokens"} at the end of its
    step (seconds and tokens summed over the steps up to it), or None when no evaluation reaches it."""
    seconds, tokens = 0.0, 0
    for row in rows:
        seconds += float(row.get("time/step_s", 0.0))
        tokens += int(row.get("rollout/tokens", 0))
        accuracy = row.get("eval/accuracy")
        if isinstance(accuracy, (int, float)) and accuracy >= target:
            return {"step": row["step"], "seconds": seconds, "generated_tokens": tokens}
    return None


def summary(rows: list[dict], target: float | None = None) -> dict:
    """One run's figures from its rows: steps, seconds, generated tokens, the mean per-step seconds of each phase,
    the mean response length and cut-off rate (the share of rollouts that hit their length limit, 1 - eos_frac)
    over the run and over its last 5 steps, the first and last loss, the evaluations (first, best, last), and
    (with a target) time_to."""
    n = len(rows)
    evals = [(row["step"], row["eval/accuracy"]) for row in rows if isinstance(row.get("eval/accuracy"), (int, float))]
    last = rows[-5:]
    out = {
        "steps": rows[-1]["step"],
        "seconds": elapsed(rows)[-1],
        "generated_tokens": sum(int(row.get("rollout/tokens", 0)) for row in rows),
        "phase_seconds": {p: sum(float(row.get(f"time/{p}_s", 0.0)) for row in rows) / n for p in PHASES
                          if any(f"time/{p}_s" in row for row in rows)},
        "len_mean": sum(float(row.get("rollout/len_mean", 0.0)) for row in rows) / n,
        "cut_frac": sum(1.0 - float(row.get("rollout/eos_frac", 0.0)) for row in rows) / n,
        "len_mean_last5": sum(float(row.get("rollout/len_mean", 0.0)) for row in last) / len(last),
        "cut_frac_last5": sum(1.0 - float(row.get("rollout/eos_frac", 0.0)) for row in last) / len(last),
        "loss_first": rows[0].get("loss"),
        "loss_last": rows[-1].get("loss"),
        "eval_first": evals[0][1] if evals else None,
        "eval_best": max(a for _, a in evals) if evals else None,
        "eval_best_step": max(evals, key=lambda e: (e[1], -e[0]))[0] if evals else None,
        "eval_last": evals[-1][1] if evals else None,
    }
    if target is not None:
        out["target"] = target
        out["to_target"] = time_to(rows, target)
    return out


def _fmt(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if percent:
        return f"{value:.1%}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(names: list[str], summaries: list[dict], image: str) -> str:
    """The table of every run's summary, and the picture."""
    phases = [p for p in PHASES if any(p in s["phase_seconds"] for s in summaries)]
    has_target = any("target" in s for s in summaries)
    head = ["run", "steps", "seconds", "generated tokens", "mean length", "cut at the limit", "last 5: length / cut",
            "loss first -> last", "eval first / best (step) / last", *(f"{p} s/step" for p in phases)]
    if has_target:
        head.append("first eval at target: step, s, tokens")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in zip(names, summaries):
        cells = [name, str(s["steps"]), f"{s['seconds']:.0f}", str(s["generated_tokens"]), f"{s['len_mean']:.1f}",
                 _fmt(s["cut_frac"], True), f"{s['len_mean_last5']:.1f} / {_fmt(s['cut_frac_last5'], True)}",
                 f"{_fmt(s['loss_first'])} -> {_fmt(s['loss_last'])}",
                 f"{_fmt(s['eval_first'], True)} / {_fmt(s['eval_best'], True)} ({_fmt(s['eval_best_step'])}) / "
                 f"{_fmt(s['eval_last'], True)}",
                 *(f"{s['phase_seconds'].get(p, 0.0):.2f}" for p in phases)]
        if has_target:
            hit = s.get("to_target")
            cells.append(f"{hit['step']}, {hit['seconds']:.0f}, {hit['generated_tokens']}" if hit else
                         ("never" if "target" in s else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n![curves]({image})\n"


def plot(names: list[str], runs: list[list[dict]], path: Path) -> Path:
    """Loss, reverse KL, response length, cut-off rate against the step; the evaluations against the step and
    against wall-clock seconds; the seconds per step of each phase and the wall clock; one line (or bar) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(19, 7.5))
    panels = [("loss", "loss"), ("kl/reverse", "reverse KL (per position)"), ("rollout/len_mean", "mean response length (tokens)")]
    for ax, (key, title) in zip(axes[0], panels):
        for name, rows in zip(names, runs):
            ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], label=name, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
    cut = axes[1][0]
    for name, rows in zip(names, runs):
        cut.plot([r["step"] for r in rows], [1.0 - float(r.get("rollout/eos_frac", 0.0)) for r in rows], label=name, linewidth=1)
    cut.set_title("rollouts cut at the length limit")
    cut.set_ylim(-0.05, 1.05)
    cut.set_xlabel("step")
    for ax, x_of, label in ((axes[1][1], lambda rows: [r["step"] for r in rows], "step"),
                            (axes[1][2], elapsed, "wall-clock seconds (sum of time/step_s)")):
        for name, rows in zip(names, runs):
            xs = x_of(rows)
            points = [(x, r["eval/accuracy"]) for x, r in zip(xs, rows) if isinstance(r.get("eval/accuracy"), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name, linewidth=1)
        ax.set_title("evaluation accuracy" if ax.lines else "evaluation accuracy (no evaluation during training)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(label)
    phases_ax, clock = axes[0][3], axes[1][3]
    bottoms = [0.0] * len(runs)
    for phase in PHASES:  # mean seconds per step of each phase, stacked
        heights = [sum(float(r.get(f"time/{phase}_s", 0.0)) for r in rows) / len(rows) for rows in runs]
        if any(heights):
            phases_ax.bar(range(len(runs)), heights, bottom=bottoms, label=phase)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    phases_ax.set_xticks(range(len(runs)), names, rotation=20, fontsize=7)
    phases_ax.set_title("seconds per step, by phase")
    phases_ax.legend(fontsize=7)
    for name, rows in zip(names, runs):
        clock.plot([r["step"] for r in rows], elapsed(rows), label=name, linewidth=1)
    clock.set_title("wall-clock seconds")
    clock.set_xlabel("step")
    for ax in axes.flat:
        if ax.lines and len(names) > 1:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay the figure out, write it (its folder made if needed) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def report(run_dirs: list[str], out: str | None = None, target: float | None = None) -> Path:
    """Write OUT/curves.png and OUT/curves.md for the runs (OUT: the run directory for one run, else runs/report);
    return the Markdown file's path."""
    if not run_dirs:
        raise UserError("esrdistill report needs at least one run directory")
    if target is not None and not 0.0 <= target <= 1.0:
        raise UserError(f"--target is an accuracy between 0 and 1, got {target}")
    dirs = [Path(d).expanduser() for d in run_dirs]
    runs = [_rows(d) for d in dirs]
    names = [d.name or str(d) for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    out_dir = Path(out).expanduser() if out else (dirs[0] if len(dirs) == 1 else Path("runs/report"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot write there ({err.strerror or err})") from None
    image = plot(names, runs, out_dir / "curves.png")
    text = "# Training curves\n\n" + markdown(names, [summary(rows, target) for rows in runs], image.name)
    (out_dir / "curves.md").write_text(text)
    return out_dir / "curves.md"
