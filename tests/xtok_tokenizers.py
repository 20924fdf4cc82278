"""Two tiny tokenizers of different kinds, trained here (no download), saved in the Hugging Face format:

- a byte-level BPE (GPT-2 / SmolLM / Qwen style: 'Ġ' for a space, every byte a token), with a chat template;
- a SentencePiece-style BPE with byte fallback (Gemma / Llama-2 style: '▁' for a space, '<0xNN>'
  tokens for bytes outside its vocabulary), which adds a BOS and has no chat template (a base model),
  optionally with a dummy prefix (Llama-2 / Mistral style: a '▁' added before the text).

Their merges differ, so they split the same text differently.
"""

from __future__ import annotations

import string

CORPUS = [
    "What is 3 + 4? The answer is 7.", "Question: 12 + 30 = 42", "Answer: 8 - 5 = 3", "café, naïve, über, déjà vu",
    "The quick brown fox jumps over the lazy dog.", "中文 日本語", "emoji 🙂 and 🎉 here", "  two  spaces\n\nnew lines\n",
    "<answer>15</answer>", "numbers 123456789 0987", "Let me think step by step.", "so 9 + 9 = 18 and 18 + 1 = 19",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _sentencepiece_merges(vocab_size: int):
    """(vocab, merges) of a BPE over '▁'-joined text, learnt on CORPUS."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    plain = Tokenizer(models.BPE(unk_token="<unk>"))
    plain.normalizer = normalizers.Replace(" ", "\u2581")
    plain.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    alphabet = list(string.printable[:94]) + ["\u2581", "\n", "é", "ü"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, initial_alphabet=alphabet,
                                  show_progress=False, limit_alphabet=len(alphabet))
    plain.train_from_iterator(CORPUS, trainer)
    spec = json.loads(plain.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    return spec["model"]["vocab"], merges


def sentencepiece_tokenizer(vocab_size: int = 360, dummy_prefix: str | None = None):
    """BPE over '▁'-joined text with byte fallback; merges learnt on the same corpus but a smaller budget.

    dummy_prefix: None (Gemma style: the text as it is); "first" (Mistral / TinyLlama style: a Metaspace
    pre-tokenizer with prepend_scheme="first" adds '▁' before a text that does not start with one);
    "legacy" (Llama-2 style: a Prepend('▁') normaliser adds it to every text). Same vocabulary and
    merges in every case; the decoder drops the added space again, as Llama-2's does.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _sentencepiece_merges(vocab_size)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix == "first":
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        replace = normalizers.Replace(" ", "\u2581")
        core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if dummy_prefix == "legacy" else replace
        core.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
        if dummy_prefix == "legacy":
            steps.append(decoders.Strip(" ", 1, 0))
    core.decoder = decoders.Sequence(steps)
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    # the byte tokens are ordinary vocabulary entries (as in Gemma), not special ones
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def permuted_copy(tokenizer, seed: int = 0):
    """The same tokenizer (same strings, same segmentation) with its ids shuffled; returns (copy, perm)
    where perm[old_id] = new_id."""
    import json
    import random

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    ids = sorted(vocab.values())
    shuffled = ids[:]
    random.Random(seed).shuffle(shuffled)
    perm = dict(zip(ids, shuffled))
    spec["model"]["vocab"] = {token: perm[i] for token, i in vocab.items()}
    for added in spec.get("added_tokens", []):
        added["id"] = perm[added["id"]]
    core = Tokenizer.from_str(json.dumps(spec))
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if getattr(tokenizer, k)}
    others = [t for t in tokenizer.all_special_tokens if t not in special.values()]
    copy = PreTrainedTokenizerFast(tokenizer_object=core, additional_special_tokens=others, **special)
    copy.chat_template = tokenizer.chat_template
    return copy, perm


def permute_model(model, perm: dict[int, int]):
    """A model that reads and predicts permuted ids exactly as `model` does the originals."""
    import copy

    import torch

    other = copy.deepcopy(model)
    index = torch.tensor([old for old, _ in sorted(perm.items(), key=lambda kv: kv[1])])  # new row r <- old row index[r]
    with torch.no_grad():
        emb = other.get_input_embeddings().weight
        emb.copy_(model.get_input_embeddings().weight[index])
        head = other.get_output_embeddings().weight
        head.copy_(model.get_output_embeddings().weight[index])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(other.config, key, None)
        if isinstance(value, int):
            setattr(other.config, key, perm[value])
    return other
