"""The CUDA path against the CPU's (skipped without a GPU; scripts/gpu_check.sh runs it on a lent one):
the losses and their gradients on CUDA equal the CPU's, exactly enough in fp32 and within bf16's precision
in bf16; a bf16 training step with LoRA and with full fine-tuning moves the weights by Adam's first step
with a finite loss; offloaded teachers (teacher_offload) are on the GPU only while they score; the hf engine
generates on CUDA as it does on the CPU."""

import json
from contextlib import nullcontext

import pytest
import torch

from esrdistill import losses, objective, rollout
from esrdistill.engines import hf as engine_hf
from esrdistill.teachers.protocol import LossSettings
from esrdistill.teachers.same import SameTokenizer
from helpers import make_model, make_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on one)")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
EOS, PAD = 4, 0
LOSSES = ("reverse_kl", "forward_kl", "jsd", "sampled")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- the pure losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", LOSSES)
def test_per_token_losses_on_cuda_equal_the_cpus(loss, dtype):
    """The same logits (rounded to bf16 first, as a bf16 model's are) give the same (B, T) losses."""
    g = torch.Generator().manual_seed(0)
    student_logits, teacher_logits = (torch.randn(4, 16, 1000, generator=g) * 3).to(DTYPES[dtype]), \
        (torch.randn(4, 16, 1000, generator=g) * 3).to(DTYPES[dtype])
    tokens = torch.randint(0, 1000, (4, 16), generator=g)
    mask = (torch.rand(4, 16, generator=g) > 0.2).float()

    def per_token(device):
        s = torch.log_softmax(student_logits.to(device).float(), -1)  # (B, T, V) fp32, as teacher.log_probs
        t = torch.log_softmax(teacher_logits.to(device).float(), -1)
        return losses.per_token_loss(loss, s, t, tokens.to(device), mask.to(device), 0.5, 0.7, 0.9).cpu()

    on_cuda, on_cpu = per_token(CUDA), per_token(CPU)
    assert on_cpu.abs().sum() > 0
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-5)


# ---- a micro-batch through the models: loss and gradients -----------------------------------------------

def _batch():
    responses = torch.tensor([[60, 61, 62, 63, 64, 65, 66, 67], [70, 71, EOS, PAD, PAD, PAD, PAD, PAD],
                              [75, 76, 77, 78, 79, EOS, PAD, PAD]])
    return [[3, 40, 41, 42], [3, 50], [3, 60, 61]], responses, rollout.response_mask(responses, [EOS])


def _loss_and_grads(loss, device, dtype, chunk=0):
    """(loss, {name: gradient in fp32 on the CPU}) of one micro-batch, the student and teacher in `dtype` on `device`."""
    tok = make_tokenizer()
    student, teacher = make_model(len(tok), 1).to(device, dtype), make_model(len(tok), 2).to(device, dtype)
    scorer = SameTokenizer(teacher, PAD, len(tok), 2, LossSettings(loss=loss, temperature=0.7, top_p=0.9))
    prompts, responses, mask = _batch()
    plan = scorer.plan(prompts, responses, mask)
    scores = scorer.score(plan, [0, 1, 2], responses.shape[1], hidden=chunk > 0)
    value, _ = objective.micro_batch_loss(objective.Student(student, PAD, len(tok), nullcontext), scorer, scores,
                                          rollout.Rollouts(prompts, responses, mask),
                                          LossSettings(loss=loss, temperature=0.7, top_p=0.9, loss_chunk=chunk), 3)
    value.backward()
    return value.item(), {n: p.grad.float().cpu() for n, p in student.named_parameters()}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("loss", LOSSES)
def test_micro_batch_loss_and_gradients_on_cuda_equal_the_cpus_in_fp32(loss):
    cpu_loss, cpu_grads = _loss_and_grads(loss, CPU, torch.float32)
    for chunk in (0, 3):  # the whole loss, and the chunked one (activation checkpointing on CUDA)
        cuda_loss, cuda_grads = _loss_and_grads(loss, CUDA, torch.float32, chunk)
        assert cuda_loss == pytest.approx(cpu_loss, rel=1e-4, abs=1e-5)
        for name, grad in cpu_grads.items():
            torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss", LOSSES)
