"""Several teachers in one run (`teachers:` and `teacher_field`; docs/teachers.md): each training row is scored
by the teacher its data names, and the loss is the same sum over rows whatever the routing.

`Routed` is one more `teacher.Teacher`: it holds {name: Teacher} (each a SameTokenizer, a CrossTokenizer with
its own alignment, or a ServedTeacher) and, through the teacher prompts the loop hands it (`TeacherPrompt`: ids that carry their
teacher's name), which rows each one scores. `plan` plans each teacher's rows; `score` and `compare` split a
micro-batch by teacher, call each one on its rows and put the per-row results back in the micro-batch's order.
The training loop and the loss do not know there are several.

The rest (views, route, pair, prompt_set, teacher) is how build.py makes them from the config.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from esrdistill.config import is_served
from esrdistill.errors import UserError
from esrdistill.teacher import Comparison, Plan, Scores, Teacher
from esrdistill.tracking import PhaseTimer

VIEW_KEYS = {"model": "teacher", "system_prompt": "teacher_system_prompt", "fewshot": "teacher_fewshot",
             "suffix": "teacher_prompt_suffix", "fewshot_template": "fewshot_template", "tokenizer": "teacher_tokenizer",
             "model_name": "teacher_model_name"}  # a teacher's own keys -> the run's keys they stand for
# The per-position metrics each kind of teacher reports (its compare's keys): a metric only some of the run's
# teachers report is averaged over their positions alone. tests/test_teachers.py checks these against compare.
_DIVERGENCE = ("kl/reverse", "kl/forward", "teacher/entropy", "student/entropy", "agree/top1", "agree/teacher_top1_prob",
               "agree/teacher_top1_missed")
METRICS = {"same": _DIVERGENCE + ("kl/sampled",),
           "cross": _DIVERGENCE + ("xtok/student_mapped_mass", "xtok/teacher_mapped_mass"),
           "served": _DIVERGENCE + ("kl/sampled", "teacher/topk_mass")}
# The keys a served teacher with teacher_top_k < its vocabulary computes over its top-K categories, not over the
# vocabulary (served_teacher.topk_metrics): beside teachers that compute them over the vocabulary they are not averaged
# with theirs (Routed.split).
TOPK_KEYS = ("kl/reverse", "kl/forward", "teacher/entropy")
PLAN_RATIOS = {"same": (), "cross": ("xtok/aligned_frac",), "served": ("teacher/request_s", "teacher/retries")}
ALIGNED = "xtok/aligned_frac"  # over every row: a teacher that reads the student's ids has a position for each


class TeacherPrompt(list):
    """A teacher prompt's token ids, and the name of the teacher that reads it."""

    def __init__(self, ids, teacher: str):
        super().__init__(ids)
        self.teacher = teacher


# ---- the teacher ---------------------------------------------------------------------------------------

@dataclass
class RoutedPlan(Plan):
    names: list[str] = field(default_factory=list)  # each row's teacher
    local: list[int] = field(default_factory=list)  # each row's index in its teacher's plan
    parts: dict[str, Plan] = field(default_factory=dict)  # each teacher's plan of its rows


@dataclass
class RoutedScores(Scores):
    parts: list = field(default_factory=list)  # (teacher name, (b_n,) rows of the micro-batch, its Scores)

    def chunk(self, positions: slice) -> "RoutedScores":
        return RoutedScores(logp=None, mask=self.mask[:, positions],
                            parts=[(name, rows, part.chunk(positions)) for name, rows, part in self.parts])


