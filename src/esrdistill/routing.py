"""Which teacher reads which row, read from the config (`teachers:`, `teacher_field`, `default_teacher`;
docs/teachers.md): each teacher's view of the config, and each problem's teacher. build.py makes the teachers and
their prompts from these; data.load_task holds out each teacher's own worked examples with them.
"""

from __future__ import annotations

import dataclasses

from esrdistill.data import DataError

VIEW_KEYS = {"model": "teacher", "system_prompt": "teacher_system_prompt", "fewshot": "teacher_fewshot",
             "suffix": "teacher_prompt_suffix", "fewshot_template": "fewshot_template", "tokenizer": "teacher_tokenizer",
             "model_name": "teacher_model_name"}  # a teacher's own keys -> the run's keys they stand for


def views(cfg) -> dict:
    """{name: the run's config as that teacher alone would see it}: its model as `teacher`, its system prompt,
    few-shot count, few-shot template and suffix as teacher_system_prompt, teacher_fewshot, fewshot_template and
    teacher_prompt_suffix (the run's keys where it gives none)."""
    out = {}
    for name, spec in cfg.teachers.items():
        spec = {"model": spec} if isinstance(spec, str) else spec
        out[name] = dataclasses.replace(cfg, teachers={}, teacher_field=None, default_teacher=None,
                                        **{VIEW_KEYS[k]: v for k, v in spec.items()})
    return out


def default_name(cfg) -> str:
    return cfg.default_teacher or next(iter(cfg.teachers))


def fewshot_counts(cfg) -> int | dict[str, int]:
    """The worked examples the task must hold out: the most any teacher sees, or, when rows are routed
    (teacher_field), {teacher: the number it sees}: each teacher's examples are rows of its own (data.load_task)."""
    if cfg.teacher_field is not None:
        return {name: view.teacher_fewshot for name, view in views(cfg).items()}
    return max([cfg.teacher_fewshot] + [v.teacher_fewshot for v in views(cfg).values()])


def router(cfg):
    """problems -> each one's teacher name (route), for data.load_task; None when rows are not routed."""
    return None if cfg.teacher_field is None else (lambda problems: route(cfg, problems))


def own(cfg, task, name: str):
    """The task as teacher `name` sees it: its own worked examples and evaluation problems (the whole task
    when rows are not routed)."""
    if cfg.teacher_field is None:
        return task
    every = task.fewshot + task.eval + task.train

    def mine(problems):
        return [p for p, n in zip(problems, route(cfg, problems, every)) if n == name]

    return dataclasses.replace(task, fewshot=mine(task.fewshot), eval=mine(task.eval))


def route(cfg, problems: list, every: list | None = None) -> list[str]:
    """Each problem's teacher: its row's `teacher_field` (or that of its reasoning-gym metadata), default_teacher
    where it has none; a name not in `teachers` is a DataError naming the known ones, and so is a teacher_field
    in none of `every` (the task's problems; default: these)."""
    default = default_name(cfg)
    if cfg.teacher_field is None:
        return [default] * len(problems)
    field_of = cfg.teacher_field

    def value(row: dict):
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        return row.get(field_of, meta.get(field_of))

    values = [value(p.row) for p in problems]
    every = problems if every is None else every
    if every and all(value(p.row) is None for p in every):
        fields = sorted(set(every[0].row) | set(every[0].row.get("metadata") or {}))
        raise DataError(f"teacher_field '{field_of}' is in no row of the data; its fields are: {', '.join(fields)}")
    names = []
    for i, v in enumerate(values):
        name = default if v is None or str(v) == "" else str(v)
        if name not in cfg.teachers:
            raise DataError(f"a row's {field_of}='{name}' names no teacher: the teachers are {', '.join(cfg.teachers)} "
                            f"(rows without {field_of} go to default_teacher={default})")
        names.append(name)
    return names
