import json
import random
import shutil

import pytest

from esrdistill.commands import lab
from esrdistill.commands.lab_repro import QUICK, arms, claims, compare, undiagnosable


def test_solve_writes_each_step_of_the_recurrence_modulo_10():
    lines, value = lab.solve(3, "+", 7, 5)
    assert lines == ["a3+7=0", "b7+0=7", "c0+7=7", "d7+7=4", "e7+4=1"] and value == 1
    lines, value = lab.solve(2, "-", 8, 2)
    assert lines == ["a2-8=4", "b8-4=4"] and value == 4
    assert lab.parse("3+7e") == (3, "+", 7, 5)


def test_a_problem_holds_its_own_worked_solution_and_long_answers():
    rng = random.Random(0)
    tok = lab.make_tokenizer()
    lengths = []
    for _ in range(200):
        p = lab.make_problem(rng, lab.TaskSpec())
        lines, value = lab.solve(*lab.parse(p["question"]))
        assert p["solution"] == "\n".join(lines) + f"\n\\boxed{{{value}}}" and p["answer"] == str(value)
        assert lab.TaskSpec().steps_min <= len(lines) <= lab.TaskSpec().steps_max
        lengths.append(len(tok(p["solution"], add_special_tokens=False)["input_ids"]) + 1)  # + EOS
    assert min(lengths) >= 100 and max(lengths) <= 160


def test_grader_on_hand_made_responses():
    assert lab.grade("a3+7=0\nb7+0=7\n\\boxed{7}", "7")
    assert not lab.grade("a3+7=0\nb7+0=7\n\\boxed{1}", "7")
    assert not lab.grade("a3+7=0\nb7+0=7", "7")  # no box: no answer, even with the right number in the text
    assert lab.grade("\\boxed{3}\n\\boxed{7}", "7")  # the last box counts
    assert not lab.grade("\\boxed{}", "7")
    assert lab.step_accuracy("3+7c", "a3+7=0\nb7+0=7\nc0+7=7\n\\boxed{7}") == 1.0
    assert lab.step_accuracy("3+7c", "a3+7=0\nb7+0=8\nc0+8=8\n\\boxed{8}") == pytest.approx(1 / 3)