class Routed:
    """A Teacher (teacher.Teacher) that scores each row with the teacher its prompt names."""

    kind = "routed"

    def __init__(self, teachers: dict[str, Teacher], offload: dict | None = None, signals: bool = False):
        """signals: token selection reads kl/reverse, kl/forward and teacher/entropy at every position (token_select
        other than prefix), so they stay per position over every row even where teachers compute them over different
        categories (below)."""
        self.teachers = teachers
        self.offload = offload or {}  # name -> (model, device): kept on the CPU, on the device while it scores
        self.constant_metrics = {f"{key}/{name}": value for name, t in teachers.items()
                                 for key, value in t.constant_metrics.items()}
        kinds = [METRICS[t.kind] for t in teachers.values()]
        self.metrics = list(dict.fromkeys(k for keys in kinds for k in keys))  # every process logs the same keys
        self.common = {k for k in self.metrics if all(k in keys for keys in kinds)}
        # Served teachers whose TOPK_KEYS are over their top-K categories: beside teachers whose are over the vocabulary,
        # those keys are averaged over the others' positions alone and theirs are logged as <key>/<name>.
        self.top_k_only = [n for n, t in teachers.items() if t.kind == "served" and not t.whole_vocabulary]
        self.mixed = 0 < len(self.top_k_only) < len(teachers)
        self.split = self.mixed and not signals

    def _reports(self, name: str, metrics: dict, key: str) -> bool:
        """Whether teacher `name`'s value of `key` goes into the run's `key`."""
        return key in metrics and not (self.split and key in TOPK_KEYS and name in self.top_k_only)

    def plan(self, prompts: list[list[int]], responses: torch.Tensor, mask: torch.Tensor) -> Plan:
        names = [p.teacher for p in prompts]
        local, rows_of = [], {name: [] for name in self.teachers}
        for b, name in enumerate(names):
            local.append(len(rows_of[name]))
            rows_of[name].append(b)
        parts, counted = {}, torch.zeros_like(mask)
        ratios = {f"teacher/rows/{name}": (float(len(rows)), 0.0) for name, rows in rows_of.items()}  # counts: summed
        ratios.update({f"time/teacher_s/{name}": (0.0, 1.0) for name in self.teachers})  # each process's seconds, averaged
        for name, rows in rows_of.items():
            if rows:
                parts[name] = self.teachers[name].plan([list(prompts[b]) for b in rows], responses[rows], mask[rows])
                counted[rows] = parts[name].mask.to(counted.dtype)
        plan = RoutedPlan(prompts=prompts, responses=responses, response_mask=mask, mask=counted, ratios=ratios,
                          names=names, local=local, parts=parts)
        self._ratios(plan)
        return plan

    def _ratios(self, plan: RoutedPlan) -> None:
        """Each teacher's plan ratios as `<key>/<name>`, and summed over teachers as `<key>`: the same keys on every
        process whatever its rows (a served teacher adds to its plan's while it scores)."""
        summed = list(dict.fromkeys(k for t in self.teachers.values() for k in PLAN_RATIOS[t.kind]))  # in one order
        for key in summed:
            plan.ratios[key] = (0.0, 0.0)
        for name, teacher in self.teachers.items():
            part = plan.parts.get(name)
            for key in PLAN_RATIOS[teacher.kind]:
                plan.ratios[f"{key}/{name}"] = part.ratios[key] if part is not None else (0.0, 0.0)
            if part is None:
                continue
            for key in summed:
                whole = (float(part.mask.sum()), float(part.response_mask.sum())) if key == ALIGNED else (0.0, 0.0)
                num, den = part.ratios.get(key, whole)
                plan.ratios[key] = (plan.ratios[key][0] + num, plan.ratios[key][1] + den)

    def score(self, plan: RoutedPlan, rows: list[int], width: int, hidden: bool = False) -> Scores:
        parts, timer = [], PhaseTimer()
        for name, teacher in self.teachers.items():
            mine = [i for i, r in enumerate(rows) if plan.names[r] == name]
            if not mine:
                continue
            with timer(name), on_device(*self.offload[name]) if name in self.offload else nullcontext():
                scores = teacher.score(plan.parts[name], [plan.local[rows[i]] for i in mine], width, hidden)
            seconds, one = plan.ratios[f"time/teacher_s/{name}"]
            plan.ratios[f"time/teacher_s/{name}"] = (seconds + timer.seconds[name], one)
            parts.append((name, torch.tensor(mine, device=scores.mask.device), scores))
        self._ratios(plan)
        mask = plan.mask[rows, :width].to(parts[0][2].mask.device)
        return RoutedScores(logp=None, mask=mask, parts=parts)

    def _each(self, student_logp: torch.Tensor, scores: RoutedScores, tokens: torch.Tensor | None):
        """(name, its (b_n,) rows of the micro-batch, the student's log-probs and tokens there, its Scores) for each
        teacher of the micro-batch; a micro-batch of one teacher as it is."""
        whole = len(scores.parts) == 1
        for name, rows, part in scores.parts:
            s = student_logp if whole else student_logp.index_select(0, rows.to(student_logp.device))
            t = None if tokens is None else (tokens if whole else tokens.index_select(0, rows.to(tokens.device)))
            yield name, rows, s, t, part

    def comparable(self, student_logp: torch.Tensor, scores: RoutedScores) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [(rows, *self.teachers[name].comparable(s, part)) for name, rows, s, _, part in self._each(student_logp, scores, None)]
        if len({p[1].shape[-1] for p in pairs}) > 1:
            raise UserError("teachers that compare over different spaces (a shared tokenizer and another) have no one "
                            "comparable space: diagnose one teacher at a time")
        order = torch.cat([rows for rows, _, _ in pairs]).argsort()
        return torch.cat([p[1] for p in pairs])[order], torch.cat([p[2] for p in pairs])[order]

    def compare(self, student_logp: torch.Tensor, scores: RoutedScores, tokens: torch.Tensor) -> Comparison:
        losses, metrics, masks, order = [], [], [], []
        for name, rows, s, t, part in self._each(student_logp, scores, tokens):
            comparison = self.teachers[name].compare(s, part, t)
            unknown = set(comparison.metrics) - set(METRICS[self.teachers[name].kind])
            if unknown:
                raise RuntimeError(f"teachers.METRICS does not list {sorted(unknown)} of a {self.teachers[name].kind} teacher")
            losses.append(comparison.per_token)
            metrics.append((name, comparison.metrics))
            masks.append(part.mask.float())
            order.append(rows)
        back = torch.cat(order).argsort().to(losses[0].device)  # the micro-batch's row order
        per_token = torch.cat(losses)[back]
        zeros = [torch.zeros_like(m) for m in masks]
        out = {}
        for key in self.metrics:
            if key in self.common and not (self.split and key in TOPK_KEYS):
                out[key] = torch.cat([m[key] for _, m in metrics])[back]
            else:  # reported by some teachers only: averaged over their positions
                out[key + ":num"] = torch.cat([m[key] if self._reports(n, m, key) else z for (n, m), z in zip(metrics, zeros)])[back]
                out[key + ":den"] = torch.cat([mask if self._reports(n, m, key) else z
                                               for (n, m), mask, z in zip(metrics, masks, zeros)])[back]
        for name in self.teachers:  # each teacher's reverse KL over its own positions (all zeros: not in this micro-batch)
            for key in ("kl/reverse",) + (TOPK_KEYS[1:] if self.mixed and name in self.top_k_only else ()):
                out[f"{key}/{name}:num"] = torch.cat([m[key] if n == name else z for (n, m), z in zip(metrics, zeros)])[back]
                out[f"{key}/{name}:den"] = torch.cat([mask if n == name else z
                                                      for (n, _), mask, z in zip(metrics, masks, zeros)])[back]
        return Comparison(per_token=per_token, metrics=out)


