"""scripts/check_quickstart.py, CI's check that the quickstart taught, on reports written here."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_quickstart.py"


def _report(run_dir: Path, before: float, after: float) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "quickstart.json").write_text(json.dumps({
        "teacher_before": {"accuracy": 0.85}, "student_before": {"accuracy": before}, "student_after": {"accuracy": after}}))
    return run_dir


def _check(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_a_student_that_reached_the_floor_with_the_gain_passes(tmp_path):
    done = _check(_report(tmp_path / "qs", 0.0, 0.81))
    assert done.returncode == 0 and "taught" in done.stdout


def test_too_low_an_accuracy_or_too_small_a_gain_fails(tmp_path):
    low = _check(_report(tmp_path / "low", 0.0, 0.55))
    small = _check(_report(tmp_path / "small", 0.3, 0.65))
    assert low.returncode == 1 and "FAILED" in low.stdout
    assert small.returncode == 1 and "FAILED" in small.stdout


def test_without_a_run_dir_the_newest_quickstart_is_checked(tmp_path):
    _report(tmp_path / "runs" / "quickstart-20260101-000000", 0.0, 0.9)
    assert _check(cwd=tmp_path).returncode == 0
    assert _check(cwd=tmp_path / "runs").returncode == 1  # no runs/ below: a clear message, not a traceback
