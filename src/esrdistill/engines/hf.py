"""The `hf` rollout engine: Hugging Face `generate` with a KV cache and left padding, in the training
process, on the student itself (nothing to sync after an optimizer step).

Sampling is ours, not generate's: generate runs greedily over a last logits processor that draws each
row's next token from the rollout distribution (temperature, then top_p: exactly
`losses.sampling_logp`) by inverse-CDF sampling with that row's own seeded generator, and leaves only
that token finite. So the distribution the loss assumes is the one sampled from, a row's sample
depends on its seed and not on which rows share its batch or process, and the draw costs a cumulative
sum instead of `torch.multinomial` over the whole vocabulary (6.2 ms against 0.2 ms per token on a
49,152-entry vocabulary on this CPU). The random stream differs from generate's own sampling.

A student with LoRA adapters generates through merged weights (`merged_lora`): each adapted layer's base weight
becomes W + s·BA for the call and is restored exactly after (from a copy, not by subtracting, which would round),
so decoding reads one matrix per layer instead of three. The loss still runs through the adapters.

`decode` chooses the KV cache: `dynamic` (transformers' DynamicCache, eager), `static` (a StaticCache sized for the
longest call so far, eager) or `compiled` (the static cache with a torch.compile'd decode step, mode
"reduce-overhead": CUDA graphs on CUDA). The prefill is never compiled; decode shapes change only with the batch
size and with the cache's length, which grows in steps of CACHE_STEP tokens, so a run compiles a few graphs.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList

from esrdistill.losses import sampling_logp
from esrdistill.rollout import Rollouts, Sampling, pack, response_mask
from esrdistill.sharding import is_sharded

DECODES = ("dynamic", "static", "compiled")
CACHE_STEP = 256  # a static cache's length is the longest prompt so far plus max_new_tokens, rounded up to this


def cache_options(decode: str, prompt_tokens: int, max_new_tokens: int, device: torch.device) -> dict:
    """GenerationConfig fields of a decode mode (DECODES) for prompts of at most `prompt_tokens` tokens."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}, got '{decode}'")
    if decode == "dynamic":
        return {"disable_compile": True}
    length = -(-(prompt_tokens + max_new_tokens) // CACHE_STEP) * CACHE_STEP
    options = {"cache_implementation": "static", "max_cache_len": length, "disable_compile": decode == "static"}
    if decode == "compiled":
        compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
        compile_config._compile_all_devices = device.type == "cpu"  # transformers compiles on accelerators only
        options["compile_config"] = compile_config
    return options


def generation_config(sampling: Sampling, head_rows: int, cache: dict | None = None) -> GenerationConfig:
    """The GenerationConfig of `sampling`: greedy over the processors (our sampler is the last one),
    every other logits-shaping field explicitly neutral; `cache`: cache_options' fields (default: dynamic)."""
    beyond_vocab = list(range(sampling.vocab_size, head_rows)) if sampling.vocab_size else []
    return GenerationConfig(
        **(cache or {"disable_compile": True}),
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=min(sampling.min_new_tokens, sampling.max_new_tokens),
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        typical_p=1.0,
        min_p=0.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        suppress_tokens=beyond_vocab or None,  # applied before our sampler: q is over the vocabulary
        eos_token_id=list(sampling.eos_ids),
        pad_token_id=sampling.pad_id,
    )


class InverseCDFSampler(LogitsProcessor):
    """The last processor: draw one token per row from softmax(scores / T) restricted to its top_p
    nucleus, with the row's generator, and return scores that are -inf everywhere else."""

    def __init__(self, temperature: float, top_p: float, generators: list[torch.Generator] | None):
        self.temperature, self.top_p, self.generators = temperature, top_p, generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = sampling_logp(torch.log_softmax(scores.float(), dim=-1), self.temperature, self.top_p).exp()  # (B, V)
        cdf = probs.cumsum(dim=-1)
        if self.generators is None:
            u = torch.rand(scores.shape[0], device=scores.device)
        else:
            u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in self.generators]).to(scores.device)
        # the first token whose cumulative probability exceeds u * total: a token of probability 0 is never drawn
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)


