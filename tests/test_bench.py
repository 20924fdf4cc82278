"""`esrdistill bench --job equal-work` runs the job TRL 1.16.0 was measured on, and the order of its prompts.

Nothing here trains: the job's config is built and its prompts are loaded through the project's own
builders, then compared with what TRL was given.
"""

from types import SimpleNamespace

import pytest

from esrdistill import build, order, packaged
from esrdistill.commands import bench
from esrdistill.config import load_config

N_PROMPTS = 64


def equal_work_configs():
    defaults, variants = bench.JOBS["equal-work"]
    return {name: load_config(None, {**defaults, **variant}) for name, variant in variants.items()}


def trl_questions() -> list[str]:
    """TRL's prompts, in the order its steps took them."""
    import reasoning_gym

    return [entry["question"] for entry in reasoning_gym.create_dataset("basic_arithmetic", size=N_PROMPTS, seed=1)]


def test_equal_work_job_has_trls_settings():
    configs = equal_work_configs()
    assert sorted(configs) == ["n128", "n256", "n32"]
    for name, cfg in configs.items():
        n = int(name[1:])
        assert (cfg.rollout_tokens, cfg.min_new_tokens) == (n, n)  # every rollout forced to exactly N tokens
        assert (cfg.temperature, cfg.top_p) == (0.7, 1.0)
        assert (cfg.lr, cfg.lora_r, cfg.dtype, cfg.max_grad_norm, cfg.weight_decay) == (1e-6, 0, "float32", 1.0, 0.0)
        assert (cfg.batch_size, cfg.micro_batch_size) == (4, 4)
        assert (cfg.dataset, cfg.dataset_options, cfg.data_seed) == ("reasoning_gym:basic_arithmetic", {}, 1)
        assert (cfg.num_prompts, cfg.eval_prompts, cfg.teacher_fewshot, cfg.shuffle_prompts) == (N_PROMPTS, 0, 0, False)
        assert (cfg.system_prompt, cfg.teacher_system_prompt, cfg.prompt_template) == (None, None, "{prompt}")
        assert cfg.teacher == "packaged:smollm2-135m-instruct"


