"""Builders: the only place where the Config turns into objects (models, task, prompts, grader, teacher,
engine) and into the small frozen groups of settings the code takes instead of the whole config
(teachers.protocol.LossSettings, teachers.cross.XtokSettings, engines.vllm.VLLMSettings, evaluate.EvalSettings).

Users see one flat config; the cores (losses, selection, xtok) take plain values; train, eval and
quickstart call these builders so that all three read a config the same way.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from esrdistill import models, prompts, rollout, routing, weighting
from esrdistill.config import Config, ConfigError, is_served
from esrdistill.data import Task, load_task
from esrdistill.engines.hf import HFEngine
from esrdistill.engines.protocol import Engine
from esrdistill.engines.vllm import VLLMEngine, VLLMSettings, import_vllm
from esrdistill.evaluate import EvalSettings
from esrdistill.grading import make_grader
from esrdistill.horizon import Adaptive
from esrdistill.packaged import is_packaged, resolve
from esrdistill.teachers.cross import CrossTokenizer, XtokSettings
from esrdistill.teachers.protocol import STAT_KEYS, LossSettings, Teacher
from esrdistill.teachers.routed import Routed, TeacherPrompt, on_device
from esrdistill.teachers.same import SameTokenizer
from esrdistill.teachers.served import Client, ServedSettings, ServedTeacher, base_url, check_server
from esrdistill.tracking import check_loggers


def rollout_length(cfg: Config) -> int:
    """How many tokens a training rollout may have.

    ESR: generation stops after K = rollout_tokens tokens; a full rollout (rollout_tokens=None)
    runs to max_new_tokens, and so may an adaptive K (its largest).
    """
    if cfg.rollout_tokens == "auto":
        raise ValueError("rollout_tokens=auto is resolved by train() before the rollout length is asked for")
    return cfg.rollout_tokens if isinstance(cfg.rollout_tokens, int) else cfg.max_new_tokens


def rollout_length_key(cfg: Config) -> str:
    """The setting that gives the rollout length (for messages)."""
    return "rollout_tokens" if isinstance(cfg.rollout_tokens, int) else "max_new_tokens"


def adaptive(cfg: Config) -> Adaptive | None:
    """rollout_tokens=adaptive's rule (horizon.py), None for any other K."""
    if cfg.rollout_tokens != "adaptive":
        return None
    return Adaptive(k_min=cfg.rollout_tokens_min, k_max=cfg.max_new_tokens, kl_drop=cfg.adaptive_kl_drop,
                    patience=cfg.adaptive_patience, growth=cfg.adaptive_growth, reference=cfg.adaptive_reference)


def prepare_models(cfg: Config) -> None:
    """Convert packaged models now (once, cached), so that loading them later is a plain local load."""
    for spec in dict.fromkeys((cfg.student, cfg.teacher, *(v.teacher for v in routing.views(cfg).values()))):
        if is_packaged(spec):
            resolve(spec, cfg.model_cache)


def task(cfg: Config, need_train: bool = True, eval_prompts: int | None = None) -> Task:
    """The config's task. need_train=False (eval, diagnose): no training rows are required, and the
    held-out split may be shorter than asked when the data has fewer rows."""
    return load_task(
        cfg.dataset,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        num_prompts=cfg.num_prompts,
        eval_prompts=cfg.eval_prompts if eval_prompts is None else eval_prompts,
        fewshot=routing.fewshot_counts(cfg),
        route=routing.router(cfg),
        fewshot_template=({name: view.fewshot_template for name, view in routing.views(cfg).items() if view.teacher_fewshot}
                          if cfg.teachers else cfg.fewshot_template),  # checked against the worked examples now
        seed=cfg.data_seed,
        options=cfg.dataset_options,
        split=cfg.dataset_split,
        eval_split=cfg.eval_split,
        need_train=need_train,
        shuffle=cfg.shuffle_prompts,
    )


def styles(cfg: Config, task: Task) -> tuple[prompts.PromptStyle, prompts.PromptStyle]:
    """(student's view, teacher's view) of a prompt."""
    student = prompts.PromptStyle(system=cfg.system_prompt, template=cfg.prompt_template)
    teacher = prompts.PromptStyle(
        system=cfg.teacher_system_prompt if cfg.teacher_system_prompt is not None else cfg.system_prompt,
        template=cfg.prompt_template,
        fewshot=prompts.fewshot_turns(task.fewshot[: cfg.teacher_fewshot], cfg.prompt_template, cfg.fewshot_template),
        suffix=cfg.teacher_prompt_suffix,
    )
    return student, teacher