def row_generators(seeds: list[int] | None, device: torch.device) -> list[torch.Generator] | None:
    if seeds is None:
        return None
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@contextmanager
def _blank_model_generation_config(model):
    """transformers fills every field a GenerationConfig leaves unset from the model's own
    generation_config; swap in a blank one for the call so nothing the model ships can leak in."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


@contextmanager
def _cpu_lm_head(model):
    """On the CPU the LM head's product for a few rows is about 3x faster as W @ h^T than as
    F.linear(h, W) (memory-bound: 17 against 5.5 GB/s here); the same numbers to ~1e-6."""
    head = model.get_output_embeddings()
    if head is None or head.weight.device.type != "cpu" or getattr(head, "bias", None) is not None:
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        return (head.weight @ flat.T).T.reshape(*hidden.shape[:-1], head.weight.shape[0])

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _lora_layers(model) -> list:
    """The model's peft layers with an active, unmerged adapter ([] for a plain model)."""
    if not hasattr(model, "peft_config"):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.merged and not m.disable_adapters]


@contextmanager
def merged_lora(model, enabled: bool = True):
    """A block in which `model`'s LoRA layers compute with merged weights W + s·BA (peft's merge), after which every
    base weight is what it was, bit for bit, and the adapters are live again. Nothing for a plain model, a sharded
    one (its gathered weights are views of the shards) or enabled=False. Costs a copy of the adapted weights."""
    layers = _lora_layers(model) if enabled and not is_sharded(model) else []
    saved = [(m, m.get_base_layer().weight, m.get_base_layer().weight.detach().clone()) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.merge()
        yield
    finally:
        with torch.no_grad():
            for m, weight, copy in saved:
                weight.copy_(copy)  # the exact weights back: subtracting s·BA again would round
                del m.merged_adapters[:]  # peft's record that they are merged: forward through the adapters again


@torch.no_grad()
def sample(model, prompts: list[list[int]], sampling: Sampling, seeds: list[int] | None = None,
           merge_lora: bool = True, decode: str = "dynamic") -> Rollouts:
    """Sample one response per prompt with HF generate (KV cache, left padding).

    max_new_tokens is a hard stop: ESR sets it to K, so no token past K is ever generated.
    temperature 0 means greedy decoding. seeds: one per row (its draws depend on it alone); None
    draws from torch's global generator. merge_lora: generate a LoRA student through merged weights
    (merged_lora). decode: the KV cache and compilation (DECODES). Returns responses on the CPU.
    """
    device = next(model.parameters()).device
    empty = torch.zeros((len(prompts), 0), dtype=torch.long)
    inputs = pack(prompts, empty, empty.float(), sampling.pad_id)
    head_rows = model.get_output_embeddings().weight.shape[0]
    cache = cache_options(decode, inputs["input_ids"].shape[1], sampling.max_new_tokens, device)
    processors = LogitsProcessorList()
    if sampling.temperature > 0:
        processors.append(InverseCDFSampler(sampling.temperature, sampling.top_p, row_generators(seeds, device)))
    was_training = model.training
    model.eval()
    try:
        with (_blank_model_generation_config(model), merged_lora(model, merge_lora),
              _cpu_lm_head(model) if device.type == "cpu" else nullcontext()):
            out = model.generate(
                input_ids=inputs["input_ids"].to(device),
                attention_mask=inputs["attention_mask"].to(device),
                generation_config=generation_config(sampling, head_rows, cache),
                logits_processor=processors,
                # transformers would keep every process decoding until all are done for a sharded (FSDP) model;
                # esrdistill generates on it only with its weights gathered (sharding.gathered), needing no peer
                synced_gpus=False,
            )
    finally:
        model.train(was_training)
    responses = out[:, inputs["input_ids"].shape[1] :].cpu()
    return Rollouts(prompts=prompts, responses=responses, mask=response_mask(responses, sampling.eos_ids))


class HFEngine:
    """A rollout engine (protocol.Engine): the student itself samples with `generate`; `sync` has nothing to do."""

    name = "hf"

    def __init__(self, model, autocast=nullcontext, merge_lora: bool = True, decode: str = "dynamic"):
        cache_options(decode, 0, 0, torch.device("cpu"))  # a bad mode fails here, not at the first rollout
        self.model, self.autocast, self.merge_lora, self.decode = model, autocast, merge_lora, decode

    def sample(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int] | None = None) -> Rollouts:
        with self.autocast():
            return sample(self.model, prompts, sampling, seeds, self.merge_lora, self.decode)

    def sync(self, model) -> None:
        """The engine is the student: its weights are already the trained ones."""
