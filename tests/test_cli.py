import json

import pytest
import torch

from esrdistill import cli
from esrdistill.commands import bench
from helpers import tiny_overrides


def test_eval_command_reports_accuracy_and_writes_json(tiny_dirs, tmp_path, capsys):
    student, teacher = tiny_dirs
    values = tiny_overrides(student, teacher, tmp_path / "run", eval_prompts=5)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    out = tmp_path / "eval.json"
    assert cli.main(["eval", *args, "--view", "teacher", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_problems"] == 5 and len(result["problems"]) == 5 and 0.0 <= result["accuracy"] <= 1.0
    assert out.with_suffix(".md").read_text().startswith("### ")
    assert "avg@1" in capsys.readouterr().out


def test_eval_with_samples_reports_maj_and_pass(tiny_dirs, tmp_path, capsys):
    student, teacher = tiny_dirs
    values = tiny_overrides(student, teacher, tmp_path / "run", eval_prompts=3, eval_samples=4, eval_temperature=1.0)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    out = tmp_path / "eval.json"
    assert cli.main(["eval", *args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples_per_problem"] == 4 and all(len(p["responses"]) == 4 for p in result["problems"])
    text = capsys.readouterr().out
    assert "maj@4" in text and "pass@4" in text


def test_config_errors_exit_2_with_the_message(capsys):
    assert cli.main(["train", "rollout_token=5"]) == 2
    assert "did you mean 'rollout_tokens'" in capsys.readouterr().err
    assert cli.main(["train", "rollout_tokens=0"]) == 2


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["train", f"student={tmp_path / 'nope'}", f"run_dir={tmp_path / 'r'}", "device=cpu"])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


def test_help_config_lists_every_key(capsys):
    assert cli.main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "rollout_tokens = 100" in out and "ESR's K" in out


def test_bench_summary_skips_the_warm_up_step():
    step = lambda s, t: {"time/rollout_s": s, "time/teacher_s": 1.0, "time/train_s": 2.0, "time/step_s": s + 3,
                         "rollout/tokens": t, "rollout/len_mean": t / 2, "rollout/eos_frac": 0.0, "mem/peak_mb": 100.0 + t}
    summary = bench.summarise([step(10.0, 8), step(2.0, 4), step(4.0, 6)])
    assert summary["rollout_s"] == pytest.approx(3.0) and summary["tokens"] == pytest.approx(5.0)
    assert summary["peak_mb"] == 108.0 and summary["steps_measured"] == 2
    text = bench.table({"a": summary, "b": {**summary, "step_s": summary["step_s"] * 2}})
    assert "| step s | 6.00 | 12.00 | 2.0x |" in text
    both = bench.table({"a hf": summary, "b hf": {**summary, "step_s": 12.0}, "a vllm": {**summary, "step_s": 3.0},
                        "b vllm": {**summary, "step_s": 9.0}})  # --engine both: a ratio for each engine's pair
    assert "| per step (mean after the first) | a hf | b hf | ratio | a vllm | b vllm | ratio |" in both
    assert "| step s | 6.00 | 12.00 | 2.0x | 3.00 | 9.00 | 3.0x |" in both and "|---|" + "---|" * 6 in both
    assert summary["tokens_per_s"] == pytest.approx(5.0 / 3.0) and summary["sync_s"] == 0.0


def test_diagnose_rejects_bad_prefixes(tmp_path, capsys):
    assert cli.main(["diagnose", "--out", str(tmp_path / "d"), "--prefixes", "0,ten"]) == 2
    assert "--prefixes takes comma-separated token counts" in capsys.readouterr().err


def test_a_bad_grader_is_reported_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from esrdistill import build

    monkeypatch.setattr(build, "pair", lambda *a, **k: pytest.fail("models loaded before the grader was checked"))
    code = cli.main(["train", "grader=no_such_module_xyz:score", f"run_dir={tmp_path / 'r'}", "device=cpu",
                     "num_prompts=4", "eval_prompts=2"])
    assert code != 0
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_every_prompt_too_long_names_the_limit_that_bit(tiny_dirs, tmp_path, capsys):
    student, teacher = tiny_dirs
    base = tiny_overrides(student, teacher, tmp_path / "a", max_prompt_tokens=5)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in base.items()]
    assert cli.main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "every one of the 32 training prompts is too long" in err and "max_prompt_tokens=5" in err
    base = tiny_overrides(student, teacher, tmp_path / "b", rollout_tokens=1010)  # the tiny models' context: 1024
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in base.items()]
    assert cli.main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "the student's context of 1024 tokens minus rollout_tokens=1010" in err


def test_diagnose_with_every_problem_too_long_is_a_clear_error(tiny_dirs, tmp_path, capsys):
    student, teacher = tiny_dirs
    base = tiny_overrides(student, teacher, tmp_path / "r", max_new_tokens=1020, eval_prompts=4)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in base.items()]
    assert cli.main(["diagnose", *args, "--out", str(tmp_path / "d"), "--problems", "4"]) == 1
    err = capsys.readouterr().err
    assert "every one of the 4 problems to diagnose is too long" in err and "max_new_tokens=1020" in err


