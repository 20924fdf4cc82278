"""Answer extraction and graders: response text + problem -> correct or not."""

from __future__ import annotations

import re
from typing import Callable

from esrdistill.data import Problem, Task

_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} in order, with nested braces balanced."""
    found = []
    start = 0
    while (at := text.find("\\boxed", start)) != -1:
        brace = text.find("{", at)
        if brace == -1:
            break
        depth, end = 0, None
        for i in range(brace, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                end = i
                break
        if end is None:
            break
        found.append(text[brace + 1 : end])
        start = end + 1
    return found


def extract_answer(text: str, mode: str) -> str | None:
    """The answer a response gives, or None when it gives none in that form.

    tag: the last <answer>...</answer> (reasoning-gym's format); boxed_last / boxed_first: the last /
    first \\boxed{...}; last_number: the last number in the text; none: the stripped text.
    """
    if mode == "tag":
        found = _TAG.findall(text)
        return found[-1].strip() if found else None
    if mode in ("boxed_last", "boxed_first"):
        found = boxed_contents(text)
        return (found[-1] if mode == "boxed_last" else found[0]).strip() if found else None
    if mode == "last_number":
        found = _NUMBER.findall(text)
        return found[-1].replace(",", "") if found else None
    if mode == "none":
        return text.strip()
    raise ValueError(f"unknown answer_extract mode '{mode}'")


def reference_answer(reference: str) -> str:
    """The final answer inside a reference: its last \\boxed{} when it has one (a worked solution,
    as in NuminaMath or MATH), else the whole reference."""
    found = boxed_contents(reference)
    return found[-1].strip() if found else reference.strip()


def math_equal(answer: str, reference: str) -> bool:
    """math-verify's equivalence of two answers; exact string match when neither parses as math."""
    from math_verify import parse, verify

    gold, pred = parse(f"${reference}$"), parse(f"${answer}$")
    if gold and pred:
        return bool(verify(gold, pred))
    return answer.strip() == reference.strip()


def make_grader(task: Task, grader: str, answer_extract: str) -> Callable[[str, Problem], bool]:
    """A function (response text, problem) -> correct, for the task's kind of answers.

    auto: reasoning-gym's own score_answer for its tasks, math-verify otherwise.
    """
    kind = grader
    if kind == "auto":
        kind = "reasoning_gym" if task.is_reasoning_gym else "math"
    if kind == "reasoning_gym" and not task.is_reasoning_gym:
        raise ValueError("grader=reasoning_gym needs a reasoning_gym:TASK dataset")

    def grade(response: str, problem: Problem) -> bool:
        answer = extract_answer(response, answer_extract)
        if answer is None or problem.answer is None:
            return False
        if kind == "reasoning_gym":
            return float(task.source.score_answer(answer, problem.row)) >= 1.0
        reference = reference_answer(problem.answer)
        if kind == "math":
            return math_equal(answer, reference)
        return answer.strip() == reference

    return grade
