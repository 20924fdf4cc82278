"""A run that stops before its end keeps every step it finished and says so once; a resume that cannot continue
its run, a run_dir that cannot be written and a damaged metrics file are refused before any model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from esrdistill import checkpoint, cli, models, tracking
from esrdistill.commands import quickstart
from esrdistill.config import make_config
from esrdistill.teachers import same
from esrdistill.teachers.served import ServedTeacherDown
from esrdistill.train import TrainingInterrupted, train
from helpers import tiny_overrides


def _args(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, dict) else ('null' if v is None else v)}" for k, v in values.items()]


def _files(run) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _teacher_fails_at_call(monkeypatch, failing_call: int):
    """SameTokenizer.score raises ServedTeacherDown from its `failing_call`-th call on (0-based), as a served
    teacher's does when its server stays down."""
    real, calls = same.SameTokenizer.score, []

    def score(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > failing_call:
            raise ServedTeacherDown("the teacher server at http://127.0.0.1:1 gave no answer in 2 tries")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(same.SameTokenizer, "score", score)
    return real


# ---- a teacher that fails mid-run --------------------------------------------------------------------------

def test_a_teacher_that_fails_mid_step_keeps_the_last_complete_step(tiny_dirs, tmp_path, monkeypatch, capsys):
    """save_every=0 and the teacher down in the middle of step 4 (its second micro-batch): the three finished
    steps are checkpointed before the run stops, and the resumed run ends as an uninterrupted one, row for row."""
    student, teacher_dir = tiny_dirs
    common = dict(steps=5, lora_r=4, lr=5e-3, temperature=1.0, save_every=0, batch_size=4, micro_batch_size=2)
    straight = tracking.read_metrics(train(make_config(tiny_overrides(student, teacher_dir, tmp_path / "straight", **common))))

    values = tiny_overrides(student, teacher_dir, tmp_path / "cut", **common)
    real = _teacher_fails_at_call(monkeypatch, failing_call=7)  # 2 micro-batches a step: the second of step 4
    assert cli.main(["train", *_args(values)]) == 1
    out, err = capsys.readouterr()
    assert "Saved the last complete step (3)" in out + err and "gave no answer" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_0000003"]
    assert [m["step"] for m in tracking.read_metrics(tmp_path / "cut")] == [1, 2, 3]

    monkeypatch.setattr(same.SameTokenizer, "score", real)
    resumed = tracking.read_metrics(train(make_config({**values, "resume": True})))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]


def test_a_teacher_that_fails_in_the_first_step_saves_nothing(tiny_dirs, tmp_path, monkeypatch, capsys):
    student, teacher_dir = tiny_dirs
    values = tiny_overrides(student, teacher_dir, tmp_path / "run", steps=3)
    _teacher_fails_at_call(monkeypatch, failing_call=0)
    assert cli.main(["train", *_args(values)]) == 1
    out, err = capsys.readouterr()
    assert "gave no answer" in err and "Saved the last" not in out + err
    assert checkpoint.latest(tmp_path / "run") is None


# ---- a resume that cannot continue its run --------------------------------------------------------------------

def _no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(models, "load_model", refuse)


def test_resuming_with_fewer_steps_than_the_newest_checkpoint_is_refused(tiny_dirs, tmp_path, monkeypatch, capsys):
    student, teacher_dir = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher_dir, run, steps=3, save_every=3)
    train(make_config(values))
    before = _files(run)
    _no_model_loads(monkeypatch)
    assert cli.main(["train", *_args({**values, "steps": 1, "resume": True})]) == 2
    err = capsys.readouterr().err
    assert "steps=1" in err and "checkpoint of step 3" in err and "steps=3 or more" in err and "Traceback" not in err
    assert _files(run) == before  # summary.json still says 3 steps; final/ untouched


def test_resuming_with_another_student_of_the_same_shape_is_refused(tiny_dirs, tmp_path, monkeypatch, capsys):
    student, teacher_dir = tiny_dirs  # two tiny Llamas of one shape: the adapter would load on either
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher_dir, run, steps=1, save_every=1)
    train(make_config(values))
    before = _files(run)
    _no_model_loads(monkeypatch)
    assert cli.main(["train", *_args({**values, "student": teacher_dir, "steps": 2, "resume": True})]) == 2
    err = capsys.readouterr().err
    assert f"student={teacher_dir}" in err and f"trains student={student}" in err and "Traceback" not in err
    assert _files(run) == before


