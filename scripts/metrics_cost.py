"""What the per-step metrics cost beside the loss (docs/how-it-works.md, "What the metrics cost").

    python scripts/metrics_cost.py [--before DIR]

Times teachers/same.py's divergence_metrics (handed the loss's forward KL, as a forward_kl run does) against the
loss itself on random log-probabilities over SmolLM2's 49,152 tokens, at the quickstart's micro-batch (8 x 20) and
the benchmark's (4 x 32, 4 x 256); the median of 5. --before DIR: also time the divergence_metrics of another
checkout's src/esrdistill/teachers/same.py (e.g. a worktree at an older commit), interleaved.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from esrdistill import losses
from esrdistill.teachers import same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="a checkout whose divergence_metrics to time beside this one's")
    args = parser.parse_args()
    variants = {"metrics": lambda s, t, m, fk: same.divergence_metrics(s, t, m, None, fk)}
    if args.before:
        spec = importlib.util.spec_from_file_location("same_before", f"{args.before}/src/esrdistill/teachers/same.py")
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        variants["metrics before"] = lambda s, t, m, fk: before.divergence_metrics(s, t, m, None)
    variants["the loss (forward KL)"] = lambda s, t, m, fk: losses.forward_kl(s, t, m)
    torch.manual_seed(0)
    print("| micro-batch | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for rows, length in ((8, 20), (4, 32), (4, 256)):
        student = torch.log_softmax(torch.randn(rows, length, 49152), -1)
        teacher = torch.log_softmax(torch.randn(rows, length, 49152), -1)
        mask = torch.ones(rows, length)
        loss = losses.forward_kl(student, teacher, mask)
        seconds = {name: [] for name in variants}
        for _ in range(5):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(student, teacher, mask, loss)
                seconds[name].append(time.perf_counter() - start)
        print(f"| {rows} x {length} | " + " | ".join(f"{statistics.median(v) * 1e3:.0f} ms" for v in seconds.values()) + " |")


if __name__ == "__main__":
    main()
