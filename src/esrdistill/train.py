"""The training loop of on-policy distillation with Early Stopping Rollout: `train()`, which reads as the phases of
a step, each a function of its inputs below it:

    for each step:  sample (the student's rollouts, K tokens) -> teacher.plan (what the teacher reads)
                    -> accumulate (per micro-batch: the teacher's scores, the loss, backward) -> optimizer_step
                    -> step_record, evaluate, log, checkpoint, stop

The student it trains is a learner.Learner (one process, DDP or FSDP2 alike); the teacher any
teachers.protocol.Teacher; the rollouts come from any engines.protocol.Engine.

Run it with `esrdistill train CONFIG.yaml`, or `accelerate launch --multi_gpu --num_processes N -m
esrdistill.cli train ...` for N processes (each samples its share of the batch; gradients are summed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from esrdistill import build, checkpoint, horizon, learner, objective, order, ranks, rollout, rundir, selection
from esrdistill.config import Config, ConfigError
from esrdistill.engines.protocol import Engine
from esrdistill.errors import UserError
from esrdistill.evaluate import EvalSettings, evaluate
from esrdistill.horizon import Adaptive
from esrdistill.measure import auto_k
from esrdistill.stepmetrics import step_metrics, step_warnings
from esrdistill.teachers.protocol import LossSettings, Teacher
from esrdistill.tracking import PhaseTimer, peak_memory_mb, reset_peak_memory


class TrainingInterrupted(Exception):
    """Ctrl-C during training: the state after the last complete step was saved to `checkpoint`."""

    def __init__(self, step: int, checkpoint: Path, resume: str = "resume=true"):
        super().__init__(f"interrupted after step {step}; saved {checkpoint}; continue with {resume}")
        self.step, self.checkpoint = step, checkpoint


class _InterruptFlag:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once.

    Under a launcher (several processes) the second SIGINT is ignored: torch's launcher forwards the
    terminal's Ctrl-C to every process a second time, and would otherwise turn a clean stop into an
    abrupt one. The launcher still kills the processes if they take longer than its grace period.
    """

    def __init__(self, several_processes: bool = False) -> None:
        self.set = False
        self.several_processes = several_processes
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.set and not self.several_processes:
                raise KeyboardInterrupt
            if not self.set:
                tqdm.write("Interrupt: finishing this step and saving a checkpoint"
                           + ("" if self.several_processes else " (Ctrl-C again to stop now)") + ".")
            self.set = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainingDiverged(UserError):
    """Too many steps in a row had a NaN or inf loss or gradient; the weights on disk are the last finite ones."""



@dataclass
class Run:
    """What the loop needs, built from the config once."""

    cfg: Config  # the config with rollout_tokens=auto resolved
    run_dir: Path
    pair: build.Pair
    teacher: Teacher  # any teachers.protocol.Teacher: same, cross, served or routed
    train_set: object  # prompts.PromptSet
    eval_set: object
    grade: object
    sampling: rollout.Sampling  # the rollouts'
    evaluation: EvalSettings  # how the student is evaluated
    loss: LossSettings  # the loss and the token selection
    adaptive: Adaptive | None = None  # rollout_tokens=adaptive's rule of K (horizon.py); None: K from the config


