"""The training loop of on-policy distillation with Early Stopping Rollout, in one function.

    for each step:  sample rollouts (K tokens) -> score with the teacher -> loss -> step -> log -> save

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from esrdistill import build, checkpoint, objective, order, ranks, rollout, rundir, selection, sharding
from esrdistill.config import Config, ConfigError
from esrdistill.errors import UserError
from esrdistill.evaluate import EvalSettings, evaluate
from esrdistill.stepmetrics import step_metrics, step_warnings
from esrdistill.teacher import LossSettings, Teacher
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


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (135M parameters on this CPU: 0.09-0.12 s per step
    fused against 0.64-0.85 s for the default implementation)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _optimisation(cfg: Config, model: torch.nn.Module, accelerator: Accelerator):
    """(the student as trained: DDP-wrapped under several processes, sharded in place under an FSDP accelerate
    config; the student itself, for generate, saving and evaluation; AdamW over its trainable parameters (over
    this process's shards under FSDP2); the warmup-then-cosine schedule)."""
    if sharded := sharding.requested():  # (checked in _setup)
        with ranks.fail_together(accelerator):
            model = sharding.shard(model, accelerator.device, accelerator.num_processes)
    optimizer = _adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    # Not passed to accelerator.prepare: a prepared scheduler steps once per process on every call.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
    if sharded:  # FSDP2 averages the gradients itself, as DDP does
        return model, model, optimizer, scheduler
    student, optimizer = accelerator.prepare(model, optimizer)
    return student, accelerator.unwrap_model(student), optimizer, scheduler


@dataclass
class _Setup:
    """What the loop needs, built from the config once."""

    cfg: Config  # the config with rollout_tokens=auto resolved
    run_dir: Path
    pair: build.Pair
    teacher: Teacher  # teacher.SameTokenizer or cross_teacher.CrossTokenizer
    train_set: object  # prompts.PromptSet
    eval_set: object
    grade: object
    sampling: rollout.Sampling  # the rollouts'
    evaluation: EvalSettings  # how the student is evaluated
    loss: LossSettings  # the loss and the token selection


def _setup(cfg: Config, accelerator: Accelerator, say) -> _Setup:
    """Checks, data, models and prompts. A failure on any process stops every process with its message."""
    device, is_main, procs = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    with ranks.fail_together(accelerator):
        if cfg.device == "cuda" and device.type != "cuda":
            raise ConfigError("device=cuda but CUDA is not available here; use device=cpu or auto")
        ranks.check_joined(cfg.device, procs)
        if cfg.batch_size % procs:
            raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the {procs} processes")
        if sharding.requested():  # an FSDP accelerate config: refused now if esrdistill cannot follow it
            sharding.check(cfg, procs)
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
            from esrdistill.diagnose import auto_k

            choice = [auto_k(cfg, pair, task, grade, say) if is_main else None]
            if procs > 1:
                from accelerate.utils import broadcast_object_list

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
    return _Setup(cfg=cfg, run_dir=run_dir, pair=pair, teacher=teacher, train_set=train_set, eval_set=eval_set, grade=grade,
                  sampling=build.rollout_sampling(cfg, pair, rollout_len),
                  evaluation=build.evaluation(cfg, pair.tokenizer, pair.eos_ids, pair.vocab_size), loss=build.loss_settings(cfg))


def train(cfg: Config, log=tqdm.write) -> Path:
    """Distil cfg.teacher into cfg.student; return the run directory (final model in run_dir/final)."""
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    device, is_main, procs = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    say = log if is_main else (lambda message: None)
    run = _setup(cfg, accelerator, say)
    cfg, run_dir, pair, teacher, train_set = run.cfg, run.run_dir, run.pair, run.teacher, run.train_set

    # ---- optimisation, resume --------------------------------------------------------------------
    student, plain_student, optimizer, scheduler = _optimisation(cfg, pair.student, accelerator)
    learner = objective.Student(student, pair.tokenizer.pad_token_id, pair.vocab_size, pair.autocast)  # what the loss runs
    start_step = rundir.resume(cfg, run_dir, plain_student, optimizer, scheduler, accelerator, say)
    # the rollouts' sampler: generate on the student, or vLLM given the (resumed) student's weights
    longest = max(map(len, train_set.student_ids + run.eval_set.student_ids)) + max(run.sampling.max_new_tokens, cfg.max_new_tokens)
    engine: rollout.Engine = sharding.gathering(build.engine(cfg, pair, plain_student, longest), plain_student)
    evaluator = _Evaluator(run, plain_student, engine, longest)
    with ranks.fail_together(accelerator):  # everything is built: only now is the run's record touched
        logger, best = rundir.open_record(cfg, run_dir, start_step, is_main, say)

    def keep_last_step() -> None:
        """Before a failed step stops the run (every process together): checkpoint the `step` steps complete so far."""
        if step > last_saved:
            path = _save(accelerator, run_dir, step, plain_student, optimizer, scheduler, cfg.keep_checkpoints, best["step"])
            say(f"Saved the last complete step ({step}) to {path} before stopping")

    bar = tqdm(total=cfg.steps, initial=start_step, desc="distil", disable=not (cfg.progress and is_main), unit="step")
    last_saved, skipped_in_row, warned, missed, save_timer = start_step, 0, set(), [], PhaseTimer()
    with _InterruptFlag(several_processes=procs > 1) as interrupt, _closing(bar, logger):  # however the loop ends
        for step in range(start_step, cfg.steps):
            timer, step_start = PhaseTimer(), time.perf_counter()
            reset_peak_memory(device)
            set_seed(order.step_seed(cfg.seed, step, accelerator.process_index))
            positions = range(accelerator.process_index, cfg.batch_size, procs)  # this process's share of the batch
            rows = [order.batch_indices(step, cfg.batch_size, len(train_set.problems), cfg.seed, cfg.shuffle_prompts)[j] for j in positions]
            student_prompts = [train_set.student_ids[i] for i in rows]

            # ---- 1. rollout: the student samples its own responses --------------------------------
            k = order.rollout_k(step, run.sampling.max_new_tokens, cfg.rollout_tokens_schedule, cfg.rollout_tokens_start,
                                cfg.schedule_steps or cfg.steps)
            sampling = dataclasses.replace(run.sampling, max_new_tokens=k, min_new_tokens=min(run.sampling.min_new_tokens, k))
            # A failure in phases 1-3 on any process (a teacher server down, a request refused) stops every process,
            # after the last complete step is saved: until this step's optimizer step, the weights are those after `step`.
            with timer("rollout"), _failing_together(accelerator, keep_last_step):
                # ESR is this length: generation itself stops after K tokens, nothing is masked off.
                batch = engine.sample(student_prompts, sampling, [order.row_seed(cfg.seed, step, j) for j in positions])

            # ---- 2. what the teacher reads (across tokenizers: the text, aligned) ------------------
            # nothing to do for a shared tokenizer; across tokenizers, the text and its alignment
            with timer("align"), _failing_together(accelerator, keep_last_step):
                plan = teacher.plan([train_set.teacher_ids[i] for i in rows], batch.responses, batch.mask)
            counted = accelerator.reduce(plan.mask.sum().to(device), "sum").item()  # positions with a teacher signal, all processes
            loss_tokens = selection.selected_count(plan.mask, cfg.token_select, cfg.select_tokens).sum()  # on this process
            selected = accelerator.reduce(loss_tokens.float().to(device), "sum").item()  # positions that carry the loss, all processes
            denominator = cfg.batch_size if cfg.loss_norm == "trajectory" else selected

            # ---- 3-4. per micro-batch: teacher scores, student loss, backward ----------------------
            student.train()
            sums = {"loss": 0.0, "response_tokens": float(batch.mask.sum()), "prompt_tokens": float(sum(map(len, student_prompts))),
                    "loss_tokens": float(loss_tokens), "ended": float(batch.ended(pair.eos_ids).sum())}
            groups = order.micro_batches(batch.lengths.tolist(), cfg.micro_batch_size)  # similar lengths together
            for i, idx in enumerate(groups):
                width = int(batch.lengths[idx].max())  # T': drop the padding past this group's longest response
                micro = rollout.Rollouts([student_prompts[j] for j in idx], batch.responses[idx, :width], batch.mask[idx, :width])
                with timer("teacher"), _failing_together(accelerator, keep_last_step):
                    scores = teacher.score(plan, idx, width, hidden=cfg.loss_chunk > 0)  # (b, T', C) log-probs, no grad
                with timer("train"), accelerator.no_sync(student) if i < len(groups) - 1 else nullcontext():
                    loss, metric_sums = objective.micro_batch_loss(learner, teacher, scores, micro, run.loss, denominator)
                    # DDP and FSDP2 average gradients over processes (in the last backward); scaling by their number makes it a sum.
                    accelerator.backward(loss * procs)
                    sums["loss"] += loss.item()
                    for key, value in metric_sums.items():
                        sums[key] = sums.get(key, 0.0) + value
                del scores, loss
            for key, (part, whole) in plan.ratios.items():
                sums[key + ":num"], sums[key + ":den"] = part, whole
            totals = {k: accelerator.reduce(torch.tensor(v, device=device), "sum").item() for k, v in sums.items()}

            # ---- 5. optimizer step, skipped when the loss or the gradient is not finite ------------
            with timer("train"):
                lr = scheduler.get_last_lr()[0]
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), max_norm))
                finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)  # the same on every process
                if finite:
                    optimizer.step()
                scheduler.step()  # the schedule stays a function of the step, skipped or not
                optimizer.zero_grad(set_to_none=True)
            if finite:
                with timer("sync"):
                    engine.sync(plain_student)  # the engine samples from the updated student next step
            skipped_in_row = 0 if finite else skipped_in_row + 1
            done = step + 1
            if not finite:
                say(f"Warning: step {done} skipped: loss {totals['loss']}, gradient norm {grad_norm} "
                    f"({skipped_in_row} in a row; the run stops after {cfg.max_skipped_steps})")

            # ---- 6. log, evaluate, checkpoint, stop ------------------------------------------------
            metrics = step_metrics(totals, counted, cfg.batch_size, teacher.constant_metrics)
            metrics.update({"rollout/k": k, "rollout/decode_steps": batch.responses.shape[1],  # generate runs until its longest row ends
                            "optim/lr": lr, "optim/grad_norm": grad_norm, "optim/skipped": int(not finite)})
            missed.append(metrics.get("agree/teacher_top1_missed", 0.0))
            for warning in step_warnings(cfg, done, metrics, missed, warned):
                say(warning)
            new_best = False
            if cfg.eval_every and run.eval_set.problems and (done % cfg.eval_every == 0 or done == cfg.steps):
                with timer("eval"), sharding.gathered(plain_student):  # every process gathers a sharded student
                    if is_main:
                        best, new_best = evaluator.run(done, best, metrics)  # adds the eval/ figures to metrics
                    new_best = ranks.any_process(accelerator, new_best)  # every process joins the save of a new best
            metrics.update(_timings(save_timer, timer, step_start, device))  # time/save_s: the previous step's checkpoint
            if logger is not None:  # before the checkpoint: a kill between the two loses no row (resume trims later ones)
                logger.log(done, metrics)
            save_timer = PhaseTimer()
            if cfg.save_every and (done % cfg.save_every == 0 or new_best):  # the best evaluation keeps its checkpoint
                with save_timer("save"):
                    _save(accelerator, run_dir, done, plain_student, optimizer, scheduler, cfg.keep_checkpoints, best["step"])
                last_saved = done
            _show(bar, metrics)
            if skipped_in_row >= cfg.max_skipped_steps:
                raise _diverged(run_dir, skipped_in_row, done)
            if ranks.any_process(accelerator, interrupt.set):  # a Ctrl-C on any process stops all after this step
                saved = checkpoint.latest(run_dir)
                if last_saved != done:
                    saved = _save(accelerator, run_dir, done, plain_student, optimizer, scheduler, cfg.keep_checkpoints,
                                  best["step"]) or saved
                raise TrainingInterrupted(done, saved or checkpoint.checkpoints_root(run_dir) / f"step_{done:07d}")

    # ---- final model -----------------------------------------------------------------------------
    final_student = sharding.whole(plain_student)  # sharded: gathered on the first process (every process joins)
    with ranks.fail_together(accelerator):  # a full disk on the first process stops every process
        if is_main:
            _save_final(cfg, run_dir, final_student, pair, best)
            log(f"Final student saved to {run_dir / 'final'}")
    accelerator.wait_for_everyone()
    return run_dir


# ---- phase 6: evaluate, save, log, stop ----------------------------------------------------------------

class _Evaluator:
    """Evaluations of the student during training, on the first process. They sample with the rollouts'
    engine when eval_engine is its kind, else with an engine of eval_engine's kind, built when first
    needed and given the student's current weights before each evaluation."""

    def __init__(self, run: _Setup, student, engine: rollout.Engine, longest: int):
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


def _save(accelerator: Accelerator, run_dir: Path, done: int, student, optimizer, scheduler, keep: int,
          best_step: int | None) -> Path | None:
    """Checkpoint step `done` (keeping the newest `keep` and the best evaluation's): the first process
    writes it while the others wait (a sharded student and optimizer are gathered to it first). Returns its path
    on the first process, None on the others."""
    if sharding.is_sharded(student):
        student, optimizer = sharding.whole(student), sharding.WholeOptimizer(student, optimizer)
    with ranks.fail_together(accelerator):  # the others wait; a full disk on the first process stops them all
        path = checkpoint.save(run_dir, done, student, optimizer, scheduler, keep, best_step) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return path


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
