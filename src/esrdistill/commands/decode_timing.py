"""The GPU check's decode table: milliseconds per decode step of the hf engine, with and without LoRA adapters,
merged or not, with the dynamic or static cache or the compiled step (commands/gpu_check.py runs it on the GPU shapes
and, in its dry run, on tiny ones)."""

from __future__ import annotations

import gc
import random
import statistics
import time
from pathlib import Path
from esrdistill.engines import hf
from esrdistill.models import add_lora
from esrdistill.rollout import Sampling

DECODE_VARIANTS = (  # (label, LoRA adapters on the student, hf_merge_lora, hf_decode)
    ("no LoRA", False, False, "dynamic"),
    ("LoRA through the adapters", True, False, "dynamic"),
    ("LoRA merged", True, True, "dynamic"),
    ("LoRA merged, static cache", True, True, "static"),
    ("LoRA merged, compiled (static cache, CUDA graphs)", True, True, "compiled"),
)


def decode_step_ms(student_dir: Path, sizes, variants=DECODE_VARIANTS, repeats: int = 2) -> list[dict]:
    """Milliseconds per decode step of the hf engine at the ESR arm's batch size: each variant generates K/8
    and then K = sizes.esr_k forced tokens (after a warm-up call, which compiles where it compiles), and the step is the
    difference over the extra tokens, so the prefill cancels. The median of `repeats` pairs. sizes: a gpu_check.Sizes
    (its esr_k, batch_size, device, dtype and lora_r)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(student_dir))
    short = max(1, sizes.esr_k // 8)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, len(tok)) for _ in range(48 + 8 * (i % 4))] for i in range(sizes.batch_size)]
    rows = []
    for label, lora, merge, decode in variants:
        model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=getattr(torch, sizes.dtype)).to(sizes.device)
        if lora:
            model = add_lora(model, sizes.lora_r, 2 * sizes.lora_r, 0.0)
        eos = (len(tok) + 1,)  # never sampled: every row runs to the limit

        def timed(n: int, model=model, merge=merge, decode=decode) -> float:
            sampling = Sampling(n, temperature=1.0, top_p=1.0, eos_ids=eos, pad_id=tok.pad_token_id or 0)
            if sizes.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            hf.sample(model, prompts, sampling, seeds=list(range(len(prompts))), merge_lora=merge, decode=decode)
            if sizes.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        timed(sizes.esr_k)  # warm-up: compiles the decode step (compiled), sizes the static cache
        warm = time.perf_counter() - t0
        ms = [1000 * (timed(sizes.esr_k) - timed(short)) / (sizes.esr_k - short) for _ in range(repeats)]
        rows.append({"variant": label, "lora": lora, "hf_merge_lora": merge, "hf_decode": decode,
                     "decode_step_ms": round(statistics.median(ms), 2), "warm_up_s": round(warm, 1)})
        print(f"[gpu-check] decode step, {label}: {rows[-1]['decode_step_ms']} ms (warm-up {warm:.1f} s)", flush=True)
        del model
        gc.collect()
        if sizes.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def decode_table(rows: list[dict], batch: int) -> str:
    lines = [f"| decode step, batch {batch} | ms | warm-up s |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['decode_step_ms']} | {r['warm_up_s']} |" for r in rows]
    return "\n".join(lines)
