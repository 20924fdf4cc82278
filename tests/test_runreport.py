"""`esrdistill report`: a run's curves and table from its metrics.jsonl, every figure from the logged rows."""

import json

import pytest

from esrdistill import cli
from esrdistill.commands import runreport


def _write_run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=6, step_s=2.0, tokens=40, evals=None, eos=None):
    """n made-up steps of step_s seconds and `tokens` generated tokens; evals: {step: accuracy}; eos: eos_frac per step."""
    evals, rows = evals or {}, []
    for i in range(1, n + 1):
        row = {"step": i, "loss": 1.0 / i, "kl/reverse": 2.0 / i, "rollout/len_mean": 10.0 + i, "rollout/tokens": tokens,
               "rollout/eos_frac": (eos or [0.5] * n)[i - 1], "time/step_s": step_s, "time/rollout_s": step_s / 2,
               "time/teacher_s": step_s / 4, "time/train_s": step_s / 4}
        if i in evals:
            row["eval/accuracy"] = evals[i]
            row["time/eval_s"] = 1.0
        rows.append(row)
    return rows


def test_time_to_target_is_the_first_evaluation_at_or_above_it_with_the_time_and_tokens_so_far():
    rows = _rows(n=6, step_s=2.0, tokens=40, evals={2: 0.3, 4: 0.8, 6: 0.9})
    assert runreport.time_to(rows, 0.8) == {"step": 4, "seconds": 8.0, "generated_tokens": 160}
    assert runreport.time_to(rows, 0.3) == {"step": 2, "seconds": 4.0, "generated_tokens": 80}
    assert runreport.time_to(rows, 0.95) is None


def test_the_summary_of_a_run_equals_the_sums_and_means_of_its_rows():
    eos = [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    rows = _rows(n=6, step_s=3.0, evals={3: 0.5, 6: 0.4}, eos=eos)
    s = runreport.summary(rows, target=0.5)
    assert s["steps"] == 6 and s["seconds"] == 18.0 and s["generated_tokens"] == 240
    assert s["phase_seconds"] == {"rollout": 1.5, "teacher": 0.75, "train": 0.75, "eval": 2.0 / 6}
    assert s["cut_frac"] == pytest.approx(sum(1 - e for e in eos) / 6)
    assert s["cut_frac_last5"] == pytest.approx(sum(1 - e for e in eos[1:]) / 5)
    assert s["len_mean"] == pytest.approx(sum(10.0 + i for i in range(1, 7)) / 6)
    assert (s["loss_first"], s["loss_last"]) == (1.0, 1.0 / 6)
    assert (s["eval_first"], s["eval_best"], s["eval_best_step"], s["eval_last"]) == (0.5, 0.5, 3, 0.4)
    assert s["to_target"] == {"step": 3, "seconds": 9.0, "generated_tokens": 120}


def test_report_writes_the_picture_and_a_table_of_every_run(tmp_path, capsys):
    a = _write_run(tmp_path / "esr", _rows(evals={3: 0.5, 6: 0.9}))
    b = _write_run(tmp_path / "full", _rows(step_s=10.0, evals={6: 0.6}))
    assert cli.main(["report", str(a), str(b), "--out", str(tmp_path / "out"), "--target", "0.8"]) == 0
    text = (tmp_path / "out" / "curves.md").read_text()
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [line for line in text.splitlines() if line.startswith("| esr") or line.startswith("| full")]
    assert table[0].startswith("| esr | 6 | 12 | 240 |") and table[0].endswith("| 6, 12, 240 |")
    assert table[1].startswith("| full | 6 | 60 | 240 |") and table[1].endswith("| never |")
    assert "wrote" in capsys.readouterr().out


def test_one_run_is_reported_in_its_own_directory(tmp_path):
    run = _write_run(tmp_path / "run", _rows())
    path = runreport.report([str(run)])
    assert path == run / "curves.md" and (run / "curves.png").is_file()
    assert "| run | 6 |" in path.read_text()


@pytest.mark.parametrize("case", ["not a run", "empty", "bad target"])
def test_what_cannot_be_reported_is_one_line(tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    run = _write_run(tmp_path / "run", _rows())
    args, message = {"not a run": ([str(tmp_path)], "holds no metrics.jsonl"),
                     "empty": ([str(tmp_path / "empty")], "holds no step yet"),
                     "bad target": ([str(run), "--target", "80"], "--target is an accuracy between 0 and 1")}[case]
    assert cli.main(["report", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
