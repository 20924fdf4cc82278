"""`esrdistill study`: the study file, the held-out split it relies on, one run's record against a slow reckoning
of its metrics, the report's means, and the quick study end to end on tiny models (written, resumable)."""

from __future__ import annotations

import json
import statistics

import pytest

from esrdistill.cli import main
from esrdistill.commands import study as study_mod
from esrdistill.commands import studyreport
from esrdistill.config import ConfigError, load_config
from esrdistill.data import DataError, load_task

REQUIRED = ("pair", "arm", "rollout_tokens", "max_new_tokens", "token_select", "loss", "seed", "data_seed",
            "teacher_accuracy", "student_before", "student_after", "eval_problems", "steps", "seconds",
            "generated_tokens", "mean_response_tokens", "seconds_to_target")


# ---- the packaged task and eval_split --------------------------------------------------------------------
def test_the_packaged_tasks_test_problems_are_the_same_for_every_seed_and_never_trained_on():
    tasks = [load_task("packaged:worked_sums", eval_prompts=100, fewshot=4, num_prompts=None, eval_split="test", seed=s)
             for s in (0, 1, 2)]
    assert all([p.prompt for p in t.eval] == [p.prompt for p in tasks[0].eval] for t in tasks)
    assert len(tasks[0].eval) == 100
    for t in tasks:
        trained = {p.prompt for p in t.train + t.fewshot}
        assert not trained & {p.prompt for p in t.eval}
        names = {p.prompt.split()[0] for p in t.eval}
        assert not names & {p.prompt.split()[0] for p in t.train}  # held out by names too, not only by text
    assert [p.prompt for p in tasks[0].train[:5]] != [p.prompt for p in tasks[1].train[:5]]  # the seed moves training


def test_every_worked_answer_adds_the_questions_numbers_in_five_lines_long_enough_for_K_to_cut():
    import re

    from esrdistill.data import packaged_datasets

    for split in ("train", "test"):
        for line in (packaged_datasets()["worked_sums"] / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            a, b = map(int, re.findall(r"\d+", row["question"]))
            assert row["answer"] == str(a + b)
            lines = row["solution"].split("\n")
            assert len(lines) == 5 and f"{a} + {b} = {a + b}." in lines[3] and f" {a + b} " in lines[4]
            assert len(row["solution"]) > 130  # with its tag 55-65 SmolLM2 tokens: K=16 or 32 cuts it


def test_training_rows_with_an_evaluation_prompt_are_left_out(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in (3, 4, 20)))
    task = load_task(str(tmp_path), eval_prompts=3, fewshot=1, num_prompts=None, eval_split="test", seed=0)
    assert [p.prompt for p in task.eval] == ["q3", "q4", "q20"]  # the split's own order
    assert task.held_out == 2
    assert sorted(p.prompt for p in task.train + task.fewshot) == sorted(f"q{i}" for i in range(10) if i not in (3, 4))


def test_eval_split_refusals_name_what_exists():
    with pytest.raises(DataError, match="reasoning-gym task has no splits"):
        load_task("reasoning_gym:chain_sum", eval_prompts=2, eval_split="test")
    with pytest.raises(DataError, match="no split 'dev': its splits are test, train"):
        load_task("packaged:worked_sums", eval_prompts=2, eval_split="dev")
    with pytest.raises(DataError, match="no packaged dataset 'sums'.*worked_sums"):
        load_task("packaged:sums", eval_prompts=2)
    with pytest.raises(DataError, match="has 100 usable rows, but eval_prompts=200"):
        load_task("packaged:worked_sums", eval_prompts=200, eval_split="test")


# ---- the study file ----------------------------------------------------------------------------------------
def test_the_shipped_studies_load_and_every_arm_is_a_valid_config(tmp_path):
    for name in study_mod.STUDIES:
        st = study_mod.load_study(name)
        assert len(st.seeds) >= 3 and st.arms and st.diagnose["after"] in st.arms
        (tmp_path / "config.yaml").write_text(json.dumps(st.config))
        runs = study_mod.plan(st, tmp_path, {})
        assert len(runs) == len(st.arms) * len(st.seeds)
        assert {r.values["seed"] for r in runs} == set(st.seeds)
        assert all(r.values["seed"] == r.values["data_seed"] for r in runs)
        kinds = {(load_config(str(tmp_path / "config.yaml"), r.values).rollout_tokens is None) for r in runs}
        assert kinds == {True, False}  # ESR and full rollouts side by side


