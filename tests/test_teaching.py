"""Training that runs is not training that teaches: on-policy distillation must move a student that does
not know a task to the teacher that does, and this check must fail when the training is broken.

The toy task: a digit x -> (x + 3) mod 10 and the end of the turn. One tiny model is trained here
(seconds) to answer it when its system message is "H" (the hint) and to answer a random digit without
it. The teacher is that model prompted with the hint; the student is the same weights without it
(context distillation, as the quickstart does with worked examples). Before distillation the student is
right about 1 time in 10 and the teacher always; ESR (K=4, rollouts of 2 tokens) must close that gap.

The last tests break the training on purpose (the gradient's sign flipped, the response mask shifted by
one position, the student scored on the teacher's prompt) and check that the same criterion says so.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import make_model, make_tokenizer, save_model
from esrdistill import engine_hf, losses, objective
from esrdistill.config import make_config
from esrdistill.rollout import Sampling, response_logits, response_mask
from esrdistill.teacher import log_probs
from esrdistill.train import train

pytestmark = pytest.mark.slow  # training runs until the student learns

HINT = "H"
SHIFT = 3  # the task: x -> (x + SHIFT) mod 10
# What "teaches" means here: greedy accuracy up by this many points, and the reverse KL on fresh
# rollouts down to at most this fraction of where it started.
MIN_GAIN, MAX_KL_RATIO = 0.5, 0.2


def answer(x: int) -> str:
    return str((x + SHIFT) % 10)


def _prompt(tok, x: int, hint: bool) -> list[int]:
    """The prompt's ids; the hint is the teacher's prompt suffix, after the generation prompt."""
    text = tok.apply_chat_template([{"role": "user", "content": str(x)}], tokenize=False, add_generation_prompt=True)
    return tok(text + (HINT if hint else ""), add_special_tokens=False)["input_ids"]


def _pretrain(path, seed: int = 0, steps: int = 500) -> str:
    """A tiny model that answers (x + 3) mod 10 with the hint and a random digit without it."""
    tok = make_tokenizer()
    model = make_model(len(tok), seed, layers=2, hidden=64)
    with torch.no_grad():  # the usual init: a model that learns in a few hundred steps
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    rng = random.Random(seed)
    eos = tok.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(32):
            x, hint = rng.randrange(10), rng.random() < 0.5
            target = answer(x) if hint else str(rng.randrange(10))
            prompt = _prompt(tok, x, hint)
            rows.append((prompt + tok(target, add_special_tokens=False)["input_ids"] + [eos], len(prompt)))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for r, (seq, start) in enumerate(rows):
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, start : len(seq)] = torch.tensor(seq[start:])
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_model(path, model.eval(), tok)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(model dir, dataset path): the hinted model, and 200 problems of the task as JSON Lines."""
    root = tmp_path_factory.mktemp("teach")
    model_dir = _pretrain(root / "model")
    rng = random.Random(0)
    data = root / "task.jsonl"
    with data.open("w") as f:
        for _ in range(200):
            x = rng.randrange(10)
            f.write(json.dumps({"question": str(x), "answer": answer(x)}) + "\n")
    return model_dir, str(data)


def _values(toy, run_dir, seed: int, **extra) -> dict:
    model_dir, data = toy
    values = dict(
        student=model_dir, teacher=model_dir, dataset=data, num_prompts=None, eval_prompts=20,
        teacher_prompt_suffix=HINT, grader="exact", answer_extract="none",
        rollout_tokens=4, max_new_tokens=4, temperature=1.0, top_p=1.0, loss="reverse_kl",
        lora_r=0, lr=1e-3, warmup_ratio=0.0, batch_size=8, micro_batch_size=8, steps=100,
        eval_every=0, save_every=0, seed=seed, data_seed=seed, run_dir=str(run_dir), device="cpu", progress=False,
    )
    values.update(extra)
    return values


