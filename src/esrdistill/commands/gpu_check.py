"""The benchmark of the GPU check (scripts/gpu_check.sh): ESR against a full rollout at a realistic size,
on randomly initialised models built from configs, timed by esrdistill's own training loop.

    python -m esrdistill.commands.gpu_check --out DIR              # CUDA: Qwen2-style ~1.5B student, Qwen3-style ~1.6B teacher
    python -m esrdistill.commands.gpu_check --out DIR --dry-run    # CPU: the same code path with tiny models, in seconds
    python -m esrdistill.commands.gpu_check cuda-verdict --junit FILE --pytest-status RC [--dry-run]
                                                          # the CUDA tests' verdict (cuda_tests_verdict)

Speed does not depend on the weights when every rollout runs to its length limit (min_new_tokens = that
limit, as `esrdistill bench --force-length` does), so random weights time what trained ones would. The
models are saved with save_pretrained beside a real tokenizer's files (SmolLM2's, carried in
.gpucheck/tokenizer/), the prompts are a local JSONL file, and each arm is `esrdistill train` in its own
process (so its peak memory is its own), summarised and tabulated by bench.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from esrdistill.cli import main as cli_main
from esrdistill.commands.bench import BENCH_DEFAULTS, summarise, table
from esrdistill.commands.decode_timing import DECODE_VARIANTS, decode_step_ms, decode_table
from esrdistill.config import load_config, save_config
from esrdistill.tracking import read_metrics

# written by `scripts/gpu_check.sh --prepare` into the checkout, carried with the device call; read from the directory
# the check runs in (the script runs it from the repository root), so an installed package finds it too
CARRIED_TOKENIZER = Path(".gpucheck") / "tokenizer"
SOURCE_NOTE = "SOURCE.txt"  # first line: how to name the vocabulary in the report


@dataclass(frozen=True)
class Sizes:
    """One benchmark setting: the two model shapes (transformers config kwargs) and the run's sizes."""

    name: str
    device: str  # cpu | cuda
    dtype: str  # float32 | bfloat16
    student_arch: str  # transformers config class of the student
    student: dict  # its kwargs, vocabulary and special ids left out (they come from the tokenizer)
    teacher_arch: str
    teacher: dict
    batch_size: int
    micro_batch_size: int
    lora_r: int
    hf_decode: str  # the arms' hf engine decode (config.hf_decode); the decode table times every mode
    decode_variants: tuple  # labels of DECODE_VARIANTS the decode table times
    esr_k: int  # ESR's K
    full_tokens: int  # the full rollout's length limit
    steps: int  # per arm; the first is a warm-up, left out of the means
    prompts: int  # distinct prompts in the JSONL file


# Qwen2.5-1.5B's shape and Qwen3-1.7B's shape, untied LM heads, on SmolLM2's 49,152-token vocabulary
# (1.46B and 1.61B parameters; with their own 151,936-token vocabularies and tied heads: 1.54B and 1.72B).
GPU = Sizes(
    name="gpu", device="cuda", dtype="bfloat16",
    student_arch="Qwen2Config",
    student=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    teacher_arch="Qwen3Config",
    teacher=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                 tie_word_embeddings=False),
    batch_size=16, micro_batch_size=4, lora_r=32, hf_decode="compiled", decode_variants=tuple(v[0] for v in DECODE_VARIANTS),
    esr_k=100, full_tokens=1024, steps=3, prompts=64,
)
DRY = Sizes(
    name="dry-run", device="cpu", dtype="float32",
    student_arch="Qwen2Config",
    student=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=2048, tie_word_embeddings=False),
    teacher_arch="Qwen3Config",
    teacher=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=2048, tie_word_embeddings=False),
    batch_size=4, micro_batch_size=2, lora_r=4, hf_decode="static",  # compiling on the CPU takes ~25 s: tests/test_rollout.py does it
    decode_variants=tuple(v[0] for v in DECODE_VARIANTS if v[3] != "compiled"), esr_k=4, full_tokens=12, steps=2, prompts=8,
)


# ---- models, tokenizer and prompts ------------------------------------------------------------------

def char_tokenizer():
    """A character-level chat tokenizer (the dry run's fallback where .gpucheck/tokenizer is absent)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"] + list(dict.fromkeys(string.printable[:95] + "\n"))
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "</s>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def load_tokenizer(path: Path | None):
    """(tokenizer, how the report names its vocabulary)."""
    from transformers import AutoTokenizer

    if path is None:
        tok = char_tokenizer()
        return tok, f"a character-level tokenizer's, {len(tok)} tokens"
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    note = path / SOURCE_NOTE
    label = note.read_text().splitlines()[0].strip() if note.is_file() else f"the tokenizer's in {path}"
    return tok, f"{label}, {len(tok):,} tokens"


def save_random_model(arch: str, shape: dict, tokenizer, out: Path, dtype: str, device: str, seed: int) -> int:
    """A randomly initialised causal LM of `shape` with `tokenizer`, saved to `out`; returns its parameter count."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar in the log
    torch.manual_seed(seed)
    config = getattr(transformers, arch)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    with torch.device(device):  # initialised where it will run: seconds on a GPU for 1.5B parameters
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return count


