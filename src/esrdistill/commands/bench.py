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

`--against trl` (equal-work only; TRL installed: `pip install -e ".[trl]"`): TRL's DistillationTrainer runs the same
job in the same invocation (commands/trl_bench.py, in its own process), interleaved with esrdistill's runs (for
each N, `--rounds` times: TRL, then esrdistill with each engine), and the report gives per phase the median over
the measured steps (the first is warm-up) with their spread, each round's ratio to TRL's step of that round, and
the load average before each run. No figure is divided by one from another invocation.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from esrdistill import build, prompts
from esrdistill.commands import trl_bench
from esrdistill.config import ConfigError, load_config, parse_overrides
from esrdistill.errors import UserError
from esrdistill.models import locate
from esrdistill.rundir import commit
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


def table(results: dict[str, dict], group: int = 2) -> str:
    """The runs side by side, in groups of `group` (a job's variants, once per engine); after each group of two (ESR,
    then the full rollout) the second's ratio to the first."""
    names = list(results)
    groups = [names[i:i + group] for i in range(0, len(names), group)]
    lines = ["| per step (mean after the first) | " + " | ".join(" | ".join(p) + (" | ratio" if len(p) == 2 else "") for p in groups) + " |",
             "|---|" + "".join("---|" * (len(p) + (len(p) == 2)) for p in groups)]
    rows = [("rollout s", "rollout_s"), ("teacher s", "teacher_s"), ("train s", "train_s"), ("engine sync s", "sync_s"),
            ("step s", "step_s"), ("response tokens", "tokens"), ("generated tokens per s", "tokens_per_s"),
            ("mean response length", "len_mean"), ("decode steps run by generate", "decode_steps"),
            ("prompt tokens", "prompt_tokens"), ("rollouts ended with EOS", "eos_frac"), ("peak memory MB (CUDA: allocated; CPU: resident)", "peak_mb")]
    for label, key in rows:
        cells = []
        for group_names in groups:
            values = [results[n][key] for n in group_names]
            cells += [f"{v:.2f}" if isinstance(v, float) else str(v) for v in values]
            if len(group_names) == 2:
                cells.append(f"{values[1] / values[0]:.1f}x" if values[0] else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _train(values: dict, label: str, engine: str) -> list[dict]:
    """One esrdistill run of `values` in its own process; its metrics.jsonl rows."""
    cfg = load_config(None, values)  # validates before spending minutes
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else ('null' if v is None else v)}" for k, v in values.items()]
    print(f"[bench] {label}: {cfg.steps} steps of {cfg.batch_size} rollouts of {'exactly' if cfg.min_new_tokens else 'at most'} "
          f"{cfg.rollout_tokens or cfg.max_new_tokens} tokens ({engine} engine) ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "esrdistill.cli", "train", *args])
    if done.returncode:  # its message is above
        raise UserError(f"bench: the '{label}' run failed (exit status {done.returncode}; its message is above); "
                        f"its run directory is {cfg.run_dir}")
    return read_metrics(cfg.run_dir)


def _job_values(job: str, overrides: list[str] | None, out_dir: Path) -> tuple[dict, dict]:
    if job not in JOBS:
        raise ConfigError(f"unknown bench job '{job}': choose one of {', '.join(JOBS)}")
    defaults, variants = JOBS[job]
    user = parse_overrides(overrides or [])
    out_dir.mkdir(parents=True, exist_ok=True)
    if job == "equal-work" and "student" not in user:
        user["student"] = layer_subset(defaults["student"], EQUAL_WORK_LAYERS, out_dir / "models" / "smollm2-57m-layers",
                                       user.get("model_cache"))
    return {**defaults, **user}, variants


def bench(overrides: list[str] | None = None, out: str = "runs/bench", job: str = "esr-vs-full", engines: tuple[str, ...] = ("hf",),
          force_length: bool = False) -> dict:

    out_dir = Path(out)
    base, variants = _job_values(job, overrides, out_dir)
    user = parse_overrides(overrides or [])
    results = {}
    for engine in engines:
        for name, variant in variants.items():
            values = {**base, **variant, **user, "rollout_engine": engine}
            if force_length:
                values["min_new_tokens"] = values.get("rollout_tokens") or values.get("max_new_tokens", 1024)
            label = name if len(engines) == 1 else f"{name} {engine}"
            values["run_dir"] = str(out_dir / label.replace(" ", "_"))
            results[label] = summarise(_train(values, label, engine))
    report = table(results, group=len(variants))
    print("\n" + report)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2))
    (out_dir / "bench.md").write_text(report + "\n")
    return results