def setup(cfg: Config, accelerator: Accelerator, say) -> Run:
    """Checks, data, models and prompts. A failure on any process stops every process with its message."""
    device, is_main, procs = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    with ranks.fail_together(accelerator):
        if cfg.device == "cuda" and device.type != "cuda":
            raise ConfigError("device=cuda but CUDA is not available here; use device=cpu or auto")
        ranks.check_joined(cfg.device, procs)
        if cfg.batch_size % procs:
            raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the {procs} processes")
        learner.check(cfg, procs)  # an FSDP accelerate config: refused now if esrdistill cannot follow it
        run_dir = rundir.check(cfg, say) if is_main else Path(cfg.run_dir).expanduser()
        task = build.task(cfg)
        grade = build.grader(cfg, task)  # a bad grader fails here, before minutes of model loading
        build.check_available(cfg)  # so do a missing vLLM, TensorBoard or wandb, before anything is written
        if is_main:  # the first process converts packaged models, once
            build.prepare_models(cfg)
    accelerator.wait_for_everyone()
    with ranks.fail_together(accelerator):
        set_seed(cfg.seed)
        pair = build.pair(cfg, device, trainable=True)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if cfg.resume and (run_dir / "config.yaml").is_file() else {}
        if cfg.rollout_tokens == "auto" and isinstance((saved or {}).get("rollout_tokens"), int):
            cfg = dataclasses.replace(cfg, rollout_tokens=saved["rollout_tokens"])  # a resumed run keeps the K it chose
            say(f"rollout_tokens=auto: K = {cfg.rollout_tokens}, as chosen when this run started")
        if cfg.rollout_tokens == "auto":  # the diagnostics choose K for this pair and task, on the first process
            choice = [auto_k(cfg, pair, task, grade, say) if is_main else None]
            if procs > 1:
                broadcast_object_list(choice)
            cfg = dataclasses.replace(cfg, rollout_tokens=choice[0][0])
            say(f"rollout_tokens=auto: K = {cfg.rollout_tokens}: {choice[0][1]}")
        rollout_len = build.rollout_length(cfg)  # ESR: K tokens (the largest of a schedule); a full rollout: max_new_tokens
        train_set = build.prompt_set(cfg, pair, task, task.train, rollout_len, build.rollout_length_key(cfg))
        eval_set = build.prompt_set(cfg, pair, task, task.eval, cfg.max_new_tokens, "max_new_tokens")
        train_set.require("training prompts")
        teacher = build.teacher(cfg, pair, train_set.teacher_ids)
        if cfg.loss_chunk:
            rollout.check_hidden_path(pair.student, "student")
            rollout.check_hidden_path(pair.teacher, "teacher")
    say(f"{len(train_set.problems)} training prompts ({train_set.dropped} dropped as too long), "
        f"{len(eval_set.problems)} eval problems ({eval_set.dropped} dropped), rollouts of {rollout_len} tokens")
    say(pair.describe() + "".join(f"; {k} {v:.1%}" for k, v in teacher.constant_metrics.items()))
    for note in (train_set.why_dropped, task.skipped and f"{task.skipped} rows skipped: {task.skipped_why}",
                 task.held_out and f"{task.held_out} training rows left out: an evaluation problem has their prompt"):
        if note:
            say(f"Note: {note}")
    if cfg.loss == "sampled" and cfg.top_p < 1:
        say(f"Warning: loss=sampled with top_p={cfg.top_p}: tokens outside the nucleus are never sampled, so the "
            "gradient leaves their part of the reverse KL out; top_p=1 gives an unbiased reverse-KL gradient")
    return Run(cfg=cfg, run_dir=run_dir, pair=pair, teacher=teacher, train_set=train_set, eval_set=eval_set, grade=grade,
                  sampling=build.rollout_sampling(cfg, pair, rollout_len),
                  evaluation=build.evaluation(cfg, pair.tokenizer, pair.eos_ids, pair.vocab_size), loss=build.loss_settings(cfg),
                  adaptive=build.adaptive(cfg))