def write_prompts(path: Path, n: int, seed: int = 0) -> None:
    """`n` grade-school word problems with answers, one JSON object a line (question, answer)."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(n):
            a, b, price = rng.randint(3, 90), rng.randint(3, 90), rng.randint(2, 9)
            question = (f"A shop sells {a} apples on Monday and {b} apples on Tuesday. Each apple costs {price} dollars. "
                        "How many dollars does the shop take over the two days?")
            out.write(json.dumps({"question": question, "answer": str((a + b) * price)}) + "\n")


# ---- the decode step, engine settings against each other ------------------------------------------



# ---- the benchmark ----------------------------------------------------------------------------------

def arms(sizes: Sizes) -> dict[str, dict]:
    """ESR (K tokens) and a full rollout, each forced to its length limit."""
    return {f"esr_k{sizes.esr_k}": {"rollout_tokens": sizes.esr_k, "min_new_tokens": sizes.esr_k},
            f"full_{sizes.full_tokens}": {"rollout_tokens": None, "min_new_tokens": sizes.full_tokens}}


def arm_values(sizes: Sizes, student: str, teacher: str, prompts: Path, run_dir: Path, variant: dict) -> dict:
    return {
        "student": student, "teacher": teacher, "dataset": str(prompts), "grader": "exact", "num_prompts": None,
        "eval_prompts": 0, "system_prompt": BENCH_DEFAULTS["system_prompt"], "max_new_tokens": sizes.full_tokens,
        "batch_size": sizes.batch_size, "micro_batch_size": sizes.micro_batch_size, "steps": sizes.steps,
        "lora_r": sizes.lora_r, "lora_alpha": 2 * sizes.lora_r, "lr": 1e-4, "eval_every": 0, "save_every": 0,
        "merge_lora": False, "hf_decode": sizes.hf_decode, "device": sizes.device, "dtype": sizes.dtype, "seed": 0, "progress": False,
        "run_dir": str(run_dir), **variant,
    }


def describe_device(device: str) -> dict:
    import peft
    import torch
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(cpu_threads=torch.get_num_threads())
    return info


def steps_that_fit(esr: dict, esr_wall_s: float, sizes: Sizes, seconds_left: float) -> int:
    """How many steps of the full arm fit in `seconds_left`, predicted from the ESR arm's figures: its start-up
    (process, models) again, then steps whose rollout grows with the decode steps and whose teacher and train
    phases grow with the tokens. At least 2 (a warm-up and one measured step), at most sizes.steps."""
    scale = sizes.full_tokens / sizes.esr_k
    startup = max(esr_wall_s - sizes.steps * esr["step_s"], 0.0)
    step = esr["step_s"] * scale * 1.15  # 15% for the longer KV cache and attention
    return int(min(max((seconds_left - startup) // step, 2), sizes.steps)) if step > 0 else sizes.steps


def run_arm(label: str, config_path: Path, run_dir: Path, limit_s: float | None) -> tuple[dict | None, str | None]:
    """One arm: `esrdistill train CONFIG` in its own process; (its summarised figures, why it failed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    why = None
    try:
        subprocess.run([sys.executable, "-m", "esrdistill.commands.gpu_check", "train", str(config_path)], check=True, env=env,
                       timeout=limit_s)
    except subprocess.CalledProcessError as err:
        why = f"exit status {err.returncode}"
    except subprocess.TimeoutExpired:
        why = f"stopped at the time limit ({limit_s:.0f} s)"
    metrics = read_metrics(run_dir)
    if why:
        print(f"[gpu-check] {label} FAILED: {why}; {len(metrics)} steps logged", flush=True)
    return (summarise(metrics) if metrics else None), why


def run(sizes: Sizes, out: Path, work: Path, tokenizer_dir: Path | None, time_limit_s: float | None = None) -> dict:
    """Build the models, run both arms, write bench.md, bench.json and setup.json under `out`."""
    import torch

    if sizes.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available here; use --dry-run on a machine without a GPU")
    start = time.perf_counter()
    seconds_left = lambda: float("inf") if time_limit_s is None else time_limit_s - (time.perf_counter() - start)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_label = load_tokenizer(tokenizer_dir)
    print(f"[gpu-check] vocabulary: {vocab_label}", flush=True)

    # ---- random models from configs, saved where `esrdistill train` loads them ----------------------
    params = {}
    for role, arch, shape, seed in (("student", sizes.student_arch, sizes.student, 1), ("teacher", sizes.teacher_arch, sizes.teacher, 2)):
        t0 = time.perf_counter()
        params[role] = save_random_model(arch, shape, tokenizer, work / role, sizes.dtype, sizes.device, seed)
        print(f"[gpu-check] {role}: {arch.removesuffix('Config')}-style, {params[role]:,} parameters, random init, "
              f"saved in {time.perf_counter() - t0:.1f} s", flush=True)
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, sizes.prompts)
    decode = decode_step_ms(work / "student", sizes, [v for v in DECODE_VARIANTS if v[0] in sizes.decode_variants])

    # ---- each arm: `esrdistill train` in its own process (ESR first: it predicts the full arm's time) -
    results, failed, wall, steps = {}, {}, {}, {}
    for label, variant in arms(sizes).items():
        run_dir = work / "runs" / label
        shutil.rmtree(run_dir, ignore_errors=True)
        values = arm_values(sizes, str(work / "student"), str(work / "teacher"), prompts, run_dir, variant)
        if results and time_limit_s is not None:  # the full arm: as many steps as fit, at least a warm-up and one
            first = next(iter(results))
            values["steps"] = steps_that_fit(results[first], wall[first], sizes, seconds_left())
        cfg = load_config(None, values)  # validates before spending minutes
        steps[label] = cfg.steps
        config_path = out / f"{label}.config.yaml"
        save_config(cfg, config_path)
        print(f"[gpu-check] {label}: {cfg.steps} steps of {cfg.batch_size} rollouts of exactly "
              f"{cfg.rollout_tokens or cfg.max_new_tokens} tokens (hf engine, {cfg.dtype}, LoRA r={cfg.lora_r}) ...", flush=True)
        t0 = time.perf_counter()
        figures, why = run_arm(label, config_path, run_dir, None if time_limit_s is None else max(seconds_left(), 1.0))
        wall[label] = round(time.perf_counter() - t0, 1)
        if figures:
            results[label] = figures
        if why:
            failed[label] = why
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copy(run_dir / "metrics.jsonl", out / f"{label}.metrics.jsonl")

    # ---- the report: bench.py's table, a header that says what was run -------------------------------
    setup = {"sizes": asdict(sizes), "steps": steps, "decode": decode, "vocabulary": vocab_label, "parameters": params, "arm_wall_s": wall,
             "failed": failed, **describe_device(sizes.device)}
    where = setup.get("gpu", f"the CPU ({setup.get('cpu_threads')} threads)")
    step_note = (f"{sizes.steps} steps per arm" if len(set(steps.values())) == 1 else
                 ", ".join(f"{n} steps of {label}" for label, n in steps.items()) + " (the full arm cut to fit the time limit)")
    lines = [f"# ESR (K={sizes.esr_k}) against a full rollout ({sizes.full_tokens:,} tokens) on {where}", "",
             f"- student: {sizes.student_arch.removesuffix('Config')}-style, {params['student']:,} parameters; teacher: "
             f"{sizes.teacher_arch.removesuffix('Config')}-style, {params['teacher']:,} parameters; both randomly initialised",
             f"- vocabulary: {vocab_label}",
             f"- {sizes.dtype}, LoRA r={sizes.lora_r}, batch {sizes.batch_size} (micro-batches of {sizes.micro_batch_size}), "
             f"hf engine (hf_decode={sizes.hf_decode}, LoRA merged for the rollouts), every rollout forced to its length limit",
             f"- {step_note}, the first (warm-up) left out of the means; torch {setup['torch']}, "
             f"transformers {setup['transformers']}, peft {setup['peft']}", ""]
    if results:
        lines.append(table(results))
    lines += ["", decode_table(decode, sizes.batch_size)]
    for label, why in failed.items():
        lines.append(f"\n{label} failed: {why}" + (" (its figures above are from the steps it logged)" if label in results else ""))
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "setup.json").write_text(json.dumps(setup, indent=2))
    return {"results": results, "failed": failed, "setup": setup}


