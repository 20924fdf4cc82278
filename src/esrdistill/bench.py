"""`esrdistill bench`: ESR (K=32) against a full rollout (up to 256 tokens), same prompts, batch and
seed, each run in its own process so that its peak memory is its own. Prints per-phase seconds per
step, tokens per step and peak memory side by side, and writes bench.json and bench.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from esrdistill.config import load_config, parse_overrides
from esrdistill.tracking import read_metrics

# A task on which the packaged student writes long answers (step-by-step reasoning), so that a
# full rollout really runs to its limit and the comparison measures what ESR saves.
BENCH_DEFAULTS = {
    "student": "packaged:smollm2-135m-instruct",
    "teacher": "packaged:smollm2-135m-instruct",
    "dataset": "reasoning_gym:gsm_symbolic",
    "system_prompt": "Think step by step, then give the final answer between <answer> and </answer> tags.",
    "num_prompts": 64,
    "eval_prompts": 0,
    "batch_size": 8,
    "micro_batch_size": 4,
    "steps": 4,
    "lora_r": 16,
    "lora_alpha": 32,
    "lr": 1e-4,
    "eval_every": 0,
    "save_every": 0,
    "seed": 0,
    "progress": False,
}
VARIANTS = {"esr_k32": {"rollout_tokens": 32}, "full_256": {"rollout_tokens": None, "max_new_tokens": 256}}
PHASES = ("rollout", "teacher", "train", "step")


def summarise(metrics: list[dict], skip_first: bool = True) -> dict:
    """Mean per-step figures of a run; the first step (one-time warm-up) is left out when there are more."""
    rows = metrics[1:] if skip_first and len(metrics) > 1 else metrics
    n = max(len(rows), 1)
    out = {f"{phase}_s": sum(m[f"time/{phase}_s"] for m in rows) / n for phase in PHASES}
    out["tokens"] = sum(m["rollout/tokens"] for m in rows) / n
    out["len_mean"] = sum(m["rollout/len_mean"] for m in rows) / n
    out["eos_frac"] = sum(m["rollout/eos_frac"] for m in rows) / n
    out["decode_steps"] = sum(m.get("rollout/decode_steps", 0) for m in rows) / n
    out["prompt_tokens"] = sum(m.get("rollout/prompt_tokens", 0) for m in rows) / n
    out["peak_mb"] = max(m["mem/peak_mb"] for m in metrics)
    out["steps_measured"] = len(rows)
    return out


def table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["| per step (mean after the first) | " + " | ".join(names) + " | ratio |", "|---|" + "---|" * (len(names) + 1)]
    rows = [("rollout s", "rollout_s"), ("teacher s", "teacher_s"), ("train s", "train_s"), ("step s", "step_s"),
            ("response tokens", "tokens"), ("mean response length", "len_mean"), ("decode steps run by generate", "decode_steps"),
            ("prompt tokens", "prompt_tokens"), ("rollouts ended with EOS", "eos_frac"), ("peak memory (RSS on CPU) MB", "peak_mb")]
    for label, key in rows:
        values = [results[n][key] for n in names]
        ratio = f"{values[-1] / values[0]:.1f}x" if len(values) == 2 and values[0] else ""
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in values) + f" | {ratio} |")
    return "\n".join(lines)


def bench(overrides: list[str] | None = None, out: str = "runs/bench") -> dict:
    user = parse_overrides(overrides or [])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, variant in VARIANTS.items():
        values = {**BENCH_DEFAULTS, **variant, **user, "run_dir": str(out_dir / name)}
        cfg = load_config(None, values)  # validates before spending minutes
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        args = [f"{k}={json.dumps(v) if isinstance(v, dict) else ('null' if v is None else v)}" for k, v in values.items()]
        print(f"[bench] {name}: {cfg.steps} steps of {cfg.batch_size} rollouts of at most "
              f"{cfg.rollout_tokens or cfg.max_new_tokens} tokens ...", flush=True)
        subprocess.run([sys.executable, "-m", "esrdistill.cli", "train", *args], check=True)
        results[name] = summarise(read_metrics(cfg.run_dir))
    report = table(results)
    print("\n" + report)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2))
    (out_dir / "bench.md").write_text(report + "\n")
    return results
