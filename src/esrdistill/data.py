"""Tasks: prompts with reference answers, from reasoning-gym, local files or the datasets library.

A task is split once, deterministically from the seed, into few-shot examples (shown to the teacher
only), evaluation problems, and training prompts, in that order, so the evaluation set does not
depend on how many training prompts a run asks for. With eval_split the evaluation problems are the
first rows of that split instead (in its own order, the same for every seed), and a training row whose
prompt is one of them is left out, so they stay held out whatever the seed. The rows of a file or a datasets name are
shuffled from the seed first (shuffle=False keeps the file's order); a generator's rows are used in
the order it makes them.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib.resources import files
from itertools import islice
from pathlib import Path
from typing import Any

from esrdistill.errors import UserError

REASONING_GYM = "reasoning_gym:"
PACKAGED = "packaged:"  # a task shipped inside the package: src/esrdistill/tasks/NAME/{train,test}.jsonl
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_GENERATED = 1000  # training prompts generated when num_prompts is null for a generator
FORMS = ("reasoning_gym:NAME, packaged:NAME (a task shipped with esrdistill), a .jsonl, .json, .csv or .parquet file, a directory of such files (a local copy of a "
         "datasets repository, split by file name), or a datasets hub name")  # what `dataset` may be, for messages


class DataError(UserError, ValueError):
    """Data a run cannot use; the message names what is wrong and what exists."""


@dataclass
class Problem:
    prompt: str  # the raw prompt text (before prompt_template and chat templates)
    answer: str | None  # the reference answer, None when the data has none
    row: dict[str, Any] = field(default_factory=dict, repr=False)  # the source row (reasoning-gym entry)


@dataclass
class Task:
    name: str
    train: list[Problem]
    eval: list[Problem]
    fewshot: list[Problem]
    source: Any = None  # the reasoning-gym dataset (its score_answer grades), else None
    skipped: int = 0  # rows left out because their prompt was unusable
    skipped_why: str = ""
    held_out: int = 0  # training rows left out because an evaluation problem (eval_split) has their prompt

    @property
    def is_reasoning_gym(self) -> bool:
        return self.source is not None


def row_fields(problem: Problem) -> dict[str, Any]:
    """What a template's {FIELD} names: the problem's prompt and answer (None when it has none), and every
    field of its row and of a reasoning-gym entry's metadata. Only text and numbers fill a template (_usable)."""
    row = problem.row
    fields = {**row.get("metadata", {}), **row} if isinstance(row.get("metadata"), dict) else dict(row)
    return {**{str(k): v for k, v in fields.items()}, "prompt": problem.prompt, "answer": problem.answer}


def _usable(value: Any) -> bool:
    return isinstance(value, (str, int, float))