# ---- the CUDA tests' verdict (scripts/gpu_check.sh's test_cuda part) ---------------------------------

@dataclass(frozen=True)
class CudaVerdict:
    """What the test_cuda part records: status ok | skipped (the dry run only) | FAILED, and why."""

    status: str
    why: str

    @property
    def exit_status(self) -> int:  # what scripts/gpu_check.sh's part() reads: 0 ok, 3 skipped, 1 FAILED
        return {"ok": 0, "skipped": 3}.get(self.status, 1)


def cuda_tests_verdict(junit_xml: str | None, pytest_status: int, cuda_device: str | None, dry_run: bool) -> CudaVerdict:
    """The verdict on tests/test_cuda.py from pytest's outcome.

    junit_xml: the text of pytest's --junitxml report (None when pytest wrote none); pytest_status: its
    exit status; cuda_device: the GPU's name, None when torch sees no CUDA device. On the GPU (dry_run
    False) it passes only when CUDA is there and every CUDA test ran and passed: a test skipped there is
    a test that did not check the CUDA path. The dry run (on a CPU) may skip them all, as "skipped".
    """
    if junit_xml is None:
        return CudaVerdict("FAILED", f"pytest wrote no report (exit status {pytest_status})")
    cases = ElementTree.fromstring(junit_xml).iter("testcase")
    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    reasons = []
    for case in cases:
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes["failed"].append(name)
        elif (skip := case.find("skipped")) is not None:
            outcomes["skipped"].append(name)
            reasons.append(skip.get("message", ""))
        else:
            outcomes["passed"].append(name)
    total = sum(map(len, outcomes.values()))
    passed, failed, skipped = (len(outcomes[k]) for k in ("passed", "failed", "skipped"))
    why_skipped = f"{skipped} of {total} CUDA tests skipped"
    reason = f": {reasons[0]}" if reasons else ""  # the first skip's reason
    if failed:
        names = ", ".join(outcomes["failed"][:3]) + (", ..." if failed > 3 else "")
        return CudaVerdict("FAILED", f"{failed} of {total} CUDA tests failed: {names}")
    if total == 0:
        return CudaVerdict("FAILED", f"no CUDA test ran (pytest exit status {pytest_status})")
    if pytest_status != 0:
        return CudaVerdict("FAILED", f"pytest exit status {pytest_status} ({passed} passed, {why_skipped})")
    if cuda_device is None:
        if dry_run:
            return CudaVerdict("skipped", f"dry run, no GPU: {why_skipped}{reason}")
        return CudaVerdict("FAILED", f"CUDA is absent (torch.cuda.is_available() is False): {why_skipped}{reason}")
    if skipped:
        return CudaVerdict("FAILED", f"{why_skipped} on {cuda_device}, where every one must run{reason}")
    return CudaVerdict("ok", f"{passed} passed on {cuda_device}")


