"""The training loop of on-policy distillation with Early Stopping Rollout, in one function.

    for each step:  sample rollouts (K tokens) -> score with the teacher -> loss -> step -> log -> save

Run it with `esrdistill train CONFIG.yaml`, or `accelerate launch -m esrdistill.cli train ...` for
several processes (each samples its share of the batch; gradients are summed across them).
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from esrdistill import build, checkpoint, losses, order, rollout, teacher as teacher_scoring
from esrdistill.config import Config, ConfigError, save_config, to_dict
from esrdistill.data import DataError
from esrdistill.evaluate import evaluate
from esrdistill.tracking import MetricsLogger, PhaseTimer, peak_memory_mb, read_metrics, reset_peak_memory


class TrainingInterrupted(Exception):
    """Ctrl-C during training: the state after the last complete step was saved to `checkpoint`."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted after step {step}; saved {checkpoint}; continue with resume=true")
        self.step, self.checkpoint = step, checkpoint


class _InterruptFlag:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.set:
                raise KeyboardInterrupt
            self.set = True
            tqdm.write("Interrupt: finishing this step and saving a checkpoint (Ctrl-C again to stop now).")

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _prepare_run_dir(cfg: Config, is_main: bool, log) -> Path:
    run_dir = Path(cfg.run_dir)
    if is_main:
        has_run = (run_dir / "metrics.jsonl").exists() or checkpoint.checkpoints_root(run_dir).exists()
        if has_run and not cfg.resume:
            raise FileExistsError(
                f"run_dir {run_dir} already holds a run: pass resume=true to continue it, or choose another run_dir"
            )
        if cfg.resume and (run_dir / "config.yaml").is_file():
            before = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            changed = sorted(k for k, v in to_dict(cfg).items() if k != "resume" and before.get(k, v) != v)
            if changed:
                log(f"Warning: resuming with changed settings: {', '.join(changed)}")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def _trim_metrics(run_dir: Path, last_step: int) -> None:
    """Drop metric lines of steps after the checkpoint we resume from (they will be redone)."""
    kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= last_step]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))