def test_equal_work_steps_take_the_generators_rows_in_order():
    cfg = equal_work_configs()["n32"]
    task = build.task(cfg)
    assert (len(task.train), task.eval, task.fewshot) == (N_PROMPTS, [], [])
    questions = trl_questions()
    assert [p.prompt for p in task.train] == questions
    for step, rows in ((0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (15, [60, 61, 62, 63]), (16, [0, 1, 2, 3])):
        indices = order.batch_indices(step, cfg.batch_size, len(task.train), cfg.seed, cfg.shuffle_prompts)
        assert [task.train[i].prompt for i in indices] == [questions[r] for r in rows]


def test_equal_work_prompts_are_smollm2s_chat_template_with_its_default_system_message(packaged_smollm2):
    from transformers import AutoConfig, AutoTokenizer

    path = packaged_smollm2  # converted by the fixture where the job's `packaged:smollm2-135m-instruct` resolves
    assert path == packaged.converted_dir("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = SimpleNamespace(config=AutoConfig.from_pretrained(path))  # prompt_set reads the context length only
    pair = SimpleNamespace(student=model, teacher=model, tokenizer=tokenizer, teacher_tokenizer=tokenizer,
                           teachers=None, served=None)
    cfg = equal_work_configs()["n256"]
    task = build.task(cfg)
    prompt_set = build.prompt_set(cfg, pair, task, task.train, build.rollout_length(cfg), build.rollout_length_key(cfg))
    assert prompt_set.dropped == 0 and prompt_set.teacher_ids == prompt_set.student_ids
    question = trl_questions()[0]
    messages = [{"role": "user", "content": question}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in expected  # the template's default system message
    assert tokenizer.decode(prompt_set.student_ids[0]) == expected
    lengths = [len(ids) for ids in prompt_set.student_ids]
    assert 48 <= sum(lengths) / len(lengths) <= 51  # TRL: about 49 prompt tokens on average
    first_steps = [sum(lengths[i : i + 4]) for i in range(0, 16, 4)]
    assert sum(first_steps) / 4 == pytest.approx(196, abs=2)  # TRL: 196 per step of 4


def test_prompts_in_order_visit_every_prompt_epoch_after_epoch():
    for n, batch in ((10, 4), (6, 5), (64, 4), (3, 7)):
        naive = [position % n for position in range(12 * batch)]
        got = [i for step in range(12) for i in order.batch_indices(step, batch, n, seed=5, shuffle=False)]
        assert got == naive


def test_shuffled_order_is_unchanged():
    # order.batch_indices before shuffle_prompts existed: runs and exact resume must draw the same prompts
    assert order.batch_indices(0, 4, 10, 0) == [9, 6, 4, 0]
    assert order.batch_indices(3, 4, 10, 0) == [6, 2, 1, 7]  # second epoch
    assert order.batch_indices(2, 5, 6, 7) == [5, 4, 5, 3, 2]  # straddles two epochs
    assert order.batch_indices(17, 4, 64, 1, shuffle=True) == [36, 49, 57, 7]


def test_shuffle_prompts_false_keeps_a_files_order(tmp_path):
    import json

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(8)))
    kept = build.task(load_config(None, {"dataset": str(path), "eval_prompts": 2, "num_prompts": None, "shuffle_prompts": False}))
    assert [p.prompt for p in kept.eval + kept.train] == [f"q{i}" for i in range(8)]
    shuffled = build.task(load_config(None, {"dataset": str(path), "eval_prompts": 2, "num_prompts": None}))
    assert sorted(p.prompt for p in shuffled.eval + shuffled.train) == sorted(f"q{i}" for i in range(8))
    assert [p.prompt for p in shuffled.eval + shuffled.train] != [f"q{i}" for i in range(8)]


def _tiny_side_by_side(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    overrides = [f"student={student}", f"teacher={teacher}", "dataset=reasoning_gym:chain_sum", "num_prompts=16",
                 "device=cpu", "model_cache=" + str(tmp_path / "cache")]
    return bench.against_trl(overrides, out=str(tmp_path / "out"), rounds=1, lengths=(3,), steps=2)


@pytest.mark.slow  # TRL's trainer and esrdistill's, each in its own process
def test_against_trl_runs_both_tools_on_the_same_prompts_and_reports_each_phase(tiny_dirs, tmp_path):
    pytest.importorskip("trl")
    result = _tiny_side_by_side(tiny_dirs, tmp_path)
    runs = result["runs"]
    assert [(r["tool"], r["n"], r["round"]) for r in runs] == [("trl", 3, 1), ("hf", 3, 1)]
    for run in runs:
        assert len(run["steps"]) == 2 and run["phases"]["steps_measured"] == 1
        assert all(run["phases"][p]["median"] > 0 for p in ("rollout", "teacher", "train", "step"))
        assert run["phases"]["tokens"] == 4 * 3  # batch 4, every rollout forced to exactly N=3 tokens
        step = run["steps"][1]
        assert step["time/step_s"] >= step["time/rollout_s"] + step["time/teacher_s"]
    report = (tmp_path / "out" / "bench-trl.md").read_text()
    assert "| N | TRL step s | esrdistill hf step s | ratio |" in report
    assert "| rollout s |" in report and "| teacher s |" in report and "load average before the runs" in report
    trl_step, ours = runs[0]["phases"]["step"]["median"], runs[1]["phases"]["step"]["median"]
    assert f"| 3 | {trl_step:.2f} | {ours:.2f} | {ours / trl_step:.2f} |" in report


def test_the_trl_spec_is_the_equal_work_job_token_for_token(tiny_dirs, tmp_path):
    """The ids the TRL side is checked against are esrdistill's own prompt ids of its first steps, in order."""
    student, teacher = tiny_dirs
    defaults, _ = bench.JOBS["equal-work"]
    values = {**defaults, "student": student, "teacher": teacher, "dataset": "reasoning_gym:chain_sum", "num_prompts": 16,
              "steps": 3, "device": "cpu"}
    spec = bench.trl_spec(values, 5)
    cfg = load_config(None, {**values, "rollout_tokens": 5, "min_new_tokens": 5})
    task = build.task(cfg)
    assert [m[-1]["content"] for m in spec["prompts"]] == [p.prompt for p in task.train[:12]]
    assert all(m[-1]["role"] == "user" and len(m) == 1 for m in spec["prompts"])  # system_prompt null: the template's own
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    assert spec["prompt_ids"] == [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                                  for m in spec["prompts"]]
    assert (spec["n"], spec["steps"], spec["batch_size"], spec["lr"], spec["max_grad_norm"], spec["temperature"], spec["top_p"]) == \
        (5, 3, 4, 1e-6, 1.0, 0.7, 1.0)


def test_against_trl_refuses_a_job_trl_does_not_run(tiny_dirs, tmp_path):
    from esrdistill.config import ConfigError

    student, teacher = tiny_dirs
    defaults, _ = bench.JOBS["equal-work"]
    with pytest.raises(ConfigError, match="as TRL runs it"):
        bench.trl_spec({**defaults, "student": student, "teacher": teacher, "lora_r": 8}, 4)


def test_against_trl_without_trl_names_the_extra(monkeypatch, tmp_path):
    from esrdistill.commands import trl_bench
    from esrdistill.errors import UserError

    monkeypatch.setattr(trl_bench, "trl_version", lambda: None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[trl\]"'):
        bench.against_trl([], out=str(tmp_path))


def test_the_command_line_refuses_against_trl_on_another_job_and_its_options_without_it(capsys):
    from esrdistill.cli import main

    assert main(["bench", "--against", "trl"]) != 0  # the default job is esr-vs-full
    assert "--against trl runs the equal-work job" in capsys.readouterr().err
    assert main(["bench", "--rounds", "3"]) != 0
    assert "--rounds and --lengths go with --against trl" in capsys.readouterr().err
    assert main(["bench", "--job", "equal-work", "--against", "trl", "--lengths", "32,x"]) != 0
    assert "--lengths takes comma-separated token counts" in capsys.readouterr().err