@dataclass
class Pair:
    """A student and a teacher on one device."""

    student: torch.nn.Module  # with LoRA (or fully trainable) when built for training
    teacher: torch.nn.Module  # frozen, eval mode
    tokenizer: object  # the student's tokenizer
    teacher_tokenizer: object
    vocab_size: int  # the student's vocabulary; no id past it is sampled (logits are cut to it)
    eos_ids: list[int]  # the student's
    teacher_eos_ids: list[int]
    relation: str  # same | appends | different (models.tokenizer_relation)
    cross: bool  # the teacher re-reads the student's text with its own tokenizer
    device: torch.device
    dtype: torch.dtype  # the compute dtype; a fully fine-tuned student keeps fp32 master weights
    served: object = None  # teachers.served.Server when the teacher is served (teacher=http://...; `teacher` is None)
    teachers: dict | None = None  # several teachers (routed_pair): {name: (its view of the config, its Pair)}; `teacher` is the default's

    @property
    def appended(self) -> int:
        """How many tokens the teacher's tokenizer appends to the student's vocabulary (0: the same)."""
        return models.appended_tokens(self.vocab_size, self.teacher_tokenizer)

    def autocast(self):
        """The context in which the student computes: autocast to `dtype` when its weights are kept
        in fp32 for training (full fine-tuning in bf16), else nothing."""
        weights = next(self.student.parameters()).dtype
        if weights == self.dtype:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        if self.teachers:
            return "; ".join(f"teacher {name}: {sub.describe()}" for name, (_, sub) in self.teachers.items())
        if self.served is not None:
            extra = self.appended
            return f"teacher: {self.served.model}, served" + (f" (its tokenizer appends {extra} tokens)" if extra else "")
        if not self.cross:
            extra = self.appended
            return "tokenizers: the same" if extra == 0 else f"tokenizers: the teacher's appends {extra} tokens to the student's"
        why = "they differ" if self.relation == models.DIFFERENT else "cross_tokenizer=on"
        return (f"tokenizers: cross-tokenizer distillation ({why}: {self.vocab_size:,} student tokens, "
                f"{len(self.teacher_tokenizer):,} teacher tokens)")