def train(cfg: Config, log=tqdm.write) -> Path:
    """Distil cfg.teacher into cfg.student; return the run directory (final model in run_dir/final)."""
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    say = log if accelerator.is_main_process else (lambda message: None)
    run = setup(cfg, accelerator, say)
    cfg, run_dir = run.cfg, run.run_dir
    student = learner.prepare(cfg, run.pair, accelerator)
    start_step = rundir.resume(cfg, run_dir, student, accelerator, say)
    with ranks.fail_together(accelerator):  # adaptive K: the (K, tail KL) of the steps before, from which K is recomputed
        steps_before = rundir.horizon_history(run_dir, start_step, run.adaptive) if run.adaptive and start_step else []
    # the rollouts' sampler: generate on the student, or vLLM given the (resumed) student's weights
    longest = max(map(len, run.train_set.student_ids + run.eval_set.student_ids)) + max(run.sampling.max_new_tokens, cfg.max_new_tokens)
    engine = student.engine(build.engine(cfg, run.pair, student.model, longest))
    evaluator = _Evaluator(run, student.model, engine, longest)
    with ranks.fail_together(accelerator):  # everything is built: only now is the run's record touched
        logger, best = rundir.open_record(cfg, run_dir, start_step, accelerator.is_main_process, say)
    done = _Done(step=start_step, saved=start_step, best=best, horizon=steps_before)
    bar = tqdm(total=cfg.steps, initial=start_step, desc="distil", disable=not (cfg.progress and accelerator.is_main_process),
               unit="step")

    def keep_last_step() -> None:
        """Before a failed step stops the run (every process together): checkpoint the steps complete so far."""
        if done.step > done.saved:
            path = student.save(accelerator, run_dir, done.step, cfg.keep_checkpoints, done.best["step"])
            say(f"Saved the last complete step ({done.step}) to {path} before stopping")

    with _InterruptFlag(several_processes=accelerator.num_processes > 1) as interrupt, _closing(bar, logger):
        for step in range(start_step, cfg.steps):
            timer, step_start = PhaseTimer(), time.perf_counter()
            reset_peak_memory(accelerator.device)
            # A failure in phases 1-3 on any process (a teacher server down, a request refused) stops every process,
            # after the last complete step is saved: until this step's optimizer step, the weights are those after `step`.
            k = horizon.adaptive_k(done.horizon, run.adaptive) if run.adaptive is not None else None
            with timer("rollout"), _failing_together(accelerator, keep_last_step):
                batch = sample(run, engine, step, accelerator, k)
            with timer("align"), _failing_together(accelerator, keep_last_step):
                plan = run.teacher.plan([run.train_set.teacher_ids[i] for i in batch.rows], batch.rollouts.responses,
                                        batch.rollouts.mask)
            totals, counted = accumulate(run, student, batch, plan, accelerator, timer, keep_last_step)
            with timer("train"):
                finite, grad_norm, lr = optimizer_step(cfg, student, totals["loss"], accelerator)
            if finite:
                with timer("sync"):
                    engine.sync(student.model)  # the engine samples from the updated student next step
            done.step, done.skipped_in_row = step + 1, 0 if finite else done.skipped_in_row + 1
            if not finite:
                say(f"Warning: step {done.step} skipped: loss {totals['loss']}, gradient norm {grad_norm} "
                    f"({done.skipped_in_row} in a row; the run stops after {cfg.max_skipped_steps})")
            metrics = step_record(cfg, run.teacher, totals, counted, batch, lr, grad_norm, finite)
            if run.adaptive is not None:
                done.horizon.append(horizon.observed(metrics))
            log_evaluate_save(run, student, evaluator, logger, done, metrics, timer, step_start, accelerator, say)
            _show(bar, metrics)
            if done.skipped_in_row >= cfg.max_skipped_steps:
                raise _diverged(run_dir, done.skipped_in_row, done.step)
            if ranks.any_process(accelerator, interrupt.set):  # a Ctrl-C on any process stops all after this step
                raise _interrupted(accelerator, run_dir, student, done, cfg.keep_checkpoints)

    final_student = student.whole()  # sharded: gathered on the first process (every process joins)
    with ranks.fail_together(accelerator):  # a full disk on the first process stops every process
        if accelerator.is_main_process:
            _save_final(cfg, run_dir, final_student, run.pair, done.best)
            log(f"Final student saved to {run_dir / 'final'}")
    accelerator.wait_for_everyone()
    return run_dir


@dataclass
class _Done:
    """What the loop carries from one step to the next."""

    step: int  # steps complete
    saved: int  # the newest step checkpointed (or resumed from)
    best: dict  # the best evaluation so far, {"step", "accuracy"}
    skipped_in_row: int = 0  # steps in a row whose loss or gradient was not finite
    missed: list[float] = field(default_factory=list)  # agree/teacher_top1_missed of every step so far (step_warnings)
    horizon: list[tuple[int, float | None]] = field(default_factory=list)  # rollout_tokens=adaptive: (K, tail KL) of every step
    warned: set = field(default_factory=set)  # the warnings said already
    save_timer: PhaseTimer = field(default_factory=PhaseTimer)  # the checkpoint written after the last logged row


# ---- the phases of a step ------------------------------------------------------------------------------