@contextmanager
def on_device(model, device: torch.device):
    """`model` on `device` for the block, then back on the CPU (teacher_offload)."""
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


# ---- from the config ------------------------------------------------------------------------------------

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
    from esrdistill.data import DataError

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


def pair(cfg, device: torch.device, trainable: bool):
    """build.Pair of the default teacher, with `teachers`: {name: (its view of the config, its Pair)}; a model
    named by several teachers is loaded once. Not trainable (evaluation, diagnostics): the default teacher alone."""
    from esrdistill import build, models

    seen, default = views(cfg), default_name(cfg)
    main = build.pair(seen[default], device, trainable)
    if not trainable:
        return main
    loaded = {seen[default].teacher: main}
    for view in seen.values():
        if view.teacher in loaded:
            continue
        if is_served(view.teacher):
            loaded[view.teacher] = _served(view, main)
            continue
        tokenizer = models.load_tokenizer(view.teacher, view.model_cache)
        if view.cross_tokenizer == "off":
            models.shared_vocab(main.tokenizer, tokenizer)
        relation = models.tokenizer_relation(main.tokenizer, tokenizer)
        cross = relation == models.DIFFERENT or view.cross_tokenizer == "on"
        home = torch.device("cpu") if cfg.teacher_offload else device  # offloaded: loaded on the CPU
        model = models.freeze(models.load_model(view.teacher, main.dtype, home, view.model_cache))
        models.check_head_rows(main.vocab_size, main.student, model, len(tokenizer.get_vocab()) if cross else None)
        loaded[view.teacher] = dataclasses.replace(main, teacher=model, teacher_tokenizer=tokenizer, relation=relation,
                                                   cross=cross, teacher_eos_ids=models.eos_ids(tokenizer, model), served=None)
    if cfg.teacher_offload and main.teacher is not None:
        main.teacher.to("cpu")
    return dataclasses.replace(main, teachers={name: (view, loaded[view.teacher]) for name, view in seen.items()})


