"""Two processes (accelerate launch --multi_gpu, gloo on the CPU) against one, on the same batch.

Rollouts are sampled at a temperature of 1e-4, so both runs draw the same responses whatever the
split of the batch over processes, and every difference left would be the multi-process code's.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from esrdistill import tracking
from esrdistill.config import make_config
from esrdistill.train import train
from helpers import tiny_overrides

pytestmark = pytest.mark.slow  # several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(values: dict, timeout: int = 300, wait: bool = True):
    """`accelerate launch --multi_gpu --num_processes 2 -m esrdistill.cli train ...`: the documented command.
    wait=False returns the running job, in a process group of its own."""
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else ('null' if v is None else v)}" for k, v in values.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "esrdistill.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def interrupt_process_1(launch, values: dict) -> tuple[str, int]:
    """Launch `values` with `launch` (2 processes), send SIGINT to process 1 alone once a step is logged, and
    wait for the job: (its stderr, the number of steps logged)."""
    job = launch(values, wait=False)
    run_dir = Path(values["run_dir"])
    rank1 = _worker_pid(run_dir, 1)
    deadline = time.time() + 120
    while time.time() < deadline and len(tracking.read_metrics(run_dir)) < 1:
        time.sleep(0.2)
    os.kill(rank1, signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    return stderr, len(tracking.read_metrics(run_dir))


def cosine_with_warmup(step: int, warmup: int, total: int, peak: float) -> float:
    """The learning rate before optimizer step `step` (0-based), by the formula."""
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_two_processes_match_one_on_the_same_batch(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    common = dict(steps=4, warmup_ratio=0.25, lora_r=0, lr=1e-3, temperature=1e-4, batch_size=4, micro_batch_size=1,
                  save_every=2, keep_checkpoints=2)
    one, two = tmp_path / "one", tmp_path / "two"
    train(make_config(tiny_overrides(student, teacher, one, **common)))
    result = launch_two(tiny_overrides(student, teacher, two, **common))
    assert result.returncode == 0, result.stderr[-3000:]

    m1, m2 = tracking.read_metrics(one), tracking.read_metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3, 4]  # one line per step, written by one process
    expected_lr = [cosine_with_warmup(s, 1, 4, 1e-3) for s in range(4)]
    assert [m["optim/lr"] for m in m1] == pytest.approx(expected_lr, abs=1e-12)
    assert [m["optim/lr"] for m in m2] == pytest.approx(expected_lr, abs=1e-12)  # not stepped twice per step
    assert [m["rollout/tokens"] for m in m2] == [m["rollout/tokens"] for m in m1]
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    # Adam moves each weight by about lr per step whatever its gradient's size; the two runs sum the
    # same gradients in another order, which can flip the sign of a weight whose gradient is ~0.
    differ = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (differ < 1e-6).float().mean().item() > 0.99
    assert differ.max().item() <= 4 * 2 * 1e-3  # no more than a flipped sign at every step
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def _worker_pid(run_dir, rank: int, timeout: float = 60) -> int:
    """The pid of the training process of `rank` whose command line names run_dir (Linux /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"run_dir={run_dir}" in cmdline and "esrdistill.cli" in cmdline and f"RANK={rank}".encode() in environ:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process for {run_dir}")


def test_ctrl_c_on_one_process_stops_both_after_the_same_step_and_resumes_exactly(tiny_dirs, tmp_path):
    """SIGINT reaches process 1 only: both processes still stop after the same step (the flag is shared),
    one checkpoint is written, and resuming ends exactly where an uninterrupted 2-process run ends. K adapts
    (rollout_tokens=adaptive): every process computes it from the same reduced figures, and the resumed processes
    recompute it from metrics.jsonl; the loss carries IW-OPD's soft weights (token_weight=iw_opd)."""
    student, teacher = tiny_dirs
    common = dict(steps=16, lora_r=4, lr=1e-2, temperature=1e-4, batch_size=4, micro_batch_size=2, save_every=0,
                  rollout_tokens="adaptive", rollout_tokens_min=3, adaptive_patience=1, adaptive_kl_drop=0.99,
                  token_weight="iw_opd")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = launch_two(tiny_overrides(student, teacher, straight, **common))
    assert done.returncode == 0, done.stderr[-3000:]

    stderr, done = interrupt_process_1(launch_two, tiny_overrides(student, teacher, resumed, **common))
    assert stderr.count("interrupted after step") == 1, stderr[-3000:]  # said once, by the first process
    assert 1 <= done < 16  # 16 steps: room for the signal to land before the end on a fast machine
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == [f"step_{done:07d}"]
    result = launch_two(tiny_overrides(student, teacher, resumed, resume=True, **common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in tracking.read_metrics(resumed)] == list(range(1, 17))
    assert [m["loss"] for m in tracking.read_metrics(resumed)] == pytest.approx(
        [m["loss"] for m in tracking.read_metrics(straight)], rel=1e-6)
    assert [m["rollout/k"] for m in tracking.read_metrics(resumed)] == [m["rollout/k"] for m in tracking.read_metrics(straight)]


def test_a_user_error_on_one_process_stops_both_with_one_message(tiny_dirs, tmp_path):
    """The run directory check runs on process 0 only; process 1 must stop too, without a gloo traceback,
    and the message is printed once."""
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a run is already there
    result = launch_two(tiny_overrides(student, teacher, run, steps=1), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("already holds a run") == 1, result.stderr[-3000:]
    # torch's launcher reports the failed child in its own words (ChildFailedError); nothing comes from
    # our processes but the message: no frame of esrdistill, no gloo connection error
    assert "esrdistill/" not in result.stderr and "gloo" not in result.stderr.lower(), result.stderr[-3000:]


def test_a_config_error_under_the_launcher_says_that_its_traceback_is_the_launchers(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    result = launch_two(tiny_overrides(student, teacher, tmp_path / "run", steps=1, batch_size=3), timeout=120)
    assert result.returncode != 0
    err = result.stderr
    assert err.count("batch_size=3 must be a multiple of the 2 processes") == 1, err[-3000:]
    note = err.index("ChildFailedError traceback of its own: the error is the message above")
    assert note < err.index("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")


def test_a_new_best_evaluation_between_regular_saves_is_saved_by_every_process(tiny_dirs, tmp_path):
    """eval_every=1, save_every=3: the first evaluation is a new best at step 1, saved off the regular
    schedule; the first process alone knew it, waited for the others at the save, and the run hung."""
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    job = launch_two(tiny_overrides(student, teacher, run, steps=3, eval_every=1, save_every=3, temperature=1e-4), wait=False)
    try:
        _, stderr = job.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        for rank in (0, 1):  # the launcher starts each worker in a session of its own
            os.kill(_worker_pid(run, rank, timeout=5), signal.SIGKILL)
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        pytest.fail("the two processes hung")
    assert job.returncode == 0, stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001", "step_0000003"]
    assert [m["eval/best_step"] for m in tracking.read_metrics(run)] == [1, 1, 1]


@pytest.mark.parametrize("argv", [["train", "steps=0"], ["train", "--help-config"]])
def test_the_command_leaves_its_process_group_before_it_returns(tmp_path, argv):
    """Left to the interpreter's exit, gloo's threads can abort a process whose run succeeded (SIGABRT); the
    command destroys the group itself, whatever it returned (a config error here)."""
    import torch.distributed as dist

    from esrdistill.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        main(argv)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_processes_that_did_not_join_one_group_are_refused(tiny_dirs, tmp_path, monkeypatch):
    """On a machine without CUDA, a launch without device=cpu starts processes that each run alone (every one
    would train the whole run): refused at once, with one message saying what works."""
    from esrdistill import ranks
    from esrdistill.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks.check_joined("cpu", 2)
    with pytest.raises(ConfigError, match="started 2 processes but they did not join one process group .*pass device=cpu"):
        ranks.check_joined("auto", 1)
    student, teacher = tiny_dirs
    result = launch_two(tiny_overrides(student, teacher, tmp_path / "run", steps=1, device="auto"), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("did not join one process group (device=auto") == 1, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()
