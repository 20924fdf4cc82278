"""Loading students and teachers with transformers, LoRA with peft, and tokenizer compatibility."""

from __future__ import annotations

import functools
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers within `timeout` seconds (False at once when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def locate(spec: str, model_cache: str | None = None) -> str:
    """What from_pretrained takes for a model spec, or a ModelError that says what is wrong, at once.

    packaged:NAME -> its converted directory. A path (it exists, or starts with '.', '/' or '~';
    '~' is expanded) -> that directory, which must hold config.json. Anything else is a hub id: used
    as it is when the hub answers, else taken from the local Hugging Face cache, else an error
    (instead of a minute of download retries).
    """
    path = resolve(spec, model_cache)
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ModelError(f"model directory '{spec}' does not exist")
        if not (local / "config.json").is_file():
            raise ModelError(f"'{spec}' is a directory but not a model: it has no config.json (point to the folder "
                             "that holds config.json, the weights and the tokenizer)")
        return str(local)
    if _hub_reachable():
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: either way the message below
        raise ModelError(
            f"model '{spec}' is not a local directory, not in the local Hugging Face cache, and the hub cannot be "
            "reached (offline): download it on a machine with network access, or give a local directory or "
            "packaged:NAME (packaged:smollm2-135m-instruct, packaged:gemma3-270m)"
        ) from None


def _load_error(spec: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load model '{spec}': {err}\n"
        "A model is a local directory, a hub id (needs hub access), or packaged:NAME "
        "(packaged:smollm2-135m-instruct, packaged:gemma3-270m)."
    )


def load_tokenizer(spec: str, model_cache: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (EOS when it has none) and left padding."""
    path = locate(spec, model_cache)
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"model directory '{spec}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
                         "tokenizer beside the model with tokenizer.save_pretrained(DIR)")
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
    path = locate(spec, model_cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(spec, err) from err
    return model.to(device).eval()


def master_dtype(dtype: torch.dtype, lora_r: int) -> torch.dtype:
    """The dtype the student's weights are kept in for training.

    Full fine-tuning in bf16 keeps fp32 master weights and computes in bf16 under autocast: AdamW
    on bf16 weights drops most updates (at lr 5e-6 a step is below bf16's spacing near 1.0). LoRA
    keeps the frozen base in `dtype`; its adapters are fp32 already (peft).
    """
    return torch.float32 if lora_r == 0 else dtype


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


SAME, APPENDS, DIFFERENT = "same", "appends", "different"


def tokenizer_relation(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> str:
    """same: identical ids. appends: the teacher's tokenizer has every student id with the same meaning
    and more after them (Qwen3's <think> tokens after Qwen2.5's vocabulary). different: anything else."""
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    same_ids = all(teacher_vocab.get(token) == index for token, index in student_vocab.items())
    if not same_ids or sorted(student_vocab.values()) != list(range(len(student_vocab))):
        return DIFFERENT
    return SAME if len(teacher_vocab) == len(student_vocab) else APPENDS


def shared_vocab(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> int:
    """The number of leading token ids on which both tokenizers agree (the student's whole vocabulary),
    or a ModelError when they differ.

    A teacher whose tokenizer only appends tokens shares the student's whole vocabulary; the
    teacher's extra entries are cut and its distribution renormalised over the shared ones, which the
    student can all produce. Different tokenizers need the cross-tokenizer path (teachers/cross.py).
    """
    if tokenizer_relation(student_tok, teacher_tok) == DIFFERENT:
        raise ModelError(
            f"the student's and the teacher's tokenizers differ ({len(student_tok)} vs {len(teacher_tok)} tokens, not "
            "the same ids) and cross_tokenizer=off: set cross_tokenizer=auto to distil across tokenizers, or pick a "
            "teacher that shares the student's tokenizer"
        )
    return len(student_tok.get_vocab())


def appended_tokens(student_vocab_size: int, teacher_tok: PreTrainedTokenizerBase) -> int:
    """How many tokens the teacher's tokenizer has past the student's vocabulary (0: the same tokenizer)."""
    return len(teacher_tok.get_vocab()) - student_vocab_size


def check_head_rows(vocab_size: int, student, teacher, teacher_vocab_size: int | None = None) -> int:
    """The vocabulary both distributions are compared over: the student tokenizer's ids, 0..vocab_size-1
    (the teacher's own vocabulary is teacher_vocab_size when its tokenizer differs).

    LM heads are often padded past the tokenizer (Qwen: 151,936 rows for 151,665 tokens); those rows
    are never produced by the tokenizer, so logits are cut to vocab_size and generation never samples
    them. A head with fewer rows than the tokenizer cannot be used.
    """
    for role, model, size in (("student", student, vocab_size), ("teacher", teacher, teacher_vocab_size or vocab_size)):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < size:
            raise ModelError(f"the {role}'s LM head has {rows} rows but the tokenizer has {size} tokens")
    return vocab_size
