"""The GPU check's dry run (scripts/gpu_check.sh --dry-run): the same script and benchmark code as on the GPU
machine, on the CPU with tiny models, writes a bench table with the three phases for both arms."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from esrdistill.config import load_config
from esrdistill.gpu_check import DRY, GPU, arm_values, arms

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return out, done


@pytest.mark.slow  # the GPU check's dry run end to end
def test_the_dry_run_passes_every_part(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["environment", "test_cuda", "bench"]
    assert all(": ok in " in line for line in summary)


@pytest.mark.slow  # the GPU check's dry run end to end
def test_the_bench_table_has_the_three_phases_for_both_arms(dry_run):
    out, _ = dry_run
    labels = list(arms(DRY))
    assert labels == [f"esr_k{DRY.esr_k}", f"full_{DRY.full_tokens}"]
    table = (out / "bench" / "bench.md").read_text()
    assert f"| per step (mean after the first) | {labels[0]} | {labels[1]} | ratio |" in table
    for phase in ("rollout s", "teacher s", "train s", "generated tokens per s"):
        assert f"| {phase} |" in table
    results = json.loads((out / "bench" / "bench.json").read_text())
    assert list(results) == labels
    for label, length in zip(labels, (DRY.esr_k, DRY.full_tokens)):
        figures = results[label]
        assert figures["rollout_s"] > 0 and figures["teacher_s"] > 0 and figures["train_s"] > 0
        assert figures["tokens_per_s"] > 0 and figures["peak_mb"] > 0
        assert figures["len_mean"] == length and figures["eos_frac"] == 0  # every rollout forced to its full length
        assert figures["tokens"] == DRY.batch_size * length
        assert figures["steps_measured"] == DRY.steps - 1  # the warm-up step left out


@pytest.mark.slow  # the GPU check's dry run end to end
def test_the_setup_names_the_models_and_the_vocabulary(dry_run):
    out, _ = dry_run
    setup = json.loads((out / "bench" / "setup.json").read_text())
    assert setup["failed"] == {} and setup["device"] == "cpu"
    assert set(setup["parameters"]) == {"student", "teacher"} and min(setup["parameters"].values()) > 0
    assert "vocabulary" in setup and "tokens" in setup["vocabulary"]
    header = (out / "bench" / "bench.md").read_text().splitlines()[0]
    assert header == f"# ESR (K={DRY.esr_k}) against a full rollout ({DRY.full_tokens} tokens) on the CPU ({setup['cpu_threads']} threads)"


def test_the_gpu_setting_is_the_one_asked_for():
    """The sizes the device runs (it cannot be run here): batch 16, LoRA r=32, K=100 against 1,024 tokens, bf16."""
    assert (GPU.device, GPU.dtype, GPU.batch_size, GPU.lora_r, GPU.esr_k, GPU.full_tokens) == ("cuda", "bfloat16", 16, 32, 100, 1024)
    lengths = {}
    for label, variant in arms(GPU).items():
        cfg = load_config(None, arm_values(GPU, "/student", "/teacher", Path("/prompts.jsonl"), Path("/run"), variant))
        assert (cfg.device, cfg.dtype, cfg.rollout_engine, cfg.batch_size, cfg.lora_r, cfg.steps) == ("cuda", "bfloat16", "hf", 16, 32, 3)
        lengths[label] = (cfg.rollout_tokens or cfg.max_new_tokens, cfg.min_new_tokens)
    assert lengths == {"esr_k100": (100, 100), "full_1024": (1024, 1024)}  # every rollout forced to its length


def test_the_gpu_models_have_about_1_5b_and_1_6b_parameters():
    """Built on the meta device (no memory): Qwen2.5-1.5B's and Qwen3-1.7B's shapes on SmolLM2's 49,152 tokens."""
    import torch
    import transformers

    counts = {}
    for role, arch, shape in (("student", GPU.student_arch, GPU.student), ("teacher", GPU.teacher_arch, GPU.teacher)):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, arch)(vocab_size=49152, **shape))
        counts[role] = sum(p.numel() for p in model.parameters())
    assert counts["student"] == pytest.approx(1.46e9, rel=0.01)
    assert counts["teacher"] == pytest.approx(1.61e9, rel=0.01)


def test_the_full_arm_is_cut_to_the_steps_that_fit_but_keeps_a_measured_step():
    """From the ESR arm (3 s steps, 40 s in all): a full step takes about 3 * 1024/100 * 1.15 = 35 s after 31 s of start-up."""
    from esrdistill.gpu_check import steps_that_fit

    esr = {"step_s": 3.0}
    assert steps_that_fit(esr, 40.0, GPU, seconds_left=200) == 3  # 4 would fit: capped at the steps asked for
    assert steps_that_fit(esr, 40.0, GPU, seconds_left=110) == 2  # 2.2 fit
    assert steps_that_fit(esr, 40.0, GPU, seconds_left=30) == 2  # none fits: still a warm-up and one measured step
