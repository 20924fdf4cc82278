"""The GPU check's dry run (scripts/gpu_check.sh --dry-run): the same script and benchmark code as on the GPU
machine, on the CPU with tiny models, writes a bench table with the three phases for both arms. The GPU
mode's verdict on the CUDA tests: it fails when CUDA is absent or any CUDA test was skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esrdistill.commands.gpu_check import DRY, GPU, CudaVerdict, arm_values, arms, cuda_tests_verdict
from esrdistill.config import load_config

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
    """On this CPU the CUDA tests are all skipped, and the dry run says so rather than "ok"."""
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["environment", "test_cuda", "bench"]
    assert ": ok in " in summary[0] and ": ok in " in summary[2]
    if torch.cuda.is_available():
        assert ": ok in " in summary[1]
    else:
        assert summary[1].startswith("test_cuda: skipped in ") and ": dry run, no GPU: " in summary[1]
        skipped, total = summary[1].split(": dry run, no GPU: ")[1].split(" CUDA tests skipped")[0].split(" of ")
        assert skipped == total and int(total) >= 21


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
def test_the_decode_table_times_every_variant_the_sizes_name(dry_run):
    out, _ = dry_run
    setup = json.loads((out / "bench" / "setup.json").read_text())
    assert [r["variant"] for r in setup["decode"]] == list(DRY.decode_variants)
    assert all(r["decode_step_ms"] > 0 for r in setup["decode"])
    table = (out / "bench" / "bench.md").read_text()
    assert f"| decode step, batch {DRY.batch_size} | ms | warm-up s |" in table
    assert all(f"| {label} |" in table for label in DRY.decode_variants)


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
    assert cfg.hf_decode == "compiled" and cfg.hf_merge_lora  # the fast path the GPU times
    from esrdistill.commands.decode_timing import DECODE_VARIANTS

    assert GPU.decode_variants == tuple(v[0] for v in DECODE_VARIANTS)  # with and without LoRA, merging, compiling


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
    from esrdistill.commands.gpu_check import steps_that_fit

    esr = {"step_s": 3.0}
    assert steps_that_fit(esr, 40.0, GPU, seconds_left=200) == 3  # 4 would fit: capped at the steps asked for
    assert steps_that_fit(esr, 40.0, GPU, seconds_left=110) == 2  # 2.2 fit
    assert steps_that_fit(esr, 40.0, GPU, seconds_left=30) == 2  # none fits: still a warm-up and one measured step


# ---- the GPU mode's verdict on the CUDA tests --------------------------------------------------------------

SKIP_REASON = "needs a CUDA GPU (scripts/gpu_check.sh runs it on one)"


def junit(passed: int = 0, skipped: int = 0, failed: int = 0) -> str:
    """A report shaped as pytest's --junitxml writes it (pytest 8), of made-up CUDA tests."""
    cases = [f'<testcase classname="tests.test_cuda" name="test_passed_{i}" time="0.1" />' for i in range(passed)]
    cases += [f'<testcase classname="tests.test_cuda" name="test_skipped_{i}" time="0.0"><skipped type="pytest.skip" '
              f'message="{SKIP_REASON}">tests/test_cuda.py:27: {SKIP_REASON}</skipped></testcase>' for i in range(skipped)]
    cases += [f'<testcase classname="tests.test_cuda" name="test_failed_{i}" time="0.1"><failure message="assert 1 == 2">'
              'E assert 1 == 2</failure></testcase>' for i in range(failed)]
    total = passed + skipped + failed
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="0" '
            f'failures="{failed}" skipped="{skipped}" tests="{total}" time="1.0">' + "".join(cases) + "</testsuite></testsuites>")


H200 = "NVIDIA H200"


def test_on_the_gpu_every_cuda_test_passed_is_ok():
    verdict = cuda_tests_verdict(junit(passed=21), 0, H200, dry_run=False)
    assert (verdict.status, verdict.why, verdict.exit_status) == ("ok", "21 passed on NVIDIA H200", 0)


def test_on_the_gpu_all_skipped_without_cuda_fails_and_says_cuda_is_absent():
    verdict = cuda_tests_verdict(junit(skipped=21), 0, None, dry_run=False)
    assert (verdict.status, verdict.exit_status) == ("FAILED", 1)
    assert verdict.why == f"CUDA is absent (torch.cuda.is_available() is False): 21 of 21 CUDA tests skipped: {SKIP_REASON}"


def test_on_the_gpu_one_skipped_cuda_test_fails():
    verdict = cuda_tests_verdict(junit(passed=20, skipped=1), 0, H200, dry_run=False)
    assert (verdict.status, verdict.exit_status) == ("FAILED", 1)
    assert verdict.why == f"1 of 21 CUDA tests skipped on NVIDIA H200, where every one must run: {SKIP_REASON}"


def test_a_failed_cuda_test_fails_on_the_gpu_and_in_the_dry_run():
    for device, dry_run in ((H200, False), (None, True)):
        verdict = cuda_tests_verdict(junit(passed=19, skipped=1, failed=1), 1, device, dry_run)
        assert (verdict.status, verdict.why) == ("FAILED", "1 of 21 CUDA tests failed: test_failed_0")


def test_no_report_or_no_test_fails_even_in_the_dry_run():
    for dry_run in (False, True):
        assert cuda_tests_verdict(None, 124, None, dry_run) == CudaVerdict("FAILED", "pytest wrote no report (exit status 124)")
        assert cuda_tests_verdict(junit(), 5, None, dry_run).why == "no CUDA test ran (pytest exit status 5)"
        assert cuda_tests_verdict(junit(skipped=21), 2, None, dry_run).status == "FAILED"  # pytest itself failed


def test_the_dry_run_records_all_skipped_without_cuda_as_skipped_not_ok():
    verdict = cuda_tests_verdict(junit(skipped=21), 0, None, dry_run=True)
    assert (verdict.status, verdict.exit_status) == ("skipped", 3)
    assert verdict.why == f"dry run, no GPU: 21 of 21 CUDA tests skipped: {SKIP_REASON}"


@pytest.mark.slow  # the GPU check's script end to end (about 10 s)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU mode without a GPU: this machine has one")
def test_the_gpu_mode_without_a_gpu_fails_saying_cuda_is_absent_and_stops(tmp_path):
    """scripts/gpu_check.sh without --dry-run on this CPU: pytest skips every CUDA test, the check fails at
    test_cuda, and it runs neither the benchmark nor the CPU test files."""
    # a short deadline: a check that went on past test_cuda would leave the CPU test files out and stop in seconds
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "GPU_CHECK_BUDGET_S": "40"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["install", "environment", "test_cuda", "gpu_check"]
    assert summary[2].startswith("test_cuda: FAILED (exit 1) in ")
    assert ": CUDA is absent (torch.cuda.is_available() is False): " in summary[2]
    skipped, total = summary[2].split("is False): ")[1].split(" CUDA tests skipped")[0].split(" of ")
    assert skipped == total and int(total) >= 21
    assert summary[3] == "gpu_check: CUDA is absent: bench and cpu_tests not run (use --dry-run on a machine without a GPU)"
    assert not (tmp_path / "bench").exists()