def _served(view, main):
    """The Pair of a teacher served at view.teacher beside the run's student (build.served_pair's checks; the server was
    asked first in build.check_available, before any model loaded)."""
    from esrdistill import build, models
    from esrdistill.served_teacher import check_server

    tokenizer, relation, appended = build.served_tokenizer(view, main.tokenizer)
    server = check_server(build.served_settings(view), appended, tokenizer)
    return dataclasses.replace(main, teacher=None, teacher_tokenizer=tokenizer, relation=relation, cross=False,
                               teacher_eos_ids=models.eos_ids(tokenizer, None), served=server)


def prompt_set(cfg, pair, task, problems: list, new_tokens: int, new_tokens_key: str):
    """build.prompt_set of each teacher's problems in its own view, merged back in the problems' order, with the
    teacher prompts as TeacherPrompts."""
    from esrdistill import build
    from esrdistill.prompts import PromptSet

    names = route(cfg, problems, task.fewshot + task.eval + task.train)
    kept, dropped, why = {}, 0, []
    for name, (view, sub) in pair.teachers.items():
        mine = [p for p, n in zip(problems, names) if n == name]
        if not mine:
            continue
        part = build.prompt_set(view, sub, own(cfg, task, name), mine, new_tokens, new_tokens_key)
        kept.update({id(p): (s, TeacherPrompt(t, name)) for p, s, t in zip(part.problems, part.student_ids, part.teacher_ids)})
        dropped += part.dropped
        why += [f"{name}: {part.why_dropped}"] if part.why_dropped else []
    order = [p for p in problems if id(p) in kept]
    return PromptSet(problems=order, student_ids=[kept[id(p)][0] for p in order],
                     teacher_ids=[kept[id(p)][1] for p in order], dropped=dropped, why_dropped="; ".join(why))


def teacher(cfg, pair, prompts: list | None = None) -> Routed:
    """A Routed teacher over build.teacher of each teacher's view (its prefix cache over its own prompts)."""
    from esrdistill import build, rollout

    out, offload = {}, {}
    for name, (view, sub) in pair.teachers.items():
        mine = [list(p) for p in prompts or [] if p.teacher == name]
        if cfg.loss_chunk:
            rollout.check_hidden_path(sub.teacher, f"teacher {name}")
        if cfg.teacher_offload and sub.teacher is not None:  # its prefix cache and vocabulary map are made on the device
            offload[name] = (sub.teacher, sub.device)
        with on_device(*offload[name]) if name in offload else nullcontext():
            out[name] = build.teacher(view, sub, mine or None)
    return Routed(out, offload, signals=cfg.token_select != "prefix")
