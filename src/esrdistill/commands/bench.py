"""`esrdistill bench`: time per phase, tokens per second and peak memory of training steps, each run in
its own process (so that its peak memory is its own), side by side.

Jobs (`--job`):
- esr-vs-full (default): ESR (K=32) against a full rollout (up to 256 tokens) on the packaged SmolLM2,
  gsm_symbolic prompts with a step-by-step system prompt, batch 8, LoRA r=16.
- equal-work: the job TRL 1.16.0 was measured on, side by side. The packaged SmolLM2-135M as the
  teacher and a 57M student made of its layers 0,4,8,12,16,20,24,29 (built once); reasoning-gym
  basic_arithmetic with its default options (`create_dataset("basic_arithmetic", size=64, seed=1)`),
  its prompts in the generator's order, each one user message through SmolLM2's chat template with
  its default system message (about 49 prompt tokens); batch 4, one rollout per prompt at
  temperature 0.7 and top_p 1.0, every rollout forced to N = 32, 128 and 256 tokens; full fine-tuning
  in fp32, AdamW at lr 1e-6, gradients clipped at 1.0: the same work whatever the engine or the tool.
`--engine hf|vllm|both` picks the rollout engine(s); `--force-length` suppresses EOS so that every
rollout has exactly its length limit (config key `min_new_tokens`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from esrdistill.config import ConfigError, load_config, parse_overrides
from esrdistill.errors import UserError
from esrdistill.models import locate
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
EQUAL_WORK_LAYERS = (0, 4, 8, 12, 16, 20, 24, 29)
# The job TRL 1.16.0 was measured on (docs/benchmarks.md), so that the comparison compares the same work.
EQUAL_WORK_DEFAULTS = {
    "student": "packaged:smollm2-135m-instruct",  # cut down to EQUAL_WORK_LAYERS by bench()
    "teacher": "packaged:smollm2-135m-instruct",
    "dataset": "reasoning_gym:basic_arithmetic",  # its default options
    "data_seed": 1,  # the generator's seed: create_dataset("basic_arithmetic", size=64, seed=1)
    "num_prompts": 64,
    "eval_prompts": 0,
    "shuffle_prompts": False,  # rows 0-3 at the first step, 4-7 at the second, ...
    "system_prompt": None,  # SmolLM2's template adds its default system message: about 49 prompt tokens
    "batch_size": 4,
    "micro_batch_size": 4,
    "temperature": 0.7,
    "top_p": 1.0,
    "lora_r": 0,
    "lr": 1e-6,
    "max_grad_norm": 1.0,
    "dtype": "float32",
    "steps": 4,
    "eval_every": 0,
    "save_every": 0,
    "seed": 0,
    "progress": False,
}
JOBS = {
    "esr-vs-full": (BENCH_DEFAULTS, {"esr_k32": {"rollout_tokens": 32}, "full_256": {"rollout_tokens": None, "max_new_tokens": 256}}),
    "equal-work": (EQUAL_WORK_DEFAULTS, {f"n{n}": {"rollout_tokens": n, "min_new_tokens": n} for n in (32, 128, 256)}),
}
PHASES = ("rollout", "teacher", "train", "sync", "step")


def layer_subset(spec: str, layers: tuple[int, ...], out: Path, model_cache: str | None = None) -> str:
    """A model made of some decoder layers of another (its embeddings, norm and head kept), saved once."""
    if (out / "config.json").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer


    path = locate(spec, model_cache)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.model.layers = type(model.model.layers)([model.model.layers[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    for index, layer in enumerate(model.model.layers):  # KV-cache slots follow the new numbering
        layer.self_attn.layer_idx = index
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def summarise(metrics: list[dict], skip_first: bool = True) -> dict:
    """Mean per-step figures of a run; the first step (one-time warm-up) is left out when there are more."""
    rows = metrics[1:] if skip_first and len(metrics) > 1 else metrics
    n = max(len(rows), 1)
    out = {f"{phase}_s": sum(m.get(f"time/{phase}_s", 0.0) for m in rows) / n for phase in PHASES}
    out["tokens"] = sum(m["rollout/tokens"] for m in rows) / n
    out["tokens_per_s"] = out["tokens"] / out["rollout_s"] if out["rollout_s"] else 0.0
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
    rows = [("rollout s", "rollout_s"), ("teacher s", "teacher_s"), ("train s", "train_s"), ("engine sync s", "sync_s"),
            ("step s", "step_s"), ("response tokens", "tokens"), ("generated tokens per s", "tokens_per_s"),
            ("mean response length", "len_mean"), ("decode steps run by generate", "decode_steps"),
            ("prompt tokens", "prompt_tokens"), ("rollouts ended with EOS", "eos_frac"), ("peak memory MB (CUDA: allocated; CPU: resident)", "peak_mb")]
    for label, key in rows:
        values = [results[n][key] for n in names]
        ratio = f"{values[-1] / values[0]:.1f}x" if len(values) == 2 and values[0] else ""
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in values) + f" | {ratio} |")
    return "\n".join(lines)


def bench(overrides: list[str] | None = None, out: str = "runs/bench", job: str = "esr-vs-full", engines: tuple[str, ...] = ("hf",),
          force_length: bool = False) -> dict:

    if job not in JOBS:
        raise ConfigError(f"unknown bench job '{job}': choose one of {', '.join(JOBS)}")
    defaults, variants = JOBS[job]
    user = parse_overrides(overrides or [])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if job == "equal-work" and "student" not in user:
        user["student"] = layer_subset(defaults["student"], EQUAL_WORK_LAYERS, out_dir / "models" / "smollm2-57m-layers",
                                       user.get("model_cache"))
    results = {}
    for engine in engines:
        for name, variant in variants.items():
            values = {**defaults, **variant, **user, "rollout_engine": engine}
            if force_length:
                values["min_new_tokens"] = values.get("rollout_tokens") or values.get("max_new_tokens", 1024)
            label = name if len(engines) == 1 else f"{name} {engine}"
            values["run_dir"] = str(out_dir / label.replace(" ", "_"))
            cfg = load_config(None, values)  # validates before spending minutes
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
            args = [f"{k}={json.dumps(v) if isinstance(v, dict) else ('null' if v is None else v)}" for k, v in values.items()]
            print(f"[bench] {label}: {cfg.steps} steps of {cfg.batch_size} rollouts of {'exactly' if cfg.min_new_tokens else 'at most'} "
                  f"{cfg.rollout_tokens or cfg.max_new_tokens} tokens ({engine} engine) ...", flush=True)
            done = subprocess.run([sys.executable, "-m", "esrdistill.cli", "train", *args])
            if done.returncode:  # its message is above
                raise UserError(f"bench: the '{label}' run failed (exit status {done.returncode}; its message is above); "
                                f"its run directory is {cfg.run_dir}")
            results[label] = summarise(read_metrics(cfg.run_dir))
    report = table(results)
    print("\n" + report)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2))
    (out_dir / "bench.md").write_text(report + "\n")
    return results