@dataclass
class Batch:
    """This process's share of one step's batch: its training rows, their student prompts and the rollouts."""

    rows: list[int]  # indices into the training prompts
    prompts: list[list[int]]  # the student's prompt ids of those rows
    rollouts: rollout.Rollouts  # (B, T) responses and mask, on the CPU
    k: int  # the rollouts' length limit this step (ESR: K; a full rollout: max_new_tokens)


def sample(run: Run, engine: Engine, step: int, accelerator: Accelerator, k: int | None = None) -> Batch:
    """Phase 1: the student samples its own responses to this process's rows of step `step`. ESR is this length:
    generation itself stops after K tokens, nothing is masked off. Seeded by (seed, step, row): a resumed run samples
    what the uninterrupted one did."""
    cfg, rank, procs = run.cfg, accelerator.process_index, accelerator.num_processes
    set_seed(order.step_seed(cfg.seed, step, rank))
    positions = range(rank, cfg.batch_size, procs)  # this process's share of the batch
    order_of_step = order.batch_indices(step, cfg.batch_size, len(run.train_set.problems), cfg.seed, cfg.shuffle_prompts)
    rows = [order_of_step[j] for j in positions]
    prompts = [run.train_set.student_ids[i] for i in rows]
    if k is None:  # K of the config and its schedule (k: rollout_tokens=adaptive's, from horizon.adaptive_k)
        k = order.rollout_k(step, run.sampling.max_new_tokens, cfg.rollout_tokens_schedule, cfg.rollout_tokens_start,
                            cfg.schedule_steps or cfg.steps)
    sampling = dataclasses.replace(run.sampling, max_new_tokens=k, min_new_tokens=min(run.sampling.min_new_tokens, k))
    rollouts = engine.sample(prompts, sampling, [order.row_seed(cfg.seed, step, j) for j in positions])
    return Batch(rows=rows, prompts=prompts, rollouts=rollouts, k=k)


def accumulate(run: Run, student: learner.Learner, batch: Batch, plan, accelerator: Accelerator, timer: PhaseTimer,
               before_stopping) -> tuple[dict[str, float], float]:
    """Phases 3-4, per micro-batch of similar lengths: the teacher scores, the student's loss, backward (gradients
    summed over micro-batches and processes). Returns (the step's sums over every process: loss, tokens, metrics and
    the plan's ratios as key:num / key:den; the positions with a teacher signal, all processes)."""
    cfg, device, procs, responses = run.cfg, accelerator.device, accelerator.num_processes, batch.rollouts
    counted = accelerator.reduce(plan.mask.sum().to(device), "sum").item()
    loss_tokens = selection.selected_count(plan.mask, cfg.token_select, cfg.select_tokens).sum()  # on this process
    selected = accelerator.reduce(loss_tokens.float().to(device), "sum").item()  # positions that carry the loss, all processes
    denominator = cfg.batch_size if cfg.loss_norm == "trajectory" else selected
    tail_from = horizon.tail_start(batch.k) if run.adaptive is not None else None  # adaptive K reads the window's tail
    student.trained.train()
    sums = {"loss": 0.0, "response_tokens": float(responses.mask.sum()), "prompt_tokens": float(sum(map(len, batch.prompts))),
            "loss_tokens": float(loss_tokens), "ended": float(responses.ended(run.pair.eos_ids).sum())}
    groups = order.micro_batches(responses.lengths.tolist(), cfg.micro_batch_size)
    for i, idx in enumerate(groups):
        width = int(responses.lengths[idx].max())  # T': drop the padding past this group's longest response
        micro = rollout.Rollouts([batch.prompts[j] for j in idx], responses.responses[idx, :width], responses.mask[idx, :width])
        with timer("teacher"), _failing_together(accelerator, before_stopping):
            scores = run.teacher.score(plan, idx, width, hidden=cfg.loss_chunk > 0)  # (b, T', C) log-probs, no grad
        with timer("train"), accelerator.no_sync(student.trained) if i < len(groups) - 1 else nullcontext():
            loss, metric_sums = objective.micro_batch_loss(student.loss_view, run.teacher, scores, micro, run.loss, denominator,
                                                           tail_from)
            # DDP and FSDP2 average gradients over processes (in the last backward); scaling by their number makes it a sum.
            accelerator.backward(loss * procs)
            sums["loss"] += loss.item()
            for key, value in metric_sums.items():
                sums[key] = sums.get(key, 0.0) + value
        del scores, loss
    for key, (part, whole) in plan.ratios.items():  # read after the last score (teachers.protocol.Plan)
        sums[key + ":num"], sums[key + ":den"] = part, whole
    return {k: accelerator.reduce(torch.tensor(v, device=device), "sum").item() for k, v in sums.items()}, counted