def test_a_setting_added_at_its_default_keeps_a_records_key():
    plain = load_config(None, {"steps": 3})
    assert study_mod.config_key(plain) == study_mod.config_key(load_config(None, {"steps": 3, "token_weight": "none"}))
    assert study_mod.config_key(plain) != study_mod.config_key(load_config(None, {"steps": 3, "token_weight": "decay"}))
    assert study_mod.config_key(plain) != study_mod.config_key(load_config(None, {"steps": 4}))


@pytest.mark.parametrize("text, message", [
    ("config: {steps: 2}\narms: {a: {}}\nseeds: [0]\nextra: 1\n", "unknown keys extra"),
    ("config: {steps: 2}\narms: {}\nseeds: [0]\n", "'arms' must be a non-empty dict"),
    ("config: {steps: 2}\narms: {a: {}}\nseeds: [-1]\n", "seeds must be non-negative"),
    ("config: {steps: 2}\narms: {a: {}}\nseeds: [0]\ntarget: 2\n", "target is a fraction"),
    ("config: {steps: 2}\narms: {a: {}}\nseeds: [0]\ndiagnose: {after: b}\n", "diagnose.after must name an arm"),
    ("config: {steps: 2}\narms: {a: {seed: 3}}\nseeds: [0]\n", "seed is set by the study itself"),
])
def test_a_bad_study_file_is_refused_before_any_run(tmp_path, text, message):
    path = tmp_path / "study_bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        st = study_mod.load_study(str(path))
        (tmp_path / "config.yaml").write_text(json.dumps(st.config))
        study_mod.plan(st, tmp_path, {})


def test_an_unknown_study_arm_or_seed_is_a_one_line_error(capsys):
    assert main(["study", "nonesuch"]) == 2
    assert "no study 'nonesuch': name a shipped one (same, cross)" in capsys.readouterr().err
    assert main(["study", "same", "--arms", "esr99", "--out", "/tmp/esrdistill-test-study-arms"]) == 2
    assert "--arms esr99: the study's arms are full, esr32" in capsys.readouterr().err


# ---- one run's record, against a slow reckoning ------------------------------------------------------------
def test_a_runs_record_is_what_its_metrics_say(tmp_path):
    run_dir = tmp_path / "esr" / "seed0"
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(1, 7):
        row = {"step": step, "time/step_s": 2.0 + step, "time/rollout_s": 1.0, "rollout/tokens": 10 * step,
               "rollout/len_mean": 5.0 + step, "rollout/eos_frac": step / 10, "loss": 1.0 / step}
        if step % 2 == 0:
            row.update({"time/eval_s": 1.5, "eval/accuracy": {2: 0.2, 4: 0.7, 6: 0.6}[step], "eval/n": 10,
                        "eval/accuracy_ci_low": 0.1, "eval/accuracy_ci_high": 0.9, "eval/len_mean": 20.0, "eval/cut_frac": 0.0})
        if step == 3:
            row["time/save_s"] = 0.5
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    st = study_mod.Study(name="t", pair="p", config={}, arms={"esr": {}}, seeds=[0], target=0.9)
    cfg = load_config(None, {"rollout_tokens": 8, "steps": 6})
    run = study_mod.StudyRun(arm="esr", seed=0, run_dir=run_dir, values={})
    rec = study_mod.record(st, run, cfg, {"accuracy": 0.75, "ci": [0.5, 0.9]}, {"accuracy": 0.0, "ci": [0, 0.3], "problems": 10}, "abc")
    train_s = [2.0 + s - (1.5 if s % 2 == 0 else 0) - (0.5 if s == 3 else 0) for s in range(1, 7)]
    assert rec["seconds"] == pytest.approx(sum(train_s))
    assert rec["seconds_with_eval"] == pytest.approx(sum(2.0 + s for s in range(1, 7)))
    assert rec["student_after"] == 0.6 and rec["best_accuracy"] == 0.7 and rec["best_minus_final"] == pytest.approx(0.1)
    assert rec["target_accuracy"] == pytest.approx(0.675)  # 90% of the teacher's 75%: first reached at step 4
    assert rec["steps_to_target"] == 4 and rec["seconds_to_target"] == pytest.approx(sum(train_s[:4]))
    assert rec["tokens_to_target"] == 10 + 20 + 30 + 40 and rec["generated_tokens"] == 210
    assert rec["mean_response_tokens"] == pytest.approx(statistics.fmean(5.0 + s for s in range(1, 7)))
    assert rec["cut_per_step"] == pytest.approx([1 - s / 10 for s in range(1, 7)])
    assert [p["step"] for p in rec["curve"]] == [0, 2, 4, 6] and rec["curve"][0]["accuracy"] == 0.0
    assert all(key in rec for key in REQUIRED)
    higher = study_mod.record(st, run, cfg, {"accuracy": 1.0, "ci": [0.7, 1]}, {"accuracy": 0.0, "ci": [0, 0.3], "problems": 10}, "abc")
    assert higher["seconds_to_target"] is None and higher["steps_to_target"] is None  # 90% of 100% is never reached


