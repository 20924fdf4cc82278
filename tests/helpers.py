"""Test helpers: tiny models built from a config, a character-level tokenizer saved to a temp dir (no
download), the tiny training config, and an interrupt-then-resume run. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import string

import pytest
import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE, extra: list[str] = ()):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIALS + list(dict.fromkeys(list(string.printable[:95]) + ["\n"])) + list(extra)
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    tok.chat_template = chat_template
    return tok


def make_model(vocab_size: int, seed: int, layers: int = 2, hidden: int = 32, vocab_rows: int | None = None,
               heads: int = 4, kv_heads: int = 2, intermediate: int | None = None, tied: bool = False):
    """A tiny Llama: vocab_rows LM head rows (default vocab_size), intermediate size (default 2 * hidden), the LM
    head tied to the embeddings when `tied`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_rows or vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=4, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: distributions far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def save_model(path, model, tok) -> str:
    """Save a model with its tokenizer as a loadable directory (generation ids set from the tokenizer)."""
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_pair(path, seed: int, **kw):
    tok = make_tokenizer()
    return save_model(path, make_model(len(tok), seed, **kw), tok)


def tiny_overrides(student: str, teacher: str, run_dir, **extra) -> dict:
    """A config for 2-3 second training steps on the tiny models."""
    values = dict(
        student=student, teacher=teacher, dataset="reasoning_gym:chain_sum",
        dataset_options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        num_prompts=32, eval_prompts=4, system_prompt="Answer.", rollout_tokens=8, max_new_tokens=12,
        batch_size=4, micro_batch_size=2, steps=3, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
        eval_every=0, save_every=0, run_dir=str(run_dir), device="cpu", progress=False,
    )
    values.update(extra)
    return values


def train_interrupted_then_resumed(values: dict, at_step: int, monkeypatch):
    """Train with `values`, send SIGINT (what Ctrl-C does) once step `at_step` is logged, then resume:
    returns the TrainingInterrupted that stopped the first attempt."""
    import signal

    from esrdistill import tracking
    from esrdistill.config import make_config
    from esrdistill.train import TrainingInterrupted, train

    original_log = tracking.MetricsLogger.log

    def interrupt(self, step, metrics):
        original_log(self, step, metrics)
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tracking.MetricsLogger, "log", interrupt)
    with pytest.raises(TrainingInterrupted) as stop:
        train(make_config(values))
    monkeypatch.setattr(tracking.MetricsLogger, "log", original_log)
    train(make_config({**values, "resume": True}))
    return stop.value


def record_teachers(monkeypatch, paths: dict[str, str]) -> list[tuple]:
    """Follow each local teacher (its name -> the directory its model is loaded from) through a run with the hf
    engine. The list returned gets ("score", name, moves, device) at each scoring by that teacher, and
    ("sample" | "step", {name: (moves, device)}) at each rollout and after each logged step, for every teacher
    scored so far. moves: the teacher model's Module.to calls since the first rollout (the setup's, loading and
    building a prefix cache, are not counted); device: where its parameters are."""
    from pathlib import Path

    from esrdistill import tracking
    from esrdistill.engines import hf as engine_hf
    from esrdistill.teachers import same

    names = {str(Path(path).resolve()): name for name, path in paths.items()}
    seen, moves, events, started = {}, {name: 0 for name in paths}, [], []

    def name_of(model):
        return names.get(str(Path(getattr(model, "name_or_path", None) or "-").resolve()))

    def where():
        return {name: (moves[name], str(next(model.parameters()).device)) for name, model in seen.items()}

    original_to, original_score = torch.nn.Module.to, same.SameTokenizer.score
    original_sample, original_log = engine_hf.HFEngine.sample, tracking.MetricsLogger.log

    def to(self, *args, **kwargs):
        if started and (name := name_of(self)) is not None:
            moves[name] += 1
        return original_to(self, *args, **kwargs)

    def score(self, plan, rows, width, hidden=False):
        name = name_of(self.model)
        seen[name] = self.model
        events.append(("score", name, moves[name], str(next(self.model.parameters()).device)))
        return original_score(self, plan, rows, width, hidden)

    def sample(self, prompts, sampling, seeds=None):
        started.append(True)
        events.append(("sample", where()))
        return original_sample(self, prompts, sampling, seeds)

    def log(self, step, metrics):
        events.append(("step", where()))
        return original_log(self, step, metrics)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(same.SameTokenizer, "score", score)
    monkeypatch.setattr(engine_hf.HFEngine, "sample", sample)
    monkeypatch.setattr(tracking.MetricsLogger, "log", log)
    return events