def test_the_tokenizer_round_trips_text_and_loads_from_disk(tmp_path):
    from transformers import AutoTokenizer

    tok = lab.make_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for p in lab.make_problems(20, 3, lab.TaskSpec()):
        for text in (p["question"], p["solution"]):
            ids = loaded(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)  # one token per character
            assert loaded.decode(ids) == text
            assert tok(text, add_special_tokens=False)["input_ids"] == ids
    prompt = loaded.apply_chat_template([{"role": "user", "content": "1+2"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "1+2\n"


def _row(arm, finals, bests=None, step_s=1.0):
    import statistics

    def spread(v):
        return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v), "max": max(v),
                "n": len(v)}

    return {"combo": {"arm": arm}, "final_accuracy": spread(finals), "best_accuracy": spread(bests or finals), "step_s": step_s}


def test_compare_calls_a_difference_only_beyond_the_seeds_noise():
    a, b = _row("a", [0.50, 0.52, 0.54]), _row("b", [0.40, 0.42, 0.44])  # std 0.02, se 0.0115, diff 0.10
    assert compare(a, b) == (pytest.approx(0.10), "holds")
    assert compare(b, a)[1] == "does not hold"
    c = _row("c", [0.30, 0.50, 0.70])  # std 0.2, se 0.115 > diff 0.08
    assert compare(c, _row("d", [0.40, 0.42, 0.44]))[1] == "within noise"
    assert compare(a, None)[1] == "not measured"


def test_claims_read_the_arms_they_name():
    grid = QUICK
    rows = [_row("full", [0.2, 0.2], bests=[0.4, 0.4], step_s=4.0), _row(f"esr_k{grid.k}", [0.5, 0.5], step_s=1.0),
            _row("prefix_mask", [0.5, 0.5]), _row("top_reverse_kl", [0.1, 0.1])]
    found = {c["claim"]: c for c in claims(rows, grid, None, None, {})}
    assert found["ESR beats a full rollout"]["verdict"] == "holds"
    assert "4.0x" in found["ESR's step is much faster"]["lab"]
    assert found["Position is not KL or entropy in disguise: the first K tokens beat the K chosen by a score"]["verdict"] == "holds"
    assert found["Full rollouts are less stable (drop from best to final)"]["lab"] == "best - final: full 20.0 pts, ESR 0.0 pts"
    assert [name for name, _ in arms(grid)] == ["full", "esr_k16", "progressive_1-16", "prefix_mask", "top_reverse_kl"]


def test_the_full_grid_has_an_adaptive_and_soft_weight_arms_and_their_claims():
    from esrdistill.commands.lab_repro import Grid
    from esrdistill.config import make_config

    grid = Grid()
    named = dict(arms(grid))
    assert named["adaptive"] == {"rollout_tokens": "adaptive", "rollout_tokens_min": 16}
    assert named["adaptive_peak"] == {**named["adaptive"], "adaptive_reference": "peak"}
    assert named["full_iw_opd"] == {"rollout_tokens": None, "token_weight": "iw_opd"} and "full_decay" in named
    for values in named.values():
        make_config(values)
    rows = [_row("full", [0.2, 0.2]), _row(f"esr_k{grid.k}", [0.5, 0.5]), _row("adaptive", [0.49, 0.51]),
            _row("full_iw_opd", [0.6, 0.6])]
    found = {c["claim"]: c for c in claims(rows, grid, None, None, {})}
    assert found["A K that adapts during training (rollout_tokens=adaptive, adaptive_reference=first)"]["verdict"] \
        == "same as fixed"
    assert not any("adaptive_reference=peak" in claim for claim in found)  # not run: no claim
    assert found["Soft token weights on full rollouts (token_weight=iw_opd)"]["verdict"] == "better than unweighted"
    assert "Soft token weights on full rollouts (token_weight=decay)" not in found  # not run: no claim


@pytest.mark.slow  # the lab end to end
def test_lab_repro_quick_end_to_end(tmp_path):
    """The whole pipeline on seconds-trained models: models, every arm with two seeds, diagnostics, claims, report."""
    from esrdistill.cli import main

    out = tmp_path / "lab"
    assert main(["lab", "repro", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "| claim | the paper | the lab | verdict |" in report
    result = json.loads((out / "lab.json").read_text())
    arm_names = [name for name, _ in arms(QUICK)]
    assert [r["combo"]["arm"] for r in result["rows"]] == arm_names
    for row in result["rows"]:
        assert row["final_accuracy"]["n"] == QUICK.seeds and row["pooled_problems"] == QUICK.seeds * QUICK.eval_problems
    metrics = [json.loads(line) for line in (out / "runs" / "progressive_1-16" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["rollout/k"] for m in metrics] == [1, 4, 8, 12]  # 1 + 15 * step // 4: K is reached at step 4 (0-based)
    assert {c["claim"] for c in result["claims"]} >= {"ESR beats a full rollout", "ESR's step is much faster"}
    assert (out / "diagnostics" / "esr" / "report.md").is_file() and (out / "arms.png").is_file()
    # everything is cached: a second call trains no model and reruns no arm
    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("runs/*/seed*/metrics.jsonl"), *out.glob("models/*/model.safetensors")]}
    assert main(["lab", "repro", "--quick", "--out", str(out)]) == 0
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # --arms: only the named arm runs again; every other row is the earlier report's
    shutil.rmtree(out / "runs" / "top_reverse_kl")
    assert main(["lab", "repro", "--quick", "--out", str(out), "--arms", "top_reverse_kl"]) == 0
    again = json.loads((out / "lab.json").read_text())
    assert [r["combo"]["arm"] for r in again["rows"]] == arm_names
    assert [r for r in again["rows"] if r["combo"]["arm"] != "top_reverse_kl"] == \
        [r for r in result["rows"] if r["combo"]["arm"] != "top_reverse_kl"]
    assert (out / "runs" / "top_reverse_kl" / "seed1" / "summary.json").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if "top_reverse_kl" not in str(p))
    assert "--arms top_reverse_kl" in (out / "report.md").read_text()
    # the earlier report's models are not these: its rows do not compare, and nothing runs
    result["models"]["student"]["accuracy"] += 0.25
    (out / "lab.json").write_text(json.dumps(result))
    shutil.rmtree(out / "runs" / "prefix_mask")
    assert main(["lab", "repro", "--quick", "--out", str(out), "--arms", "prefix_mask"]) == 1
    assert not (out / "runs" / "prefix_mask").exists()


def test_lab_repro_arms_refuses_an_unknown_arm_and_a_missing_report(tmp_path, capsys):
    from esrdistill.cli import main

    assert main(["lab", "repro", "--quick", "--out", str(tmp_path / "a"), "--arms", "full,esr_k99"]) == 1
    assert "no arm esr_k99" in capsys.readouterr().err
    assert main(["lab", "repro", "--quick", "--out", str(tmp_path / "b"), "--arms", "full"]) == 1
    assert "lab.json" in capsys.readouterr().err and not (tmp_path / "b" / "models").exists()


def test_lab_repro_arms_refuses_before_running_when_the_claims_diagnostics_cannot_exist(tmp_path, capsys):
    """A lab.json copied without its diagnostics/ (and without the runs they read) is refused before any model trains."""
    from esrdistill.cli import main

    out = tmp_path / "lab"
    out.mkdir()
    (out / "lab.json").write_text(json.dumps({"models": {}, "rows": []}))
    assert main(["lab", "repro", "--quick", "--out", str(out), "--arms", "prefix_mask"]) == 1
    err = capsys.readouterr().err
    assert "esr_k16" in err and "full" in err and "diagnostics" in err and not (out / "models").exists()


def test_undiagnosable_names_the_arms_with_neither_diagnostics_nor_student_nor_a_run(tmp_path):
    out = tmp_path / "lab"
    assert undiagnosable(out, QUICK, ("prefix_mask",)) == ["esr_k16", "full"]
    assert undiagnosable(out, QUICK, ("full", "prefix_mask")) == ["esr_k16"]  # full runs: its student will be there
    (out / "runs" / "esr_k16" / "seed0" / "final").mkdir(parents=True)
    assert undiagnosable(out, QUICK, ("prefix_mask",)) == ["full"]
    done = out / "diagnostics" / "full" / "diagnostics.json"
    done.parent.mkdir(parents=True)
    student = str(out / "runs" / "full" / "seed0" / "final")
    done.write_text(json.dumps({"student_after": student, "problems": QUICK.diagnose_problems + 1}))
    assert undiagnosable(out, QUICK, ("prefix_mask",)) == ["full"]  # made on another number of problems: not reused
    done.write_text(json.dumps({"student_after": student, "problems": QUICK.diagnose_problems}))
    assert undiagnosable(out, QUICK, ("prefix_mask",)) == []
