"""Student rollouts: batched sampling with a KV cache, and the masks and packing around it.

Conventions used everywhere in esrdistill:
- A prompt is a list of token ids (no padding). A batch of prompts is left-padded for generation.
- A response is a row of a (B, T) tensor, right-padded. `response_mask` marks the tokens that
  count: every token up to and including the first EOS. The EOS token counts (stopping is a choice
  the teacher should judge); everything after it, and padding, does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig


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


def response_logits(model, prompts: list[list[int]], responses: torch.Tensor, mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Logits of `model` at the response positions only: (B, T, V_model), in the model's dtype.

    Nothing is computed through the LM head for prompt positions (logits_to_keep), which is what
    keeps a long prompt and a large vocabulary from costing a (B, P, V) tensor.
    """
    resp_len = responses.shape[1]
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in pack(prompts, responses, mask, pad_id).items()}
    out = model(**inputs, logits_to_keep=resp_len + 1, use_cache=False)
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


def generation_config(
    max_new_tokens: int, temperature: float, top_p: float, eos_ids: list[int], pad_id: int
) -> GenerationConfig:
    """An explicit GenerationConfig, so no model's own defaults (top_k=50, penalties) leak in."""
    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=0 if sample else None,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
    )


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
) -> Rollouts:
    """Sample one response per prompt with HF generate (KV cache, left padding).

    max_new_tokens is a hard stop: ESR sets it to K, so no token past K is ever generated.
    temperature 0 means greedy decoding. Returns responses on the CPU.
    """
    device = next(model.parameters()).device
    empty = torch.zeros((len(prompts), 0), dtype=torch.long)
    inputs = pack(prompts, empty, empty.float(), pad_id)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            generation_config=generation_config(max_new_tokens, temperature, top_p, eos_ids, pad_id),
        )
    finally:
        model.train(was_training)
    responses = out[:, inputs["input_ids"].shape[1] :].cpu()
    return Rollouts(prompts=prompts, responses=responses, mask=response_mask(responses, eos_ids))
