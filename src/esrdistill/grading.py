"""Answer extraction and graders.

A Grader splits grading in two, so that majority voting can grade a voted answer:
    extract(response) -> answer or None      (how the answer is found in the text)
    check(answer, problem) -> bool           (whether that answer is right)
    grader(response, problem) -> bool        (both; in lenient mode, any answer in the text counts)
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from esrdistill.config import ConfigError
from esrdistill.data import Problem, Task

_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
BUILTIN_GRADERS = ("auto", "reasoning_gym", "math", "exact")


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


def tag_contents(text: str) -> list[str]:
    """Contents of every <answer>...</answer>, in order."""
    return [m.strip() for m in _TAG.findall(text)]


def numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


def extract_answer(text: str, mode: str) -> str | None:
    """The answer a response gives, or None when it gives none in that form.

    tag: the last <answer>...</answer> (reasoning-gym's format); boxed_last / boxed_first: the last /
    first \\boxed{...}; last_number: the last number in the text; none: the stripped text;
    lenient: the last tag, else the last box, else the last number (lenient grading also accepts
    any other answer in the text, see Grader).
    """
    if mode == "tag":
        found = tag_contents(text)
        return found[-1] if found else None
    if mode in ("boxed_last", "boxed_first"):
        found = boxed_contents(text)
        return (found[-1] if mode == "boxed_last" else found[0]).strip() if found else None
    if mode == "last_number":
        found = numbers(text)
        return found[-1] if found else None
    if mode == "none":
        return text.strip()
    if mode == "lenient":
        for found in (tag_contents(text), [b.strip() for b in boxed_contents(text)], numbers(text)):
            if found:
                return found[-1]
        return None
    raise ValueError(f"unknown answer_extract mode '{mode}'")


def all_answers(text: str) -> list[str]:
    """Every candidate answer in a response (tags, boxes, numbers): what lenient grading tries."""
    return tag_contents(text) + [b.strip() for b in boxed_contents(text)] + numbers(text)


def answer_markers(text: str, mode: str) -> int:
    """How many answer markers a response holds: \\boxed{} for boxed modes, <answer> tags for tag mode,
    both otherwise. More than one is the repetition the paper found behind a 'collapse'."""
    if mode.startswith("boxed"):
        return len(boxed_contents(text))
    if mode == "tag":
        return len(tag_contents(text))
    return len(boxed_contents(text)) + len(tag_contents(text))


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


def load_callable(spec: str) -> Callable:
    """'package.module:function' -> the function, or a ValueError saying what is missing."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"grader '{spec}': cannot import module '{module_name}': {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"grader '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


@dataclass
class Grader:
    """kind: reasoning_gym | math | exact | custom; mode: an answer_extract mode."""

    kind: str
    mode: str
    source: Any = None  # the reasoning-gym dataset, for its score_answer
    custom: Callable | None = None  # fn(answer, reference, row) -> bool, or a score with 1.0 = right

    def extract(self, response: str) -> str | None:
        return extract_answer(response, self.mode)

    def check(self, answer: str | None, problem: Problem) -> bool:
        if answer is None:
            return False
        if self.kind == "custom":
            result = self.custom(answer, problem.answer, problem.row)
            return float(result) >= 1.0 if isinstance(result, float) else bool(result)
        if self.kind == "reasoning_gym":  # its score_answer reads the entry: some tasks have no reference answer
            return float(self.source.score_answer(answer, problem.row)) >= 1.0
        if problem.answer is None:
            return False
        reference = reference_answer(problem.answer)
        if self.kind == "math":
            return math_equal(answer, reference)
        return answer.strip() == reference

    def __call__(self, response: str, problem: Problem) -> bool:
        if self.mode == "lenient":  # the right answer anywhere in the response
            return any(self.check(candidate, problem) for candidate in dict.fromkeys(all_answers(response)))
        return self.check(self.extract(response), problem)


def make_grader(task: Task, grader: str, answer_extract: str) -> Grader:
    """The grader for a task. auto: reasoning-gym's own score_answer for its tasks, math-verify
    otherwise. 'module:function' names your own function fn(answer, reference, row)."""
    if ":" in grader:
        return Grader("custom", answer_extract, custom=load_callable(grader))
    if grader not in BUILTIN_GRADERS:
        raise ConfigError(f"grader must be one of {', '.join(BUILTIN_GRADERS)} or module:function, got '{grader}'")
    kind = grader
    if kind == "auto":
        kind = "reasoning_gym" if task.is_reasoning_gym else "math"
    if kind == "reasoning_gym" and not task.is_reasoning_gym:
        raise ConfigError("grader=reasoning_gym needs a reasoning_gym:TASK dataset")
    return Grader(kind, answer_extract, source=task.source)
