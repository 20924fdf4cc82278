"""Training that runs is not training that teaches: on-policy distillation must move a student that does
not know a task to the teacher that does, and this check must fail when the training is broken.

The toy task: a digit x -> (x + 3) mod 10 and the end of the turn. One tiny model is trained here
(seconds) to answer it when its system message is "H" (the hint) and to answer a random digit without
it. The teacher is that model prompted with the hint; the student is the same weights without it
(context distillation, as the quickstart does with worked examples). Before distillation the student is
right about 1 time in 10 and the teacher always; ESR (K=4, rollouts of 2 tokens) must close that gap.

Three arms: reverse KL (the default), forward KL (the quickstart's loss), and the cross-tokenizer path
(xtok_loss=matched_kl) with the teacher behind a tokenizer of its own: the same strings under shuffled
ids, and the teacher's weights permuted to match (xtok_tokenizers.permuted_copy), so the student learns
only if the teacher's tokens are mapped back to its own.

The last tests break the training on purpose (the gradient's sign flipped, the response mask shifted by
one position, the student scored on the teacher's prompt; across tokenizers also the vocabulary map read
as if the ids were the same) and check, for each arm, that the same criterion says so. A sampler that
draws other tokens is not among them: the losses compare whole distributions at each position, and the
answer's position depends on the prompt alone, so such a run still teaches (seen with each row's rollout
drawn from the next row's prompt, in every arm).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from esrdistill import losses, objective
from esrdistill.config import make_config
from esrdistill.engines import hf as engine_hf
from esrdistill.losses import log_probs
from esrdistill.rollout import Sampling, response_logits, response_mask
from esrdistill.teachers import xtok
from esrdistill.tracking import read_metrics
from esrdistill.train import train
from helpers import make_model, make_tokenizer, save_model

pytestmark = pytest.mark.slow  # training runs until the student learns

HINT = "H"
SHIFT = 3  # the task: x -> (x + SHIFT) mod 10
# What "teaches" means here: greedy accuracy up by this many points, and the reverse KL on fresh
# rollouts down to at most this fraction of where it started.
MIN_GAIN, MAX_KL_RATIO = 0.5, 0.2
# The arms: the config keys each sets. Margins (2026-12-02, an AMD EPYC; teachers pretrained at seeds 0-2,
# runs at seeds 0 and 1): every arm gained 0.9 with the KL at most 0.033 of where it started; every breakage
# below gained at most 0 with the KL at least 0.999 of where it started.
ARMS = {
    "reverse_kl": dict(loss="reverse_kl", steps=100),
    "forward_kl": dict(loss="forward_kl", steps=50),
    "xtok_matched_kl": dict(loss="reverse_kl", xtok_loss="matched_kl", steps=50),
}


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
    # 50 steps of warmup, then linear decay to 0: at a constant 3e-3 the model settled on one wrong answer
    # on some CPUs and seeds (6 -> 7 on an AMD EPYC at seed 0, in half of seeds 0-3); with this schedule
    # seeds 0-5 each answer all ten digits there.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
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
        schedule.step()
    return save_model(path, model.eval(), tok)


def _behind_another_tokenizer(model_dir: str, path) -> str:
    """The model of `model_dir` behind its tokenizer with the ids shuffled, its embeddings and head
    permuted to match: the same teacher, read and written in other ids."""
    from transformers import AutoModelForCausalLM
    from xtok_tokenizers import permute_model, permuted_copy

    tok, perm = permuted_copy(make_tokenizer(), seed=0)
    model = permute_model(AutoModelForCausalLM.from_pretrained(model_dir), perm)
    return save_model(path, model.eval(), tok)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(model dir, dataset path, the model behind another tokenizer): the hinted model, 200 problems of
    the task as JSON Lines, and the cross-tokenizer arm's teacher."""
    root = tmp_path_factory.mktemp("teach")
    model_dir = _pretrain(root / "model")
    rng = random.Random(0)
    data = root / "task.jsonl"
    with data.open("w") as f:
        for _ in range(200):
            x = rng.randrange(10)
            f.write(json.dumps({"question": str(x), "answer": answer(x)}) + "\n")
    return model_dir, str(data), _behind_another_tokenizer(model_dir, root / "other_tokenizer")


def _values(toy, run_dir, seed: int, arm: str = "reverse_kl", **extra) -> dict:
    model_dir, data, other_tokenizer = toy
    values = dict(
        student=model_dir, teacher=other_tokenizer if "xtok_loss" in ARMS[arm] else model_dir, dataset=data,
        num_prompts=None, eval_prompts=20,
        teacher_prompt_suffix=HINT, grader="exact", answer_extract="none",
        rollout_tokens=4, max_new_tokens=4, temperature=1.0, top_p=1.0, loss="reverse_kl",
        lora_r=0, lr=1e-3, warmup_ratio=0.0, batch_size=8, micro_batch_size=8, steps=100,
        eval_every=0, save_every=0, seed=seed, data_seed=seed, run_dir=str(run_dir), device="cpu", progress=False,
    )
    values.update(ARMS[arm])
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