# ---- side by side with TRL (--against trl) ---------------------------------------------------------------

SIDE_PHASES = (("rollout s", "rollout"), ("teacher s", "teacher"), ("train s", "train"), ("engine sync s", "sync"), ("step s", "step"))


def trl_spec(values: dict, n: int) -> dict:
    """What trl_bench.run needs for one N of the equal-work job: the models, the prompts of the steps it runs (in
    esrdistill's order: shuffle_prompts is off) as chat messages, and the token ids esrdistill makes of them."""
    from transformers import AutoTokenizer

    cfg = load_config(None, {**values, "rollout_tokens": n, "min_new_tokens": n})
    if cfg.shuffle_prompts or cfg.lora_r or cfg.teacher_fewshot or cfg.prompt_template != "{prompt}":
        raise ConfigError("bench --against trl runs the equal-work job as TRL runs it: shuffle_prompts=false, lora_r=0, "
                          "no worked examples, prompt_template={prompt}")
    task = build.task(cfg)
    style, _ = build.styles(cfg, task)
    student, teacher = locate(cfg.student, cfg.model_cache), locate(cfg.teacher, cfg.model_cache)
    tokenizer = AutoTokenizer.from_pretrained(student)
    problems = [task.train[i % len(task.train)] for i in range(cfg.batch_size * cfg.steps)]
    system = [] if cfg.system_prompt is None else [{"role": "system", "content": cfg.system_prompt}]
    return {"student": student, "teacher": teacher, "n": n, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "max_grad_norm": cfg.max_grad_norm, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "seed": cfg.seed, "dtype": cfg.dtype, "device": "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and _cuda()) else "cpu",
            "prompts": [system + [{"role": "user", "content": p.prompt}] for p in problems],
            "prompt_ids": prompts.encode(tokenizer, problems, style)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _trl_run(spec: dict, out: Path, label: str) -> list[dict]:
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    print(f"[bench] {label}: TRL {trl_bench.trl_version()} DistillationTrainer, {spec['steps']} steps of {spec['batch_size']} "
          f"rollouts of exactly {spec['n']} tokens ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "esrdistill.commands.trl_bench", str(spec_path), str(out)])
    if done.returncode:
        raise UserError(f"bench: TRL's '{label}' run failed (exit status {done.returncode}; its message is above)")
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def per_phase(rows: list[dict]) -> dict:
    """Median, min and max over the measured steps (the first left out when there are more) of each phase."""
    measured = rows[1:] if len(rows) > 1 else rows
    out = {}
    for _, phase in SIDE_PHASES:
        values = [r.get(f"time/{phase}_s", 0.0) for r in measured]
        out[phase] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["steps_measured"] = len(measured)
    out["tokens"] = statistics.median(r["rollout/tokens"] for r in measured)
    return out


def _span(values: list[float], digits: int = 2) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if abs(high - low) < 10 ** -digits else f"{low:.{digits}f}-{high:.{digits}f}"


def side_by_side_tables(runs: list[dict], engines: tuple[str, ...]) -> str:
    """The report: per N, each round's step medians (TRL and each engine) and ratios; then per phase the
    median over rounds of each run's median, with the spread over steps."""
    ns = list(dict.fromkeys(r["n"] for r in runs))
    head = "| N | TRL step s |" + "".join(f" esrdistill {e} step s | ratio |" for e in engines)
    lines = ["Step seconds (each run's median over its measured steps; a range is over the rounds, the ratio is "
             "esrdistill's step over TRL's step of the same round):", "", head, "|---|---|" + "---|---|" * len(engines)]
    for n in ns:
        rounds = sorted({r["round"] for r in runs if r["n"] == n})
        step = {(r["tool"], r["round"]): r["phases"]["step"]["median"] for r in runs if r["n"] == n}
        cells = [_span([step[("trl", k)] for k in rounds])]
        for e in engines:
            cells += [_span([step[(e, k)] for k in rounds]), _span([step[(e, k)] / step[("trl", k)] for k in rounds])]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for n in ns:
        tools = ["trl", *engines]
        lines += ["", f"N={n}, per phase: median over the rounds of each run's median (in brackets: the fastest and "
                  "slowest measured step of any round)", "",
                  "| per step | " + " | ".join("TRL" if t == "trl" else f"esrdistill {t}" for t in tools) + " | "
                  + " | ".join(f"{e} / TRL" for e in engines) + " |", "|---|" + "---|" * (len(tools) + len(engines))]
        for label, phase in SIDE_PHASES:
            mid = {t: statistics.median(r["phases"][phase]["median"] for r in runs if r["n"] == n and r["tool"] == t) for t in tools}
            low = {t: min(r["phases"][phase]["min"] for r in runs if r["n"] == n and r["tool"] == t) for t in tools}
            high = {t: max(r["phases"][phase]["max"] for r in runs if r["n"] == n and r["tool"] == t) for t in tools}
            cells = [f"{mid[t]:.2f} [{low[t]:.2f}-{high[t]:.2f}]" for t in tools]
            cells += [f"{mid[e] / mid['trl']:.2f}x" if mid["trl"] > 0 else "" for e in engines]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "TRL's teacher phase is its teacher's backbone: TRL projects both LM heads inside its chunked loss, so "
              "the teacher's LM head falls in TRL's train phase (esrdistill's teacher phase includes the teacher's LM head). "
              "TRL has no engine sync (it generates with the student itself)."]
    return "\n".join(lines)


def against_trl(overrides: list[str] | None = None, out: str = "runs/bench-trl", engines: tuple[str, ...] = ("hf",),
                rounds: int = 2, lengths: tuple[int, ...] | None = None, steps: int = 6) -> dict:
    """`esrdistill bench --job equal-work --against trl`: TRL and esrdistill interleaved on the same job."""
    version = trl_bench.trl_version()
    if version is None:
        raise UserError('bench --against trl needs TRL: pip install -e ".[trl]" (tested with TRL '
                        + ", ".join(trl_bench.TESTED_TRL) + ")")
    if rounds < 1 or steps < 2:
        raise ConfigError(f"bench --against trl needs --rounds >= 1 and steps >= 2 (a warm-up and a measured step), got "
                          f"--rounds {rounds}, steps={steps}")
    out_dir = Path(out)
    user = parse_overrides(overrides or [])
    base, variants = _job_values("equal-work", overrides, out_dir)
    base = {**base, "steps": user.get("steps", steps)}
    ns = lengths or tuple(v["rollout_tokens"] for v in variants.values())
    specs = {n: trl_spec(base, n) for n in ns}  # every prompt set checked before the first run
    runs = []
    for n in ns:
        for k in range(1, rounds + 1):
            load = os.getloadavg()[0]
            rows = _trl_run(specs[n], out_dir / "trl" / f"n{n}_round{k}.jsonl", f"TRL N={n} round {k}")
            runs.append({"tool": "trl", "n": n, "round": k, "load_before": round(load, 2), "phases": per_phase(rows), "steps": rows})
            for engine in engines:
                load = os.getloadavg()[0]
                values = {**base, "rollout_tokens": n, "min_new_tokens": n, **user, "steps": base["steps"],
                          "rollout_engine": engine, "run_dir": str(out_dir / f"n{n}_{engine}_round{k}")}
                rows = _train(values, f"esrdistill {engine} N={n} round {k}", engine)
                runs.append({"tool": engine, "n": n, "round": k, "load_before": round(load, 2), "phases": per_phase(rows),
                             "steps": [{key: r[key] for key in r if key.startswith(("time/", "rollout/"))} for r in rows]})
    loads = [r["load_before"] for r in runs]
    header = (f"`esrdistill bench --job equal-work --against trl --rounds {rounds}` at {commit()}; TRL {version}; "
              f"{base['steps']} steps a run (the first is warm-up); load average before the runs {min(loads):.2f}-{max(loads):.2f}.")
    report = header + "\n\n" + side_by_side_tables(runs, engines)
    print("\n" + report)
    (out_dir / "bench-trl.json").write_text(json.dumps({"commit": commit(), "trl": version, "runs": runs}, indent=1))
    (out_dir / "bench-trl.md").write_text(report + "\n")
    return {"runs": runs, "report": report}
