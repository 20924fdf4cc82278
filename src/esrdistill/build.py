"""Builders: the only place where the Config turns into objects (models, task, prompts, grader).

The cores (losses, rollout, teacher, prompts) take plain values; train, eval and quickstart call
these builders so that all three read a config the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from esrdistill import models, prompts
from esrdistill.config import Config
from esrdistill.data import Task, load_task
from esrdistill.grading import make_grader


def rollout_length(cfg: Config) -> int:
    """How many tokens a training rollout may have.

    ESR: generation stops after K = rollout_tokens tokens; a full rollout (rollout_tokens=None)
    runs to max_new_tokens.
    """
    return cfg.rollout_tokens if cfg.rollout_tokens is not None else cfg.max_new_tokens


def task(cfg: Config) -> Task:
    return load_task(
        cfg.dataset,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        num_prompts=cfg.num_prompts,
        eval_prompts=cfg.eval_prompts,
        fewshot=cfg.teacher_fewshot,
        seed=cfg.seed,
        options=cfg.dataset_options,
        split=cfg.dataset_split,
    )


def styles(cfg: Config, task: Task) -> tuple[prompts.PromptStyle, prompts.PromptStyle]:
    """(student's view, teacher's view) of a prompt."""
    student = prompts.PromptStyle(system=cfg.system_prompt, template=cfg.prompt_template)
    teacher = prompts.PromptStyle(
        system=cfg.teacher_system_prompt if cfg.teacher_system_prompt is not None else cfg.system_prompt,
        template=cfg.prompt_template,
        fewshot=prompts.fewshot_turns(task.fewshot, cfg.prompt_template, cfg.fewshot_template),
        suffix=cfg.teacher_prompt_suffix,
    )
    return student, teacher


@dataclass
class Pair:
    """A student and a teacher that share a tokenizer, on one device."""

    student: torch.nn.Module  # with LoRA (or fully trainable) when built for training
    teacher: torch.nn.Module  # frozen, eval mode
    tokenizer: object  # the student's tokenizer
    teacher_tokenizer: object  # the same vocabulary, maybe another chat template
    vocab_size: int  # logits are compared over the first vocab_size entries
    eos_ids: list[int]
    device: torch.device
    dtype: torch.dtype


def pair(cfg: Config, device: torch.device, trainable: bool) -> Pair:
    dtype = models.resolve_dtype(cfg.dtype, device)
    tokenizer = models.load_tokenizer(cfg.student, cfg.model_cache)
    teacher_tokenizer = models.load_tokenizer(cfg.teacher, cfg.model_cache)
    student = models.load_model(cfg.student, dtype, device, cfg.model_cache)
    if trainable:
        student = models.add_lora(student, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    teacher = models.freeze(models.load_model(cfg.teacher, dtype, device, cfg.model_cache))
    return Pair(
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        vocab_size=models.shared_vocab_size(tokenizer, teacher_tokenizer, student, teacher),
        eos_ids=models.eos_ids(tokenizer, student),
        device=device,
        dtype=dtype,
    )


def prompt_set(cfg: Config, pair: Pair, task: Task, problems, new_tokens: int) -> prompts.PromptSet:
    """Both views of `problems`, dropping those that leave no room for `new_tokens` of response."""
    student_style, teacher_style = styles(cfg, task)
    student_limit = prompts.context_length(pair.student) - new_tokens
    if cfg.max_prompt_tokens is not None:
        student_limit = min(student_limit, cfg.max_prompt_tokens)
    teacher_limit = prompts.context_length(pair.teacher) - new_tokens
    return prompts.prepare(
        problems, pair.tokenizer, pair.teacher_tokenizer, student_style, teacher_style, student_limit, teacher_limit
    )


def grader(cfg: Config, task: Task) -> Callable:
    return make_grader(task, cfg.grader, cfg.answer_extract)
