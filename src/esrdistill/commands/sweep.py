"""`esrdistill sweep CONFIG.yaml --grid "rollout_tokens=8,16,32" --grid "token_select=prefix,top_reverse_kl"
--seeds 3 [--out DIR] [--parallel N] [key=value ...]`: every combination of the grid with every seed,
one run directory each, then a table of accuracies over seeds.

Runs are `esrdistill train` processes, one after another by default (`--parallel N`: N at once, each
with its share of the CPU threads). A run whose summary.json exists is complete and skipped; one with
metrics or checkpoints but no summary was interrupted and is resumed (resume=true), so a sweep that
stops resumes where it stopped when the same command runs again. `seed` varies sampling, data order
and initialisation; `data_seed` (the problems and the held-out split) is the same for every run, so
seeds compare runs on the same problems.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from esrdistill.config import ConfigError, load_config, parse_overrides
from esrdistill.evalstats import wilson_interval
from esrdistill.tracking import read_metrics


@dataclass
class Run:
    combo: dict[str, str]  # grid key -> value (as written on the command line)
    seed: int
    run_dir: Path
    values: dict = field(default_factory=dict)  # the run's config values (overrides of the base config)

    @property
    def name(self) -> str:
        return combo_name(self.combo)


def parse_grid(items: list[str], grid_file: str | None = None) -> dict[str, list[str]]:
    """["k=a,b", ...] (and/or a YAML file mapping keys to lists) -> {key: [values]} in the given order."""
    grid: dict[str, list[str]] = {}
    if grid_file:
        if not Path(grid_file).is_file():
            raise ConfigError(f"--grid-file {grid_file} does not exist")
        try:
            loaded = yaml.safe_load(Path(grid_file).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--grid-file {grid_file} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, list) and v for v in loaded.values()):
            raise ConfigError(f"{grid_file} must map config keys to non-empty lists of values")
        grid.update({k: ["null" if v is None else str(v) for v in values] for k, values in loaded.items()})
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid takes key=v1,v2,..., got '{item}'")
        key, values = item.split("=", 1)
        parse_overrides([f"{key.strip()}=x"])  # an unknown key fails here, with a suggestion
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[key.strip()]:
            raise ConfigError(f"--grid {key}: no values")
    if not grid:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2 (or --grid-file)")
    return grid


def combo_name(combo: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in combo.items()) or "base"


def _dir_name(combo: dict[str, str]) -> str:
    return "_".join(f"{k}-{v}" for k, v in combo.items()).replace("/", "-").replace(" ", "") or "base"


def plan(config: str | None, grid: dict[str, list[str]], seeds: list[int], overrides: dict, out: Path) -> list[Run]:
    """Every combination x seed, each validated now (a bad value fails before any run starts)."""
    runs = []
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))
        for seed in seeds:
            run_dir = out / _dir_name(combo) / f"seed{seed}"
            run_values = {**overrides, **combo, "seed": seed, "run_dir": str(run_dir)}
            load_config(config, run_values)
            runs.append(Run(combo=combo, seed=seed, run_dir=run_dir, values=run_values))
    return runs


def state(run: Run) -> str:
    if (run.run_dir / "summary.json").is_file():
        return "done"
    if (run.run_dir / "metrics.jsonl").exists() or (run.run_dir / "checkpoints").exists():
        return "partial"
    return "new"


def _command(config: str | None, run: Run, resume: bool) -> list[str]:
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else ('null' if v is None else v)}" for k, v in run.values.items()]
    return [sys.executable, "-m", "esrdistill.cli", "train", *([config] if config else []), *args, "progress=false",
            *(["resume=true"] if resume else [])]


def execute(config: str | None, runs: list[Run], parallel: int = 1, say=print) -> None:
    """Run what is not done yet; `parallel` at once, each with its share of the threads."""
    todo = [r for r in runs if state(r) != "done"]
    say(f"[sweep] {len(runs)} runs, {len(runs) - len(todo)} already complete, {len(todo)} to run"
        + (f", {parallel} at a time" if parallel > 1 else ""))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if parallel > 1 else dict(os.environ)

    def one(item):
        index, run = item
        resume = state(run) == "partial"
        say(f"[sweep] {index}/{len(todo)} {run.name} seed={run.seed}" + (" (resuming)" if resume else ""))
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir.parent / f"seed{run.seed}.log", "a") as log:
            result = subprocess.run(_command(config, run, resume), stdout=log, stderr=subprocess.STDOUT, env=env)
        if result.returncode != 0:
            raise ConfigError(f"run {run.name} seed={run.seed} failed (exit {result.returncode}); its log: "
                              f"{run.run_dir.parent / f'seed{run.seed}.log'}")

    items = list(enumerate(todo, start=1))
    if parallel <= 1:
        for item in items:
            one(item)
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(one, items))


def _final_eval(run_dir: Path) -> tuple[int, int] | None:
    """(correct, problems) of the run's last evaluation, from its eval/step_N.json."""
    files = sorted((run_dir / "eval").glob("step_*.json"))
    if not files:
        return None
    result = json.loads(files[-1].read_text())
    correct = sum(sum(p["correct"]) for p in result["problems"])
    total = sum(len(p["correct"]) for p in result["problems"])
    return correct, total