def optimizer_step(cfg: Config, student: learner.Learner, loss: float, accelerator: Accelerator) -> tuple[bool, float, float]:
    """Phase 5: clip, step (skipped when the loss or the gradient is not finite), advance the schedule. Returns
    (whether the weights changed, the gradient norm, the learning rate the step used)."""
    lr = student.scheduler.get_last_lr()[0]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = float(accelerator.clip_grad_norm_(student.trained.parameters(), max_norm))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)  # the same on every process
    if finite:
        student.optimizer.step()
    student.scheduler.step()  # the schedule stays a function of the step, skipped or not
    student.optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm, lr


def step_record(cfg: Config, teacher: Teacher, totals: dict[str, float], counted: float, batch: Batch, lr: float,
                grad_norm: float, finite: bool) -> dict:
    """Phase 6's figures of one step (stepmetrics.step_metrics, with the rollout limit, optimizer and skip)."""
    metrics = step_metrics(totals, counted, cfg.batch_size, teacher.constant_metrics)
    metrics.update({"rollout/k": batch.k, "rollout/decode_steps": batch.rollouts.responses.shape[1],  # generate runs until its longest row ends
                    "optim/lr": lr, "optim/grad_norm": grad_norm, "optim/skipped": int(not finite)})
    return metrics


# ---- phase 6: evaluate, save, log, stop ----------------------------------------------------------------

def log_evaluate_save(run: Run, student: learner.Learner, evaluator: "_Evaluator", logger, done: _Done, metrics: dict,
                      timer: PhaseTimer, step_start: float, accelerator: Accelerator, say) -> None:
    """Phase 6 after step done.step: the warnings its figures call for, an evaluation every eval_every steps (and after
    the last), the step's row in the metrics log, a checkpoint every save_every steps and at a new best evaluation.
    Updates `done` (best, saved, save_timer) and `metrics` (eval/ and time/ figures)."""
    cfg = run.cfg
    done.missed.append(metrics.get("agree/teacher_top1_missed", 0.0))
    for warning in step_warnings(cfg, done.step, metrics, done.missed, done.warned):
        say(warning)
    new_best = False
    if cfg.eval_every and run.eval_set.problems and (done.step % cfg.eval_every == 0 or done.step == cfg.steps):
        with timer("eval"), student.gathered():  # every process gathers a sharded student
            if accelerator.is_main_process:
                done.best, new_best = evaluator.run(done.step, done.best, metrics)  # adds the eval/ figures to metrics
            new_best = ranks.any_process(accelerator, new_best)  # every process joins the save of a new best
    metrics.update(_timings(done.save_timer, timer, step_start, accelerator.device))  # time/save_s: the previous step's save
    if logger is not None:  # before the checkpoint: a kill between the two loses no row (resume trims later ones)
        logger.log(done.step, metrics)
    done.save_timer = PhaseTimer()
    if cfg.save_every and (done.step % cfg.save_every == 0 or new_best):  # the best evaluation keeps its checkpoint
        with done.save_timer("save"):
            student.save(accelerator, run.run_dir, done.step, cfg.keep_checkpoints, done.best["step"])
        done.saved = done.step


