"""Why the train phase slowed beside vLLM on the CPU: page faults from memory glibc gives back (docs/training.md,
"Freed memory on the CPU").

    python scripts/freed_memory.py MODEL_DIR [ACTIONS]     # e.g. ~/.cache/esrdistill/models/smollm2-135m-instruct hold,vllm,keep

A fixed forward, backward and AdamW step of MODEL_DIR's model on 4 x 256 random tokens (as the equal-work bench's
train phase at N=256), timed (median of 3 after one warm-up) with the minor page faults per step, at the start and
after each action, in the order given:

    hold   the process allocates and keeps 2.3 GiB (about what the in-process vLLM engine holds), touched
    vllm   the in-process vLLM engine is built (esrdistill's VLLMEngine) and generates 8 x 64 tokens
    keep   esrdistill.cpumem.keep_freed_memory(): glibc keeps freed memory (what cpu_keep_memory=true does)

Prints one line per point and, at the end, one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from esrdistill import cpumem


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    path, actions = sys.argv[1], (sys.argv[2].split(",") if len(sys.argv) > 2 else ["hold", "vllm", "keep"])
    unknown = set(actions) - {"hold", "vllm", "keep"}
    if unknown:
        sys.exit(f"unknown action(s) {sorted(unknown)}: use hold, vllm, keep")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = model.get_output_embeddings().weight.shape[0]
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (4, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    kept: list[torch.Tensor] = []

    def step() -> None:
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    def point(label: str) -> dict:
        step()
        times, faults = [], []
        for _ in range(3):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        row = {"point": label, "step_s": round(statistics.median(times), 3), "faults": int(statistics.median(faults)),
               "rss_mb": round(rss_mb()), "load1": round(os.getloadavg()[0], 2)}
        print(f"{label:14s} step {row['step_s']:.3f} s  faults/step {row['faults']:>7d}  rss {row['rss_mb']} MB  "
              f"load {row['load1']}", flush=True)
        return row

    rows = [point("start")]
    for action in actions:
        if action == "hold":
            kept.append(torch.ones(int(2.3 * 2**30) // 4))
            rows.append(point("held 2.3 GiB"))
        elif action == "vllm":
            from esrdistill.engines.vllm import VLLMEngine, VLLMSettings
            from esrdistill.rollout import Sampling

            engine = VLLMEngine(path, torch.float32, 512, 0, vocab, VLLMSettings())
            engine.sync(model)
            sampling = Sampling(64, temperature=0.7, top_p=1.0, eos_ids=(2,), pad_id=0, min_new_tokens=64)
            engine.sample([[1, 2, 3, 4] * 20] * 8, sampling, list(range(8)))
            kept.append(engine)
            rows.append(point("engine built"))
        else:
            rows.append(point("kept" if cpumem.keep_freed_memory() else "kept (no glibc)"))
    print(json.dumps({"model": path, "actions": actions, "points": rows}))


if __name__ == "__main__":
    main()