def test_the_same_student_by_another_path_resumes(tiny_dirs, tmp_path, capsys):
    student, teacher_dir = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher_dir, run, steps=1, save_every=1)
    train(make_config(values))
    other_spelling = os.path.relpath(student)  # from the working directory
    assert other_spelling != student
    train(make_config({**values, "student": other_spelling, "steps": 2, "resume": True}))
    assert [m["step"] for m in tracking.read_metrics(run)] == [1, 2]
    assert "changed settings: steps\n" in capsys.readouterr().out  # not the student


# ---- a metrics row cut short ----------------------------------------------------------------------------------

def test_a_torn_last_metrics_row_is_dropped_on_resume(tiny_dirs, tmp_path, capsys):
    """The disk filled while step 3's row was written: the resume drops the torn line (with a note) and logs
    step 3 again, on a line of its own."""
    student, teacher_dir = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher_dir, run, steps=2, save_every=2)
    train(make_config(values))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.12')
    assert [m["step"] for m in tracking.read_metrics(run)] == [1, 2]
    train(make_config({**values, "steps": 3, "resume": True}))
    assert "was cut short" in capsys.readouterr().out
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_a_damaged_metrics_line_before_the_last_is_a_clear_error(tiny_dirs, tmp_path, monkeypatch, capsys):
    student, teacher_dir = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher_dir, run, steps=3, save_every=3)
    train(make_config(values))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    before = _files(run)
    _no_model_loads(monkeypatch)
    assert cli.main(["train", *_args({**values, "steps": 4, "resume": True})]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}, line 2 of 3" in err and "Traceback" not in err
    assert _files(run) == before


# ---- a run_dir that cannot be written -------------------------------------------------------------------------

def _read_only_dir() -> Path | None:
    """A directory that not even root can write in: /sys (a read-only mount on Linux), when it is one."""
    try:
        os.close(os.open("/sys/.esrdistill-probe", os.O_CREAT | os.O_WRONLY))
    except OSError:
        return Path("/sys")
    os.unlink("/sys/.esrdistill-probe")
    return None


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_a_run_dir_that_cannot_be_written_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "taken").write_text("not a directory")
    if where == "read-only" and _read_only_dir() is None:
        pytest.skip("no read-only directory here")
    run_dir = {"a file": tmp_path / "taken", "under a file": tmp_path / "taken" / "run",
               "read-only": (_read_only_dir() or tmp_path) / "esrdistill-run"}[where]
    _no_model_loads(monkeypatch)
    assert cli.main(["train", *_args(tiny_overrides("s", "t", run_dir))]) == 2
    err = capsys.readouterr().err
    expected = {"a file": "is a file, not a directory", "under a file": "which is a file", "read-only": "cannot write in"}[where]
    assert f"run_dir {run_dir}" in err and expected in err and "Traceback" not in err, err
    assert (tmp_path / "taken").read_text() == "not a directory"


# ---- Ctrl-C in the quickstart, a failed bench arm -------------------------------------------------------------

def test_ctrl_c_in_the_quickstart_says_how_to_continue_it(tmp_path, monkeypatch, capsys):
    """The quickstart's run directory is new each time: its message gives the quickstart's own command, with the
    user's settings and that run_dir, and that command resumes the training."""
    run_dir = tmp_path / "qs"
    before = SimpleNamespace(accuracy=0.0)
    monkeypatch.setattr(quickstart.build, "prepare_models", lambda cfg: None)
    monkeypatch.setattr(quickstart, "_run_eval", lambda cfg, model, view: {None: before})
    seen = []

    def interrupted(cfg):
        seen.append(cfg)
        raise TrainingInterrupted(2, Path(cfg.run_dir) / "checkpoints" / "step_0000002")

    monkeypatch.setattr(quickstart, "train", interrupted)
    assert cli.main(["quickstart", "seed=1", f"run_dir={run_dir}"]) == 130
    err = capsys.readouterr().err
    assert f"continue with `esrdistill quickstart seed=1 run_dir={run_dir} resume=true`" in err and "Traceback" not in err
    assert cli.main(["quickstart", "seed=1", f"run_dir={run_dir}", "resume=true"]) == 130
    assert seen[-1].resume is True and seen[-1].seed == 1 and seen[-1].run_dir == str(run_dir)