class _Evaluator:
    """Evaluations of the student during training, on the first process. They sample with the rollouts'
    engine when eval_engine is its kind, else with an engine of eval_engine's kind, built when first
    needed and given the student's current weights before each evaluation."""

    def __init__(self, run: Run, student, engine: Engine, longest: int):
        self.setup, self.student, self.longest, self.rollouts_engine = run, student, longest, engine
        self.engine = engine if build.eval_engine_kind(run.cfg) == engine.name else None

    def run(self, done: int, best: dict, metrics: dict) -> tuple[dict, bool]:
        """Evaluate the student after step `done`, save the result to run_dir/eval and add its eval/ figures
        to `metrics`. Returns (the best evaluation so far, {"step", "accuracy"}; whether this one is it)."""
        run, cfg = self.setup, self.setup.cfg
        if self.engine is not self.rollouts_engine:
            self.engine = self.engine or build.engine(cfg, run.pair, self.student, self.longest, build.eval_engine_kind(cfg))
            self.engine.sync(self.student)
        result = evaluate(self.engine, run.pair.tokenizer, run.eval_set.student_ids, run.eval_set.problems, run.grade,
                          run.evaluation, progress=cfg.progress)
        result.save(run.run_dir / "eval" / f"step_{done:07d}.json", title=f"Student after step {done}")
        metrics.update(result.metrics("eval"))
        new_best = result.accuracy > best["accuracy"]
        if new_best:
            best = {"step": done, "accuracy": result.accuracy}
        metrics["eval/best_step"] = best["step"]
        return best, new_best


def _timings(save_timer: PhaseTimer, timer: PhaseTimer, step_start: float, device: torch.device) -> dict[str, float]:
    """time/<phase>_s of this step (time/save_s: the checkpoint written after the previous step's row),
    time/step_s and mem/peak_mb."""
    out = {f"time/{phase}_s": s for phase, s in {**save_timer.seconds, **timer.seconds}.items()}
    out["time/step_s"] = time.perf_counter() - step_start
    out["mem/peak_mb"] = peak_memory_mb(device)
    return out


def _show(bar, metrics: dict) -> None:
    """One more step on the progress bar, with its loss, reverse KL, rollout length and seconds."""
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl/reverse']:.4f}",
                    len=f"{metrics['rollout/len_mean']:.0f}", s=f"{metrics['time/step_s']:.1f}")


@contextmanager
def _failing_together(accelerator: Accelerator, before_stopping) -> Iterator[None]:
    """A phase that every process runs with no collective that a failure could skip (rollout, alignment, scoring; a
    sharded student's all-gather opens the rollout, before anything in it can fail): an exception on any process is
    raised on every process (ranks.fail_together: the others raise PeerFailed with its message), after
    `before_stopping()`, which every process runs together."""
    try:
        with ranks.fail_together(accelerator):
            yield
    except Exception:
        before_stopping()
        raise


@contextmanager
def _closing(bar, logger) -> Iterator[None]:
    """Close the progress bar and the metrics log however the loop ends: after its last step, or on
    TrainingDiverged, TrainingInterrupted or any error."""
    try:
        yield
    finally:
        bar.close()
        if logger is not None:
            logger.close()


def _interrupted(accelerator: Accelerator, run_dir: Path, student: learner.Learner, done: _Done, keep: int) -> TrainingInterrupted:
    """The error that stops a run after a Ctrl-C, once the step it finished is checkpointed."""
    saved = checkpoint.latest(run_dir)
    if done.saved != done.step:
        saved = student.save(accelerator, run_dir, done.step, keep, done.best["step"]) or saved
    return TrainingInterrupted(done.step, saved or checkpoint.checkpoints_root(run_dir) / f"step_{done.step:07d}")


def _diverged(run_dir: Path, skipped_in_row: int, done: int) -> TrainingDiverged:
    """The error that stops a run after `skipped_in_row` non-finite steps, naming its newest checkpoint."""
    saved = checkpoint.latest(run_dir)
    return TrainingDiverged(
        f"{skipped_in_row} steps in a row had a non-finite loss or gradient (last: step {done}); stopping. "
        f"The weights were never updated with them; the newest checkpoint is {saved or 'none'}. Lower lr, "
        f"check the data, or raise max_skipped_steps"
    )


def _save_final(cfg: Config, run_dir: Path, student, pair: build.Pair, best: dict) -> None:
    """final/ (the trained student, loadable with from_pretrained) and summary.json (the best evaluation)."""
    checkpoint.save_final(run_dir / "final", student, pair.tokenizer, cfg.merge_lora, build.final_dtype(cfg, pair))
    best_checkpoint = checkpoint.find(run_dir, best["step"]) if best["step"] else None
    summary = {"steps": cfg.steps, "best_eval_step": best["step"], "best_eval_accuracy": best["accuracy"] if best["step"] else None,
               "best_checkpoint": str(best_checkpoint) if best_checkpoint else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