def pair(cfg: Config, device: torch.device, trainable: bool) -> Pair:
    """The student (with LoRA or fully trainable when `trainable`) and its teacher: local, served (served_pair) or
    several (routed_pair)."""
    if cfg.teachers:
        return routed_pair(cfg, device, trainable)
    if is_served(cfg.teacher):
        return served_pair(cfg, device, trainable)
    dtype = models.resolve_dtype(cfg.dtype, device)
    tokenizer = models.load_tokenizer(cfg.student, cfg.model_cache)
    teacher_tokenizer, relation, cross = _teacher_tokenizer(cfg, tokenizer)  # before any weights load
    student_dtype = models.master_dtype(dtype, cfg.lora_r) if trainable else dtype
    student = models.load_model(cfg.student, student_dtype, device, cfg.model_cache)
    if trainable:
        student = models.add_lora(student, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    teacher = models.freeze(models.load_model(cfg.teacher, dtype, device, cfg.model_cache))
    vocab = len(tokenizer.get_vocab())
    return Pair(
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        vocab_size=models.check_head_rows(vocab, student, teacher, len(teacher_tokenizer.get_vocab()) if cross else None),
        eos_ids=models.eos_ids(tokenizer, student),
        teacher_eos_ids=models.eos_ids(teacher_tokenizer, teacher),
        relation=relation,
        cross=cross,
        device=device,
        dtype=dtype,
    )


def _teacher_tokenizer(view: Config, student_tokenizer) -> tuple[object, str, bool]:
    """(the tokenizer of view.teacher, its models.tokenizer_relation to the student's, whether the teacher re-reads the
    student's text: cross). cross_tokenizer=off refuses a different tokenizer here, before any weights load."""
    tokenizer = models.load_tokenizer(view.teacher, view.model_cache)
    relation = models.tokenizer_relation(student_tokenizer, tokenizer)
    if view.cross_tokenizer == "off":
        models.shared_vocab(student_tokenizer, tokenizer)
    return tokenizer, relation, relation == models.DIFFERENT or view.cross_tokenizer == "on"


MAX_APPENDED = 256  # a served teacher whose tokenizer appends more tokens to the student's is refused (each is asked for)


def served_pair(cfg: Config, device: torch.device, trainable: bool) -> Pair:
    """The student, and a teacher served at cfg.teacher: its tokenizer (teacher_tokenizer) is loaded here, its
    weights stay on the server (Pair.teacher is None)."""
    if not trainable:
        raise ConfigError("a served teacher (teacher=http://...) is for training only: diagnostics and evaluations of the "
                          "teacher need its weights, so give teacher its directory or hub id there")
    dtype = models.resolve_dtype(cfg.dtype, device)
    tokenizer = models.load_tokenizer(cfg.student, cfg.model_cache)
    served = _served_teacher(cfg, tokenizer)  # before the weights: does the server answer, with enough --max-logprobs?
    student = models.load_model(cfg.student, models.master_dtype(dtype, cfg.lora_r), device, cfg.model_cache)
    student = models.add_lora(student, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    vocab = len(tokenizer.get_vocab())
    if student.get_output_embeddings().weight.shape[0] < vocab:
        raise models.ModelError(f"the student's LM head has fewer rows than its tokenizer's {vocab} tokens")
    return Pair(student=student, teacher=None, tokenizer=tokenizer, vocab_size=vocab, eos_ids=models.eos_ids(tokenizer, student),
                device=device, dtype=dtype, **served)


def _served_teacher(view: Config, student_tokenizer) -> dict:
    """The Pair fields of the teacher served at view.teacher (teacher_tokenizer, relation, cross, teacher_eos_ids,
    served: the answer of its server, asked now)."""
    tokenizer, relation, appended = served_tokenizer(view, student_tokenizer)
    server = check_server(served_settings(view), appended, tokenizer)
    return dict(teacher_tokenizer=tokenizer, relation=relation, cross=False, teacher_eos_ids=models.eos_ids(tokenizer, None),
                served=server)


def served_tokenizer(cfg: Config, student_tokenizer) -> tuple[object, str, int]:
    """(the tokenizer of the teacher served at cfg.teacher: teacher_tokenizer, default the student's; its
    models.tokenizer_relation to the student's; how many tokens it appends), or a ConfigError when it does not have the
    student's ids."""
    tokenizer = models.load_tokenizer(cfg.teacher_tokenizer or cfg.student, cfg.model_cache)
    relation = models.tokenizer_relation(student_tokenizer, tokenizer)
    appended = models.appended_tokens(len(student_tokenizer.get_vocab()), tokenizer)
    if relation == models.DIFFERENT or appended > MAX_APPENDED:
        raise ConfigError(f"teacher_tokenizer={cfg.teacher_tokenizer} of the teacher served at {cfg.teacher} does not have "
                          f"the student's ids (or appends {appended} > {MAX_APPENDED} tokens to them): a served teacher "
                          "must share the student's tokenizer (docs/served-teacher.md)")
    return tokenizer, relation, appended


def served_settings(cfg: Config) -> ServedSettings:
    """The teacher_* keys of a teacher served at cfg.teacher (its URL with or without the /v1 an OpenAI client is given)."""
    return ServedSettings(url=base_url(cfg.teacher), model_name=cfg.teacher_model_name, top_k=cfg.teacher_top_k, mode=cfg.served_loss,
                          concurrency=cfg.teacher_concurrency, timeout_s=cfg.teacher_timeout_s, retries=cfg.teacher_retries)


def loss_settings(cfg: Config) -> LossSettings:
    """The loss, the token selection and the token weights: what the teacher compares with and the loss reduces with."""
    return LossSettings(loss=cfg.loss, jsd_beta=cfg.jsd_beta, temperature=cfg.temperature, top_p=cfg.top_p,
                        loss_norm=cfg.loss_norm, loss_chunk=cfg.loss_chunk, token_select=cfg.token_select,
                        select_tokens=cfg.select_tokens, token_weight=cfg.token_weight,
                        token_weight_gamma=cfg.token_weight_gamma, token_weight_decay=cfg.token_weight_decay)


def xtok_settings(cfg: Config) -> XtokSettings:
    """The xtok_* keys: how a teacher with another tokenizer is aligned and compared."""
    return XtokSettings(loss=cfg.xtok_loss, align=cfg.xtok_align, teacher_floor=cfg.xtok_teacher_floor,
                        uld_weight=cfg.xtok_uld_weight)


def vllm_settings(cfg: Config) -> VLLMSettings:
    """The vllm_* keys: how a vLLM engine uses its device."""
    return VLLMSettings(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, kv_cache_gb=cfg.vllm_kv_cache_gb,
                        sleep=cfg.vllm_sleep, compile=cfg.vllm_compile)


def teacher(cfg: Config, pair: Pair, prompts: list[list[int]] | None = None) -> Teacher:
    """The teacher's scorer: the student's own ids, (across tokenizers) the student's text re-read, or (served)
    a vLLM server's top-K log-probs of the student's ids. prompts: the teacher prompts it will score, whose
    shared beginning is cached once (teacher_prefix_cache)."""
    if pair.teachers:
        return routed_teacher(cfg, pair, prompts)
    settings = loss_settings(cfg)
    if pair.served is not None:
        return weighable(cfg, ServedTeacher(Client(served_settings(cfg), pair.served, pair.vocab_size, pair.appended),
                                            settings, pair.device))
    micro = cfg.teacher_micro_batch or cfg.micro_batch_size
    prefix = rollout.PrefixCache(pair.teacher, prompts) if cfg.teacher_prefix_cache and prompts else None
    if not pair.cross:
        return weighable(cfg, SameTokenizer(pair.teacher, pair.tokenizer.pad_token_id, pair.vocab_size, micro, settings, prefix))
    return weighable(cfg, CrossTokenizer(pair.teacher, pair.tokenizer, pair.teacher_tokenizer, pair.eos_ids,
                                         pair.teacher_eos_ids, micro, settings, xtok_settings(cfg), prefix))


def weighable(cfg: Config, scorer: Teacher, name: str = "") -> Teacher:
    """`scorer`, once it is known to report the per-token statistic cfg.token_weight reads (weighting.SIGNALS)."""
    key = STAT_KEYS.get(weighting.SIGNALS.get(cfg.token_weight, ""))
    if key is not None and key not in scorer.metric_keys:
        who = f"teacher {name} ({scorer.kind})" if name else f"a {scorer.kind} teacher"
        raise ConfigError(f"token_weight={cfg.token_weight} reads each sampled token's log-prob under the teacher, which "
                          f"{who} does not give (across tokenizers the student's token has no teacher token): use "
                          "token_weight=iw_opd_kl, the same weight from the per-position reverse KL")
    return scorer


def engine(cfg: Config, pair: Pair, student, max_model_len: int, kind: str | None = None) -> Engine:
    """A rollout engine holding the student: `hf` (generate on the student itself) or `vllm` (an
    in-process vLLM engine, given the student's current weights). kind: default cfg.rollout_engine."""
    kind = kind or cfg.rollout_engine
    if kind == "hf":
        return HFEngine(student, pair.autocast, cfg.hf_merge_lora, cfg.hf_decode)
    return vllm_engine(cfg, models.locate(cfg.student, cfg.model_cache), pair.dtype, max_model_len, pair.vocab_size, student)


def vllm_engine(cfg: Config, path: str, dtype: torch.dtype, max_model_len: int, vocab_size: int,
                weights_from=None) -> Engine:
    """An in-process vLLM engine on the model at `path`; with `weights_from`, given that model's weights
    at once (a resumed or LoRA-wrapped student is not what the directory holds)."""
    engine = VLLMEngine(path, dtype, max_model_len, cfg.seed, vocab_size, vllm_settings(cfg))
    if weights_from is not None:
        engine.sync(weights_from)
    return engine


def eval_engine_kind(cfg: Config) -> str:
    return cfg.rollout_engine if cfg.eval_engine == "auto" else cfg.eval_engine


def check_available(cfg: Config) -> None:
    """Import now what a training run will need later (vLLM for its rollouts or its evaluations,
    TensorBoard, wandb, trackio), and ask every served teacher's server whether it answers (and with its tokenizer:
    check_served), so that a missing package or server stops it before any model loads or anything is
    written or trained."""
    evaluates = cfg.eval_every > 0 and cfg.eval_prompts > 0
    for key, kind in (("rollout_engine", cfg.rollout_engine), ("eval_engine", eval_engine_kind(cfg) if evaluates else "hf")):
        if kind == "vllm":
            import_vllm(f"{key}=vllm")
    check_loggers(cfg.tensorboard, cfg.wandb, cfg.trackio)
    check_served(cfg)


def check_served(cfg: Config) -> None:
    """Ask the server of each served teacher (teacher=http://..., or each one in `teachers`) whether it answers, returns
    teacher_top_k log-probs and tokenizes as teacher_tokenizer does (teachers.served.check_server): the tokenizers are
    loaded for that (small, fast), the weights not. A packaged model's tokenizer is not converted yet: its server is
    asked the rest now and its tokenizer checked when the pair loads, before the weights."""
    served = [view for view in (routing.views(cfg).values() if cfg.teachers else [cfg]) if is_served(view.teacher)]
    student = None
    for view in served:
        tokenizer, appended = None, 0
        if not any(is_packaged(spec) for spec in (view.student, view.teacher_tokenizer or view.student)):
            student = student or models.load_tokenizer(view.student, view.model_cache)
            tokenizer, _, appended = served_tokenizer(view, student)
        check_server(served_settings(view), appended, tokenizer)


def final_dtype(cfg: Config, pair: Pair) -> torch.dtype:
    """The dtype final/ is saved in: final_dtype, or (auto) the run's dtype."""
    return pair.dtype if cfg.final_dtype == "auto" else models.resolve_dtype(cfg.final_dtype, pair.device)


def rollout_sampling(cfg: Config, pair: Pair, max_new_tokens: int, side: str = "student") -> rollout.Sampling:
    """How training rollouts (and diagnose's rollouts of either model) are sampled."""
    tokenizer, eos, vocab = ((pair.tokenizer, pair.eos_ids, pair.vocab_size) if side == "student" else
                             (pair.teacher_tokenizer, pair.teacher_eos_ids, len(pair.teacher_tokenizer)))
    return rollout.Sampling(max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            eos_ids=tuple(eos), pad_id=tokenizer.pad_token_id, vocab_size=vocab,
                            min_new_tokens=min(cfg.min_new_tokens, max_new_tokens) if side == "student" else 0)


def eval_sampling(cfg: Config, tokenizer, eos_ids: list[int], vocab_size: int, max_new_tokens: int | None = None) -> rollout.Sampling:
    """How evaluation samples are drawn (eval_temperature 0 = greedy)."""
    return rollout.Sampling(max_new_tokens=max_new_tokens or cfg.max_new_tokens, temperature=cfg.eval_temperature,
                            top_p=cfg.eval_top_p, eos_ids=tuple(eos_ids), pad_id=tokenizer.pad_token_id, vocab_size=vocab_size)


def evaluation(cfg: Config, tokenizer, eos_ids: list[int], vocab_size: int) -> EvalSettings:
    """How an evaluation of a model with this tokenizer, EOS ids and vocabulary draws its samples."""
    return EvalSettings(sampling=eval_sampling(cfg, tokenizer, eos_ids, vocab_size), batch_size=cfg.eval_batch_size,
                        samples=cfg.eval_samples)


def prompt_set(cfg: Config, pair: Pair, task: Task, problems, new_tokens: int, new_tokens_key: str) -> prompts.PromptSet:
    """Both views of `problems`, dropping those that leave no room for `new_tokens` of response.

    new_tokens_key names the setting that gave new_tokens (rollout_tokens or max_new_tokens), for the
    message that says which limit a dropped prompt exceeded.
    """
    if pair.teachers:  # each teacher's rows in its own view
        return routed_prompt_set(cfg, pair, task, problems, new_tokens, new_tokens_key)
    student_style, teacher_style = styles(cfg, task)
    student_context = prompts.context_length(pair.student)
    if pair.served is not None:  # the server generates one token after what it scores: it needs room for it
        teacher_limit = prompts.Limit("teacher", pair.served.max_scored_tokens - new_tokens,
                                      f"the teacher server's context of {pair.served.max_model_len} tokens (--max-model-len), "
                                      f"minus 1 for the token it generates, minus {new_tokens_key}={new_tokens}")
    else:
        teacher_context = prompts.context_length(pair.teacher)
        teacher_limit = prompts.Limit("teacher", teacher_context - new_tokens,
                                      f"the teacher's context of {teacher_context} tokens minus {new_tokens_key}={new_tokens}")
    limits = [prompts.Limit("student", student_context - new_tokens,
                            f"the student's context of {student_context} tokens minus {new_tokens_key}={new_tokens}"),
              teacher_limit]
    if cfg.max_prompt_tokens is not None and cfg.max_prompt_tokens < limits[0].tokens:
        limits[0] = prompts.Limit("student", cfg.max_prompt_tokens, f"max_prompt_tokens={cfg.max_prompt_tokens}")
    return prompts.prepare(problems, pair.tokenizer, pair.teacher_tokenizer, student_style, teacher_style, limits[0], limits[1])


def grader(cfg: Config, task: Task) -> Callable:
    return make_grader(task, cfg.grader, cfg.answer_extract)


# ---- several teachers (`teachers:`; routing.py reads which row goes to which) ----------------------------

def routed_pair(cfg: Config, device: torch.device, trainable: bool) -> Pair:
    """The Pair of the default teacher, with `teachers`: {name: (its view of the config, its Pair)}; a model
    named by several teachers is loaded once. Not trainable (evaluation, diagnostics): the default teacher alone."""
    seen, default = routing.views(cfg), routing.default_name(cfg)
    main = pair(seen[default], device, trainable)
    if not trainable:
        return main
    loaded = {seen[default].teacher: main}
    for view in seen.values():
        if view.teacher in loaded:
            continue
        if is_served(view.teacher):  # its server was asked first, in check_available, before any model loaded
            loaded[view.teacher] = dataclasses.replace(main, teacher=None, **_served_teacher(view, main.tokenizer))
            continue
        tokenizer, relation, cross = _teacher_tokenizer(view, main.tokenizer)
        home = torch.device("cpu") if cfg.teacher_offload else device  # offloaded: loaded on the CPU
        model = models.freeze(models.load_model(view.teacher, main.dtype, home, view.model_cache))
        models.check_head_rows(main.vocab_size, main.student, model, len(tokenizer.get_vocab()) if cross else None)
        loaded[view.teacher] = dataclasses.replace(main, teacher=model, teacher_tokenizer=tokenizer, relation=relation,
                                                   cross=cross, teacher_eos_ids=models.eos_ids(tokenizer, model), served=None)
    if cfg.teacher_offload and main.teacher is not None:
        main.teacher.to("cpu")
    return dataclasses.replace(main, teachers={name: (view, loaded[view.teacher]) for name, view in seen.items()})


def routed_prompt_set(cfg: Config, pair: Pair, task: Task, problems: list, new_tokens: int,
                      new_tokens_key: str) -> prompts.PromptSet:
    """prompt_set of each teacher's problems in its own view, merged back in the problems' order, with the
    teacher prompts as TeacherPrompts (ids that carry their teacher's name, which Routed reads)."""
    names = routing.route(cfg, problems, task.fewshot + task.eval + task.train)
    kept, dropped, why = {}, 0, []
    for name, (view, sub) in pair.teachers.items():
        mine = [p for p, n in zip(problems, names) if n == name]
        if not mine:
            continue
        part = prompt_set(view, sub, routing.own(cfg, task, name), mine, new_tokens, new_tokens_key)
        kept.update({id(p): (s, TeacherPrompt(t, name)) for p, s, t in zip(part.problems, part.student_ids, part.teacher_ids)})
        dropped += part.dropped
        why += [f"{name}: {part.why_dropped}"] if part.why_dropped else []
    order = [p for p in problems if id(p) in kept]
    return prompts.PromptSet(problems=order, student_ids=[kept[id(p)][0] for p in order],
                             teacher_ids=[kept[id(p)][1] for p in order], dropped=dropped, why_dropped="; ".join(why))


def routed_teacher(cfg: Config, pair: Pair, prompts: list | None = None) -> Routed:
    """A Routed teacher over `teacher` of each teacher's view (its prefix cache over its own prompts)."""
    out, offload = {}, {}
    for name, (view, sub) in pair.teachers.items():
        mine = [list(p) for p in prompts or [] if p.teacher == name]
        if cfg.loss_chunk:
            rollout.check_hidden_path(sub.teacher, f"teacher {name}")
        if cfg.teacher_offload and sub.teacher is not None:  # its prefix cache and vocabulary map are made on the device
            offload[name] = (sub.teacher, sub.device)
        with on_device(*offload[name]) if name in offload else nullcontext():
            out[name] = weighable(cfg, teacher(view, sub, mine or None), name)
    return Routed(out, offload, signals=cfg.token_select != "prefix" or cfg.token_weight in weighting.SIGNALS)
