import json

import pytest

from helpers import make_tokenizer
from esrdistill import prompts
from esrdistill.data import DataError, Problem, load_task


def test_reasoning_gym_split_is_disjoint_and_stable():
    a = load_task("reasoning_gym:chain_sum", num_prompts=10, eval_prompts=5, fewshot=2, seed=3)
    b = load_task("reasoning_gym:chain_sum", num_prompts=40, eval_prompts=5, fewshot=2, seed=3)
    assert (len(a.fewshot), len(a.eval), len(a.train)) == (2, 5, 10)
    assert [p.prompt for p in a.eval] == [p.prompt for p in b.eval]  # eval set independent of num_prompts
    assert [p.prompt for p in a.train] == [p.prompt for p in b.train[:10]]
    assert a.is_reasoning_gym and a.eval[0].answer == str(a.eval[0].row["answer"])


def test_a_mixture_of_reasoning_gym_tasks_from_dataset_options_is_graded_per_task():
    options = {"datasets": [{"name": "products", "weight": 1, "config": {"min_digits": 1, "max_digits": 1}},
                            {"name": "leg_counting", "weight": 1}]}
    task = load_task("reasoning_gym:composite", num_prompts=30, eval_prompts=5, seed=0, options=options)
    sources = {p.row["metadata"]["source_dataset"] for p in task.train}
    assert sources == {"products", "leg_counting"}  # the field a teacher_field routes by
    assert all(task.source.score_answer(p.answer, p.row) == 1.0 for p in task.train + task.eval)
    assert not any(task.source.score_answer("-1", p.row) == 1.0 for p in task.eval)
    for bad, message in [({"datasets": "products"}, "needs dataset_options {datasets:"),
                         ({"datasets": [{"name": "products"}, {"name": "products"}]}, "names a task twice"),
                         ({"datasets": [{"name": "prodcts"}]}, "no task 'prodcts'"),
                         ({"datasets": [{"name": "products", "config": {"min_digitz": 1}}]}, "rejected dataset_options")]:
        with pytest.raises(DataError, match=message):
            load_task("reasoning_gym:composite", num_prompts=4, options=bad)


def test_unknown_reasoning_gym_task_suggests():
    with pytest.raises(DataError, match="no task 'chain_sums'.*chain_sum"):
        load_task("reasoning_gym:chain_sums", num_prompts=2)


def test_reasoning_gym_options_reach_the_generator():
    task = load_task("reasoning_gym:chain_sum", num_prompts=20, seed=0, options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    for p in task.train:
        numbers = [t for t in p.prompt.replace("=", " ").split() if t.lstrip("-").isdigit()]
        assert len(numbers) == 2 and all(len(n.lstrip("-")) == 1 for n in numbers)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_file_with_custom_fields(tmp_path):
    rows = [{"q": f"What is {i}+1?", "a": str(i + 1)} for i in range(12)]
    task = load_task(_write_jsonl(tmp_path / "d.jsonl", rows), prompt_field="q", answer_field="a", eval_prompts=2, fewshot=1, seed=0)
    assert (len(task.fewshot), len(task.eval), len(task.train)) == (1, 2, 9)
    assert not task.is_reasoning_gym
    for p in task.fewshot + task.eval + task.train:
        assert p.answer == str(int(p.prompt.split()[2].split("+")[0]) + 1)


def test_missing_field_names_the_fields_that_exist(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "x", "solution": "y"}] * 3)
    with pytest.raises(DataError, match="prompt_field 'question'.*fields are: problem, solution"):
        load_task(path)
    with pytest.raises(DataError, match="answer_field 'answer'.*fields are: problem, solution"):
        load_task(path, prompt_field="problem", eval_prompts=1)


@pytest.mark.parametrize("suffix, content", [(".jsonl", ""), (".jsonl", "\n  \n"), (".json", ""), (".csv", "")])
def test_empty_data_file_says_so(tmp_path, suffix, content):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=r"data file .*d\.\w+ is empty$"):
        load_task(str(path))


