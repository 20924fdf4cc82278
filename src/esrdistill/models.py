"""Loading students and teachers with transformers, LoRA with peft, and tokenizer compatibility."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from esrdistill.errors import UserError
from esrdistill.packaged import resolve


class ModelError(UserError, RuntimeError):
    """A model that cannot be used as asked; the message says why."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device={device} but CUDA is not available here; use device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _check_exists(spec: str) -> None:
    looks_local = spec.startswith((".", "/", "~")) or Path(spec).exists()
    if looks_local and not Path(spec).expanduser().is_dir():
        raise ModelError(f"model directory '{spec}' does not exist")


def _load_error(spec: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load model '{spec}': {err}\n"
        "A model is a local directory, a hub id (needs hub access), or packaged:NAME "
        "(packaged:smollm2-135m-instruct, packaged:gemma3-270m)."
    )


def load_tokenizer(spec: str, model_cache: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (EOS when it has none) and left padding."""
    path = resolve(spec, model_cache)
    _check_exists(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _load_error(spec, err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(spec: str, dtype: torch.dtype, device: torch.device, model_cache: str | None = None):
    """An AutoModelForCausalLM in eval mode on `device`."""
    path = resolve(spec, model_cache)
    _check_exists(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(spec, err) from err
    return model.to(device).eval()


def freeze(model):
    """A teacher: eval mode, no parameter needs a gradient."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def add_lora(model, r: int, alpha: int, dropout: float):
    """LoRA on every linear layer (peft's all-linear: attention and MLP, not the LM head).

    r=0 means full fine-tuning: the model is returned as it is, every parameter trainable.
    """
    if r == 0:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def eos_ids(tokenizer: PreTrainedTokenizerBase, model) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    return sorted(i for i in ids if i is not None)


def shared_vocab(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> int:
    """The number of leading token ids on which both tokenizers agree, or a ModelError.

    Identical tokenizers share all of them. A teacher whose tokenizer only appends tokens to the
    student's (Qwen3's <think> tokens after Qwen2.5's vocabulary) shares the student's whole
    vocabulary; the teacher's extra entries are cut and its distribution renormalised over the
    shared ones, which the student can all produce. Anything else is a different tokenizer.
    """
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    size = len(student_vocab)
    same_ids = all(teacher_vocab.get(token) == index for token, index in student_vocab.items())
    if not same_ids or sorted(student_vocab.values()) != list(range(size)):
        raise ModelError(
            f"the student's and the teacher's tokenizers differ ({len(student_vocab)} vs {len(teacher_vocab)} "
            "tokens, not the same ids): cross-tokenizer distillation is not supported yet. Pick a teacher and "
            "a student that share a tokenizer."
        )
    return size


def shared_vocab_size(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, student, teacher) -> int:
    """The vocabulary both distributions are compared over: the student tokenizer's ids.

    Embedding matrices are often padded past the tokenizer (Qwen: 151,936 vs 152,064 rows); those
    rows are never produced by the tokenizer, so logits are cut to the shared size.
    """
    size = shared_vocab(student_tok, teacher_tok)
    for role, model in (("student", student), ("teacher", teacher)):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < size:
            raise ModelError(f"the {role}'s LM head has {rows} rows but the tokenizer has {size} tokens")
    return size
