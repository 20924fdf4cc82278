"""Rollouts: what every sampling engine returns, the response mask, and packing prompt + response for
one forward pass (with the LM head in fp32). What an engine implements is engines/protocol.py's `Engine`; the
engines are in engines/.

Conventions used everywhere in esrdistill:
- A prompt is a list of token ids (no padding). A batch of prompts is left-padded for generation.
- A response is a row of a (B, T) tensor, right-padded. `response_mask` marks the tokens that
  count: every token up to and including the first EOS. The EOS token counts (stopping is a choice
  the teacher should judge); everything after it, and padding, does not.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esrdistill.errors import UserError


def response_mask(response_ids: torch.Tensor, eos_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """(B, T) response token ids -> (B, T) float mask: 1 up to and including the first EOS, 0 after.

    With no EOS in a row (a rollout cut at the length limit, as ESR always is) the whole row counts.
    Padding written by generate after a finished row is after its EOS, so it is masked.
    """
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= response_ids == eos
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS tokens strictly before t
    return (eos_before == 0).float()


def pack(prompts: list[list[int]], responses: torch.Tensor, mask: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts, append the responses, and build the inputs of one forward pass.

    prompts: B lists of token ids. responses: (B, T) ids. mask: (B, T) response mask.
    Returns input_ids (B, P + T), attention_mask (B, P + T) and position_ids (B, P + T), with
    P = the longest prompt. The response occupies the last T columns of every row, so the logits
    that predict it are at columns P - 1 .. P + T - 2: a forward with logits_to_keep=T + 1 and the
    last column dropped gives exactly the (B, T, V) response logits, whatever the padding.
    Positions count only real tokens, as generate does with left padding.
    """
    batch, resp_len = responses.shape
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width + resp_len), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width + resp_len), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) : width] = torch.tensor(prompt, dtype=torch.long)
        attention[row, width - len(prompt) : width] = 1
    input_ids[:, width:] = responses.cpu()
    attention[:, width:] = mask.cpu().long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions}


@contextmanager
def fp32_lm_head(model):
    """Inside this block the LM head computes its logits in fp32, from a bf16 (or fp16) model too.

    A bf16 head rounds every logit to bf16 before any upcast, which adds about 2.6e-4 nats per token
    of spurious KL between two models (more than the KL left once a student is close). The body of
    the model keeps its dtype; only the (B, T, H) x (V, H) product is done in fp32, with autocast off.
    The head's own forward is patched on the instance for the duration, so whatever the model does
    after its head (Gemma-2's logit soft-capping, say) still happens, on fp32 logits.
    """
    inner = getattr(model, "module", model)  # under DDP, the wrapped model
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if getattr(head, "bias", None) is None else head.bias.float()
            return F.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def response_logits(model, prompts: list[list[int]], responses: torch.Tensor, mask: torch.Tensor, pad_id: int,
                    prefix: "PrefixCache | None" = None, hidden: bool = False) -> torch.Tensor:
    """Logits of `model` at the response positions only: (B, T, V_model), always fp32; with
    hidden=True the final hidden states there instead, (B, T, H), for `head_logits` to project later
    (the chunked loss never holds (B, T, V)).

    Nothing is computed through the LM head for prompt positions (logits_to_keep), which is what
    keeps a long prompt and a large vocabulary from costing a (B, P, V) tensor. With `prefix`, the
    key/value cache of the prompts' shared prefix is reused instead of recomputed.
    """
    resp_len = responses.shape[1]
    device = next(model.parameters()).device
    head = hidden_instead_of_logits(model) if hidden else fp32_lm_head(model)
    if prefix is not None and prefix.covers(prompts):
        return prefix.response_logits(model, prompts, responses, mask, pad_id, head)
    inputs = {k: v.to(device) for k, v in pack(prompts, responses, mask, pad_id).items()}
    with head:
        out = model(**inputs, logits_to_keep=resp_len + 1, use_cache=False)
    return out.logits[:, :-1, :]


# What some models do to their logits after the head; neutral values turn it off for a forward.
_AFTER_HEAD = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def _inner(model):
    return getattr(model, "module", model)  # under DDP, the wrapped model


