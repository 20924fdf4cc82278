"""The lab: a synthetic task and two small models trained from scratch on the CPU, so that the paper's
claims can be re-checked with seeds in under an hour (`esrdistill lab models`, `esrdistill lab repro`).

The task: a two-term recurrence modulo 10 with every step written out. A prompt gives two digits x, y,
an operator and the label of the last step; each step writes its label, x, the operator, y and
r = (x op y) mod 10 on its own line, then (x, y) becomes (y, r); the answer is the last r, boxed:

    prompt:   3+7e
    solution: a3+7=0\nb7+0=7\nc0+7=7\nd7+7=4\ne7+4=1\n\\boxed{1}

A line is 7 characters, so 14-19 steps are 108-143 response tokens under the lab's character-level
tokenizer: positions early and late in a response are far apart, and a mistake at one step carries
into every later line (the teacher continuing a student's prefix continues from the student's wrong
values: the paper's "teacher decay" has a concrete cause here). Every operand is copied from a fixed
offset and each result is a lookup in a 10x10 table, which small models learn in minutes. The task
has 100 x len(ops) x (steps_max - steps_min + 1) distinct problems (1,200 by default), so the models
see most of them in training: the lab measures how distillation moves a student's behaviour toward
its teacher's, not generalisation to new problems.

The models are Llamas built from a config and trained by next-token prediction on worked solutions:
a teacher that solves the task well and a smaller, briefly trained student that solves it poorly.
They are saved with their tokenizer in the Hugging Face format and load through the same code as
real models. The repro grid and the claims it checks are in `lab_repro.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from esrdistill.commands.evaluation import run_eval
from esrdistill.config import load_config
from esrdistill.grading import extract_answer

MODULUS = 10
OPS = {"+": lambda a, b: (a + b) % MODULUS, "-": lambda a, b: (a - b) % MODULUS}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# every character a prompt or a solution can hold; the tokenizer has one token per character
LABELS = "abcdefghijklmnopqrstuvwxyz"
CHARS = list(dict.fromkeys("0123456789+-=\n\\{}" + LABELS + "box"))
CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}"


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs of the lab task."""

    steps_min: int = 14  # steps per problem, at least
    steps_max: int = 19  # and at most (26 labels): 108-143 response tokens with the box and EOS
    ops: str = "+-"  # the operators a problem may use (one per problem)


def solve(x: int, op: str, y: int, steps: int) -> tuple[list[str], int]:
    """The worked lines ("c0+7=7": label, x, operator, y, result) of a problem and its answer."""
    lines = []
    for i in range(steps):
        r = OPS[op](x, y)
        lines.append(f"{LABELS[i]}{x}{op}{y}={r}")
        x, y = y, r
    return lines, y


def parse(prompt: str) -> tuple[int, str, int, int]:
    """A prompt's (x, op, y, steps): "3+7e" -> (3, "+", 7, 5)."""
    return int(prompt[0]), prompt[1], int(prompt[2]), LABELS.index(prompt[3]) + 1


def make_problem(rng: random.Random, spec: TaskSpec) -> dict:
    """One problem: its prompt, the worked solution a model is trained on, and the answer."""
    steps = rng.randint(spec.steps_min, spec.steps_max)
    x, op, y = rng.randrange(MODULUS), rng.choice(spec.ops), rng.randrange(MODULUS)
    lines, value = solve(x, op, y, steps)
    return {"question": f"{x}{op}{y}{LABELS[steps - 1]}", "answer": str(value),
            "solution": "\n".join(lines) + f"\n\\boxed{{{value}}}"}


def make_problems(n: int, seed: int, spec: TaskSpec) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, spec) for _ in range(n)]


def grade(response: str, answer: str) -> bool:
    """Right when the response's last \\boxed{} holds the answer: the lab's runs use the same rule
    (grader=exact, answer_extract=boxed_last)."""

    found = extract_answer(response, "boxed_last")
    return found is not None and found == answer.strip()


def step_accuracy(prompt: str, response: str) -> float:
    """Share of a response's worked lines that equal the reference's line at the same index."""
    lines, _ = solve(*parse(prompt))
    got = response.split("\n")
    return sum(a == b for a, b in zip(lines, got)) / len(lines)


def make_tokenizer():
    """The lab's character-level tokenizer (Hugging Face fast tokenizer, a chat template that shows
    the user message and a newline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclass(frozen=True)
class ModelSpec:
    """A Llama trained from scratch on worked solutions."""

    hidden: int
    layers: int
    heads: int
    steps: int  # optimizer steps of next-token training
    lr: float = 3e-3
    batch: int = 32
    seed: int = 0


TEACHER = ModelSpec(hidden=96, layers=3, heads=4, steps=800, seed=1)
STUDENT = ModelSpec(hidden=96, layers=3, heads=4, steps=400, seed=2)
# `--quick`: models trained for seconds, for the tests (they solve little of the task)
QUICK_TEACHER = ModelSpec(hidden=32, layers=1, heads=2, steps=30, seed=1)
QUICK_STUDENT = ModelSpec(hidden=16, layers=1, heads=2, steps=10, seed=2)
DATA_SEED = 1234  # the problems the models are trained on (the distillation prompts use data_seed)


def build_model(spec: ModelSpec, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    return model


def _examples(tokenizer, problems: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + solution + EOS, where the solution starts) per problem."""
    out = []
    for p in problems:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p["question"]}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(p["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((ids + response, len(ids)))
    return out


def train_lm(spec: ModelSpec, tokenizer, problems: list[dict], say=print, progress: bool = True):
    """Next-token training on worked solutions (loss on the solution and EOS only); returns the model."""
    from tqdm.auto import tqdm

    model = build_model(spec, tokenizer)
    model.train()
    examples = _examples(tokenizer, problems)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps))))
    rng = random.Random(spec.seed)
    pad = tokenizer.pad_token_id
    bar = tqdm(range(spec.steps), desc=f"train {spec.hidden}x{spec.layers}", disable=not progress, leave=False)
    for step in bar:
        batch = [examples[rng.randrange(len(examples))] for _ in range(spec.batch)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        for row, (seq, start) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, start : len(seq)] = torch.tensor(seq[start:])
        loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    say(f"  trained {spec.hidden}x{spec.layers} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) "
        f"for {spec.steps} steps, last loss {loss.item():.4f}")
    return model.eval()


