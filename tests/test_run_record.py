"""Nothing is lost on the failure paths: a run that cannot start leaves its directory as it was, what a
run will need is checked before its first step, and a kill at any point between a step's metrics row
and its checkpoint resumes to the same rows and weights as an uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from esrdistill import checkpoint, cli, tracking
from esrdistill.config import make_config
from esrdistill.errors import UserError
from esrdistill.train import train
from helpers import tiny_overrides

MISSING = ("vllm", "torch.utils.tensorboard", "wandb", "trackio")


def _args(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]


def _hide_packages(monkeypatch):
    """vLLM, TensorBoard, wandb and trackio not installed: importing them fails as it would then."""
    for name in MISSING:
        monkeypatch.setitem(sys.modules, name, None)


def _files(run) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ---- a run that cannot start leaves the directory as it was ---------------------------------------------

@pytest.mark.parametrize("needs", ["rollout_engine=vllm", "eval_engine=vllm", "tensorboard=true", "wandb=true", "trackio=true"])
def test_a_resume_that_needs_a_missing_package_stops_before_touching_the_run(tiny_dirs, tmp_path, monkeypatch, capsys, needs):
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=1, save_every=1, eval_every=1)
    train(make_config(values))
    before = _files(run)
    _hide_packages(monkeypatch)
    key, value = needs.split("=")
    code = cli.main(["train", *_args({**values, "resume": True, "steps": 3, key: value})])
    err = capsys.readouterr().err
    assert code == 1 and f"{needs} needs" in err and "Traceback" not in err, err
    assert _files(run) == before  # config.yaml, metrics.jsonl, checkpoints: all as they were


def test_a_resume_whose_engine_fails_to_build_leaves_config_yaml_as_it_was(tiny_dirs, tmp_path, monkeypatch):
    from esrdistill import build

    student, teacher = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=1, save_every=1)
    train(make_config(values))
    before = _files(run)

    def broken(*args, **kwargs):
        raise UserError("the engine could not start")

    monkeypatch.setattr(build, "engine", broken)
    assert cli.main(["train", *_args({**values, "resume": True, "steps": 3, "lr": 0.5})]) == 1
    assert _files(run) == before


def test_tensorboard_without_the_package_leaves_no_metrics_file_behind(tiny_dirs, tmp_path, monkeypatch, capsys):
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=1)
    _hide_packages(monkeypatch)
    assert cli.main(["train", *_args({**values, "tensorboard": True})]) == 1
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (run / "metrics.jsonl").exists()
    assert cli.main(["train", *_args(values)]) == 0  # the next plain run in that directory is not refused
    # and the logger itself starts TensorBoard before it creates metrics.jsonl
    with pytest.raises(UserError, match="tensorboard=true needs the tensorboard package"):
        tracking.MetricsLogger(tmp_path / "other", {}, tensorboard=True)
    assert not (tmp_path / "other" / "metrics.jsonl").exists()


def test_eval_engine_vllm_without_vllm_fails_before_the_first_step(tiny_dirs, tmp_path, monkeypatch, capsys):
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    _hide_packages(monkeypatch)
    values = tiny_overrides(student, teacher, run, steps=4, eval_every=2, save_every=2, eval_engine="vllm")
    assert cli.main(["train", *_args(values)]) == 1
    err = capsys.readouterr().err
    assert "eval_engine=vllm needs vLLM" in err and "rollout_engine" not in err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("change", [{"lora_r": 8}, {"lora_r": 0}])
def test_resuming_with_another_lora_r_is_a_clear_error(tiny_dirs, tmp_path, capsys, change):
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=1, save_every=1)
    train(make_config(values))
    before = _files(run)
    assert cli.main(["train", *_args({**values, "resume": True, "steps": 2, **change})]) == 1
    err = capsys.readouterr().err
    assert "does not fit this student" in err or "holds no model.safetensors" in err
    assert "lora_r" in err and "Traceback" not in err
    assert _files(run) == before


# ---- a kill between a step's row and its checkpoint -----------------------------------------------------

class _Killed(BaseException):
    """SIGKILL, as far as the run can tell: nothing after it runs, no handler sees it."""


@pytest.mark.parametrize("when", ["after_the_checkpoint", "before_the_checkpoint"])
def test_a_kill_around_a_checkpoint_loses_no_row(tiny_dirs, tmp_path, monkeypatch, when):
    """Killed at step 3 just after its checkpoint is in place (or just before): the resumed run has every
    row, the same losses, the same best evaluation and the same weights as an uninterrupted one."""
    student, teacher = tiny_dirs
    common = dict(steps=5, lora_r=0, lr=5e-3, temperature=1.0, save_every=1, eval_every=3)
    straight = tmp_path / "straight"
    train(make_config(tiny_overrides(student, teacher, straight, **common)))

    killed = tmp_path / "killed"
    values = tiny_overrides(student, teacher, killed, **common)
    real_save = checkpoint.save

    def save_then_die(run_dir, step, *args, **kwargs):
        if step == 3 and when == "before_the_checkpoint":
            raise _Killed
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 3:
            raise _Killed
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(_Killed):
        train(make_config(values))
    monkeypatch.setattr(checkpoint, "save", real_save)
    train(make_config({**values, "resume": True}))

    rows_a, rows_b = tracking.read_metrics(straight), tracking.read_metrics(killed)
    assert [m["step"] for m in rows_b] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in rows_b] == [m["loss"] for m in rows_a]
    assert [m.get("eval/best_step") for m in rows_b] == [m.get("eval/best_step") for m in rows_a] == [None, None, 3, None, 3]
    summaries = [json.loads((run / "summary.json").read_text()) for run in (straight, killed)]
    assert summaries[0]["best_eval_step"] == summaries[1]["best_eval_step"] == 3
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(killed / "final").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow  # two training runs in their own processes, then trackio's local store read back
def test_trackio_holds_the_numbers_of_metrics_jsonl_and_a_resume_continues_its_run(tiny_dirs, tmp_path):
    pytest.importorskip("trackio")
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "store")}  # the real package, its local store, no network
    values = tiny_overrides(student, teacher, run, steps=1, save_every=1, trackio=True, trackio_project="p", trackio_run="r")
    for extra in ({}, {"resume": True, "steps": 2}):
        done = subprocess.run([sys.executable, "-m", "esrdistill.cli", "train", *_args({**values, **extra})], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    read = subprocess.run([sys.executable, "-c", "import json; from trackio.sqlite_storage import SQLiteStorage; "
                           "print(json.dumps(SQLiteStorage.get_logs('p', 'r'), default=str))"],
                          env=env, capture_output=True, text=True, timeout=120)
    logs = json.loads(read.stdout.strip().splitlines()[-1])
    rows = tracking.read_metrics(run)
    assert [log["step"] for log in logs] == [row["step"] for row in rows] == [1, 2]  # one trackio run, resumed
    for log, row in zip(logs, rows):
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        assert numbers and {k: log[k] for k in numbers} == pytest.approx(numbers)