def test_the_report_means_and_spreads_are_those_of_the_seeds():
    records = [{"arm": "a", "seed": s, "rollout_tokens": 8, "max_new_tokens": 32, "token_select": "prefix", "loss": "forward_kl",
                "teacher_accuracy": 0.8, "student_before": 0.0, "student_after": acc, "best_minus_final": 0.0, "steps": 10,
                "seconds": sec, "seconds_per_step": sec / 10, "generated_tokens": 100, "mean_response_tokens": 8.0,
                "cut_frac": 1.0, "after_len_mean": 9.0, "seconds_to_target": hit, "tokens_to_target": None if hit is None else 50}
               for s, acc, sec, hit in ((0, 0.5, 10.0, None), (1, 0.7, 20.0, 12.0), (2, 0.9, 30.0, 18.0))]
    (row,) = studyreport.arm_rows(records)
    assert row["student_after"]["mean"] == pytest.approx(0.7)
    assert row["student_after"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert row["reached"] == 2 and row["seconds_to_target"]["mean"] == pytest.approx(15.0)
    assert row["seeds"] == [0, 1, 2]


# ---- the quick study end to end ----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_quick_study_writes_every_field_and_a_second_call_trains_nothing(tmp_path, tiny_dirs, monkeypatch):
    student, teacher = tiny_dirs
    out, report = tmp_path / "runs", tmp_path / "report"
    args = ["study", "same", "--quick", "--out", str(out), "--report", str(report), f"student={student}", f"teacher={teacher}"]
    assert main(args) == 0
    records = json.loads((report / "runs.json").read_text())
    assert [(r["arm"], r["seed"]) for r in records] == [("esr16", 0), ("full", 0), ("esr16", 1), ("full", 1)]  # seed by seed
    for rec in records:
        assert all(key in rec for key in REQUIRED), [k for k in REQUIRED if k not in rec]
        assert rec["steps"] == 2 and rec["eval_problems"] == 4 and rec["data_seed"] == rec["seed"]
        assert len(rec["curve"]) == 3 and len(rec["len_per_step"]) == 2
    assert {r["rollout_tokens"] for r in records} == {16, None}
    text = (report / "report.md").read_text()
    assert "| esr16 | ESR, K=16 |" in text and "| full | full (up to 24) |" in text
    assert "esrdistill study same --quick" in text and "teacher continues the student's rollout" in text
    assert (report / "same.png").stat().st_size > 0 and (report / "diagnose-same" / "diagnostics.json").is_file()
    made = json.loads((out / "esr16" / "seed0" / "study.json").read_text())  # the code that trained it, kept with it
    assert made["commits"] == [records[0]["commit"]] and made["commands"] == [records[0]["command"]]
    assert records[0]["command"].startswith("esrdistill study same --quick --out ")

    import esrdistill.commands.study as study_module

    def no_training(cfg):
        raise AssertionError(f"trained {cfg.run_dir} again")

    monkeypatch.setattr(study_module, "train", no_training)
    (out / "esr16" / "seed0" / "study.json").write_text(json.dumps({"commits": ["abc1234"], "commands": ["earlier"],
                                                                    "note": "timed beside another job"}))
    assert main(args) == 0  # everything is done: nothing is trained, the report is rewritten
    again = json.loads((report / "runs.json").read_text())
    assert len(again) == 4
    assert [r["commit"] for r in again if (r["arm"], r["seed"]) == ("esr16", 0)] == ["abc1234"]  # not today's code
    assert "- esr16 seed 0: timed beside another job" in (report / "report.md").read_text()

    import shutil

    shutil.rmtree(out / "full" / "seed1")  # a fresh checkout: the runs are gone, runs.json is not
    shutil.rmtree(out / "before")  # and so are the accuracies before training and the diagnostics
    shutil.rmtree(out / "diagnose")
    evaluate, diagnose = study_module.run_eval, study_module.diagnose

    def no_work(*args, **kwargs):
        raise AssertionError("evaluated or diagnosed again")

    monkeypatch.setattr(study_module, "run_eval", no_work)
    monkeypatch.setattr(study_module, "diagnose", no_work)
    assert main(args) == 0  # its record stands for it, with the same settings: nothing is trained
    assert len(json.loads((report / "runs.json").read_text())) == 4
    kept = json.loads((report / "before-same.json").read_text())  # beside runs.json: what the report's seeds had
    assert sorted(kept) == ["student-any", "teacher-data_seed0", "teacher-data_seed1"]
    assert [r["teacher_accuracy"] for r in again] == [r["teacher_accuracy"] for r in json.loads((report / "runs.json").read_text())]
    monkeypatch.setattr(study_module, "run_eval", evaluate)
    monkeypatch.setattr(study_module, "diagnose", diagnose)
    with pytest.raises(AssertionError, match="trained .*full/seed1 again"):  # other settings: it is trained
        main(args + ["lr=1e-3"])


def test_the_diagnostics_summary_reads_the_share_at_K_and_the_kl_beyond_K():
    result = {"decay": {"ks": [0, 8, 16], "teacher_continues_student": [0.9, 0.5, 0.2], "student_continues_teacher": [0, 0.3, 0.8],
                        "n": 10},
              "profile": {"kl_share_without_first": {"8": 0.4, "16": 0.7, "24": 0.9}, "first_position_kl_share": 0.1},
              "cascading": {"bucket_starts": [0, 8, 16, 24], "before": [1.0, 2.0, 3.0, 5.0], "after": [0.5, 1.0, 2.0, None]}}
    d = studyreport.diagnostics_summary(result, k=20)
    assert d["share_k"] == 16 and d["kl_share_without_first"] == 0.7  # the largest measured prefix within K
    assert d["beyond_k_before"] == pytest.approx(5.0)  # buckets starting at or after K=20: only 24
    assert d["beyond_k_after"] is None  # its only bucket beyond K is empty
    assert d["within_k_before"] == pytest.approx(2.0) and d["within_k_after"] == pytest.approx(3.5 / 3)
    assert studyreport.diagnostics_summary(result, k=16)["beyond_k_before"] == pytest.approx(4.0)


def test_the_accuracies_before_training_are_computed_once(tmp_path, monkeypatch):
    from esrdistill.evaluate import summarise

    calls = []

    def fake_eval(cfg, model, view="student", progress=True, **kw):
        calls.append((model, view, cfg.data_seed))
        return summarise([], 0.0)

    monkeypatch.setattr(study_mod, "run_eval", fake_eval)
    for seed in (0, 1, 0, 1):
        cfg = load_config(None, {"data_seed": seed, "eval_split": "test", "dataset": "packaged:worked_sums"})
        study_mod.before(cfg, tmp_path, "teacher", say=lambda _: None)
        study_mod.before(cfg, tmp_path, "student", say=lambda _: None)
    views = [(view, seed) for _, view, seed in calls]
    assert views == [("teacher", 0), ("student", 0), ("teacher", 1)]  # the zero-shot student's problems do not move with the seed

    kept, fresh = tmp_path / "report" / "before-same.json", tmp_path / "fresh"  # kept beside the report, reused
    cfg = load_config(None, {"data_seed": 0, "eval_split": "test", "dataset": "packaged:worked_sums"})
    study_mod.before(cfg, tmp_path, "teacher", say=lambda _: None, kept=kept, settings="a")  # from OUT/before
    assert len(calls) == 3 and json.loads(kept.read_text())["teacher-data_seed0"]["settings"] == "a"
    study_mod.before(cfg, fresh, "teacher", say=lambda _: None, kept=kept, settings="a")  # a fresh checkout
    assert len(calls) == 3 and (fresh / "before" / "teacher-data_seed0.json").is_file()
    study_mod.before(cfg, tmp_path / "other", "teacher", say=lambda _: None, kept=kept, settings="b")  # other settings
    assert len(calls) == 4 and json.loads(kept.read_text())["teacher-data_seed0"]["settings"] == "b"


def test_what_a_final_accuracy_is_made_of_the_format_and_the_last_number(tmp_path):
    (tmp_path / "eval").mkdir()
    problems = [{"reference": "11", "responses": ["So Noah has 11 shells now.\n<answer>11</answer>"], "answers": ["11"]},
                {"reference": "9", "responses": ["4 + 5 = 9 buttons.\nThe answer is 9."], "answers": [None]},
                {"reference": "16", "responses": ["Adding 16: 17\nAdding 17: 18"], "answers": [None]},
                {"reference": "3", "responses": ["no number at all"], "answers": [None]}]
    (tmp_path / "eval" / "step_0000002.json").write_text(json.dumps({"problems": []}))
    (tmp_path / "eval" / "step_0000004.json").write_text(json.dumps({"problems": problems}))  # the last one counts
    assert study_mod.answer_forms(tmp_path) == {"after_answer_extracted": 0.25, "after_last_number_right": 0.5}
    assert study_mod.answer_forms(tmp_path / "nowhere") == {"after_answer_extracted": None, "after_last_number_right": None}