@torch.no_grad()
def measure(model_dir: str, teacher_dir: str) -> tuple[float, float]:
    """(greedy accuracy over the 10 digits, mean reverse KL to the hinted teacher on 64 fresh T=1 rollouts)."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    eos = (tok.eos_token_id,)
    xs = list(range(10))
    greedy = engine_hf.sample(student, [_prompt(tok, x, False) for x in xs],
                              Sampling(max_new_tokens=4, temperature=0.0, eos_ids=eos, pad_id=tok.pad_token_id))
    # masks recomputed here, so that a test that breaks the engine's mask does not break the measurement
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True)
             for r, m in zip(greedy.responses, response_mask(greedy.responses, eos))]
    accuracy = sum(t.strip() == answer(x) for t, x in zip(texts, xs)) / len(xs)

    xs = [i % 10 for i in range(64)]
    student_prompts, teacher_prompts = [_prompt(tok, x, False) for x in xs], [_prompt(tok, x, True) for x in xs]
    fresh = engine_hf.sample(student, student_prompts, Sampling(max_new_tokens=4, temperature=1.0, eos_ids=eos,
                                                                pad_id=tok.pad_token_id), seeds=list(range(64)))
    mask = response_mask(fresh.responses, eos)
    s = log_probs(response_logits(student, student_prompts, fresh.responses, mask, tok.pad_token_id), len(tok))
    t = log_probs(response_logits(teacher, teacher_prompts, fresh.responses, mask, tok.pad_token_id), len(tok))
    kl = losses.reverse_kl(s, t, mask)
    return accuracy, float(kl.sum() / mask.sum())


def distil(toy, tmp_path, seed: int) -> dict:
    """Train with ESR and return the before/after figures of `measure`."""
    run = tmp_path / f"run{seed}"
    train(make_config(_values(toy, run, seed)))
    (acc_before, kl_before), (acc_after, kl_after) = measure(toy[0], toy[0]), measure(str(run / "final"), toy[0])
    return {"acc_before": acc_before, "acc_after": acc_after, "kl_before": kl_before, "kl_after": kl_after}


def teaches(r: dict) -> bool:
    return r["acc_after"] - r["acc_before"] >= MIN_GAIN and r["kl_after"] <= MAX_KL_RATIO * r["kl_before"]


def test_the_toy_teacher_knows_the_task_and_the_student_does_not(toy):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(toy[0]).eval()
    hinted = engine_hf.sample(model, [_prompt(tok, x, True) for x in range(10)],
                              Sampling(max_new_tokens=4, temperature=0.0, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id))
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(hinted.responses, hinted.mask)]
    assert texts == [answer(x) for x in range(10)]
    accuracy, kl = measure(toy[0], toy[0])
    assert accuracy <= 0.3 and kl > 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_esr_distillation_teaches_the_student_the_task(toy, tmp_path, seed):
    r = distil(toy, tmp_path, seed)
    assert teaches(r), r


def _flip_the_gradient(monkeypatch):
    original = losses.per_token_loss
    monkeypatch.setattr(losses, "per_token_loss", lambda *a, **k: -original(*a, **k))


def _shift_the_mask(monkeypatch):
    original = engine_hf.response_mask

    def shifted(responses, eos_ids):
        mask = original(responses, eos_ids)
        return torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)  # one position late

    monkeypatch.setattr(engine_hf, "response_mask", shifted)


def _score_the_student_on_the_teachers_prompt(monkeypatch):
    tok = make_tokenizer()
    suffix = _prompt(tok, 0, True)[len(_prompt(tok, 0, False)):]  # what the teacher's view adds: the hint
    original = objective.response_logits

    def as_the_teacher_sees_it(model, prompts, *a, **k):
        return original(model, [p + suffix for p in prompts], *a, **k)

    monkeypatch.setattr(objective, "response_logits", as_the_teacher_sees_it)


@pytest.mark.parametrize("breakage", [_flip_the_gradient, _shift_the_mask, _score_the_student_on_the_teachers_prompt],
                         ids=["flipped_gradient", "mask_shifted_by_one", "student_on_teacher_prompt"])
def test_the_check_fails_when_training_is_broken(toy, tmp_path, monkeypatch, breakage):
    breakage(monkeypatch)
    r = distil(toy, tmp_path, seed=0)
    assert not teaches(r), r
