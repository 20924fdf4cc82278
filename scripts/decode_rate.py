"""The hf engine's generation rate against the machine's memory-bandwidth bound (docs/training.md, "The hf engine").

    python scripts/decode_rate.py [--tokens 32] [--rounds 4] [--profile]

The packaged SmolLM2-135M-Instruct in fp32, batch 8 (the default bench's ESR arm), every row forced to --tokens
tokens at temperature 0.7, top_p 0.95: the base model, LoRA r=16 (every linear layer) through its adapters, LoRA
merged for the call (hf_merge_lora), and merged with hf_decode=static, interleaved round by round (the first round
is a warm-up). The bound: a decode step reads every weight once and yields 8 tokens, at the read bandwidth measured
here (the best of five sums over a 1 GiB tensor). --profile adds torch.profiler's table of one merged call.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esrdistill import packaged
from esrdistill.engines import hf
from esrdistill.models import add_lora
from esrdistill.rollout import Sampling

BATCH = 8


def read_bandwidth_gbps() -> float:
    x = torch.ones(256 * 2**20)  # 1 GiB of fp32
    x.sum()
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of every variant, the first a warm-up")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    path = packaged.convert(packaged.SMOLLM2.name)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in base.parameters())
    lora = add_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), 16, 32, 0.05)
    torch.manual_seed(0)
    with torch.no_grad():  # adapters that change the weights, as after some training
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    question = "Sam has 3 boxes of 12 apples and gives away 7. How many apples are left? Answer step by step."
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True)["input_ids"]
    prompts = [list(prompt) for _ in range(BATCH)]
    sampling = Sampling(args.tokens, temperature=0.7, top_p=0.95, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id or 0,
                        vocab_size=len(tok), min_new_tokens=args.tokens)
    variants = {"no LoRA": (base, True, "dynamic"), "LoRA through the adapters": (lora, False, "dynamic"),
                "LoRA merged": (lora, True, "dynamic"), "LoRA merged, static cache": (lora, True, "static")}
    seconds = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (model, merge, decode) in variants.items():
            start = time.perf_counter()
            hf.sample(model, prompts, sampling, list(range(BATCH)), merge_lora=merge, decode=decode)
            if round_:
                seconds[name].append(time.perf_counter() - start)
    bandwidth = read_bandwidth_gbps()
    bound = BATCH * bandwidth * 1e9 / (params * 4)
    out = {"parameters": params, "read_gb_per_s": round(bandwidth, 2), "bound_tokens_per_s": round(bound, 1),
           "tokens": args.tokens, "batch": BATCH, "threads": torch.get_num_threads(), "load": os.getloadavg()}
    for name, times in seconds.items():
        median = statistics.median(times)
        rate = BATCH * args.tokens / median
        out[name] = {"seconds": [round(t, 3) for t in times], "tokens_per_s": round(rate, 1), "of_bound": round(rate / bound, 3)}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            hf.sample(lora, prompts, sampling, list(range(BATCH)))
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