def test_equal_work_student_is_the_chosen_layers_of_the_teacher(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_dirs[0])
    path = bench.layer_subset(tiny_dirs[0], (1,), tmp_path / "one-layer")
    subset = AutoModelForCausalLM.from_pretrained(path)
    assert subset.config.num_hidden_layers == 1
    a, b = subset.state_dict(), source.state_dict()
    assert torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    ids = torch.tensor([[3, 40, 41, 42]])
    assert subset.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)  # its KV cache works


@pytest.mark.parametrize("command", [["lab", "repro", "--quick"], ["lab", "models", "--quick"], ["sweep", "--grid", "lr=0.1"]])
def test_an_out_directory_that_cannot_be_written_is_a_clear_error(tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main([*command, "--out", str(blocker / "lab")]) == 1
    err = capsys.readouterr().err
    assert f"--out {blocker / 'lab'}: cannot write there" in err and "Traceback" not in err


def test_yaml_syntax_errors_in_the_config_file_or_an_override_are_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\ndataset_options: {min_terms: 2\n")
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: config file {path} is not valid YAML: line 3, column 1: expected ',' or '}}'")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert cli.main(["train", "dataset_options={min_terms: 2", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert err == ("config error: dataset_options={min_terms: 2 is not valid YAML: line 1, column 14: expected ',' or '}', "
                   "but got '<stream end>' (while parsing a flow mapping begun at line 1, column 1)\n")


def _rows(path, null_at=()):
    """A JSON Lines file of 40 sums, the answer null in the rows numbered in null_at."""
    path.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": None if i in null_at else str(i + 1)}) + "\n"
                            for i in range(40)))
    return str(path)


@pytest.mark.parametrize("case", ["fewshot_field", "null_answer", "directory"])
def test_data_a_run_cannot_use_is_one_line_naming_what_to_change(tiny_dirs, tmp_path, capsys, monkeypatch, case):
    """Each is found before any model loads."""
    from esrdistill import models

    student, teacher = tiny_dirs
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded before the data was checked"))
    extra, message = {
        "fewshot_field": ({"dataset": _rows(tmp_path / "d.jsonl"), "teacher_fewshot": 2, "fewshot_template": "{solution}"},
                          "error: fewshot_template names {solution}, but the worked examples have no field 'solution': "
                          "their fields are answer, prompt, question\n"),
        "null_answer": ({"dataset": _rows(tmp_path / "n.jsonl", null_at=(10,))},
                        f"error: dataset '{tmp_path / 'n.jsonl'}': 1 of the 36 rows used have no answer_field 'answer' "
                        "(null or missing: 0 worked examples, 0 evaluation problems, 1 training prompts); remove or "
                        "fill them in\n"),
        "directory": ({"dataset": str(tmp_path / "data")},
                      f"error: dataset {tmp_path / 'data'} is a directory without a .jsonl, .json, .csv or .parquet file: a "
                      "dataset is reasoning_gym:NAME, packaged:NAME (a task shipped with esrdistill), a .jsonl"),
    }[case]
    (tmp_path / "data").mkdir()
    values = tiny_overrides(student, teacher, tmp_path / "run", shuffle_prompts=False, dataset_options={}, **extra)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    assert cli.main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1 and "Traceback" not in err