def test_a_bench_arm_that_fails_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from esrdistill.commands import bench

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    assert cli.main(["bench", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "the 'esr_k32' run failed (exit status 1" in err and "Traceback" not in err and "CalledProcessError" not in err


# ---- several processes: a failure on one stops all, and every message is said once ----------------------------

WORKER = Path(__file__).with_name("failing_teacher_worker.py")


@pytest.mark.slow
def test_a_teacher_failing_on_one_process_stops_every_process_after_saving(tiny_dirs, tmp_path):
    """Under `accelerate launch` with 2 processes, the teacher fails on process 1 alone during step 3: both stop
    (no hang), the two finished steps are checkpointed (save_every=0), and the message is printed once."""
    from test_multiprocess import _free_port

    student, teacher_dir = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher_dir, run, steps=5, batch_size=4, micro_batch_size=2, save_every=0)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(WORKER), "train", *_args(values)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert result.stderr.count("the teacher server refused a request on process 1") == 1, result.stderr[-3000:]
    assert "Saved the last complete step (2)" in result.stdout + result.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    assert [m["step"] for m in tracking.read_metrics(run)] == [1, 2]


def _esrdistill_launch(values: dict, wait: bool = True):
    """`esrdistill launch --multi_gpu --num_processes 2 ... train ...` (gloo on the CPU); wait=False: the running
    job, in a process group of its own (as a terminal's foreground job)."""
    from test_multiprocess import _free_port

    cmd = [sys.executable, "-m", "esrdistill.cli", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "train", *_args(values)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_ctrl_c_under_esrdistill_launch_ends_as_one_process_does(tiny_dirs, tmp_path):
    """A terminal's Ctrl-C reaches the launcher and both processes: one message, exit status 130, no launcher
    traceback, and the checkpoint of the step they stopped after."""
    import signal
    import time

    student, teacher_dir = tiny_dirs
    run = tmp_path / "run"
    job = _esrdistill_launch(tiny_overrides(student, teacher_dir, run, steps=16, batch_size=4, micro_batch_size=2), wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not tracking.read_metrics(run):
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGINT)  # the whole foreground job, as Ctrl-C in a terminal
    _, stderr = job.communicate(timeout=180)
    done = len(tracking.read_metrics(run))
    assert job.returncode == 130, stderr[-3000:]
    assert stderr.count("interrupted after step") == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{done:07d}"]


@pytest.mark.slow
def test_a_config_error_under_esrdistill_launch_is_one_message_and_status_2(tiny_dirs, tmp_path):
    student, teacher_dir = tiny_dirs
    result = _esrdistill_launch(tiny_overrides(student, teacher_dir, tmp_path / "run", batch_size=3))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("must be a multiple of the 2 processes") == 1
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]


def test_esrdistill_launch_keeps_the_first_processs_exit_status():
    from esrdistill.commands.launch import exit_status, split

    failure = lambda code: SimpleNamespace(exitcode=code)  # noqa: E731
    assert exit_status({1: failure(1), 0: failure(2)}) == 2
    assert exit_status({0: failure(-9)}) == 137  # killed by SIGKILL
    assert exit_status({0: failure(-15), 1: failure(2)}) == 2  # rank 1 failed first; the launcher then stopped rank 0
    assert exit_status({0: failure(-9), 1: failure(-15)}) == 137
    assert split(["--num_processes", "2", "train", "a.yaml", "steps=3"]) == (["--num_processes", "2"], ["train", "a.yaml", "steps=3"])
    with pytest.raises(Exception, match="names the script itself"):
        split(["-m", "esrdistill.cli", "train"])


def test_esrdistill_launch_help_says_whose_options_it_takes(capsys):
    assert cli.main(["launch", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: esrdistill launch [accelerate launch options] train") and "accelerate launch --help" in out
