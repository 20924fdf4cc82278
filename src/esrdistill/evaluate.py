"""Evaluation: n samples per problem, graded; avg@n, maj@n, pass@n with 95% intervals, and the
repetition statistics that tell a real collapse from a grading artefact."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esrdistill import rollout
from esrdistill.data import Problem
from esrdistill.engines.protocol import Engine
from esrdistill.evalstats import majority_vote, mean_interval, ngram_repetition, wilson_interval
from esrdistill.grading import Grader, answer_markers


@dataclass(frozen=True)
class EvalSettings:
    """How an evaluation draws its samples (build.evaluation makes it from the config's eval_* keys)."""

    sampling: rollout.Sampling  # eval_temperature, eval_top_p, max_new_tokens; the evaluated model's EOS and vocabulary
    batch_size: int = 16  # eval_batch_size: sequences per engine.sample call
    samples: int = 1  # eval_samples: samples per problem (avg@n, maj@n, pass@n)


@dataclass
class ProblemResult:
    prompt: str
    reference: str | None
    responses: list[str]
    answers: list[str | None]  # extracted answer of each sample
    correct: list[bool]
    lengths: list[int]  # tokens, EOS included
    ended: list[bool]  # False = cut by the length limit
    repeats: list[float]  # n-gram repetition rate of each sample
    markers: list[int]  # answer markers (\boxed{} or <answer>) in each sample
    majority: str | None = None
    majority_correct: bool = False


@dataclass
class EvalResult:
    n_problems: int
    samples_per_problem: int
    temperature: float
    accuracy: float  # avg@n: mean over problems of the fraction of correct samples (greedy pass@1 at n=1, T=0)
    accuracy_ci: tuple[float, float]
    pass_at_n: float  # fraction of problems with at least one correct sample
    pass_ci: tuple[float, float]
    maj_at_n: float  # fraction of problems whose majority answer is correct
    maj_ci: tuple[float, float]
    len_mean: float  # mean response length in tokens
    cut_frac: float  # responses stopped by the length limit rather than EOS
    repeated_answer_frac: float  # responses with more than one answer marker
    ngram_repetition: float  # mean fraction of repeated 4-grams per response
    problems: list[ProblemResult] = field(default_factory=list, repr=False)

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        k = self.samples_per_problem
        return {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/accuracy_ci_low": self.accuracy_ci[0],
            f"{prefix}/accuracy_ci_high": self.accuracy_ci[1],
            f"{prefix}/pass@{k}": self.pass_at_n,
            f"{prefix}/maj@{k}": self.maj_at_n,
            f"{prefix}/n": self.n_problems,
            f"{prefix}/len_mean": self.len_mean,
            f"{prefix}/cut_frac": self.cut_frac,
            f"{prefix}/repeated_answer_frac": self.repeated_answer_frac,
            f"{prefix}/ngram_rep": self.ngram_repetition,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self, title: str) -> str:
        k = self.samples_per_problem
        sampling = "greedy" if self.temperature == 0 else f"T={self.temperature}, {k} samples per problem"

        def row(name, value, ci):
            return f"| {name} | {value:.1%} | {ci[0]:.1%}-{ci[1]:.1%} |"

        lines = [f"### {title}", "", f"{self.n_problems} problems, {sampling}.", "",
                 "| metric | value | 95% CI |", "|---|---|---|", row(f"avg@{k}", self.accuracy, self.accuracy_ci)]
        if k > 1:
            lines += [row(f"maj@{k}", self.maj_at_n, self.maj_ci), row(f"pass@{k}", self.pass_at_n, self.pass_ci)]
        lines += ["", "| repetition | value |", "|---|---|", f"| mean length (tokens) | {self.len_mean:.1f} |",
                  f"| cut at the length limit | {self.cut_frac:.1%} |",
                  f"| more than one answer marker | {self.repeated_answer_frac:.1%} |",
                  f"| repeated 4-grams | {self.ngram_repetition:.1%} |"]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path, title: str = "Evaluation") -> tuple[Path, Path]:
        """Write PATH (JSON with every response) and PATH with .md (the short table)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        md = path.with_suffix(".md")
        md.write_text(self.markdown(title))
        return path, md


def summarise(problems: list[ProblemResult], temperature: float) -> EvalResult:
    """The figures of an evaluation from its per-problem results."""
    n = len(problems)
    k = len(problems[0].correct) if problems else 0
    per_problem = [sum(p.correct) / len(p.correct) for p in problems]
    passed = sum(any(p.correct) for p in problems)
    majority = sum(p.majority_correct for p in problems)
    flat = lambda attr: [x for p in problems for x in getattr(p, attr)]  # noqa: E731
    total = max(len(flat("lengths")), 1)
    return EvalResult(
        n_problems=n,
        samples_per_problem=k,
        temperature=temperature,
        accuracy=sum(per_problem) / n if n else 0.0,
        accuracy_ci=mean_interval(per_problem),
        pass_at_n=passed / n if n else 0.0,
        pass_ci=wilson_interval(passed, n),
        maj_at_n=majority / n if n else 0.0,
        maj_ci=wilson_interval(majority, n),
        len_mean=sum(flat("lengths")) / total,
        cut_frac=sum(not e for e in flat("ended")) / total,
        repeated_answer_frac=sum(m > 1 for m in flat("markers")) / total,
        ngram_repetition=sum(flat("repeats")) / total,
        problems=problems,
    )


def evaluate(
    engine: Engine,
    tokenizer,
    prompt_ids: list[list[int]],
    problems: list[Problem],
    grader: Grader,
    settings: EvalSettings,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Sample settings.samples responses per problem (greedy at temperature 0), grade each and the majority.

    engine: an engines.protocol.Engine (engines.hf.HFEngine, engines.vllm.VLLMEngine) holding the model evaluated.
    """
    sampling, batch_size, samples = settings.sampling, settings.batch_size, settings.samples
    flat_prompts = [ids for ids in prompt_ids for _ in range(samples)]  # (problem 0 x n, problem 1 x n, ...)
    texts, lengths, ended, token_lists = [], [], [], []
    bar = tqdm(total=len(flat_prompts), desc=desc, disable=not progress, leave=False, unit="seq")
    eos = torch.tensor(sampling.eos_ids)
    for start in range(0, len(flat_prompts), batch_size):
        batch = engine.sample(flat_prompts[start : start + batch_size], sampling)
        for row in range(batch.responses.shape[0]):
            count = int(batch.mask[row].sum())
            tokens = batch.responses[row, :count]
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
            lengths.append(count)
            ended.append(bool(torch.isin(tokens, eos).any()))
            token_lists.append(tokens.tolist())
        bar.update(batch.responses.shape[0])
    bar.close()

    results = []
    for i, problem in enumerate(problems):
        rows = range(i * samples, (i + 1) * samples)
        responses = [texts[r] for r in rows]
        answers = [grader.extract(t) for t in responses]
        majority = majority_vote(answers)
        results.append(ProblemResult(
            prompt=problem.prompt,
            reference=problem.answer,
            responses=responses,
            answers=answers,
            correct=[bool(grader(t, problem)) for t in responses],
            lengths=[lengths[r] for r in rows],
            ended=[ended[r] for r in rows],
            repeats=[ngram_repetition(token_lists[r]) for r in rows],
            markers=[answer_markers(t, grader.mode) for t in responses],
            majority=majority,
            majority_correct=grader.check(majority, problem),
        ))
    return summarise(results, sampling.temperature)
