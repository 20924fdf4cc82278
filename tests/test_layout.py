"""The package's layout: the library apart from the commands built on it, imports in one direction, teachers and
engines as packages of classes, and the training loop's phases, each callable alone, training with a kind of teacher
defined here and registered nowhere."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from esrdistill import build, learner, losses, train
from esrdistill.config import make_config
from esrdistill.teachers.protocol import DIVERGENCE_KEYS, Comparison, Plan, Scores, Teacher
from esrdistill.teachers.same import divergence_metrics
from esrdistill.tracking import PhaseTimer
from helpers import tiny_overrides

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "esrdistill"
COMMANDS = ("esrdistill.cli", "esrdistill.commands")  # what is built on the library


def _module_name(path: Path) -> str:
    parts = ("esrdistill",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """{module: [(an esrdistill module it imports, whether inside a function)]}, relative imports resolved."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found += [(t, id(node) not in top) for t in targets if t in modules and t != name]
        out[name] = found
    return out


def _is_command(module: str) -> bool:
    return module == COMMANDS[0] or module == COMMANDS[1] or module.startswith(COMMANDS[1] + ".")


def test_the_parser_sees_the_packages_imports():
    imports = _imports()
    assert ("esrdistill.build", False) in imports["esrdistill.train"]
    assert ("esrdistill.teachers.protocol", False) in imports["esrdistill.teachers.same"]
    assert any(t == "esrdistill.commands.quickstart" for t, _ in imports["esrdistill.cli"])
    assert len(imports) >= 45


def test_no_module_imports_itself_back_through_others():
    graph = {m: {t for t, _ in targets} for m, targets in _imports().items()}
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_library_never_imports_a_command():
    wrong = [(m, t) for m, targets in _imports().items() if not _is_command(m) for t, _ in targets if _is_command(t)]
    assert wrong == []


def test_imports_inside_functions_are_only_the_command_lines_deferred_commands():
    """No import is hidden in a function to dodge a cycle; cli.py defers each command's (torch and the rest) until the
    command runs, so that `esrdistill --help` and a bad argument answer at once."""
    lazy = [(m, t) for m, targets in _imports().items() for t, inside in targets if inside and m != "esrdistill.cli"]
    assert lazy == []


def test_teachers_and_engines_hold_classes_and_do_not_read_the_config():
    readers = {"esrdistill.config", "esrdistill.build", "esrdistill.routing"}
    wrong = [(m, t) for m, targets in _imports().items() if m.startswith(("esrdistill.teachers", "esrdistill.engines"))
             for t, _ in targets if t in readers]
    assert wrong == []


# ---- a kind of teacher defined here, trained by the loop's phases -------------------------------------------------

class UniformTeacher:
    """A teacher that finds every token equally likely: one class with what teachers.protocol.Teacher lists."""

    kind = "uniform"
    constant_metrics = {"uniform/vocab": 1.0}
    metric_keys = DIVERGENCE_KEYS
    ratio_keys = ("uniform/rows",)
    topk_keys = ()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def plan(self, prompts, responses, mask) -> Plan:
        return Plan(prompts=prompts, responses=responses, response_mask=mask, mask=mask,
                    ratios={"uniform/rows": (float(len(prompts)), 0.0)})

    def score(self, plan, rows, width, hidden=False) -> Scores:
        logp = torch.full((len(rows), width, self.vocab_size), -torch.log(torch.tensor(float(self.vocab_size))))
        return Scores(logp=logp, mask=plan.mask[rows, :width])

    def comparable(self, student_logp, scores):
        return student_logp, scores.logp

    def compare(self, student_logp, scores, tokens) -> Comparison:
        per_token = losses.reverse_kl(student_logp, scores.logp, scores.mask)
        return Comparison(per_token=per_token, metrics=divergence_metrics(student_logp, scores.logp, scores.mask, per_token))


@pytest.fixture
def tiny_run(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    accelerator = Accelerator(cpu=True)
    cfg = make_config(tiny_overrides(student, teacher, tmp_path / "run", loss="reverse_kl"))
    return train.setup(cfg, accelerator, say=lambda message: None), accelerator


def test_a_new_kind_of_teacher_trains_a_step_through_the_loops_phases(tiny_run):
    run, accelerator = tiny_run
    teacher = UniformTeacher(run.pair.vocab_size)
    assert isinstance(teacher, Teacher)
    run = dataclasses.replace(run, teacher=teacher)
    student = learner.prepare(run.cfg, run.pair, accelerator)
    engine = student.engine(build.engine(run.cfg, run.pair, student.model, 256))
    before = {n: p.detach().clone() for n, p in student.model.named_parameters() if p.requires_grad}

    batch = train.sample(run, engine, 0, accelerator)
    assert batch.rollouts.responses.shape[0] == run.cfg.batch_size and batch.rollouts.responses.shape[1] <= run.cfg.rollout_tokens
    plan = teacher.plan([run.train_set.teacher_ids[i] for i in batch.rows], batch.rollouts.responses, batch.rollouts.mask)
    totals, counted = train.accumulate(run, student, batch, plan, accelerator, PhaseTimer(), lambda: None)
    assert counted == batch.rollouts.mask.sum().item() > 0
    assert totals["uniform/rows:num"] == run.cfg.batch_size and totals["loss"] > 0
    finite, grad_norm, lr = train.optimizer_step(run.cfg, student, totals["loss"], accelerator)
    assert finite and grad_norm > 0 and lr == pytest.approx(run.cfg.lr)
    changed = [n for n, p in student.model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert changed  # the step reached the weights

    metrics = train.step_record(run.cfg, teacher, totals, counted, batch, lr, grad_norm, finite)
    assert metrics["uniform/rows"] == run.cfg.batch_size and metrics["uniform/vocab"] == 1.0
    # the uniform teacher's entropy is log V at every position
    assert metrics["teacher/entropy"] == pytest.approx(float(torch.log(torch.tensor(float(run.pair.vocab_size)))), rel=1e-5)
    assert metrics["kl/reverse"] > 0 and metrics["rollout/k"] == run.cfg.rollout_tokens


def test_sampling_a_step_depends_on_the_step_alone(tiny_run):
    """sample(run, engine, step) is seeded by (seed, step, row): the same step samples the same rollouts whatever
    came before it (a resumed run continues as the uninterrupted one), another step other rollouts."""
    run, accelerator = tiny_run
    student = learner.prepare(run.cfg, run.pair, accelerator)
    engine = student.engine(build.engine(run.cfg, run.pair, student.model, 256))
    first = train.sample(run, engine, 1, accelerator)
    train.sample(run, engine, 0, accelerator)
    again = train.sample(run, engine, 1, accelerator)
    other = train.sample(run, engine, 2, accelerator)
    assert first.rows == again.rows and torch.equal(first.rollouts.responses, again.rollouts.responses)
    assert first.rows != other.rows or not torch.equal(first.rollouts.responses, other.rollouts.responses)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_a_step_whose_loss_is_not_finite_leaves_the_weights_and_advances_the_schedule(tiny_run):
    run, accelerator = tiny_run
    student = learner.prepare(run.cfg, run.pair, accelerator)
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    finite, _, lr = train.optimizer_step(run.cfg, student, float("nan"), accelerator)
    assert not finite and lr == pytest.approx(run.cfg.lr)
    assert all(torch.equal(p.detach(), before[n]) for n, p in student.model.named_parameters())
    assert student.scheduler.last_epoch == 1  # the schedule stays a function of the step
