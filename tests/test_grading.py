import pytest

from esrdistill.data import Problem, Task, load_task
from esrdistill.grading import boxed_contents, extract_answer, make_grader


@pytest.mark.parametrize(
    "text, mode, expected",
    [
        ("so <answer>42</answer>", "tag", "42"),
        ("<answer>1</answer> then <answer> 2 </answer>", "tag", "2"),
        ("no tags 42", "tag", None),
        ("", "tag", None),
        (r"first \boxed{3} last \boxed{\frac{1}{2}}", "boxed_last", r"\frac{1}{2}"),
        (r"first \boxed{3} last \boxed{\frac{1}{2}}", "boxed_first", "3"),
        (r"unclosed \boxed{3", "boxed_last", None),
        ("it is 1,234 or -5.5", "last_number", "-5.5"),
        ("total 1,234", "last_number", "1234"),
        ("no digits", "last_number", None),
        ("  raw \n", "none", "raw"),
    ],
)
def test_extract_answer(text, mode, expected):
    assert extract_answer(text, mode) == expected


def test_boxed_contents_balances_nested_braces():
    assert boxed_contents(r"\boxed{a{b}c} and \boxed{d}") == ["a{b}c", "d"]


def test_reasoning_gym_grader_uses_score_answer():
    task = load_task("reasoning_gym:chain_sum", num_prompts=3, eval_prompts=2, seed=1)
    grade = make_grader(task, "auto", "tag")
    problem = task.eval[0]
    assert grade(f"<answer>{problem.answer}</answer>", problem) is True
    assert grade(f"<answer>{int(problem.answer) + 1}</answer>", problem) is False
    assert grade(problem.answer, problem) is False  # right number, wrong format


def test_math_grader_accepts_equivalent_forms():
    task = Task(name="t", train=[], eval=[], fewshot=[])
    grade = make_grader(task, "auto", "boxed_last")
    problem = Problem(prompt="?", answer="0.5")
    assert grade(r"so \boxed{\frac{1}{2}}", problem)
    assert not grade(r"so \boxed{\frac{1}{3}}", problem)
    assert not grade("no box", problem)


def test_exact_grader():
    task = Task(name="t", train=[], eval=[], fewshot=[])
    grade = make_grader(task, "exact", "tag")
    assert grade("<answer>Paris</answer>", Problem("?", "Paris"))
    assert not grade("<answer>paris</answer>", Problem("?", "Paris"))


def test_reasoning_gym_grader_needs_a_reasoning_gym_task():
    with pytest.raises(ValueError, match="reasoning_gym"):
        make_grader(Task(name="t", train=[], eval=[], fewshot=[]), "reasoning_gym", "tag")


def test_reference_with_a_worked_solution_is_graded_on_its_last_box():
    task = Task(name="t", train=[], eval=[], fewshot=[])
    grade = make_grader(task, "math", "boxed_last")
    problem = Problem("?", r"First 2+2=4, so the answer is \boxed{4}.")
    assert grade(r"\boxed{4}", problem)
    assert not grade(r"\boxed{5}", problem)


def test_lenient_accepts_the_right_answer_anywhere():
    task = Task(name="t", train=[], eval=[], fewshot=[])
    strict = make_grader(task, "math", "boxed_last")
    lenient = make_grader(task, "math", "lenient")
    problem = Problem("?", "12")
    response = r"So \boxed{12}. Check: \boxed{12} \boxed{13}"  # a repeated box whose last copy is wrong
    assert not strict(response, problem)
    assert lenient(response, problem)
    assert make_grader(task, "math", "boxed_first")(response, problem)
    assert not lenient("nothing here", problem) and not lenient("", problem)


def test_custom_grader_named_module_function(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    grade = make_grader(Task(name="t", train=[], eval=[], fewshot=[]), "custom_grader:close_enough", "last_number")
    assert grade("about 3.4", Problem("?", "3"))
    assert not grade("about 3.6", Problem("?", "3"))
    assert grade.check("3.2", Problem("?", "3"))


def test_custom_grader_that_does_not_exist_is_a_clear_error():
    from esrdistill.config import ConfigError

    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        make_grader(Task(name="t", train=[], eval=[], fewshot=[]), "no_such_module:fn", "tag")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        make_grader(Task(name="t", train=[], eval=[], fewshot=[]), "math:nope", "tag")


def test_answer_markers_count_repeats():
    from esrdistill.grading import answer_markers

    assert answer_markers(r"\boxed{1} and \boxed{1}", "boxed_last") == 2
    assert answer_markers("<answer>1</answer>", "tag") == 1
    assert answer_markers(r"<answer>1</answer> \boxed{2}", "lenient") == 2