def _spread(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: list[Run]) -> list[dict]:
    """One row per combination: final and best evaluation accuracy over seeds, the pooled interval,
    time per step and tokens trained."""
    rows = []
    for name in dict.fromkeys(r.name for r in runs):
        group = [r for r in runs if r.name == name]
        finals, bests, step_s, tokens, pooled = [], [], [], [], [0, 0]
        for run in group:
            metrics = read_metrics(run.run_dir)
            evals = [m["eval/accuracy"] for m in metrics if "eval/accuracy" in m]
            if evals:
                finals.append(evals[-1])
                bests.append(max(evals))
            if metrics:
                step_s.append(statistics.fmean(m["time/step_s"] for m in metrics))
                tokens.append(sum(m.get("loss/tokens", m["rollout/tokens"]) for m in metrics))
            counts = _final_eval(run.run_dir)
            if counts:
                pooled[0] += counts[0]
                pooled[1] += counts[1]
        rows.append({
            "combo": group[0].combo, "seeds": [r.seed for r in group], "data_seed": group[0].values.get("data_seed"),
            "final_accuracy": _spread(finals), "best_accuracy": _spread(bests),
            "pooled_correct": pooled[0], "pooled_problems": pooled[1],
            "pooled_ci": list(wilson_interval(pooled[0], pooled[1])) if pooled[1] else None,
            "step_s": statistics.fmean(step_s) if step_s else None,
            "tokens_trained": statistics.fmean(tokens) if tokens else None,
        })
    return rows


def _fmt(v, pct=True):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1%}" if pct else f"{v:.2f}"


def markdown(rows: list[dict], data_seed) -> str:
    keys = list(rows[0]["combo"]) if rows else []
    lines = [f"Evaluation accuracy over seeds (data_seed={data_seed}: every run evaluates the same problems). "
             "Final: the last evaluation; best: the best evaluation of a run; the 95% interval pools the final "
             "evaluations of all seeds.", "",
             "| " + " | ".join(keys) + " | seeds | final mean ± std | final min-max | pooled 95% CI | best mean ± std | "
             "s per step | tokens trained |",
             "|" + "---|" * (len(keys) + 7)]
    for row in rows:
        f, b = row["final_accuracy"], row["best_accuracy"]
        ci = row["pooled_ci"]
        lines.append("| " + " | ".join(row["combo"][k] for k in keys) + f" | {','.join(map(str, row['seeds']))} | "
                     f"{_fmt(f['mean'])} ± {_fmt(f['std'])} | {_fmt(f['min'])}-{_fmt(f['max'])} | "
                     + (f"{ci[0]:.1%}-{ci[1]:.1%} ({row['pooled_correct']}/{row['pooled_problems']})" if ci else "-")
                     + f" | {_fmt(b['mean'])} ± {_fmt(b['std'])} | {_fmt(row['step_s'], False)} | "
                     + (f"{row['tokens_trained']:.0f}" if row["tokens_trained"] is not None else "-") + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path | None:
    """Final accuracy (mean ± std over seeds) against the first grid key, one line per value of the others."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(rows[0]["combo"])
    first, rest = keys[0], keys[1:]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for other in dict.fromkeys(tuple(r["combo"][k] for k in rest) for r in rows):
        line = [r for r in rows if tuple(r["combo"][k] for k in rest) == other]
        xs = [r["combo"][first] for r in line]
        ys = [r["final_accuracy"]["mean"] if r["final_accuracy"]["mean"] is not None else float("nan") for r in line]
        es = [r["final_accuracy"]["std"] or 0.0 for r in line]
        label = ", ".join(f"{k}={v}" for k, v in zip(rest, other)) or "final accuracy"
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.set_xlabel(first)
    if sum(len(str(r["combo"][first])) for r in rows) > 40:  # long category names: slant them
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("final eval accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep(config: str | None, grid_items: list[str], seeds: int | list[int], overrides: list[str] | None = None,
          out: str = "runs/sweep", parallel: int = 1, grid_file: str | None = None, say=print) -> list[dict]:
    """Plan, run (skipping complete runs, resuming partial ones), aggregate; write sweep.json/.md/.png."""
    if config is not None and not Path(config).is_file():
        raise ConfigError(f"config file {config} does not exist")
    grid = parse_grid(grid_items, grid_file)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ConfigError("--seeds must be >= 1")
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    values = parse_overrides(overrides or [])
    if "seed" in grid or "run_dir" in grid:
        raise ConfigError("seed and run_dir are set by the sweep itself (use --seeds and --out)")
    out_dir = Path(out)
    runs = plan(config, grid, seed_list, values, out_dir)
    execute(config, runs, parallel, say)
    rows = aggregate(runs)
    data_seed = load_config(config, {**values, **runs[0].combo}).data_seed
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps({"config": config, "grid": grid, "seeds": seed_list, "data_seed": data_seed,
                                                    "overrides": values, "rows": rows}, indent=2))
    table = markdown(rows, data_seed)
    (out_dir / "sweep.md").write_text(f"# esrdistill sweep\n\n`{config}`, grid {grid}, seeds {seed_list}\n\n{table}")
    plot(rows, out_dir / "sweep.png")
    say("\n" + table)
    say(f"Wrote {out_dir / 'sweep.md'}, sweep.json and sweep.png")
    return rows