def test_micro_batch_loss_on_cuda_in_bf16_is_the_fp32_loss_within_bf16_precision(loss):
    """bf16 weights and activations (8 bits of mantissa) move the loss by a few percent, no more, and leave
    the gradient pointing the same way."""
    cpu_loss, cpu_grads = _loss_and_grads(loss, CPU, torch.float32)
    bf16_loss, bf16_grads = _loss_and_grads(loss, CUDA, torch.bfloat16)
    assert bf16_loss == pytest.approx(cpu_loss, rel=0.05, abs=1e-3)
    assert all(torch.isfinite(g).all() for g in bf16_grads.values())
    whole = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    assert _cosine(whole(bf16_grads), whole(cpu_grads)) > 0.98


# ---- training steps: train() on CUDA in bf16 --------------------------------------------------------------

def _prompts(path, n=16):
    with path.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n")
    return str(path)


@pytest.mark.parametrize("lora_r", [4, 0], ids=["lora", "full"])
def test_a_bf16_training_step_on_cuda_moves_the_weights_by_adams_first_step(tiny_dirs, tmp_path, lora_r):
    """Adam's first step moves each trained weight (LoRA's B, which starts at zero; or every fp32 master
    weight of full fine-tuning) by lr times the sign of its gradient."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from esrdistill.config import make_config
    from esrdistill.tracking import read_metrics
    from esrdistill.train import train

    student, teacher = tiny_dirs
    run, lr = tmp_path / "run", 1e-3
    torch.cuda.reset_peak_memory_stats()
    train(make_config(dict(
        student=student, teacher=teacher, dataset=_prompts(tmp_path / "prompts.jsonl"), grader="exact", eval_prompts=0,
        system_prompt="Answer.", rollout_tokens=8, min_new_tokens=8, batch_size=4, micro_batch_size=2, steps=1, lr=lr,
        warmup_ratio=0.0, max_grad_norm=0.0, lora_r=lora_r, lora_alpha=8, lora_dropout=0.0, eval_every=0, save_every=1,
        run_dir=str(run), device="cuda", dtype="bfloat16", progress=False)))
    assert torch.cuda.max_memory_allocated() > 0  # the models were on the GPU
    (metrics,) = read_metrics(run)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["loss"] > 0
    assert metrics["optim/skipped"] == 0 and metrics["rollout/tokens"] == 4 * 8
    saved = run / "checkpoints" / "step_0000001"
    if lora_r:
        trained = {k: v for k, v in load_file(str(saved / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k}
        deltas = torch.cat([v.float().flatten() for v in trained.values()])
    else:
        initial = AutoModelForCausalLM.from_pretrained(student).state_dict()
        master = load_file(str(saved / "model.safetensors"))
        assert all(v.dtype == torch.float32 for v in master.values())  # fp32 master weights under bf16
        # every weight but the embedding rows of tokens the step never read
        deltas = torch.cat([(master[k] - initial[k].float()).flatten() for k in master if k in initial and "embed" not in k])
    assert deltas.numel() > 0 and torch.isfinite(deltas).all()
    assert (deltas.abs() > lr / 100).float().mean().item() > 0.9
    assert deltas.abs().max().item() == pytest.approx(lr, rel=0.05)
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert final.dtype == torch.bfloat16 and all(torch.isfinite(p).all() for p in final.parameters())


def test_offloaded_teachers_are_on_the_gpu_only_while_they_score(tiny_dirs, tmp_path, monkeypatch):
    """Two local teachers, teacher_offload=true, in fp32 on CUDA: each one's weights are on the GPU at each of its
    scorings and on the CPU at each rollout and after each step (resident, on the GPU throughout); the losses are
    those of the resident run (rel 1e-5). tests/test_teachers.py counts the moves on the CPU."""
    from test_teachers import _routed_data

    from esrdistill.config import make_config
    from esrdistill.tracking import read_metrics
    from esrdistill.train import train
    from helpers import record_teachers, save_pair, tiny_overrides

    student, teacher = tiny_dirs
    other = save_pair(tmp_path / "other", seed=5)
    data = _routed_data(tmp_path / "data.jsonl")
    losses_of, events = {}, {}
    for offload in (False, True):
        values = tiny_overrides(student, None, tmp_path / f"run-{offload}", dataset=data, dataset_options={}, steps=2,
                                teachers={"one": teacher, "two": other}, teacher_field="source", teacher_offload=offload,
                                device="cuda", dtype="float32")
        del values["teacher"]
        with monkeypatch.context() as patch:
            events[offload] = record_teachers(patch, {"one": teacher, "two": other})
            train(make_config(values))
        losses_of[offload] = [m["loss"] for m in read_metrics(tmp_path / f"run-{offload}")]
    for offload, recorded in events.items():
        scorings = [e[1:] for e in recorded if e[0] == "score"]  # (name, moves, device)
        between = [e[1] for e in recorded if e[0] != "score"]  # at each rollout and step: {name: (moves, device)}
        assert {name for name, _, _ in scorings} == {"one", "two"}
        assert {device.split(":")[0] for _, _, device in scorings} == {"cuda"}
        home = "cpu" if offload else "cuda"
        assert {device.split(":")[0] for where in between[1:] for _, device in where.values()} == {home}, offload
    assert losses_of[True] == pytest.approx(losses_of[False], rel=1e-5)


# ---- generation with the hf engine ------------------------------------------------------------------------

def test_greedy_generation_on_cuda_equals_the_cpus_in_fp32():
    tok = make_tokenizer()
    model = make_model(len(tok), 3)
    prompts = [tok("What is 12 + 30?")["input_ids"], tok("Hi")["input_ids"], tok("2 * 7 =")["input_ids"]]
    sampling = rollout.Sampling(12, temperature=0.0, eos_ids=(EOS,), pad_id=PAD, vocab_size=len(tok))
    on_cpu = engine_hf.HFEngine(model).sample(prompts, sampling)
    on_cuda = engine_hf.HFEngine(model.to(CUDA)).sample(prompts, sampling)
    assert on_cuda.responses.device.type == "cpu"
    assert torch.equal(on_cuda.responses, on_cpu.responses) and torch.equal(on_cuda.mask, on_cpu.mask)


@pytest.mark.parametrize("weights", ["bf16", "fp32 under bf16 autocast"])
def test_sampling_on_cuda_is_forced_to_its_length_and_repeats_with_its_seeds(weights):
    """What training does on CUDA: bf16 weights (LoRA), or fp32 master weights computing in bf16 (full fine-tuning)."""
    tok = make_tokenizer()
    model = make_model(len(tok), 3).to(CUDA, torch.bfloat16 if weights == "bf16" else torch.float32)
    autocast = nullcontext if weights == "bf16" else (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    engine = engine_hf.HFEngine(model, autocast)
    prompts = [tok("What is 12 + 30?")["input_ids"], tok("Hi")["input_ids"], tok("2 * 7 =")["input_ids"]]
    sampling = rollout.Sampling(16, temperature=0.7, top_p=0.95, eos_ids=(EOS,), pad_id=PAD, vocab_size=len(tok), min_new_tokens=16)
    first, again = engine.sample(prompts, sampling, [11, 12, 13]), engine.sample(prompts, sampling, [11, 12, 13])
    other = engine.sample(prompts, sampling, [21, 22, 23])
    assert first.responses.shape == (3, 16) and first.mask.sum().item() == 3 * 16
    assert not (first.responses == EOS).any() and int(first.responses.max()) < len(tok)
    assert torch.equal(first.responses, again.responses)
    assert not torch.equal(first.responses, other.responses)
