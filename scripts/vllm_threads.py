"""Does an in-process vLLM engine slow torch work beside it? (docs/training.md, "The vLLM engine")

    python scripts/vllm_threads.py MODEL_DIR        # e.g. ~/.cache/esrdistill/models/smollm2-135m-instruct
    SRC=/path/to/other/checkout/src python scripts/vllm_threads.py MODEL_DIR   # another checkout's engine

A fixed forward, backward and AdamW step of MODEL_DIR's model on 4 x 256 random tokens, timed (median of 3) before
the engine exists, after it is built, after it generated 8 x 64 tokens, and after torch's own set_num_threads is
called again; the process's torch threads and CPU affinity at each point; the CPU time each thread burns while the
process sleeps 2 s. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

if os.environ.get("SRC"):
    sys.path.insert(0, os.environ["SRC"])

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from esrdistill.engines.vllm import VLLMEngine, VLLMSettings  # noqa: E402
from esrdistill.rollout import Sampling  # noqa: E402


def threads_cpu() -> dict[str, tuple[str, int]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            out[tid] = (name, int(fields[11]) + int(fields[12]))  # utime + stime, in clock ticks
        except OSError:
            pass
    return out


def idle_burn(seconds: float = 2.0) -> dict:
    before = threads_cpu()
    time.sleep(seconds)
    after = threads_cpu()
    tick = os.sysconf("SC_CLK_TCK")
    burn = {f"{after[t][0]}:{t}": (after[t][1] - before[t][1]) / tick for t in after if t in before and after[t][1] > before[t][1]}
    return {"threads": len(after), "cpu_s_while_sleeping": burn}


def main() -> None:
    path = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (4, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def work(n: int = 3) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    report = {"torch_threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0))}
    set_threads = torch.set_num_threads
    work(1)
    report["before_engine_s"] = work()
    report["idle_before"] = idle_burn()
    engine = VLLMEngine(path, torch.float32, 512, 0, vocab, VLLMSettings())
    report["after_engine_threads"] = torch.get_num_threads()
    report["after_engine_affinity"] = sorted(os.sched_getaffinity(0))
    report["set_num_threads_after_engine"] = torch.set_num_threads.__name__
    report["after_engine_s"] = work()
    engine.sync(model)
    sampling = Sampling(64, temperature=0.7, top_p=1.0, eos_ids=(2,), pad_id=0, min_new_tokens=64)
    start = time.perf_counter()
    engine.sample([[1, 2, 3, 4] * 20] * 8, sampling, list(range(8)))
    report["generate_s"] = time.perf_counter() - start
    report["after_generate_s"] = work()
    report["idle_after"] = idle_burn()
    set_threads(report["torch_threads"])
    report["restored_threads"] = torch.get_num_threads()
    report["restored_s"] = work()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
