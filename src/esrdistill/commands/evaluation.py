"""The eval command's work: one model, loaded from a directory or a packaged name, evaluated on the config's
held-out problems as the student or as the teacher would be prompted (`esrdistill eval`; the quickstart, the
study and the lab call it for their before and after figures)."""

from __future__ import annotations

from esrdistill import build, models, prompts, routing
from esrdistill.data import DataError
from esrdistill.engines.hf import HFEngine
from esrdistill.evaluate import EvalResult, evaluate


def run_eval(cfg, model: str, view: str = "student", progress: bool = True, device=None,
             teacher: str | None = None) -> EvalResult:
    """Evaluate one model on the config's held-out problems, prompted as the student or the teacher.

    cfg: a Config (dataset, prompts, grader, eval_* keys, max_new_tokens, device, dtype are used).
    teacher: with several teachers and teacher_field, only the problems routed to that teacher, and
    view="teacher" prompts them as that teacher sees them (its worked examples, system prompt, suffix).
    """
    device = device or models.resolve_device(cfg.device)
    task = build.task(cfg, need_train=False)
    if teacher is not None:
        task, cfg = routing.own(cfg, task, teacher), routing.views(cfg)[teacher]
    grade = build.grader(cfg, task)  # a bad grader fails before the model loads
    tokenizer = models.load_tokenizer(model, cfg.model_cache)
    net = models.load_model(model, models.resolve_dtype(cfg.dtype, device), device, cfg.model_cache)
    student_style, teacher_style = build.styles(cfg, task)
    style = teacher_style if view == "teacher" else student_style
    context = prompts.context_length(net)
    limit = prompts.Limit(view, context - cfg.max_new_tokens, f"the model's context of {context} tokens minus max_new_tokens={cfg.max_new_tokens}")
    prompt_set = prompts.prepare(task.eval, tokenizer, tokenizer, style, style, limit, limit)
    if not task.eval:
        raise DataError("no evaluation problems: set eval_prompts > 0")
    prompt_set.require("evaluation prompts")
    settings = build.evaluation(cfg, tokenizer, models.eos_ids(tokenizer, net), len(tokenizer))
    if build.eval_engine_kind(cfg) == "vllm":
        longest = max(map(len, prompt_set.student_ids)) + cfg.max_new_tokens
        engine = build.vllm_engine(cfg, models.locate(model, cfg.model_cache), net.dtype, longest, len(tokenizer))
    else:
        engine = HFEngine(net, merge_lora=cfg.hf_merge_lora, decode=cfg.hf_decode)
    return evaluate(engine, tokenizer, prompt_set.student_ids, prompt_set.problems, grade, settings, progress=progress,
                    desc=f"eval {view}")