@contextmanager
def hidden_instead_of_logits(model):
    """Inside this block the model returns its final hidden states where its logits would be: the LM
    head is the identity and whatever the model does after it (Gemma-2's soft-capping, a logit scale)
    is off. The forward goes through the model's own `forward`, so DDP and peft see a normal call."""
    inner = _inner(model)
    head, config = inner.get_output_embeddings(), inner.config
    saved = {k: getattr(config, k) for k, neutral in _AFTER_HEAD.items() if getattr(config, k, neutral) != neutral}
    head.forward = lambda hidden: hidden
    for key in saved:
        setattr(config, key, _AFTER_HEAD[key])
    try:
        yield
    finally:
        del head.forward
        for key, value in saved.items():
            setattr(config, key, value)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits from final hidden states (B, T, H), as the model's own forward gives them."""
    inner = _inner(model)
    head, config = inner.get_output_embeddings(), inner.config
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if getattr(head, "bias", None) is None else head.bias.float()
        logits = F.linear(hidden.float(), head.weight.float(), bias)
        if getattr(config, "final_logit_softcapping", None) is not None:
            cap = config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        if getattr(config, "logit_scale", None) not in (None, 1.0):
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None) not in (None, 1.0):
            logits = logits / config.logits_scaling
    return logits


def check_hidden_path(model, role: str) -> None:
    """Refuse the chunked loss for a model whose logits the hidden-state path does not reproduce."""

    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device).unsqueeze(0)
    with torch.no_grad():
        plain = response_logits(model, [[1, 2]], ids.cpu(), torch.ones(1, 8), 0)
        chunked = head_logits(model, response_logits(model, [[1, 2]], ids.cpu(), torch.ones(1, 8), 0, hidden=True))
    if not torch.allclose(plain, chunked, atol=1e-3, rtol=1e-3):
        raise UserError(f"loss_chunk: the {role}'s logits cannot be rebuilt from its final hidden states "
                        f"({type(_inner(model)).__name__} does something after its LM head that esrdistill does not know); "
                        "use loss_chunk=0")


class PrefixCache:
    """The key/value cache of the longest token prefix that every prompt of a run shares (a system
    message and few-shot turns, typically), computed once for a frozen model (the teacher).

    A forward from it lays the rows out as [shared prefix (cached)] [left padding] [rest of the
    prompt] [response]: the padding is masked out and the positions count real tokens only, so the
    logits are those of the plain forward (tested to 1e-5). At least one token of every prompt stays
    out of the cache: the last prompt position predicts the first response token.
    """

    def __init__(self, model, prompts: list[list[int]], min_tokens: int = 16):
        shortest = min(len(p) for p in prompts)
        length = 0
        while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
            length += 1
        self.ids = list(prompts[0][:length])
        self.cache = None
        if length >= min_tokens:
            device = next(model.parameters()).device
            with torch.no_grad():
                self.cache = model(input_ids=torch.tensor([self.ids], device=device), use_cache=True).past_key_values

    @property
    def length(self) -> int:
        return len(self.ids) if self.cache is not None else 0

    def covers(self, prompts: list[list[int]]) -> bool:
        n = self.length
        return n > 0 and all(len(p) > n and p[:n] == self.ids for p in prompts)

    def response_logits(self, model, prompts, responses, mask, pad_id, head) -> torch.Tensor:
        import copy

        n, resp_len = self.length, responses.shape[1]
        device = next(model.parameters()).device
        rest = pack([p[n:] for p in prompts], responses, mask, pad_id)  # left-padded rest + response
        attention = torch.cat([torch.ones(len(prompts), n, dtype=torch.long), rest["attention_mask"]], dim=1)
        positions = n + rest["position_ids"]  # the rest's real tokens count on from the prefix
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(prompts))
        with head:  # fp32_lm_head or hidden_instead_of_logits
            out = model(input_ids=rest["input_ids"].to(device), attention_mask=attention.to(device),
                        position_ids=positions.to(device), past_key_values=cache, logits_to_keep=resp_len + 1, use_cache=True)
        return out.logits[:, :-1, :]


@dataclass
class Rollouts:
    """One batch of student samples. responses (B, T) right-padded; mask (B, T) (see response_mask)."""

    prompts: list[list[int]]
    responses: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def ended(self, eos_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
        """(B,) bool: the responses that ended with an EOS, before the length limit."""
        return (torch.isin(self.responses, torch.tensor(eos_ids)) & self.mask.bool()).any(-1)


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled; every engine and every caller (training, eval, diagnose) uses these.

    Nothing else shapes the distribution: not the model's own generation_config (a shipped
    repetition_penalty, min_p, no_repeat_ngram_size, ...), not a default top_k.
    """

    max_new_tokens: int  # hard stop: ESR's K for training rollouts
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling; top_k is always off
    eos_ids: tuple[int, ...] = ()  # any of these ends a response (and counts in its mask)
    pad_id: int = 0
    vocab_size: int | None = None  # ids >= vocab_size (padding rows of the LM head) are never sampled
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens (forced lengths for benchmarks)
