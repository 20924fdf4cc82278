"""TRL's DistillationTrainer on the equal-work job, timed per phase: the other side of
`esrdistill bench --job equal-work --against trl` (commands/bench.py runs it in its own process, interleaved
with esrdistill's runs of the same job).

    python -m esrdistill.commands.trl_bench SPEC.json OUT.jsonl

SPEC.json (bench.trl_spec writes it): student and teacher directories, the prompts as chat messages, the token
ids esrdistill made of them (TRL's tokenisation is checked against them: a prompt that differs stops the run),
N (every rollout forced to exactly N tokens), steps, batch size, learning rate, clipping, temperature, top_p, seed.
OUT.jsonl gets one object per optimizer step: `time/rollout_s` (TRL's `_generate`: tokenising, `generate`),
`time/teacher_s` (the teacher's backbone: TRL projects both LM heads inside its chunked loss, so the teacher's LM
head and the student's fall in `time/train_s`), `time/train_s` (the rest of the step: the student's forward, the
loss, backward, clipping, AdamW, TRL's logging) and `time/step_s`, with `rollout/tokens` and `rollout/len_mean`.
Full fine-tuning in fp32 on the CPU (or the spec's device), no gradient checkpointing, beta=1 (reverse KL over the
full vocabulary), no shuffling: the work of esrdistill's equal-work run.

TRL versions: 1.16.0 is the one tested (`pip install -e ".[trl]"`); the trainer's private methods timed here
(`_generate`, `_get_last_hidden_state`, `_tokenize_prompts`) are checked at start, so another version that lacks
them stops with a clear message instead of timing the wrong thing.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from esrdistill.errors import UserError

TESTED_TRL = ("1.16.0",)
TIMED_METHODS = ("_generate", "_get_last_hidden_state", "_tokenize_prompts")


def trl_version() -> str | None:
    """TRL's version when it is installed, else None."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


class PhaseClock:
    """Seconds per phase within the current optimizer step, and the finished steps' rows."""

    def __init__(self):
        self.current: dict[str, float] = {}
        self.rows: list[dict] = []
        self.start = 0.0
        self.tokens: list[int] = []

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] = self.current.get(phase, 0.0) + seconds

    def timed(self, phase: str, fn, when=lambda *a, **k: True):
        def wrapper(*args, **kwargs):
            if not when(*args, **kwargs):
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - t0)
        return wrapper

    def begin(self) -> None:
        self.current, self.tokens, self.start = {}, [], time.perf_counter()

    def end(self, step: int) -> None:
        step_s = time.perf_counter() - self.start
        rollout, teacher = self.current.get("rollout", 0.0), self.current.get("teacher", 0.0)
        self.rows.append({"step": step, "time/rollout_s": rollout, "time/teacher_s": teacher,
                          "time/train_s": step_s - rollout - teacher, "time/sync_s": 0.0, "time/step_s": step_s,
                          "rollout/tokens": sum(self.tokens), "rollout/len_mean": sum(self.tokens) / max(len(self.tokens), 1)})


def run(spec: dict, out: Path) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    missing = [m for m in TIMED_METHODS if not hasattr(DistillationTrainer, m)]
    if missing:
        raise UserError(f"TRL {trl_version()}'s DistillationTrainer lacks {', '.join(missing)}, which the benchmark times; "
                        f"use TRL {' or '.join(TESTED_TRL)}")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=dtype)
    n, expected = spec["n"], [list(ids) for ids in spec["prompt_ids"]]
    dataset = Dataset.from_list([{"prompt": messages} for messages in spec["prompts"]])
    clock = PhaseClock()
    seen: list[list[int]] = []

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as work:
        args = DistillationConfig(
            output_dir=work, per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
            max_steps=spec["steps"], learning_rate=spec["lr"], max_grad_norm=spec["max_grad_norm"],
            lr_scheduler_type=spec.get("lr_scheduler_type", "cosine"), warmup_steps=0, optim="adamw_torch_fused",
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=spec.get("device", "cpu") == "cpu",
            max_completion_length=n, temperature=spec["temperature"], top_p=spec["top_p"], top_k=0,
            generation_kwargs={"min_new_tokens": n}, beta=1.0, shuffle_dataset=False, disable_dropout=True,
            logging_steps=1, report_to="none", save_strategy="no", seed=spec["seed"], dataloader_num_workers=0,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                      processing_class=tokenizer)

        tokenize = trainer._tokenize_prompts

        def checked_tokenize(prompts):
            ids, images, fields = tokenize(prompts)
            seen.extend(list(map(list, ids)))
            return ids, images, fields

        generate = trainer._generate

        def counted_generate(prompts):
            result = generate(prompts)
            clock.tokens.extend(len(c) for c in result[1])  # (prompt_ids, completion_ids, ...)
            return result

        trainer._tokenize_prompts = checked_tokenize
        trainer._generate = clock.timed("rollout", counted_generate)
        trainer._get_last_hidden_state = clock.timed(
            "teacher", trainer._get_last_hidden_state, when=lambda model, *a, **k: model is trainer.accelerator.unwrap_model(trainer.teacher_model))

        class Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.begin()

            def on_step_end(self, args, state, control, **kwargs):
                clock.end(state.global_step)
                with out.open("a") as f:  # each step as it ends: an interrupted run keeps what it measured
                    f.write(json.dumps(clock.rows[-1]) + "\n")

        trainer.add_callback(Steps())
        out.write_text("")
        trainer.train()

    if [ids for ids in seen] != expected[: len(seen)]:
        first = next(i for i, (a, b) in enumerate(zip(seen, expected)) if a != b) if any(
            a != b for a, b in zip(seen, expected)) else len(expected)
        raise UserError(f"TRL tokenised prompt {first} differently from esrdistill: not the same job "
                        f"({len(seen)} prompts seen)")
    forced = [row["rollout/len_mean"] for row in clock.rows]
    if any(abs(length - n) > 1e-9 for length in forced):
        raise UserError(f"TRL's rollouts were not all {n} tokens long (mean lengths {forced}): not the same job")
    return clock.rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    try:
        run(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