def test_malformed_jsonl_line_is_named_by_its_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n{"question": "c", answer: 3}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: not valid JSON"):
        load_task(str(path))
    path.write_text('{"question": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"line 2: a row must be a JSON object, got list"):
        load_task(str(path))


def test_rows_without_a_usable_prompt_are_counted(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(8)] + [{"question": 7, "answer": "x"}, {"question": "  "},
                                                                        {"answer": "no prompt"}]
    task = load_task(_write_jsonl(tmp_path / "d.jsonl", rows), eval_prompts=2)
    assert task.skipped == 3 and "not a non-empty string" in task.skipped_why
    assert len(task.train) + len(task.eval) == 8


def test_eval_and_diagnose_need_no_training_rows(tmp_path):
    """40 rows with the default eval_prompts (64): training refuses, a held-out-only use takes all 40."""
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(40)])
    with pytest.raises(DataError, match="leave none for training"):
        load_task(path, eval_prompts=64)
    task = load_task(path, eval_prompts=64, need_train=False)
    assert len(task.eval) == 40 and task.train == []


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task(str(tmp_path / "nope.jsonl"))


def test_too_few_rows_for_the_split(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "x", "answer": "1"}] * 3)
    with pytest.raises(DataError, match="leave none for training"):
        load_task(path, eval_prompts=3)


def test_long_prompts_are_dropped_and_counted_not_truncated():
    tok = make_tokenizer()
    problems = [Problem("short", "1"), Problem("x" * 200, "2"), Problem("mid " * 5, "3")]
    style = prompts.PromptStyle(system="S")
    ids = prompts.encode(tok, problems, style)
    limit = len(ids[2])
    out = prompts.prepare(problems, tok, tok, style, style, prompts.Limit("student", limit, "max_prompt_tokens=X"),
                          prompts.Limit("teacher", 10_000, "big"))
    assert out.dropped == 1 and [p.answer for p in out.problems] == ["1", "3"]
    assert out.student_ids == [ids[0], ids[2]]  # kept whole
    assert out.why_dropped.startswith(f"1 student prompts exceed {limit} tokens (max_prompt_tokens=X;")


def test_teacher_view_has_fewshot_turns_and_suffix_student_view_does_not():
    tok = make_tokenizer()
    shots = prompts.fewshot_turns([Problem("1+1", "2")], "Q: {prompt}", "<answer>{answer}</answer>")
    student = prompts.PromptStyle(system="S", template="Q: {prompt}")
    teacher = prompts.PromptStyle(system="T", template="Q: {prompt}", fewshot=shots, suffix="<think></think>")
    s_text = prompts.render(tok, "2+2", student)
    t_text = prompts.render(tok, "2+2", teacher)
    assert s_text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ: 2+2<|im_end|>\n<|im_start|>assistant\n"
    assert t_text == (
        "<|im_start|>system\nT<|im_end|>\n<|im_start|>user\nQ: 1+1<|im_end|>\n<|im_start|>assistant\n"
        "<answer>2</answer><|im_end|>\n<|im_start|>user\nQ: 2+2<|im_end|>\n<|im_start|>assistant\n<think></think>"
    )


def test_prompt_template_keeps_other_braces():
    tok = make_tokenizer()
    text = prompts.render(tok, "2+2", prompts.PromptStyle(template="{prompt} Put it in \\boxed{}."))
    assert "2+2 Put it in \\boxed{}." in text


def test_base_model_without_chat_template_gets_plain_layout():
    tok = make_tokenizer(chat_template=None)
    text = prompts.render(tok, "2+2", prompts.PromptStyle(system="Be brief.", fewshot=(("1+1", "2"),)))
    assert text == "Be brief.\n\nQuestion: 1+1\nAnswer: 2\n\nQuestion: 2+2\nAnswer:"
