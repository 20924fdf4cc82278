"""The bias of a served teacher's top-K losses against the full-vocabulary loss, measured on the tiny pair of
the tests (docs/served-teacher.md prints its table).

    python scripts/served_bias.py            # a markdown table on stdout, about 5 s on a CPU

The student (tests/helpers.py, seed 1) samples 8 rollouts of 32 tokens at temperature 1; the teacher (seed 2,
the served tests' model) scores them locally in fp32. For K = 1, 8, 64 and the whole vocabulary, the top-K
losses (losses.topk_student / topk_teacher with served_loss = tail and renorm) are compared with the
full-vocabulary loss over every response position: the loss's relative error, and the gradient with respect
to the student's logits (relative error of the whole gradient, and its cosine with the exact one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from esrdistill import losses
from esrdistill.engines import hf as engine_hf  # noqa: E402
from esrdistill.rollout import Sampling, response_logits  # noqa: E402
from helpers import make_model, make_tokenizer  # noqa: E402

LOSSES = ("reverse_kl", "forward_kl")
TOLERANCE = 1e-5  # at K = V the tail loss must equal the full one within this (relative)


def measure() -> list[dict]:
    tok = make_tokenizer()
    vocab = len(tok)
    student = make_model(vocab, 1)
    teacher = make_model(vocab, 2, hidden=64, heads=2, kv_heads=2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{a}+{a + 3}="}], add_generation_prompt=True, tokenize=True, return_dict=False)
               for a in range(8)]
    torch.manual_seed(0)
    batch = engine_hf.sample(student, prompts, Sampling(32, temperature=1.0, eos_ids=(), pad_id=tok.pad_token_id))
    mask = batch.mask
    with torch.no_grad():
        teacher_logp = torch.log_softmax(response_logits(teacher, prompts, batch.responses, mask, tok.pad_token_id).float(), -1)
        student_logits = response_logits(student, prompts, batch.responses, mask, tok.pad_token_id).float()
    tokens = batch.responses

    def loss_and_grad(name: str, k: int | None, mode: str | None):
        logits = student_logits.clone().requires_grad_()
        student_logp = torch.log_softmax(logits, -1)
        if k is None:
            per_token = losses.per_token_loss(name, student_logp, teacher_logp, tokens, mask)
        else:
            top = teacher_logp.topk(k, dim=-1)
            per_token = losses.per_token_loss(name, losses.topk_student(student_logp, top.indices, mode),
                                              losses.topk_teacher(top.values, mode), tokens, mask)
        loss = per_token.sum() / mask.sum()
        loss.backward()
        return loss.item(), logits.grad.flatten()

    rows = []
    for name in LOSSES:
        full, full_grad = loss_and_grad(name, None, None)
        for k in (1, 8, 64, vocab):
            mass = teacher_logp.topk(k, dim=-1).values.exp().sum(-1)[mask.bool()].mean().item()
            for mode in losses.TOPK_MODES:
                value, grad = loss_and_grad(name, k, mode)
                rows.append({"loss": name, "k": k, "mode": mode, "full": full, "value": value, "mass": mass,
                             "loss_err": (value - full) / full,
                             "grad_err": ((grad - full_grad).norm() / full_grad.norm()).item(),
                             "grad_cos": torch.nn.functional.cosine_similarity(grad, full_grad, dim=0).item()})
    return rows


def main() -> None:
    rows = measure()
    print("| loss | K | teacher's top-K mass | served_loss | loss | full loss | loss error | gradient error | gradient cosine |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['k']} | {r['mass']:.3f} | {r['mode']} | {r['value']:.4f} | {r['full']:.4f} | "
              f"{r['loss_err']:+.1%} | {r['grad_err']:.1%} | {r['grad_cos']:.3f} |")
    at_v = [r for r in rows if r["k"] == rows[-1]["k"] and r["mode"] == "tail"]
    worst = max(abs(r["loss_err"]) for r in at_v)
    print(f"\nAt K = V the tail loss is the full loss within {worst:.1e} (relative; required: {TOLERANCE:.0e}).")
    if worst > TOLERANCE:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
