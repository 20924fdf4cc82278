"""The quickstart's report of a several-teachers run, from made-up evaluations (no model runs)."""

import json

from esrdistill import quickstart
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
    monkeypatch.setattr(quickstart, "is_packaged", lambda spec: False)
    monkeypatch.setattr(quickstart, "train", lambda cfg: None)
    monkeypatch.setattr(quickstart, "read_metrics", lambda run_dir: [{"time/rollout_s": 1.0}])
    report = quickstart.quickstart([f"run_dir={tmp_path / 'run'}"], "teachers")
    out = capsys.readouterr().out
    assert report["student_after"]["accuracy"] == 0.625 and report["per_teacher"]["products"]["student_after"] == 0.25
    assert "| products | 4 | 100.0% | 0.0% | 25.0% |" in out
    assert "The rows of products gained less than 40 points: distillation did not teach the student those" in out
    assert "basic_arithmetic gained" not in out and "did not teach the student here" not in out
    assert json.loads((tmp_path / "run" / "quickstart.json").read_text())["per_teacher"] == report["per_teacher"]