def train(cfg: Config, log=tqdm.write) -> Path:
    """Distil cfg.teacher into cfg.student; return the run directory (final model in run_dir/final)."""
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    if cfg.device == "cuda" and accelerator.device.type != "cuda":
        raise ConfigError("device=cuda but CUDA is not available here; use device=cpu or auto")
    device, is_main = accelerator.device, accelerator.is_main_process
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the {accelerator.num_processes} processes")
    run_dir = _prepare_run_dir(cfg, is_main, log)
    set_seed(cfg.seed)

    # ---- models, data, prompts -------------------------------------------------------------------
    with accelerator.main_process_first():  # the first process converts packaged models, once
        pair = build.pair(cfg, device, trainable=True)
    task = build.task(cfg)
    rollout_len = build.rollout_length(cfg)  # ESR: K tokens; a full rollout: max_new_tokens
    train_set = build.prompt_set(cfg, pair, task, task.train, rollout_len)
    eval_set = build.prompt_set(cfg, pair, task, task.eval, cfg.max_new_tokens)
    grade = build.grader(cfg, task)
    if not train_set.problems:
        raise DataError(f"every one of the {train_set.dropped} training prompts is longer than the models' context")
    if is_main:
        log(f"{len(train_set.problems)} training prompts ({train_set.dropped} dropped as too long), "
            f"{len(eval_set.problems)} eval problems ({eval_set.dropped} dropped), rollouts of {rollout_len} tokens")
    pad_id = pair.tokenizer.pad_token_id

    # ---- optimisation ----------------------------------------------------------------------------
    params = [p for p in pair.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
    student, optimizer, scheduler = accelerator.prepare(pair.student, optimizer, scheduler)
    plain_student = accelerator.unwrap_model(student)  # for generate, saving and evaluation
    start_step = 0
    if cfg.resume and (found := checkpoint.latest(run_dir)) is not None:
        start_step = checkpoint.load(found, plain_student, optimizer, scheduler)
        if is_main:
            _trim_metrics(run_dir, start_step)
            log(f"Resumed from {found} (step {start_step})")
    logger = MetricsLogger(run_dir, to_dict(cfg), cfg.tensorboard, cfg.wandb) if is_main else None
    teacher_micro = cfg.teacher_micro_batch or cfg.micro_batch_size
    best = {"step": None, "accuracy": -1.0}
    for m in read_metrics(run_dir) if is_main else []:  # evaluations before a resume still count
        if m.get("eval/accuracy", -1.0) > best["accuracy"]:
            best = {"step": m["step"], "accuracy": m["eval/accuracy"]}

    bar = tqdm(total=cfg.steps, initial=start_step, desc="distil", disable=not (cfg.progress and is_main), unit="step")
    last_saved = start_step
    with _InterruptFlag() as interrupt:
        for step in range(start_step, cfg.steps):
            timer = PhaseTimer()
            step_start = time.perf_counter()
            reset_peak_memory(device)
            set_seed(order.step_seed(cfg.seed, step, accelerator.process_index))
            rows = order.batch_indices(step, cfg.batch_size, len(train_set.problems), cfg.seed)
            rows = rows[accelerator.process_index :: accelerator.num_processes]  # this process's share
            student_prompts = [train_set.student_ids[i] for i in rows]
            teacher_prompts = [train_set.teacher_ids[i] for i in rows]

            # ---- 1. rollout: the student samples its own responses --------------------------------
            with timer("rollout"):
                # ESR is this length: generation itself stops after K tokens, nothing is masked off.
                batch = rollout.sample(plain_student, student_prompts, rollout_len, cfg.temperature, cfg.top_p, pair.eos_ids, pad_id)
            tokens_global = accelerator.reduce(batch.mask.sum().to(device), "sum").item()  # counted tokens, all processes
            denominator = cfg.batch_size if cfg.loss_norm == "trajectory" else tokens_global

            # ---- 2-4. per micro-batch: teacher scores, student loss, backward ----------------------
            student.train()
            sums = {"loss": 0.0, "kl_reverse": 0.0, "kl_sampled": 0.0, "agree": 0.0, "teacher_entropy": 0.0,
                    "prompt_tokens": float(sum(len(p) for p in student_prompts)),
                    "ended": (torch.isin(batch.responses, torch.tensor(pair.eos_ids)) & batch.mask.bool()).any(-1).sum().item()}
            groups = order.micro_batches(batch.lengths.tolist(), cfg.micro_batch_size)  # similar lengths together
            for i, idx in enumerate(groups):
                width = int(batch.lengths[idx].max())  # drop the padding past this group's longest response
                responses, mask_cpu = batch.responses[idx, :width], batch.mask[idx, :width]  # (b, T')
                group_student_prompts = [student_prompts[j] for j in idx]
                group_teacher_prompts = [teacher_prompts[j] for j in idx]
                tokens, mask = responses.to(device), mask_cpu.to(device)
                with timer("teacher"):
                    teacher_logp = teacher_scoring.score(  # (b, T', V), no grad
                        pair.teacher, group_teacher_prompts, responses, mask_cpu, pad_id, pair.vocab_size, teacher_micro
                    )
                with timer("train"):
                    sync = accelerator.no_sync(student) if i < len(groups) - 1 else nullcontext()
                    with sync:
                        logits = rollout.response_logits(student, group_student_prompts, responses, mask_cpu, pad_id)
                        student_logp = teacher_scoring.log_probs(logits, pair.vocab_size)  # (b, T, V) fp32
                        per_token = losses.per_token_loss(cfg.loss, student_logp, teacher_logp, tokens, mask, cfg.jsd_beta)
                        loss = losses.reduce_loss(per_token, mask, cfg.loss_norm, denominator)
                        # DDP averages gradients over processes; scaling by their number makes it a sum.
                        accelerator.backward(loss * accelerator.num_processes)
                    with torch.no_grad():
                        sums["loss"] += loss.item()
                        sums["kl_reverse"] += losses.reverse_kl(student_logp, teacher_logp, mask).sum().item()
                        s_tok, t_tok = losses.token_logp(student_logp, tokens), losses.token_logp(teacher_logp, tokens)
                        sums["kl_sampled"] += losses.sampled_kl(s_tok, t_tok, mask).sum().item()
                        sums["agree"] += ((student_logp.argmax(-1) == teacher_logp.argmax(-1)).float() * mask).sum().item()
                        sums["teacher_entropy"] += (-(teacher_logp.exp() * teacher_logp).sum(-1) * mask).sum().item()
                del teacher_logp, student_logp, logits, per_token, loss

            # ---- 5. optimizer step ---------------------------------------------------------------
            with timer("train"):
                lr = scheduler.get_last_lr()[0]
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = accelerator.clip_grad_norm_(student.parameters(), max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            done = step + 1

            # ---- 6. log, evaluate, checkpoint ------------------------------------------------------
            totals = {k: accelerator.reduce(torch.tensor(v, device=device), "sum").item() for k, v in sums.items()}
            metrics = {
                "loss": totals["loss"],
                "kl/reverse": totals["kl_reverse"] / max(tokens_global, 1),
                "kl/sampled": totals["kl_sampled"] / max(tokens_global, 1),
                "teacher/entropy": totals["teacher_entropy"] / max(tokens_global, 1),
                "agree/top1": totals["agree"] / max(tokens_global, 1),
                "rollout/len_mean": tokens_global / cfg.batch_size,
                "rollout/eos_frac": totals["ended"] / cfg.batch_size,  # rollouts that ended before K
                "rollout/tokens": int(tokens_global),
                "rollout/prompt_tokens": int(totals["prompt_tokens"]),
                "rollout/decode_steps": batch.responses.shape[1],  # generate runs until its longest row ends
                "optim/lr": lr,
                "optim/grad_norm": float(grad_norm),
            }
            if cfg.eval_every and eval_set.problems and (done % cfg.eval_every == 0 or done == cfg.steps):
                with timer("eval"):
                    if is_main:
                        result = evaluate(plain_student, pair.tokenizer, eval_set.student_ids, eval_set.problems, grade,
                                          pair.eos_ids, cfg.max_new_tokens, cfg.eval_batch_size, cfg.eval_samples,
                                          cfg.eval_temperature, cfg.eval_top_p, progress=cfg.progress)
                        result.save(run_dir / "eval" / f"step_{done:07d}.json", title=f"Student after step {done}")
                        metrics.update(result.metrics("eval"))
                        if result.accuracy > best["accuracy"]:
                            best = {"step": done, "accuracy": result.accuracy}
                        metrics["eval/best_step"] = best["step"]
                    accelerator.wait_for_everyone()
            if cfg.save_every and done % cfg.save_every == 0:
                with timer("save"):
                    if is_main:
                        checkpoint.save(run_dir, done, plain_student, optimizer, scheduler, cfg.keep_checkpoints)
                    last_saved = done
                    accelerator.wait_for_everyone()
            metrics.update({f"time/{phase}_s": s for phase, s in timer.seconds.items()})
            metrics["time/step_s"] = time.perf_counter() - step_start
            metrics["mem/peak_mb"] = peak_memory_mb(device)
            if logger is not None:
                logger.log(done, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl/reverse']:.4f}",
                            len=f"{metrics['rollout/len_mean']:.0f}", s=f"{metrics['time/step_s']:.1f}")
            if interrupt.set:
                path = checkpoint.latest(run_dir)
                if last_saved != done and is_main:
                    path = checkpoint.save(run_dir, done, plain_student, optimizer, scheduler, cfg.keep_checkpoints)
                bar.close()
                if logger is not None:
                    logger.close()
                raise TrainingInterrupted(done, path)
    bar.close()

    # ---- final model -----------------------------------------------------------------------------
    if is_main:
        checkpoint.save_final(run_dir / "final", plain_student, pair.tokenizer, cfg.merge_lora)
        summary = {"steps": cfg.steps, "best_eval_step": best["step"], "best_eval_accuracy": best["accuracy"] if best["step"] else None}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.close()
        log(f"Final student saved to {run_dir / 'final'}")
    accelerator.wait_for_everyone()
    return run_dir