def spec_key(task: TaskSpec, spec: ModelSpec) -> str:
    blob = json.dumps({"task": asdict(task), "model": asdict(spec), "data_seed": DATA_SEED, "chars": CHARS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_model(path: Path, task: TaskSpec, spec: ModelSpec, say=print, progress: bool = True) -> Path:
    """Train the model unless `path` holds one trained from the same specification."""
    key = spec_key(task, spec)
    marker = path / "lab_model.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        say(f"  {path}: cached")
        return path
    tokenizer = make_tokenizer()
    started = time.perf_counter()
    model = train_lm(spec, tokenizer, make_problems(20000, DATA_SEED, task), say, progress)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    marker.write_text(json.dumps({"key": key, "task": asdict(task), "model": asdict(spec),
                                  "seconds": time.perf_counter() - started}, indent=2))
    return path


def write_dataset(path: Path, n: int, task: TaskSpec) -> Path:
    """The distillation problems as JSON Lines (question, answer): runs load them as any local file, and
    `data_seed` shuffles and splits them. Their seed differs from the models' training problems."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for row in make_problems(n, DATA_SEED + 1, task):
                f.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
        tmp.replace(path)
    return path


def lab_config(out: Path, **extra) -> dict:
    """Config values of a lab distillation run (overrides of the defaults)."""
    values = dict(
        student=str(out / "models" / "student"), teacher=str(out / "models" / "teacher"),
        dataset=str(out / "data" / "problems.jsonl"), num_prompts=None, eval_prompts=128,
        grader="exact", answer_extract="boxed_last", system_prompt=None,
        max_new_tokens=160, rollout_tokens=32, select_tokens=32, temperature=1.0, top_p=1.0,
        lora_r=0, lr=3e-4, warmup_ratio=0.1, batch_size=32, micro_batch_size=16, steps=300,
        eval_every=50, eval_batch_size=64, save_every=50, keep_checkpoints=1, device="cpu", dtype="float32",
        progress=False,
    )
    values.update(extra)
    return values


def models(out: str = "runs/lab", task: TaskSpec = TaskSpec(), teacher: ModelSpec = TEACHER, student: ModelSpec = STUDENT,
           eval_problems: int = 128, say=print, progress: bool = True) -> dict:
    """Train (or reuse) the lab's teacher and student and report both accuracies on held-out problems."""

    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    say(f"esrdistill lab models: teacher and student trained from scratch in {root / 'models'}")
    started = time.perf_counter()
    write_dataset(root / "data" / "problems.jsonl", 4000, task)
    ensure_model(root / "models" / "teacher", task, teacher, say, progress)
    ensure_model(root / "models" / "student", task, student, say, progress)
    cached = root / "models" / "accuracy.json"
    keys = {"teacher": spec_key(task, teacher), "student": spec_key(task, student), "problems": eval_problems}
    if cached.is_file() and json.loads(cached.read_text()).get("keys") == keys:
        accuracy = json.loads(cached.read_text())["accuracy"]
    else:
        cfg = load_config(None, lab_config(root, eval_prompts=eval_problems))
        accuracy = {}
        for side in ("teacher", "student"):
            result = run_eval(cfg, getattr(cfg, side), view="student", progress=progress)
            accuracy[side] = {"accuracy": result.accuracy, "ci": list(result.accuracy_ci), "problems": len(result.problems),
                              "len_mean": result.len_mean}
        cached.write_text(json.dumps({"keys": keys, "accuracy": accuracy}, indent=2))
    report = {"task": asdict(task), "teacher": {**asdict(teacher), **accuracy["teacher"]},
              "student": {**asdict(student), **accuracy["student"]}}
    for side in ("teacher", "student"):
        a = report[side]
        say(f"  {side}: {a['accuracy']:.1%} (95% CI {a['ci'][0]:.1%}-{a['ci'][1]:.1%}, {a['problems']} problems, greedy), "
            f"mean response {a['len_mean']:.0f} tokens")
    if report["teacher"]["accuracy"] <= report["student"]["accuracy"]:
        say("  warning: the teacher does not beat the student here, so distillation has nothing to teach")
    report["train_seconds"] = {side: json.loads((root / "models" / side / "lab_model.json").read_text()).get("seconds")
                               for side in ("teacher", "student")}
    report["seconds"] = time.perf_counter() - started
    return report
