"""The student sharded with FSDP2 over two CPU processes (gloo), launched with the shipped accelerate config,
against one process on the same batch; resume from its checkpoints; what is refused.

Rollouts are sampled at a temperature of 1e-4, so every run draws the same responses whatever the split of
the batch over processes, and every difference left would be the sharded code's.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import _free_port, interrupt_process_1
from transformers import AutoModelForCausalLM

from esrdistill import sharding, tracking
from esrdistill.config import ConfigError, make_config
from esrdistill.train import train
from helpers import save_pair, tiny_overrides

FSDP2_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp2.yaml"


def launch_fsdp2(values: dict, timeout: int = 300, wait: bool = True):
    """`accelerate launch --config_file configs/accelerate/fsdp2.yaml -m esrdistill.cli train ...` (2 processes)."""
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "esrdistill.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _weights_differ(a: dict, b: dict) -> torch.Tensor:
    return torch.cat([(a[k] - b[k]).abs().flatten() for k in a])


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4])
def test_fsdp2_on_two_processes_matches_one_on_the_same_batch(tiny_dirs, tmp_path, lora_r):
    """Loss and gradient norm per step within rel 1e-5; after 3 steps 99% of the weights within 1e-6 of the
    one-process run's (the DDP test's bound: Adam can flip a step on a weight whose gradient is ~0); the
    evaluation (first process, gathered student) gives the same figures; the checkpoint holds the files a
    one-process run writes; final/ is an ordinary Hugging Face directory."""
    student, teacher = tiny_dirs
    common = dict(steps=3, warmup_ratio=0.25, lora_r=lora_r, lr=1e-3 if lora_r == 0 else 1e-2, temperature=1e-4,
                  batch_size=4, micro_batch_size=1, save_every=2, eval_every=3)
    one, two = tmp_path / "one", tmp_path / "two"
    train(make_config(tiny_overrides(student, teacher, one, **common)))
    result = launch_fsdp2(tiny_overrides(student, teacher, two, **common))
    assert result.returncode == 0, result.stderr[-3000:]

    m1, m2 = tracking.read_metrics(one), tracking.read_metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3]
    assert [m["optim/lr"] for m in m2] == pytest.approx([m["optim/lr"] for m in m1], abs=1e-12)
    assert [m["rollout/tokens"] for m in m2] == [m["rollout/tokens"] for m in m1]
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-5)
    assert [m["optim/grad_norm"] for m in m2] == pytest.approx([m["optim/grad_norm"] for m in m1], rel=1e-5)
    assert m2[-1]["eval/accuracy"] == m1[-1]["eval/accuracy"] and m2[-1]["eval/len_mean"] == m1[-1]["eval/len_mean"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]  # + the best eval's

    final = AutoModelForCausalLM.from_pretrained(two / "final")
    assert final.config.architectures == ["LlamaForCausalLM"]  # not torch's FSDP class
    differ = _weights_differ(AutoModelForCausalLM.from_pretrained(one / "final").state_dict(), final.state_dict())
    assert (differ < 1e-6).float().mean().item() > 0.99
    assert differ.max().item() <= 3 * 2 * common["lr"]

    ckpt1, ckpt2 = one / "checkpoints" / "step_0000002", two / "checkpoints" / "step_0000002"
    weights = "adapter/adapter_model.safetensors" if lora_r else "model.safetensors"
    a, b = load_file(str(ckpt1 / weights)), load_file(str(ckpt2 / weights))
    assert sorted(a) == sorted(b)
    assert (_weights_differ(a, b) < 1e-6).float().mean().item() > 0.99
    s1 = torch.load(ckpt1 / "trainer_state.pt", weights_only=False)["optimizer"]
    s2 = torch.load(ckpt2 / "trainer_state.pt", weights_only=False)["optimizer"]
    assert sorted(s2["state"]) == sorted(s1["state"])  # the layout of an unsharded run's optimizer.state_dict()
    assert all(s2["state"][i]["exp_avg"].shape == s1["state"][i]["exp_avg"].shape for i in s1["state"])


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4])
def test_an_interrupted_fsdp2_run_resumes_to_the_uninterrupted_one(tiny_dirs, tmp_path, lora_r):
    """SIGINT on process 1 stops both after the same step with a gathered checkpoint; resuming under FSDP2
    repeats the uninterrupted run: the same losses (rel 1e-6) and final weights (1e-6)."""
    student, teacher = tiny_dirs
    common = dict(steps=16, lora_r=lora_r, lr=1e-3 if lora_r == 0 else 1e-2, temperature=1e-4, batch_size=4,
                  micro_batch_size=2, save_every=0)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = launch_fsdp2(tiny_overrides(student, teacher, straight, **common))
    assert done.returncode == 0, done.stderr[-3000:]

    stderr, done = interrupt_process_1(launch_fsdp2, tiny_overrides(student, teacher, resumed, **common))
    assert "interrupted after step" in stderr, stderr[-3000:]
    assert 1 <= done < 16  # 16 steps: room for the signal to land before the end on a fast machine
    result = launch_fsdp2(tiny_overrides(student, teacher, resumed, resume=True, **common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {done})" in result.stderr + result.stdout
    assert [m["step"] for m in tracking.read_metrics(resumed)] == list(range(1, 17))
    assert [m["loss"] for m in tracking.read_metrics(resumed)] == pytest.approx(
        [m["loss"] for m in tracking.read_metrics(straight)], rel=1e-6)
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    assert _weights_differ(a, b).max().item() < 1e-6


@pytest.mark.slow
def test_an_unevenly_sharded_student_checkpoints_resumes_and_saves_final(tiny_dirs, tmp_path):
    """A student whose LM head (359 rows) and MLP (intermediate size 63) 2 processes shard with padding: the run
    writes its checkpoints and final/ (an ordinary Hugging Face directory of those shapes, the weights of the last
    checkpoint); resumed from its step-2 checkpoint it repeats the uninterrupted run (losses rel 1e-6, final
    weights 1e-6)."""
    _, teacher = tiny_dirs
    student = save_pair(tmp_path / "uneven", seed=1, vocab_rows=359, intermediate=63)
    common = dict(steps=4, lora_r=0, lr=1e-3, temperature=1e-4, batch_size=4, micro_batch_size=2, save_every=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = launch_fsdp2(tiny_overrides(student, teacher, straight, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]

    final = AutoModelForCausalLM.from_pretrained(straight / "final")
    assert (final.config.vocab_size, final.config.intermediate_size) == (359, 63)
    last = load_file(str(straight / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert sorted(last) == sorted(final.state_dict())
    assert all(torch.equal(last[k], v) for k, v in final.state_dict().items())

    shutil.copytree(straight, resumed)  # the run as it stood after its step-2 checkpoint
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    shutil.rmtree(resumed / "final")
    result = launch_fsdp2(tiny_overrides(student, teacher, resumed, resume=True, **common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(step 2)" in result.stderr + result.stdout
    assert [m["step"] for m in tracking.read_metrics(resumed)] == [1, 2, 3, 4]
    assert [m["loss"] for m in tracking.read_metrics(resumed)] == pytest.approx(
        [m["loss"] for m in tracking.read_metrics(straight)], rel=1e-6)
    again = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    assert _weights_differ(final.state_dict(), again).max().item() < 1e-6


def test_views_of_a_padded_buffer_are_copied_to_tensors_of_their_own():
    padded = torch.arange(12.0).reshape(4, 3)  # FSDP2's all-gather buffer: 3 rows of a parameter and 1 of padding
    view, tight = padded[:3], torch.ones(2, 2)
    out = sharding._own_storage({"embed": view, "head": view, "norm": tight, "step": 3})
    assert out["norm"] is tight and out["step"] == 3
    assert torch.equal(out["embed"], view) and out["embed"].untyped_storage().nbytes() == 3 * 3 * 4
    assert out["head"] is out["embed"]  # names that shared a tensor still share one


def test_fsdp_version_1_and_ram_efficient_loading_are_refused_with_what_works(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not sharding.requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="set fsdp_version: 2"):
        sharding.requested()
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ConfigError, match="set it to false"):
        sharding.requested()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    assert sharding.requested()


def test_the_chunked_loss_and_processes_that_run_alone_are_refused_under_fsdp2(tiny_dirs, tmp_path, monkeypatch):
    student, teacher = tiny_dirs
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="use loss_chunk=0"):
        sharding.check(make_config(tiny_overrides(student, teacher, tmp_path / "run", loss_chunk=4)), 2)
    sharding.check(make_config(tiny_overrides(student, teacher, tmp_path / "run")), 2)  # the default passes


def test_the_shipped_accelerate_configs_ask_for_what_esrdistill_runs():
    import yaml

    fsdp2 = yaml.safe_load(FSDP2_CONFIG.read_text())
    assert fsdp2["distributed_type"] == "FSDP" and fsdp2["fsdp_config"]["fsdp_version"] == 2
    assert fsdp2["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False
    ddp = yaml.safe_load((FSDP2_CONFIG.parent / "ddp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora", "uneven"])
def test_gathered_generation_and_the_weight_push_see_the_whole_student(tmp_path, kind):
    """Under FSDP2 the two processes generate for different numbers of steps (3 and 8) on the gathered
    student, without hanging, and get what the unsharded model generates; the vLLM push (a recording
    engine) receives the unsharded model's weights, LoRA merged, exactly; the whole student saved as a
    checkpoint and as final/ reads back as those weights, its LM head tied where the student's is. "uneven":
    359 LM head rows and an intermediate size of 63, which 2 processes shard with padding (a 151,936-row
    vocabulary on 3 or 6 GPUs)."""
    worker = Path(__file__).with_name("fsdp2_worker.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG), "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(worker), str(tmp_path), kind]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(worker.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank, steps in ((0, 3), (1, 8)):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["push_max_diff"] == 0.0
        assert out["generated"] == out["expected"] and len(out["generated"][0]) == 3 + steps
    first = json.loads((tmp_path / "rank0.json").read_text())
    assert first["final_max_diff"] == 0.0
    assert "saved_max_diff" not in first if kind == "lora" else first["saved_max_diff"] == 0.0  # LoRA: adapter checkpoints
    assert first["tied"] == [kind == "uneven"] * 2  # the whole student's, then final/'s
