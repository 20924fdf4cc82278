import json

import pytest

from esrdistill import prompts
from esrdistill.data import DataError, Problem, load_task
from helpers import make_tokenizer


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


def test_a_fewshot_template_field_the_worked_examples_lack_names_the_fields_they_have(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": str(i), "source": "s"} for i in range(8)])
    with pytest.raises(DataError, match=r"^fewshot_template names \{solution\}, but the worked examples have no field "
                                        r"'solution': their fields are answer, prompt, question, source$"):
        load_task(path, eval_prompts=2, fewshot=2, fewshot_template="Worked: {solution} <answer>{answer}</answer>")
    task = load_task(path, eval_prompts=2, fewshot=2, fewshot_template="\\boxed{x} {source}: <answer>{answer}</answer>")
    assert len(task.fewshot) == 2  # LaTeX braces are not field names; fields the rows have are fine
    with pytest.raises(DataError, match=r"fewshot_template names \{solution\}"):  # the same check where the turns are made
        prompts.fewshot_turns(task.fewshot, "{prompt}", "{solution}")
    assert prompts.fewshot_turns(task.fewshot, "{prompt}", "{source}: {answer}")[0][1] == f"s: {task.fewshot[0].answer}"


def test_a_fewshot_template_field_that_is_null_in_a_worked_example_is_counted():
    examples = [Problem("q1", "1", {"solution": "s1"}), Problem("q2", "2", {"solution": None}), Problem("q3", "3", {})]
    with pytest.raises(DataError, match=r"names \{solution\}, but 2 of the 3 worked examples have no value for it"):
        prompts.fewshot_turns(examples, "{prompt}", "{solution}")


def test_reasoning_gym_metadata_fields_fill_a_fewshot_template():
    task = load_task("reasoning_gym:gsm_symbolic", num_prompts=2, fewshot=2, fewshot_template="{answer_cot} <answer>{answer}</answer>")
    turns = prompts.fewshot_turns(task.fewshot, "{prompt}", "{answer_cot} <answer>{answer}</answer>")
    assert turns[0][1] == f"{task.fewshot[0].row['metadata']['answer_cot']} <answer>{task.fewshot[0].answer}</answer>"
    with pytest.raises(DataError, match=r"no field 'solution': their fields are .*answer_cot.*question"):
        load_task("reasoning_gym:gsm_symbolic", num_prompts=2, fewshot=2, fewshot_template="{solution}")


def test_a_reasoning_gym_task_without_reference_answers_cannot_show_them_in_worked_examples():
    from esrdistill.grading import make_grader

    task = load_task("reasoning_gym:graph_color", num_prompts=2, eval_prompts=1, seed=0)
    assert task.eval[0].answer is None and task.eval[0].row["answer"] is None  # not the text "None"
    with pytest.raises(DataError, match=r"names \{answer\}, but 2 of the 2 worked examples have no value for it"):
        load_task("reasoning_gym:graph_color", num_prompts=2, fewshot=2, fewshot_template="<answer>{answer}</answer>")
    grader = make_grader(task, "auto", "tag")  # its score_answer still grades: a response is checked by itself
    graded = []
    task.source.score_answer = lambda answer, entry: graded.append((answer, entry)) or 1.0
    assert grader("<answer>{0: 1}</answer>", task.eval[0]) and graded == [("{0: 1}", task.eval[0].row)]


def test_rows_without_an_answer_are_counted_by_split_before_any_is_used(tmp_path):
    rows = [{"question": f"q{i}", "answer": None if i in (0, 5, 9) else str(i)} for i in range(10)] + [{"question": "q10"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"^dataset '.*d\.jsonl': 4 of the 11 rows used have no answer_field 'answer' "
                                        r"\(null or missing: 1 worked examples, 1 evaluation problems, 2 training "
                                        r"prompts\); remove or fill them in$"):
        load_task(path, eval_prompts=5, fewshot=1, shuffle=False)
    task = load_task(path, eval_prompts=0, fewshot=0)  # answers unused: training prompts only
    assert sum(p.answer is None for p in task.train) == 4
    routed = load_task(path, fewshot={"a": 0}, route=lambda problems: ["a"] * len(problems), shuffle=False)
    assert len(routed.train) == 11  # several teachers, no worked examples and no evaluation: answers unused too


def test_a_directory_without_data_files_or_an_unsupported_file_names_the_supported_forms(tmp_path):
    (tmp_path / "notes.txt").write_text("What is 1+1?\n")
    (tmp_path / "empty").mkdir()
    forms = r"a dataset is reasoning_gym:NAME, packaged:NAME \(a task shipped with esrdistill\), a \.jsonl, \.json, \.csv or \.parquet file, a directory of such files"
    with pytest.raises(DataError, match=rf"^data file .*notes\.txt is a \.txt file, which esrdistill does not read: {forms}"):
        load_task(str(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match=rf"^dataset .*empty is a directory without a \.jsonl, \.json, \.csv or \.parquet file: {forms}"):
        load_task(str(tmp_path / "empty"))


def test_a_directory_of_data_files_is_read_split_by_file_name(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"question": f"t{i}", "answer": str(i)} for i in range(6)])
    _write_jsonl(folder / "test.jsonl", [{"question": f"e{i}", "answer": str(i)} for i in range(3)])
    task = load_task(str(folder), eval_prompts=2, shuffle=False)
    assert [p.prompt for p in task.eval + task.train] == [f"t{i}" for i in range(6)]
    task = load_task(str(folder), split="test", eval_prompts=3, need_train=False, shuffle=False)
    assert [p.prompt for p in task.eval] == ["e0", "e1", "e2"]


def test_each_teachers_fewshot_template_is_checked_against_its_own_worked_examples(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i), "source": "b", "solution": f"s{i}"} if i % 2 else
            {"question": f"q{i}", "answer": str(i), "source": "a"} for i in range(20)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    route = lambda problems: [p.row["source"] for p in problems]  # noqa: E731
    task = load_task(path, fewshot={"a": 2, "b": 2}, route=route, shuffle=False,
                     fewshot_template={"a": "<answer>{answer}</answer>", "b": "{solution} <answer>{answer}</answer>"})
    assert [p.prompt for p in task.fewshot] == ["q0", "q1", "q2", "q3"]
    with pytest.raises(DataError, match=r"^teachers: a's fewshot_template names \{solution\}, but the worked examples "
                                        r"have no field 'solution': their fields are answer, prompt, question, source$"):
        load_task(path, fewshot={"a": 2, "b": 2}, route=route, fewshot_template={"a": "{solution}", "b": "{solution}"})