def cuda_verdict_main(argv: list[str]) -> int:
    """`cuda-verdict --junit FILE --pytest-status RC [--dry-run]`: print the verdict's reason, exit 0 / 3 / 1."""
    parser = argparse.ArgumentParser(prog="python -m esrdistill.commands.gpu_check cuda-verdict")
    parser.add_argument("--junit", required=True, help="pytest's --junitxml report of tests/test_cuda.py")
    parser.add_argument("--pytest-status", type=int, required=True, help="pytest's exit status")
    parser.add_argument("--dry-run", action="store_true", help="on a CPU: all skipped is 'skipped', not a failure")
    args = parser.parse_args(argv)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = Path(args.junit)
    verdict = cuda_tests_verdict(report.read_text() if report.is_file() else None, args.pytest_status, device, args.dry_run)
    print(verdict.why, flush=True)
    return verdict.exit_status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cuda-verdict"]:
        return cuda_verdict_main(argv[1:])
    if argv[:1] == ["train"]:  # one arm, in its own process: `esrdistill train` itself
        return cli_main(argv)
    parser = argparse.ArgumentParser(prog="python -m esrdistill.commands.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (seconds), the same code path")
    parser.add_argument("--out", required=True, help="where bench.md, bench.json, setup.json and the arms' metrics go")
    parser.add_argument("--work", help="where the models and runs go (default: a temporary directory, removed after)")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: .gpucheck/tokenizer when present; the dry "
                                            "run falls back to a character tokenizer)")
    parser.add_argument("--steps", type=int, help="steps per arm (default 3 on the GPU, 2 in the dry run)")
    parser.add_argument("--time-limit", type=float, help="seconds the whole benchmark may take; an arm past it is stopped")
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if args.steps:
        sizes = replace(sizes, steps=args.steps)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else (CARRIED_TOKENIZER if CARRIED_TOKENIZER.is_dir() else None)
    if tokenizer_dir is None and not args.dry_run:
        raise SystemExit(f"gpu_check: no tokenizer: run `scripts/gpu_check.sh --prepare` (it fills {CARRIED_TOKENIZER}) "
                         "or pass --tokenizer DIR")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpucheck-"))
    try:
        result = run(sizes, Path(args.out), work, tokenizer_dir, args.time_limit)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if result["failed"] or not result["results"] else 0


if __name__ == "__main__":
    sys.exit(main())
