"""Accuracy of a model on held-out problems: generate, extract, grade, summarise."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from esrdistill import rollout
from esrdistill.data import Problem


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class EvalResult:
    accuracy: float  # fraction of problems answered correctly
    n: int  # problems graded
    correct: int
    ci95: tuple[float, float]  # Wilson 95% interval of the accuracy
    mean_len: float  # mean response length in tokens
    cut_frac: float  # fraction of responses stopped by the length limit rather than EOS
    samples: list[dict] = field(default_factory=list, repr=False)  # prompt, response, reference, correct

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/n": self.n,
            f"{prefix}/ci95_low": self.ci95[0],
            f"{prefix}/ci95_high": self.ci95[1],
            f"{prefix}/len_mean": self.mean_len,
            f"{prefix}/cut_frac": self.cut_frac,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    problems: list[Problem],
    grade: Callable[[str, Problem], bool],
    eos_ids: list[int],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Generate one response per problem (greedy at temperature 0) and grade it."""
    pad_id = tokenizer.pad_token_id
    samples, lengths, cut = [], [], 0
    bar = tqdm(total=len(problems), desc=desc, disable=not progress, leave=False, unit="prob")
    for start in range(0, len(problems), batch_size):
        batch = rollout.sample(
            model, prompt_ids[start : start + batch_size], max_new_tokens, temperature, top_p, eos_ids, pad_id
        )
        for row, problem in enumerate(problems[start : start + batch_size]):
            n_tokens = int(batch.mask[row].sum())
            ended = bool(torch.isin(batch.responses[row, :n_tokens], torch.tensor(eos_ids)).any())
            text = tokenizer.decode(batch.responses[row, :n_tokens], skip_special_tokens=True)
            correct = bool(grade(text, problem))
            samples.append({"prompt": problem.prompt, "response": text, "reference": problem.answer, "correct": correct})
            lengths.append(n_tokens)
            cut += not ended
        bar.update(len(batch.prompts))
    bar.close()
    n = len(samples)
    correct = sum(s["correct"] for s in samples)
    return EvalResult(
        accuracy=correct / n if n else 0.0,
        n=n,
        correct=correct,
        ci95=wilson_interval(correct, n),
        mean_len=sum(lengths) / n if n else 0.0,
        cut_frac=cut / n if n else 0.0,
        samples=samples,
    )


def run_eval(cfg, model: str, view: str = "student", progress: bool = True, device=None) -> EvalResult:
    """Evaluate one model on the config's held-out problems, prompted as the student or the teacher.

    cfg: a Config (its dataset, prompts, grader, max_new_tokens, device, dtype are used).
    """
    from esrdistill import build, models, prompts

    device = device or models.resolve_device(cfg.device)
    tokenizer = models.load_tokenizer(model, cfg.model_cache)
    net = models.load_model(model, models.resolve_dtype(cfg.dtype, device), device, cfg.model_cache)
    task = build.task(cfg)
    student_style, teacher_style = build.styles(cfg, task)
    style = teacher_style if view == "teacher" else student_style
    limit = prompts.context_length(net) - cfg.max_new_tokens
    prompt_set = prompts.prepare(task.eval, tokenizer, tokenizer, style, style, limit, limit)
    if not prompt_set.problems:
        from esrdistill.data import DataError

        raise DataError("no evaluation problems: set eval_prompts > 0 (and check that prompts fit the context)")
    return evaluate(
        net, tokenizer, prompt_set.student_ids, prompt_set.problems, build.grader(cfg, task), models.eos_ids(tokenizer, net),
        cfg.max_new_tokens, cfg.eval_batch_size, progress=progress, desc=f"eval {view}",
    )
