"""The one flat, frozen, typed config of a distillation run.

Load it with `load_config(path, overrides)`: YAML first, then `key=value` overrides. Unknown keys
and bad values raise `ConfigError` naming the key and what is allowed. Derived values (the
generation length, the dtype, the device) are computed where they are used, never written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from esrdistill.config_window import check_window
from esrdistill.errors import UserError

LOSSES = ("reverse_kl", "forward_kl", "jsd", "sampled")
LOSS_NORMS = ("trajectory", "token")
DTYPES = ("auto", "float32", "bfloat16", "float16")
GRADERS = ("auto", "reasoning_gym", "math", "exact")
ANSWER_EXTRACTS = ("tag", "boxed_last", "boxed_first", "last_number", "lenient", "none")
CROSS_TOKENIZER = ("auto", "on", "off")
ENGINES = ("hf", "vllm")
HF_DECODES = ("dynamic", "static", "compiled")  # engines.hf.DECODES (config imports no engine)
XTOK_LOSSES = ("matched_kl", "uld", "hybrid")
XTOK_ALIGN = ("start", "middle")
SERVED_LOSSES = ("tail", "renorm")


def is_served(spec: str) -> bool:
    """Whether a teacher spec is the address of a server (http://HOST:PORT) rather than a model."""
    return spec.strip().lower().startswith(("http://", "https://"))


class ConfigError(UserError, ValueError):
    """A config key or value a user must fix; the message says how."""


@dataclass(frozen=True)
class Config:
    # ---- models -------------------------------------------------------------------------------
    student: str = "packaged:smollm2-135m-instruct"  # local dir, hub id, or packaged:NAME
    teacher: str = "packaged:smollm2-135m-instruct"  # local dir, hub id, packaged:NAME, or http://HOST:PORT (a vLLM server: docs/served-teacher.md)
    teacher_tokenizer: Optional[str] = None  # served teacher: the model dir or hub id its tokenizer is read from (for its prompts); null = the student's
    teacher_model_name: Optional[str] = None  # served teacher: the model name the server reports; null = the one model it serves
    teacher_top_k: int = 64  # served teacher: log-probs per position it returns (start the server with --max-logprobs >= this)
    served_loss: str = "tail"  # served teacher: tail (top-K tokens + one bucket for the rest) | renorm (renormalised over the top-K)
    teacher_concurrency: int = 8  # served teacher: requests in flight at once (one per rollout)
    teacher_timeout_s: float = 120.0  # served teacher: seconds one request may take before it is retried
    teacher_retries: int = 5  # served teacher: retries of a failed request (waits 1, 2, 4, ... s) before the run stops
    teachers: dict = field(default_factory=dict)  # several teachers: {name: model or URL, or {model, system_prompt, fewshot, fewshot_template, suffix, tokenizer, model_name}}; routed by teacher_field (docs/teachers.md)
    teacher_field: Optional[str] = None  # several teachers: the data field naming each row's teacher; null = every row to default_teacher
    default_teacher: Optional[str] = None  # several teachers: the teacher of rows without teacher_field; null = the first of teachers
    teacher_offload: bool = False  # several teachers: keep local teachers on the CPU, each moved to the device only while it scores (needs loss_chunk=0)
    model_cache: Optional[str] = None  # where packaged models are converted; null = ~/.cache/esrdistill (or $ESRDISTILL_CACHE)

    # ---- data ---------------------------------------------------------------------------------
    dataset: str = "reasoning_gym:chain_sum"  # reasoning_gym:TASK, packaged:NAME (shipped tasks: worked_sums), a .jsonl/.json/.csv/.parquet file, a directory of them (split by file name, as datasets does), or a datasets hub name
    dataset_options: dict = field(default_factory=dict)  # kwargs for the generator / datasets.load_dataset
    dataset_split: str = "train"  # split to read from a directory or a datasets name
    eval_split: Optional[str] = None  # evaluate on the first eval_prompts rows of this split (e.g. test), the same for every data_seed; training rows with one of their prompts are left out. null = hold rows out of dataset_split
    prompt_field: str = "question"  # row field holding the prompt text
    answer_field: str = "answer"  # row field holding the reference answer (used for eval and few-shot, which refuse rows without one)
    num_prompts: Optional[int] = 1000  # training prompts to use; null = every remaining row
    eval_prompts: int = 64  # held-out problems for evaluation (taken before the training prompts)
    shuffle_prompts: bool = True  # false: prompts in the file's / generator's order, epoch after epoch
    prompt_template: str = "{prompt}"  # user message; "{prompt}" is replaced by the row's prompt
    system_prompt: Optional[str] = None  # student's system message; null = the chat template's default
    teacher_system_prompt: Optional[str] = None  # teacher's system message; null = system_prompt
    teacher_fewshot: int = 0  # worked examples (held-out rows) the teacher alone sees as earlier turns
    fewshot_template: str = "<answer>{answer}</answer>"  # assistant turn of a worked example: {answer} and {FIELD} of its row (or metadata); a field a worked example lacks is an error
    teacher_prompt_suffix: str = ""  # text the teacher alone sees after its chat template (e.g. an empty think block)
    cross_tokenizer: str = "auto"  # auto (when the tokenizers differ) | on (always re-read the text) | off (refuse different tokenizers)
    xtok_loss: str = "matched_kl"  # across tokenizers: matched_kl (loss on the shared tokens) | uld | hybrid (matched_kl + ULD on the rest)
    xtok_align: str = "start"  # across tokenizers: start (same text context, else masked) | middle (the paper's: teacher token at the middle byte)
    xtok_teacher_floor: float = -20.0  # across tokenizers: the teacher's log-probs on the shared tokens are floored here
    xtok_uld_weight: float = 1.0  # xtok_loss=hybrid: weight of the ULD term on the unmapped tokens
    xtok_min_mapped_mass: float = 0.5  # warn when the probability mass on shared tokens falls below this
    max_prompt_tokens: Optional[int] = None  # drop longer prompts; null = model context minus rollout length

    # ---- rollout ------------------------------------------------------------------------------
    rollout_engine: str = "hf"  # hf (generate on the student) | vllm (vLLM in-process, weights pushed after each step)
    eval_engine: str = "auto"  # engine of evaluations: auto (= rollout_engine) | hf | vllm
    hf_merge_lora: bool = True  # hf engine, LoRA student: generate through merged weights (restored exactly after; a copy of the adapted weights in memory)
    hf_decode: str = "dynamic"  # hf engine's KV cache: dynamic | static (StaticCache) | compiled (StaticCache + torch.compile reduce-overhead: CUDA graphs; compiles a few graphs at the start)
    vllm_gpu_memory_utilization: float = 0.3  # vllm on CUDA: share of the GPU's memory vLLM may take (the rest trains)
    vllm_kv_cache_gb: Optional[float] = None  # vllm: KV-cache size in GiB; null = 1 on CPU, vLLM's own sizing on CUDA
    vllm_sleep: bool = False  # vllm on CUDA: free the engine's memory during the teacher and train phases
    vllm_compile: bool = False  # vllm: torch.compile / CUDA graphs (faster generation, minutes to start); false = eager
    rollout_tokens: Optional[int] = 100  # ESR's K: generate only this many tokens; null = full rollout; auto = the diagnostics' K; adaptive = chosen during training (docs/selection.md)
    rollout_tokens_schedule: str = "fixed"  # fixed | progressive (K grows linearly from rollout_tokens_start over schedule_steps)
    rollout_tokens_start: int = 1  # progressive schedule: K at the first step
    schedule_steps: Optional[int] = None  # progressive schedule: steps to reach rollout_tokens; null = all the steps
    auto_k_problems: int = 16  # rollout_tokens=auto: held-out problems the diagnostics use to choose K
    rollout_tokens_min: int = 16  # rollout_tokens=adaptive: K at the first step (K grows from there, up to max_new_tokens)
    adaptive_kl_drop: float = 0.5  # rollout_tokens=adaptive: a step is learned when the window tail's reverse KL <= this x the reference (adaptive_reference)
    adaptive_patience: int = 2  # rollout_tokens=adaptive: learned steps in a row before K grows
    adaptive_growth: float = 2.0  # rollout_tokens=adaptive: K -> ceil(K x this) when it grows
    adaptive_reference: str = "first"  # rollout_tokens=adaptive: the tail KL a step is compared with: first (its value when K was set) or peak (its largest at this K)
    token_select: str = "prefix"  # prefix (ESR: generation stops at K) | on full rollouts: prefix_mask, random, middle, last, top_reverse_kl, ... (docs/selection.md)
    select_tokens: int = 100  # token_select other than prefix: tokens per trajectory that carry the loss
    token_weight: str = "none"  # none | decay | iw_opd | iw_opd_kl: soft weights of the tokens that carry the loss (docs/selection.md)
    token_weight_gamma: float = 0.5  # iw_opd, iw_opd_kl: an early token weighs up to 1 + gamma, the last about 1
    token_weight_decay: float = 0.99  # decay: the weight of position t is decay**t (then each row rescaled to mean 1)
    max_new_tokens: int = 1024  # length limit of a full rollout (rollout_tokens=null) and of evaluation
    min_new_tokens: int = 0  # rollouts: EOS is held back before this many tokens (benchmarks force equal lengths); 0 = off
    temperature: float = 0.7  # sampling temperature of rollouts
    top_p: float = 0.95  # nucleus sampling of rollouts (top_k is off)

    # ---- loss ---------------------------------------------------------------------------------
    loss: str = "reverse_kl"  # reverse_kl | forward_kl | jsd | sampled (per-token policy gradient)
    jsd_beta: float = 0.5  # jsd only: weight of the teacher in the mixture, strictly between 0 and 1
    loss_chunk: int = 0  # compute the loss this many positions at a time (recomputed in backward): memory grows with it, not with T; 0 = all at once
    loss_norm: str = "trajectory"  # trajectory: mean over a trajectory then over trajectories; token: mean over all tokens

    # ---- optimisation -------------------------------------------------------------------------
    lora_r: int = 32  # LoRA rank on every linear layer; 0 = full fine-tuning
    lora_alpha: int = 64  # LoRA scaling numerator
    lora_dropout: float = 0.05  # LoRA dropout
    lr: float = 5e-5  # peak learning rate (the paper: 5e-5 LoRA, 5e-6 full fine-tuning)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.1  # fraction of steps with linear warmup before the cosine decay
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    batch_size: int = 16  # prompts (one rollout each) per optimizer step
    micro_batch_size: int = 4  # trajectories per forward/backward; the loss does not depend on it
    teacher_prefix_cache: bool = True  # compute the teacher prompts' shared beginning (system message, few-shot turns) once
    teacher_micro_batch: Optional[int] = None  # trajectories per teacher forward, at most micro_batch_size; null = micro_batch_size
    steps: int = 200  # optimizer steps
    max_skipped_steps: int = 3  # a step whose loss or gradient is NaN/inf is skipped; stop after this many in a row
    seed: int = 0  # seeds data order, sampling and init; each step reseeds from (seed, step)
    data_seed: int = 0  # seeds the problems themselves and the held-out split (a sweep over seed keeps them); reasoning-gym's rows under S+1 are those under S shifted by one: take seeds far apart (0, 1000, ...) for other problems

    # ---- evaluation, checkpoints, output ------------------------------------------------------
    eval_every: int = 50  # evaluate the student every N steps and at the end; 0 = never
    eval_batch_size: int = 16  # sequences per generate call during evaluation
    eval_samples: int = 1  # samples per problem: avg@n, maj@n, pass@n (n > 1 needs eval_temperature > 0)
    eval_temperature: float = 0.0  # 0 = greedy (pass@1); the paper: 0.7 with 4 samples
    eval_top_p: float = 1.0  # nucleus sampling of evaluation samples
    grader: str = "auto"  # auto | reasoning_gym | math | exact | module:function (your fn(answer, reference, row))
    answer_extract: str = "tag"  # tag (<answer>..</answer>) | boxed_last | boxed_first | last_number | lenient (right answer anywhere) | none
    save_every: int = 50  # checkpoint every N steps; 0 = only on interruption
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    run_dir: str = "runs/esr"  # where config.yaml, metrics.jsonl, checkpoints/ and final/ go
    resume: bool = False  # continue from the newest checkpoint in run_dir
    merge_lora: bool = True  # final/ holds the merged model; False = the adapter only
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda; several GPUs: `accelerate launch`
    cpu_keep_memory: bool = True  # on the CPU (one process), malloc keeps freed memory for the next step (no page faults; docs/training.md)
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16; full fine-tuning keeps fp32 master weights
    final_dtype: str = "auto"  # dtype of final/: auto (= dtype) | float32 (keeps updates bf16 full fine-tuning rounds away) | bfloat16 | float16
    tensorboard: bool = False  # also write TensorBoard events to run_dir/tb (`pip install tensorboard`)
    wandb: bool = False  # also log to Weights & Biases (offline unless WANDB_MODE says otherwise)
    trackio: bool = False  # also log to trackio, its local store ($TRACKIO_DIR, else ~/.cache/huggingface/trackio; `pip install trackio`)
    trackio_project: str = "esrdistill"  # trackio=true: the project the run logs to
    trackio_run: Optional[str] = None  # trackio=true: the run's name; null = the run directory's name
    progress: bool = True  # show progress bars


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _coerce(key: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the type of field `key`, or raise ConfigError."""
    if key == "rollout_tokens" and isinstance(value, str) and value.strip().lower() in ("auto", "adaptive"):
        return value.strip().lower()  # auto: chosen by the diagnostics before training; adaptive: during it (horizon.py)
    hint = _HINTS[key]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    spelled_null = isinstance(value, str) and value.strip().lower() in ("null", "none", "~")
    if value is None or (spelled_null and (optional or base is not str)):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    try:
        if base is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{key}={value!r} is not a finite number")
            return number
        if base is dict:
            value = parse_yaml(value, f"{key}={value}") if isinstance(value, str) else value
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if base is str:
            return value if isinstance(value, str) else str(value)
    except ConfigError:
        raise
    except (ValueError, TypeError):
        pass
    raise ConfigError(f"{key}={value!r} is not a valid {getattr(base, '__name__', base)}")


def parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, with a syntax error as one ConfigError line: source (a file, or key=value), line, column,
    the problem, and where the construct it broke began."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = problem or str(err).splitlines()[0]  # a ReaderError (a control character) has no mark
        context, begun = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and begun is not None and (mark is None or (begun.line, begun.column) != (mark.line, mark.column)):
            what += f" ({context} begun at line {begun.line + 1}, column {begun.column + 1})"
        raise ConfigError(f"{source} is not valid YAML: {where}{what}") from None


def _check_key(key: str) -> None:
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint} (valid keys: see `esrdistill train --help-config`)")


def validate(cfg: Config) -> Config:
    """Raise ConfigError on values no run can use; return cfg unchanged."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name in ("student", "teacher", "dataset"):
        need(bool(getattr(cfg, name).strip()), f"{name} is missing: give a local directory, a hub id or packaged:NAME")
    check_window(cfg, need)
    need(cfg.max_new_tokens > 0, f"max_new_tokens must be > 0, got {cfg.max_new_tokens}")
    need(cfg.temperature > 0, f"temperature must be > 0 for on-policy sampling, got {cfg.temperature}")
    need(0 < cfg.top_p <= 1, f"top_p must be in (0, 1], got {cfg.top_p}")
    need(cfg.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got '{cfg.loss}'")
    need(0 < cfg.jsd_beta < 1, f"jsd_beta must be strictly between 0 and 1, got {cfg.jsd_beta}")
    need(cfg.loss_norm in LOSS_NORMS, f"loss_norm must be one of {', '.join(LOSS_NORMS)}, got '{cfg.loss_norm}'")
    need(cfg.lora_r >= 0, f"lora_r must be >= 0 (0 = full fine-tuning), got {cfg.lora_r}")
    need(cfg.lora_alpha > 0, f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    need(0 <= cfg.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    need(cfg.lr >= 0, f"lr must be >= 0, got {cfg.lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    need(cfg.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 = off), got {cfg.max_grad_norm}")
    need(cfg.batch_size > 0, f"batch_size must be > 0, got {cfg.batch_size}")
    need(cfg.micro_batch_size > 0, f"micro_batch_size must be > 0, got {cfg.micro_batch_size}")
    need(cfg.teacher_micro_batch is None or cfg.teacher_micro_batch > 0, f"teacher_micro_batch must be > 0 or null, got {cfg.teacher_micro_batch}")
    need(cfg.teacher_micro_batch is None or cfg.teacher_micro_batch <= cfg.micro_batch_size,
         f"teacher_micro_batch={cfg.teacher_micro_batch} is larger than micro_batch_size={cfg.micro_batch_size}, and the teacher "
         "scores one student micro-batch at a time, so it would have no effect: raise micro_batch_size, or leave "
         "teacher_micro_batch at null")
    need(cfg.rollout_engine in ENGINES, f"rollout_engine must be one of {', '.join(ENGINES)}, got '{cfg.rollout_engine}'")
    need(cfg.hf_decode in HF_DECODES, f"hf_decode must be one of {', '.join(HF_DECODES)}, got '{cfg.hf_decode}'")
    need(cfg.eval_engine in ("auto",) + ENGINES, f"eval_engine must be auto, hf or vllm, got '{cfg.eval_engine}'")
    need(0 < cfg.vllm_gpu_memory_utilization <= 1, f"vllm_gpu_memory_utilization must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}")
    need(cfg.vllm_kv_cache_gb is None or cfg.vllm_kv_cache_gb > 0, f"vllm_kv_cache_gb must be > 0 or null, got {cfg.vllm_kv_cache_gb}")
    need(cfg.cross_tokenizer in CROSS_TOKENIZER, f"cross_tokenizer must be one of {', '.join(CROSS_TOKENIZER)}, got '{cfg.cross_tokenizer}'")
    need(cfg.xtok_loss in XTOK_LOSSES, f"xtok_loss must be one of {', '.join(XTOK_LOSSES)}, got '{cfg.xtok_loss}'")
    need(cfg.xtok_align in XTOK_ALIGN, f"xtok_align must be one of {', '.join(XTOK_ALIGN)}, got '{cfg.xtok_align}'")
    need(cfg.xtok_teacher_floor < 0, f"xtok_teacher_floor must be < 0 (a log-probability), got {cfg.xtok_teacher_floor}")
    need(cfg.xtok_uld_weight >= 0, f"xtok_uld_weight must be >= 0, got {cfg.xtok_uld_weight}")
    need(0 <= cfg.xtok_min_mapped_mass <= 1, f"xtok_min_mapped_mass must be in [0, 1], got {cfg.xtok_min_mapped_mass}")
    need(cfg.teacher_top_k >= 1, f"teacher_top_k must be >= 1, got {cfg.teacher_top_k}")
    need(cfg.served_loss in SERVED_LOSSES, f"served_loss must be one of {', '.join(SERVED_LOSSES)}, got '{cfg.served_loss}'")
    need(cfg.teacher_concurrency >= 1, f"teacher_concurrency must be >= 1, got {cfg.teacher_concurrency}")
    need(cfg.teacher_timeout_s > 0, f"teacher_timeout_s must be > 0, got {cfg.teacher_timeout_s}")
    need(cfg.teacher_retries >= 0, f"teacher_retries must be >= 0, got {cfg.teacher_retries}")
    _check_teachers(cfg, need)
    if is_served(cfg.teacher):  # what a teacher that returns only its top-K log-probs cannot do (docs/served-teacher.md)
        need(cfg.loss_chunk == 0, "loss_chunk needs the teacher's hidden states, which a served teacher does not return: "
                                  "set loss_chunk=0 (a served teacher sends only its top-K log-probs, so the loss is small)")
        need(cfg.cross_tokenizer != "on", "a served teacher must share the student's tokenizer: cross_tokenizer=on is not "
                                          "supported with teacher=http://...")
        need(cfg.rollout_tokens != "auto", "rollout_tokens=auto runs the diagnostics, which need the teacher's weights: give "
                                           "rollout_tokens a number (or adaptive) with a served teacher")
    need(cfg.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {cfg.min_new_tokens}")
    need(cfg.loss_chunk >= 0, f"loss_chunk must be >= 0 (0 = the whole response at once), got {cfg.loss_chunk}")
    need(cfg.max_skipped_steps >= 1, f"max_skipped_steps must be >= 1, got {cfg.max_skipped_steps}")
    need(not (cfg.dtype == "float16" and cfg.lora_r == 0),
         "dtype=float16 with full fine-tuning (lora_r=0) is not supported (it would need loss scaling): use "
         "dtype=bfloat16 (trained with fp32 master weights) or float32")
    need(cfg.steps > 0, f"steps must be > 0, got {cfg.steps}")
    need(cfg.num_prompts is None or cfg.num_prompts > 0, f"num_prompts must be > 0 or null (all rows), got {cfg.num_prompts}")
    need(cfg.eval_prompts >= 0, f"eval_prompts must be >= 0, got {cfg.eval_prompts}")
    need(cfg.teacher_fewshot >= 0, f"teacher_fewshot must be >= 0, got {cfg.teacher_fewshot}")
    need("{prompt}" in cfg.prompt_template, "prompt_template must contain {prompt}")
    need(cfg.max_prompt_tokens is None or cfg.max_prompt_tokens > 0, f"max_prompt_tokens must be > 0 or null, got {cfg.max_prompt_tokens}")
    need(cfg.eval_every >= 0, f"eval_every must be >= 0 (0 = never), got {cfg.eval_every}")
    need(cfg.eval_batch_size > 0, f"eval_batch_size must be > 0, got {cfg.eval_batch_size}")
    need(cfg.grader in GRADERS or ":" in cfg.grader, f"grader must be one of {', '.join(GRADERS)} or module:function, got '{cfg.grader}'")
    need(cfg.eval_samples >= 1, f"eval_samples must be >= 1, got {cfg.eval_samples}")
    need(cfg.eval_temperature >= 0, f"eval_temperature must be >= 0 (0 = greedy), got {cfg.eval_temperature}")
    need(cfg.eval_samples == 1 or cfg.eval_temperature > 0, "eval_samples > 1 needs eval_temperature > 0 (greedy samples are all the same)")
    need(0 < cfg.eval_top_p <= 1, f"eval_top_p must be in (0, 1], got {cfg.eval_top_p}")
    need(cfg.answer_extract in ANSWER_EXTRACTS, f"answer_extract must be one of {', '.join(ANSWER_EXTRACTS)}, got '{cfg.answer_extract}'")
    need(cfg.save_every >= 0, f"save_every must be >= 0 (0 = only on interruption), got {cfg.save_every}")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got '{cfg.device}' (pick GPUs with CUDA_VISIBLE_DEVICES)")
    need(cfg.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got '{cfg.dtype}'")
    need(cfg.final_dtype in DTYPES, f"final_dtype must be one of {', '.join(DTYPES)}, got '{cfg.final_dtype}'")
    return cfg


TEACHER_KEYS = ("model", "system_prompt", "fewshot", "fewshot_template", "suffix", "tokenizer", "model_name")  # what each of `teachers` may set


def _check_teachers(cfg: Config, need) -> None:
    """The several-teachers keys (docs/teachers.md)."""
    if not cfg.teachers:
        need(cfg.teacher_field is None and cfg.default_teacher is None and not cfg.teacher_offload,
             "teacher_field, default_teacher and teacher_offload are for several teachers: give them with teachers")
        return
    for name, spec in cfg.teachers.items():
        need(isinstance(name, str) and name.strip() and not set(name) & set("/: "),
             f"teachers: a name must be a word without '/', ':' or spaces (it ends metric names), got {name!r}")
        spec = {"model": spec} if isinstance(spec, str) else spec
        need(isinstance(spec, dict) and set(spec) <= set(TEACHER_KEYS) and isinstance(spec.get("model"), str)
             and spec["model"].strip(), f"teachers: {name} must be a model (a local directory, hub id or packaged:NAME) "
             f"or a mapping of {', '.join(TEACHER_KEYS)} with a model, got {spec!r}")
        if is_served(spec["model"]):  # as with teacher=http://... (docs/served-teacher.md)
            need(cfg.loss_chunk == 0, f"loss_chunk needs the teacher's hidden states, which a served teacher ({name}) does "
                                      "not return: set loss_chunk=0")
            need(cfg.cross_tokenizer != "on", f"a served teacher ({name}) must share the student's tokenizer: "
                                              "cross_tokenizer=on is not supported with it")
        need(isinstance(spec.get("fewshot", 0), int) and spec.get("fewshot", 0) >= 0, f"teachers: {name}'s fewshot must be an int >= 0")
        need(all(isinstance(spec.get(k, ""), str if k in ("suffix", "fewshot_template") else (str, type(None)))
                 for k in ("system_prompt", "suffix", "fewshot_template", "tokenizer", "model_name")),
             f"teachers: {name}'s system_prompt, suffix, fewshot_template, tokenizer and model_name must be text")
    need(cfg.default_teacher is None or cfg.default_teacher in cfg.teachers,
         f"default_teacher={cfg.default_teacher} is not one of teachers: {', '.join(cfg.teachers)}")
    need(cfg.rollout_tokens != "auto", "rollout_tokens=auto runs the diagnostics against one teacher: give rollout_tokens a "
                                       "number with several teachers")
    need(not (cfg.teacher_offload and cfg.loss_chunk), "teacher_offload with loss_chunk: the chunked loss needs each "
                                                        "teacher's LM head on the device after it scores; set loss_chunk=0")


def _default_teacher_model(values: dict[str, Any]) -> dict[str, Any]:
    """With `teachers`, `teacher` is the default teacher's model (what evaluation and diagnostics read); a
    different `teacher` is an error."""
    teachers, default = values.get("teachers") or {}, values.get("default_teacher")
    if not isinstance(teachers, dict) or not teachers or (default is not None and default not in teachers):
        return values  # validate says what is wrong
    spec = teachers[default if default is not None else next(iter(teachers))]
    model = spec if isinstance(spec, str) else spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, str):
        return values
    if values.get("teacher", model) != model:
        raise ConfigError(f"teacher={values['teacher']} and teachers: give one; with teachers, teacher is the default "
                          f"teacher's model ({model})")
    return {**values, "teacher": model}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=1e-4', 'rollout_tokens=null'] -> {'lr': '1e-4', 'rollout_tokens': 'null'} (coerced later)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        _check_key(key)
        out[key] = value
    return out


def make_config(values: dict[str, Any]) -> Config:
    """A validated Config from a mapping of field names to raw values."""
    for key in values:
        _check_key(key)
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    return validate(Config(**_default_teacher_model(coerced)))


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Config from an optional YAML file plus `key=value` overrides (overrides win)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        loaded = parse_yaml(text, f"config file {path}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, not {type(loaded).__name__}")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    elif overrides:
        values.update(parse_overrides(overrides))
    return make_config(values)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def field_comments() -> dict[str, str]:
    """The one-line comment of every field, read from this file's source (the single place they live)."""
    import inspect

    comments: dict[str, str] = {}
    for line in inspect.getsource(Config).splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith("#"):
            name = stripped.split(":", 1)[0].strip()
            if name in FIELDS:
                comments[name] = stripped.split("#", 1)[1].strip()
    return comments


def describe_fields() -> str:
    """One line per field: name, default, and its comment (for --help-config)."""
    comments, defaults = field_comments(), to_dict(Config())
    return "\n".join(f"{name} = {defaults[name]!r}\n    {comments.get(name, '')}" for name in FIELDS)
