"""The quickstart's report of a several-teachers run, from made-up evaluations (no model runs)."""

import json
from pathlib import Path

from esrdistill.commands import quickstart
from esrdistill.evaluate import ProblemResult, summarise


def _result(correct: list[bool]):
    return summarise([ProblemResult(prompt="q", reference="1", responses=["r"], answers=["1"], correct=[c], lengths=[3],
                                    ended=[True], repeats=[0.0], markers=[1]) for c in correct], 0.0)


def test_a_task_that_was_not_taught_is_named_even_when_the_whole_set_was(tmp_path, monkeypatch, capsys):
    accuracy = {("teacher", "basic_arithmetic"): 1.0, ("teacher", "products"): 1.0,
                ("before", "basic_arithmetic"): 0.0, ("before", "products"): 0.0,
                ("after", "basic_arithmetic"): 1.0, ("after", "products"): 0.25}

    def run_eval(cfg, model, view, progress, teacher):
        stage = "teacher" if view == "teacher" else ("after" if model.endswith("final") else "before")
        return _result([i < 4 * accuracy[stage, teacher] for i in range(4)])

    monkeypatch.setattr(quickstart, "run_eval", run_eval)
    monkeypatch.setattr(quickstart.build, "prepare_models", lambda cfg: None)
    def train(cfg):  # one logged step, as a run leaves it
        Path(cfg.run_dir).mkdir(parents=True)
        row = {"step": 1, "loss": 0.5, "rollout/tokens": 8, "time/rollout_s": 1.0, "time/step_s": 2.0}
        (Path(cfg.run_dir) / "metrics.jsonl").write_text(json.dumps(row) + "\n")

    monkeypatch.setattr(quickstart, "train", train)
    report = quickstart.quickstart([f"run_dir={tmp_path / 'run'}"], "teachers")
    out = capsys.readouterr().out
    assert report["student_after"]["accuracy"] == 0.625 and report["per_teacher"]["products"]["student_after"] == 0.25
    assert "| products | 4 | 100.0% | 0.0% | 25.0% |" in out
    assert "The rows of products gained less than 40 points: distillation did not teach the student those" in out
    assert "basic_arithmetic gained" not in out and "did not teach the student here" not in out
    assert json.loads((tmp_path / "run" / "quickstart.json").read_text())["per_teacher"] == report["per_teacher"]
    assert (tmp_path / "run" / "curves.png").is_file() and "| run | 1 | 2 | 8 |" in (tmp_path / "run" / "curves.md").read_text()
