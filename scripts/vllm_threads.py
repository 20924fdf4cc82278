"""Does an in-process vLLM engine slow torch work beside it? (docs/training.md, "The vLLM engine")

    python scripts/vllm_threads.py MODEL_DIR        # e.g. ~/.cache/esrdistill/models/smollm2-135m-instruct
    SRC=/path/to/other/checkout/src python scripts/vllm_threads.py MODEL_DIR   # another checkout's engine

A fixed forward, backward and AdamW step of MODEL_DIR's model on 4 x 256 random tokens, timed (median of 3) before
the engine exists, after it is built, after it generated 8 x 64 tokens, and after torch's own set_num_threads is
called again, and after the main thread's NUMA memory policy is reset; the process's torch threads and CPU affinity
at each point, each thread's allowed CPUs, torch's global settings, the environment OpenMP and torch read, the
memory policy; a compute-bound, a memory-bound and a page-fault-bound micro-benchmark before and after; the CPU
time each thread burns while the process sleeps 2 s. Prints one JSON object.
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


MPOL = {0: "default", 1: "preferred", 2: "bind", 3: "interleave", 4: "local", 5: "preferred_many", 6: "weighted_interleave"}


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def mempolicy() -> str:
    """The calling thread's NUMA memory policy (get_mempolicy(2), x86-64 syscall 239): vLLM's CPU worker binds it."""
    import ctypes

    mode, mask = ctypes.c_int(-1), (ctypes.c_ulong * 16)()
    if _libc().syscall(239, ctypes.byref(mode), mask, ctypes.c_ulong(16 * 64), None, ctypes.c_ulong(0)) != 0:
        return f"unreadable (errno {ctypes.get_errno()})"
    nodes = [i for i in range(16 * 64) if mask[i // 64] >> (i % 64) & 1]
    return f"{MPOL.get(mode.value & 0xFF, mode.value)} nodes={nodes}" + (" (flags set)" if mode.value >> 8 else "")


def reset_mempolicy() -> int:
    """set_mempolicy(MPOL_DEFAULT) for the calling thread (x86-64 syscall 238); 0 on success."""
    return _libc().syscall(238, 0, None, 0)


def thread_affinities() -> dict[str, int]:
    """How many of the process's threads allow each CPU list (/proc/self/task/*/status Cpus_allowed_list)."""
    out: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                line = next(x for x in f if x.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            continue
        key = line.split(":", 1)[1].strip()
        out[key] = out.get(key, 0) + 1
    return out


def torch_state() -> dict:
    """Process-wide settings vLLM could change: torch's globals, the environment torch and OpenMP read, memory."""
    tiny = torch.tensor([1e-39]) * torch.tensor([1.0])  # 0 when denormals are flushed
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OMP_", "KMP_", "GOMP_", "MKL_", "TORCH", "LD_PRELOAD", "MALLOC", "VLLM_CPU", "NUMEXPR"))}
    with open("/proc/self/status") as f:
        status = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in ("Mems_allowed_list", "VmRSS", "Threads")}
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else None
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "mkldnn": torch.backends.mkldnn.enabled, "flush_denormal": tiny.item() == 0.0,
            "default_dtype": str(torch.get_default_dtype()), "matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "grad": torch.is_grad_enabled(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mempolicy": mempolicy(),
            "thread_affinities": thread_affinities(), "env": env, "status": status, "thp": thp}


def micro() -> dict[str, float]:
    """Medians of three: a compute-bound matmul, a memory-bound add over 256 MiB, and a fresh 256 MiB tensor
    written once (page faults): which kind of work got slower."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, y = torch.randn(64 << 20), torch.randn(64 << 20)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times), 4)

    return {"matmul_1024_s": timed(lambda: [a @ b for _ in range(10)]), "add_256MiB_s": timed(lambda: x.add(y)),
            "fresh_256MiB_s": timed(lambda: torch.empty(64 << 20).fill_(1.0))}


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
    report["state_before"], report["micro_before"] = torch_state(), micro()
    report["idle_before"] = idle_burn()
    engine = VLLMEngine(path, torch.float32, 512, 0, vocab, VLLMSettings())
    report["after_engine_threads"] = torch.get_num_threads()
    report["after_engine_affinity"] = sorted(os.sched_getaffinity(0))
    report["set_num_threads_after_engine"] = torch.set_num_threads.__name__
    report["after_engine_s"] = work()
    report["state_after_engine"], report["micro_after_engine"] = torch_state(), micro()
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
    report["reset_mempolicy_rc"] = reset_mempolicy()  # this thread's; torch's OMP workers keep theirs
    report["mempolicy_after_reset"] = mempolicy()
    report["after_reset_s"] = work()
    report["micro_after_reset"] = micro()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
