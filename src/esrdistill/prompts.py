"""Turning problems into prompt token ids: the student's view and the teacher's view.

The student sees its own chat template with `system_prompt`. The teacher sees its own chat template
with `teacher_system_prompt`, any few-shot worked examples as earlier turns, and then
`teacher_prompt_suffix` appended after the generation prompt (Qwen3's empty think block, say).
Both are then followed by the same response tokens, which is why they must share a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from esrdistill.data import DataError, Problem, check_fewshot_template, row_fields


@dataclass(frozen=True)
class PromptStyle:
    system: str | None = None  # None = the chat template's default system message
    template: str = "{prompt}"  # user message, "{prompt}" replaced literally (braces elsewhere are kept)
    fewshot: tuple[tuple[str, str], ...] = ()  # (user, assistant) turns before the question
    suffix: str = ""  # text after the generation prompt


def fill(template: str, problem: Problem) -> str:
    """Replace {answer}, {prompt} and {FIELD} for every field of the problem's row (and of a
    reasoning-gym entry's metadata, e.g. {answer_cot} of gsm_symbolic) by its value (data.row_fields).
    Other braces are left alone, so LaTeX like \\boxed{} survives."""
    for key, value in row_fields(problem).items():
        if isinstance(value, (str, int, float)) and "{" + key + "}" in template:
            template = template.replace("{" + key + "}", str(value))
    return template


def fewshot_turns(examples: list[Problem], template: str, answer_template: str) -> tuple[tuple[str, str], ...]:
    """Worked examples as (user, assistant) pairs; answer_template is filled from the example's row. A field
    it names that an example lacks (or holds null in) is a DataError (data.check_fewshot_template)."""
    check_fewshot_template(answer_template, examples)
    return tuple((template.replace("{prompt}", p.prompt), fill(answer_template, p)) for p in examples)


def render(tokenizer: PreTrainedTokenizerBase, problem_prompt: str, style: PromptStyle) -> str:
    """The full prompt text, ending where the model's response starts."""
    user = style.template.replace("{prompt}", problem_prompt)
    if tokenizer.chat_template:
        messages = [] if style.system is None else [{"role": "system", "content": style.system}]
        for shot_user, shot_answer in style.fewshot:
            messages += [{"role": "user", "content": shot_user}, {"role": "assistant", "content": shot_answer}]
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model: a plain question/answer layout
        parts = [] if style.system is None else [style.system.strip(), ""]
        for shot_user, shot_answer in style.fewshot:
            parts += [f"Question: {shot_user}", f"Answer: {shot_answer}", ""]
        parts += [f"Question: {user}", "Answer:"]
        text = "\n".join(parts)
    return text + style.suffix


def encode(tokenizer: PreTrainedTokenizerBase, problems: list[Problem], style: PromptStyle) -> list[list[int]]:
    """Token ids of each rendered prompt. A BOS is added only when the text does not carry one."""
    out = []
    for problem in problems:
        text = render(tokenizer, problem.prompt, style)
        has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
        out.append(tokenizer(text, add_special_tokens=not has_bos and not tokenizer.chat_template)["input_ids"])
    return out


@dataclass(frozen=True)
class Limit:
    """The most prompt tokens one side may have, and the setting that makes it so (for messages)."""

    side: str  # "student" or "teacher"
    tokens: int
    reason: str  # e.g. "max_prompt_tokens=512" or "the student's context of 2048 tokens minus rollout_tokens=100"


def keep_fitting(
    student_ids: list[list[int]], teacher_ids: list[list[int]], student_limit: int, teacher_limit: int
) -> list[int]:
    """Indices of the prompts that fit both limits (prompt tokens; the rollout's room already taken off)."""
    return [i for i, (s, t) in enumerate(zip(student_ids, teacher_ids)) if len(s) <= student_limit and len(t) <= teacher_limit]


def context_length(model) -> int:
    """The model's maximum sequence length from its config (a very large number when it has none)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


@dataclass
class PromptSet:
    """Problems with the student's and the teacher's prompt ids, long prompts already dropped."""

    problems: list[Problem]
    student_ids: list[list[int]]
    teacher_ids: list[list[int]]
    dropped: int  # prompts removed because they did not fit a limit
    why_dropped: str = ""  # which limits they exceeded, for messages

    def require(self, what: str) -> None:
        """Raise a DataError naming the limit when every prompt was dropped."""
        if not self.problems:

            raise DataError(f"every one of the {self.dropped} {what} is too long: {self.why_dropped}")


def prepare(
    problems: list[Problem],
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_style: PromptStyle,
    teacher_style: PromptStyle,
    student_limit: Limit,
    teacher_limit: Limit,
) -> PromptSet:
    """Encode both views of every problem and drop the ones longer than a limit (never truncate)."""
    student_ids = encode(student_tokenizer, problems, student_style)
    teacher_ids = encode(teacher_tokenizer, problems, teacher_style)
    keep = keep_fitting(student_ids, teacher_ids, student_limit.tokens, teacher_limit.tokens)
    reasons = []
    for limit, ids in ((student_limit, student_ids), (teacher_limit, teacher_ids)):
        over = sum(len(x) > limit.tokens for x in ids)
        if over:
            reasons.append(f"{over} {limit.side} prompts exceed {max(limit.tokens, 0)} tokens ({limit.reason}; "
                           f"the shortest {limit.side} prompt has {min(len(x) for x in ids)})")
    return PromptSet(
        problems=[problems[i] for i in keep],
        student_ids=[student_ids[i] for i in keep],
        teacher_ids=[teacher_ids[i] for i in keep],
        dropped=len(problems) - len(keep),
        why_dropped="; ".join(reasons),
    )