def distil(toy, tmp_path, seed: int, arm: str = "reverse_kl", **extra) -> dict:
    """Train with ESR in `arm` and return the before/after figures of `measure` (against the hinted model
    in the student's ids: the cross-tokenizer arm's teacher is the same model in other ids)."""
    run = tmp_path / f"run-{arm}-{seed}"
    train(make_config(_values(toy, run, seed, arm, **extra)))
    (acc_before, kl_before), (acc_after, kl_after) = measure(toy[0], toy[0]), measure(str(run / "final"), toy[0])
    first = read_metrics(run)[0]
    return {"acc_before": acc_before, "acc_after": acc_after, "kl_before": kl_before, "kl_after": kl_after,
            "xtok": {k: v for k, v in first.items() if k.startswith("xtok/")}}


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


def test_the_teacher_behind_another_tokenizer_is_the_same_teacher_in_other_ids(toy):
    """The cross-tokenizer arm's teacher: other ids for the same strings, the same log-probabilities."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esrdistill.models import DIFFERENT, tokenizer_relation

    tok, other = make_tokenizer(), AutoTokenizer.from_pretrained(toy[2])
    assert tokenizer_relation(tok, other) == DIFFERENT
    shared = tok.get_vocab()
    moved = sum(other.get_vocab()[t] != i for t, i in shared.items())
    assert set(other.get_vocab()) == set(shared) and moved > 0.9 * len(shared)
    text = tok.apply_chat_template([{"role": "user", "content": "7"}], tokenize=False, add_generation_prompt=True) + HINT
    ids, other_ids = tok(text, add_special_tokens=False)["input_ids"], other(text, add_special_tokens=False)["input_ids"]
    assert [other.convert_ids_to_tokens(i) for i in other_ids] == [tok.convert_ids_to_tokens(i) for i in ids]
    with torch.no_grad():
        logp = torch.log_softmax(AutoModelForCausalLM.from_pretrained(toy[0])(torch.tensor([ids])).logits[0, -1], -1)
        other_logp = torch.log_softmax(AutoModelForCausalLM.from_pretrained(toy[2])(torch.tensor([other_ids])).logits[0, -1], -1)
    index = torch.tensor([other.get_vocab()[t] for t in tok.convert_ids_to_tokens(list(range(len(tok))))])
    torch.testing.assert_close(other_logp[index], logp, rtol=1e-5, atol=1e-5)
    assert tok.decode(logp.argmax()) == answer(7)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("arm", ARMS)
def test_esr_distillation_teaches_the_student_the_task(toy, tmp_path, arm, seed):
    r = distil(toy, tmp_path, seed, arm)
    assert teaches(r), r
    if "xtok_loss" in ARMS[arm]:  # the cross-tokenizer path, every response token aligned (the same segmentation)
        assert r["xtok"]["xtok/vocab_mapped"] == 1.0 and r["xtok"]["xtok/aligned_frac"] == pytest.approx(1.0)
    else:
        assert r["xtok"] == {}


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


def _read_the_vocabulary_map_as_the_same_ids(monkeypatch):
    """Across tokenizers: each shared unit's teacher token taken at the student's id (the map ignored)."""
    original = xtok.build_vocab_map

    def same_ids(*a, **k):
        vocab_map = original(*a, **k)
        vocab_map.teacher_primary = vocab_map.student_primary.clone()
        return vocab_map

    monkeypatch.setattr(xtok, "build_vocab_map", same_ids)


BREAKAGES = {
    "flipped_gradient": _flip_the_gradient,
    "mask_shifted_by_one": _shift_the_mask,
    "student_on_teacher_prompt": _score_the_student_on_the_teachers_prompt,
    "vocab_map_as_same_ids": _read_the_vocabulary_map_as_the_same_ids,
}
CASES = [(arm, name) for arm in ARMS for name in BREAKAGES if name != "vocab_map_as_same_ids" or "xtok_loss" in ARMS[arm]]


@pytest.mark.parametrize(("arm", "breakage"), CASES, ids=[f"{arm}-{name}" for arm, name in CASES])
def test_the_check_fails_when_training_is_broken(toy, tmp_path, monkeypatch, arm, breakage):
    BREAKAGES[breakage](monkeypatch)
    r = distil(toy, tmp_path, 0, arm)
    assert not teaches(r), r
