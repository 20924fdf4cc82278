"""Several teachers in one run (`teachers:` and `teacher_field`; docs/teachers.md): each training row is scored
by the teacher its data names, and the loss is the same sum over rows whatever the routing.

`Routed` is one more `protocol.Teacher`: it holds {name: Teacher} (each a SameTokenizer, a CrossTokenizer with
its own alignment, or a ServedTeacher) and, through the teacher prompts the loop hands it (`TeacherPrompt`: ids that
carry their teacher's name), which rows each one scores. `plan` plans each teacher's rows; `score` and `compare` split
a micro-batch by teacher, call each one on its rows and put the per-row results back in the micro-batch's order.
What it reports it asks its teachers (their metric_keys, ratio_keys and topk_keys). The training loop and the loss do
not know there are several. build.py makes it from the config (build.routed_pair, build.teacher).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from esrdistill.errors import UserError
from esrdistill.teachers.protocol import Comparison, Plan, Scores, Teacher
from esrdistill.tracking import PhaseTimer

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
    """A Teacher (protocol.Teacher) that scores each row with the teacher its prompt names."""

    kind = "routed"

    def __init__(self, teachers: dict[str, Teacher], offload: dict | None = None, signals: bool = False):
        """signals: token selection reads kl/reverse, kl/forward and teacher/entropy at every position (token_select
        other than prefix), so they stay per position over every row even where teachers compute them over different
        categories (below)."""
        self.teachers = teachers
        self.offload = offload or {}  # name -> (model, device): kept on the CPU, on the device while it scores
        self.constant_metrics = {f"{key}/{name}": value for name, t in teachers.items()
                                 for key, value in t.constant_metrics.items()}
        kinds = [t.metric_keys for t in teachers.values()]
        self.metrics = list(dict.fromkeys(k for keys in kinds for k in keys))  # every process logs the same keys
        self.common = {k for k in self.metrics if all(k in keys for keys in kinds)}
        # Teachers whose topk_keys are over their top-K categories (served, teacher_top_k below the vocabulary): beside
        # teachers whose are over the vocabulary, those keys are averaged over the others' positions alone and theirs
        # are logged as <key>/<name>.
        self.topk = {n: t.topk_keys for n, t in teachers.items() if t.topk_keys}
        self.mixed = 0 < len(self.topk) < len(teachers)
        self.split = self.mixed and not signals
        self.topk_keys = tuple(dict.fromkeys(k for keys in self.topk.values() for k in keys)) if not self.mixed else ()
        self.metric_keys, self.ratio_keys = tuple(self.metrics), self._ratio_keys()

    def _ratio_keys(self) -> tuple[str, ...]:
        """The keys plan puts into its ratios: rows and seconds per teacher, each teacher's ratio_keys as
        `<key>/<name>` and summed over the teachers as `<key>`."""
        names = list(self.teachers)
        summed = dict.fromkeys(k for t in self.teachers.values() for k in t.ratio_keys)
        return tuple([f"teacher/rows/{n}" for n in names] + [f"time/teacher_s/{n}" for n in names] + list(summed)
                     + [f"{k}/{n}" for n, t in self.teachers.items() for k in t.ratio_keys])

    def _reports(self, name: str, metrics: dict, key: str) -> bool:
        """Whether teacher `name`'s value of `key` goes into the run's `key`."""
        return key in metrics and not (self.split and key in self.topk.get(name, ()))

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
        summed = list(dict.fromkeys(k for t in self.teachers.values() for k in t.ratio_keys))  # in one order
        for key in summed:
            plan.ratios[key] = (0.0, 0.0)
        for name, teacher in self.teachers.items():
            part = plan.parts.get(name)
            for key in teacher.ratio_keys:
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
            unknown = set(comparison.metrics) - set(self.teachers[name].metric_keys)
            if unknown:
                raise RuntimeError(f"the {self.teachers[name].kind} teacher {name}'s compare returned {sorted(unknown)}, "
                                   "which its metric_keys do not list")
            losses.append(comparison.per_token)
            metrics.append((name, comparison.metrics))
            masks.append(part.mask.float())
            order.append(rows)
        back = torch.cat(order).argsort().to(losses[0].device)  # the micro-batch's row order
        per_token = torch.cat(losses)[back]
        zeros = [torch.zeros_like(m) for m in masks]
        out = {}
        for key in self.metrics:
            if key in self.common and not (self.split and any(key in keys for keys in self.topk.values())):
                out[key] = torch.cat([m[key] for _, m in metrics])[back]
            else:  # reported by some teachers only: averaged over their positions
                out[key + ":num"] = torch.cat([m[key] if self._reports(n, m, key) else z for (n, m), z in zip(metrics, zeros)])[back]
                out[key + ":den"] = torch.cat([mask if self._reports(n, m, key) else z
                                               for (n, m), mask, z in zip(metrics, masks, zeros)])[back]
        for name in self.teachers:  # each teacher's reverse KL over its own positions (all zeros: not in this micro-batch)
            for key in ("kl/reverse",) + (tuple(k for k in self.topk.get(name, ()) if k != "kl/reverse") if self.mixed else ()):
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