# {name} not right after a letter, digit, _, ^, } or \: those braces are LaTeX (\boxed{x}, \frac{a}{b}, x_{i})
_PLACEHOLDER = re.compile(r"(?<![A-Za-z0-9_^}\\])\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_fields(template: str) -> list[str]:
    """The field names a template means to fill, in order, each once ({answer} in "<answer>{answer}</answer>")."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(template)))


def check_fewshot_template(template: str, examples: list[Problem], setting: str = "fewshot_template") -> None:
    """Raise a DataError when `template` names a field that a worked example lacks or holds null (or a list) in:
    the teacher would read the literal text {FIELD}. The message lists the fields the examples have."""
    rows = [row_fields(p) for p in examples]
    for name in template_fields(template):
        empty = sum(not _usable(r.get(name)) for r in rows)
        if not empty:
            continue
        if not any(name in r for r in rows):
            have = sorted({k for r in rows for k, v in r.items() if _usable(v)})
            raise DataError(f"{setting} names {{{name}}}, but the worked examples have no field '{name}': "
                            f"their fields are {', '.join(have)}")
        raise DataError(f"{setting} names {{{name}}}, but {empty} of the {len(rows)} worked examples have no value "
                        f"for it (null, or not text or a number)")


def _split(rows: list[Problem], fewshot: int, eval_prompts: int, num_prompts: int | None, name: str,
           need_train: bool = True) -> tuple[list, list, list]:
    held = fewshot + eval_prompts
    if need_train and len(rows) <= held:
        raise DataError(
            f"dataset {name} has {len(rows)} rows, but teacher_fewshot={fewshot} and eval_prompts={eval_prompts} "
            "leave none for training"
        )
    if not need_train and len(rows) <= fewshot:
        raise DataError(f"dataset {name} has {len(rows)} rows, but teacher_fewshot={fewshot} leaves no problem to use")
    train = rows[held:] if num_prompts is None else rows[held : held + num_prompts]
    return rows[:fewshot], rows[fewshot:held], train


def _split_by_teacher(rows: list[Problem], fewshot: dict[str, int], route, eval_prompts: int, num_prompts: int | None,
                      name: str, need_train: bool = True) -> tuple[list, list, list]:
    """Each teacher's worked examples are the first fewshot[teacher] rows routed to it (route(rows): each row's
    teacher); the evaluation problems and then the training prompts are the rest, in order."""
    want, few, rest = dict(fewshot), [], []
    for row, teacher in zip(rows, route(rows)):
        if want.get(teacher, 0) > 0:
            few.append(row)
            want[teacher] -= 1
        else:
            rest.append(row)
    short = {t: fewshot[t] - n for t, n in want.items() if n > 0}
    if short:
        raise DataError(f"dataset {name} has too few rows for the worked examples of "
                        + ", ".join(f"teacher {t} (it has {n} of the {fewshot[t]} it sees)" for t, n in short.items()))
    _, ev, train = _split(rest, 0, eval_prompts, num_prompts, name, need_train)
    return few, ev, train


def _composite(options: dict) -> dict:
    """reasoning_gym:composite's `datasets` as reasoning-gym wants them (DatasetSpec), from YAML's mappings
    ({name, weight, config}): a mixture of tasks, each entry's metadata naming its task (source_dataset)."""
    from reasoning_gym.composite import DatasetSpec

    specs = options.get("datasets")
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in specs):
        raise DataError("reasoning_gym:composite needs dataset_options {datasets: [{name: TASK, weight: W, config: {...}}, ...]}"
                        f", got {specs!r}")
    names = [s["name"] for s in specs]
    if len(set(names)) < len(names):
        raise DataError(f"reasoning_gym:composite names a task twice ({', '.join(names)}): reasoning-gym keeps one per name")
    for spec in specs:
        _reasoning_gym(spec["name"], dict(spec.get("config") or {}), 0, 1)  # an unknown task or option, named
    return {**options, "datasets": [DatasetSpec(s["name"], float(s.get("weight", 1.0)), dict(s.get("config") or {}))
                                    for s in specs]}


def _reasoning_gym(task_name: str, options: dict, seed: int, size: int):
    import difflib

    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task_name not in DATASETS:
        close = difflib.get_close_matches(task_name, DATASETS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise DataError(f"reasoning-gym has no task '{task_name}'.{hint}")
    if task_name == "composite":
        options = _composite(options)
    try:
        return reasoning_gym.create_dataset(task_name, size=size, seed=seed, **options)
    except (TypeError, AssertionError, ValueError) as err:
        raise DataError(f"reasoning-gym task '{task_name}' rejected dataset_options {options}: {err}") from err


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file; a line that is not a JSON object is an error naming its line number."""
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: a row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def packaged_datasets() -> dict[str, Path]:
    """{name: directory} of the tasks shipped in the package (packaged:NAME)."""
    root = Path(str(files("esrdistill") / "tasks"))
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and any(p.glob("*.jsonl"))} if root.is_dir() else {}


def _packaged_rows(spec: str, split: str) -> list[dict]:
    name = spec[len(PACKAGED):]
    shipped = packaged_datasets()
    if name not in shipped:
        raise DataError(f"there is no packaged dataset '{name}': the packaged ones are {', '.join(shipped) or 'none'}")
    path = shipped[name] / f"{split}.jsonl"
    if not path.is_file():
        splits = ", ".join(p.stem for p in sorted(shipped[name].glob("*.jsonl")))
        raise DataError(f"{spec} has no split '{split}': its splits are {splits}")
    return _read_jsonl(path)


def _rows_from_library(spec: str, options: dict, split: str) -> list[dict]:
    if spec.startswith(PACKAGED):
        return _packaged_rows(spec, split)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix not in FILE_FORMATS:
        raise DataError(f"data file {path} is a {path.suffix or 'suffix-less'} file, which esrdistill does not read: "
                        f"a dataset is {FORMS}")
    if path.is_dir() and not any(p.suffix in FILE_FORMATS for p in islice(path.rglob("*"), 10_000) if p.is_file()):
        raise DataError(f"dataset {path} is a directory without a .jsonl, .json, .csv or .parquet file: a dataset is {FORMS}")
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        if path.stat().st_size == 0 or not path.read_bytes().strip():
            raise DataError(f"data file {path} is empty")
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
    import datasets  # only here: a JSON Lines file needs no datasets

    try:
        if path.suffix in FILE_FORMATS:
            data = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train", **options)
        else:  # a directory (its data files, split by their names) or a hub name
            data = datasets.load_dataset(str(path) if path.is_dir() else spec, split=split, **options)
    except Exception as err:  # datasets raises many kinds; the user needs the message, not the type
        reason = str(err).strip() or type(err).__name__
        forms = "" if path.suffix in FILE_FORMATS or path.is_dir() else f" (a dataset is {FORMS})"
        raise DataError(f"could not load dataset '{spec}': {reason}{forms}") from err
    return [dict(row) for row in data]


def _check_answers(rows: list[Problem], fewshot: int, eval_prompts: int, answer_field: str, name: str) -> None:
    """Raise a DataError counting the rows of the split (worked examples, evaluation problems, training prompts,
    in that order) with no answer: a worked example would show none and evaluation would grade against nothing."""
    parts = [("worked examples", rows[:fewshot]), ("evaluation problems", rows[fewshot : fewshot + eval_prompts]),
             ("training prompts", rows[fewshot + eval_prompts :])]
    missing = [(what, sum(p.answer is None for p in part)) for what, part in parts]
    total = sum(n for _, n in missing)
    if total:
        raise DataError(f"dataset '{name}': {total} of the {len(rows)} rows used have no answer_field '{answer_field}' "
                        f"(null or missing: {', '.join(f'{n} {what}' for what, n in missing)}); remove or fill them in")


def load_task(
    dataset: str,
    prompt_field: str = "question",
    answer_field: str = "answer",
    num_prompts: int | None = None,
    eval_prompts: int = 0,
    fewshot: int | dict[str, int] = 0,
    seed: int = 0,
    options: dict | None = None,
    split: str = "train",
    need_train: bool = True,
    shuffle: bool = True,
    route=None,
    fewshot_template: str | dict[str, str] | None = None,
    eval_split: str | None = None,
) -> Task:
    """Load and split a task. `dataset` is reasoning_gym:NAME, a file path, a directory of data files, or a
    datasets name (FORMS).

    need_train=False (eval, diagnose): no training row is required, and the held-out split takes
    what there is when the data has fewer than fewshot + eval_prompts rows.
    Several teachers (route: problems -> each one's teacher name): fewshot is {teacher: count}, and each
    teacher's worked examples are the first rows routed to it (_split_by_teacher).
    fewshot_template (the assistant turn of a worked example; {teacher: template} for several teachers) is
    checked against the worked examples now, before any model loads (check_fewshot_template).
    A local row without an answer is an error when answers are used (eval_prompts or fewshot > 0).
    eval_split: the evaluation problems are the first eval_prompts rows of this split (not shuffled), and
    training rows and worked examples whose prompt is one of theirs are left out (Task.held_out counts them).
    """
    options = dict(options or {})
    fewshot_total = sum(fewshot.values()) if isinstance(fewshot, dict) else fewshot

    def checked(task: Task) -> Task:
        templates = fewshot_template if isinstance(fewshot_template, dict) else {None: fewshot_template}
        owners = route(task.fewshot + task.eval + task.train) if route is not None else [None] * len(task.fewshot)
        for teacher, template in templates.items():
            examples = [p for p, owner in zip(task.fewshot, owners) if route is None or owner == teacher]
            if template is not None and examples:
                setting = "fewshot_template" if teacher is None else f"teachers: {teacher}'s fewshot_template"
                check_fewshot_template(template, examples, setting)
        return task

    def split_rows(rows, fewshot, eval_prompts, num_prompts, name, need_train):
        if route is None:
            return _split(rows, fewshot, eval_prompts, num_prompts, name, need_train)
        return _split_by_teacher(rows, fewshot, route, eval_prompts, num_prompts, name, need_train)

    if "seed" in options:  # dataset_options: {seed: N} means the data seed, not a second seed argument
        seed = int(options.pop("seed"))
    if dataset.startswith(REASONING_GYM):
        name = dataset[len(REASONING_GYM) :]
        if eval_split:
            raise DataError(f"eval_split={eval_split}: a reasoning-gym task has no splits (its held-out problems are "
                            "rows of the same generator); give a dataset with a test split, or leave eval_split unset")
        size = fewshot_total + eval_prompts + (num_prompts if num_prompts is not None else DEFAULT_GENERATED)
        source = _reasoning_gym(name, options, seed, size)
        # some tasks (graph_color, rush_hour, ...) have no reference answer: their score_answer checks a response alone
        rows = [Problem(prompt=e["question"], answer=None if e["answer"] is None else str(e["answer"]), row=e) for e in source]
        few, ev, train = split_rows(rows, fewshot, eval_prompts, num_prompts, dataset, need_train)
        return checked(Task(name=dataset, train=train, eval=ev, fewshot=few, source=source))

    raw = _rows_from_library(dataset, options, split)
    if not raw:
        raise DataError(f"dataset '{dataset}' is empty")
    fields = sorted(raw[0])
    if prompt_field not in raw[0]:
        raise DataError(f"prompt_field '{prompt_field}' is not in dataset '{dataset}'; its fields are: {', '.join(fields)}")
    needs_answer = eval_prompts > 0 or fewshot_total > 0
    if needs_answer and answer_field not in raw[0]:
        raise DataError(
            f"answer_field '{answer_field}' is not in dataset '{dataset}' (needed for eval_prompts/teacher_fewshot); "
            f"its fields are: {', '.join(fields)}"
        )
    if shuffle:
        random.Random(seed).shuffle(raw)
    rows = _problems(raw, prompt_field, answer_field)
    skipped = len(raw) - len(rows)
    if not rows:
        raise DataError(f"dataset '{dataset}' has no row whose '{prompt_field}' is a non-empty string ({len(raw)} rows)")
    held_out = 0
    if eval_split:
        ev = _problems(_rows_from_library(dataset, options, eval_split), prompt_field, answer_field)[:eval_prompts]
        if need_train and len(ev) < eval_prompts:
            raise DataError(f"eval_split {eval_split} of {dataset} has {len(ev)} usable rows, but eval_prompts={eval_prompts}")
        held = {p.prompt for p in ev}
        held_out = sum(p.prompt in held for p in rows)
        rows = [p for p in rows if p.prompt not in held]
        few, _, train = split_rows(rows, fewshot, 0, num_prompts, dataset, need_train)
    else:
        few, ev, train = split_rows(rows, fewshot, eval_prompts, num_prompts, dataset, need_train)
    if needs_answer:
        _check_answers(few + ev + train, len(few), len(ev), answer_field, dataset)
    return checked(Task(name=dataset, train=train, eval=ev, fewshot=few, skipped=skipped, held_out=held_out,
                        skipped_why=f"'{prompt_field}' is not a non-empty string" if skipped else ""))


def _problems(raw: list[dict], prompt_field: str, answer_field: str) -> list[Problem]:
    """The rows with a usable prompt (a non-empty string), as Problems."""
    rows = []
    for row in raw:
        prompt = row.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            continue  # a row without a usable prompt cannot be sampled from
        answer = row.get(answer_field)
        rows.append(Problem(prompt=prompt, answer=None if answer is None else str(answer), row=row))
    return rows
