"""A teacher served by a real vLLM OpenAI-compatible server (vllm-cpu here) on 127.0.0.1, started once for
the module with the CPU form of `vllm serve` and stopped at the end.

Skipped when vLLM is not installed (`bash scripts/install_vllm_cpu.sh`), unless CI. The teacher has a head
size of 32, the smallest vLLM's CPU attention supports; --max-logprobs is the whole vocabulary (102), so
that a served teacher at teacher_top_k=102 can be compared with the same model loaded locally.
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from esrdistill import tracking
from helpers import make_model, make_tokenizer, save_model, save_pair, tiny_overrides

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not os.environ.get("CI"),
                                reason="vLLM not installed (bash scripts/install_vllm_cpu.sh)")
pytestmark = [needs_vllm, pytest.mark.slow]  # slow: a vLLM server takes 20-60 s to start on 2 cores
VOCAB = len(make_tokenizer())  # 102
START_TIMEOUT_S = 300


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free port, in its own process group."""

    def __init__(self, model: str, max_logprobs: int, log_path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model, self.max_logprobs, self.log_path, self.process = model, max_logprobs, log_path, None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "VLLMServer":
        import httpx

        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--dtype", "float32",
                   "--max-logprobs", str(self.max_logprobs), "--max-model-len", "512", "--enforce-eager",
                   "--kv-cache-memory-bytes", str(2**28), "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode}: see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer within {START_TIMEOUT_S} s: see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(student dir, teacher dir, the running server)."""
    root = tmp_path_factory.mktemp("served")
    tok = make_tokenizer()
    teacher = save_model(root / "teacher", make_model(len(tok), 2, hidden=64, heads=2, kv_heads=2), tok)
    server = VLLMServer(teacher, max_logprobs=VOCAB, log_path=root / "server.log").start()
    yield save_pair(root / "student", 1), teacher, server
    server.stop()


def test_served_log_probs_equal_the_local_teachers(served):
    """The server's top-K ids are the local fp32 model's, and its log-probs equal the local ones within 1e-4
    (measured: at most 5e-5 over 240 positions; 239 of them have the same top-64 order)."""
    from transformers import AutoModelForCausalLM

    from esrdistill.teachers.served import Client, ServedSettings, check_server

    _, teacher_dir, server = served
    settings = ServedSettings(url=server.url, top_k=16)
    client = Client(settings, check_server(settings), VOCAB)
    local = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32).eval()
    for prompt, response in (([3, 40, 41, 42], [70, 71, 72, 73, 4]), ([3, 50, 51], [60, 61, 62, 63, 64, 65, 66])):
        row = client.submit(prompt + response, len(prompt)).result()
        with torch.no_grad():
            logp = torch.log_softmax(local(torch.tensor([prompt + response])).logits[0].float(), -1)[len(prompt) - 1 : -1]
        top = logp.topk(16, dim=-1)
        assert row.ids.shape == (len(response), 16)
        assert (row.logp - top.values).abs().max() < 1e-4
        assert (row.logp - logp.gather(-1, row.ids)).abs().max() < 1e-4  # each id's own log-prob, whatever the order of ties
        assert (row.token_logp - logp.gather(-1, torch.tensor(response)[:, None])[:, 0]).abs().max() < 1e-4


def test_a_server_with_too_few_logprobs_is_a_clear_error(served):
    from esrdistill.teachers.served import ServedSettings, ServedTeacherError, check_server

    with pytest.raises(ServedTeacherError, match=rf"cannot return teacher_top_k={VOCAB + 1}.*--max-logprobs {VOCAB + 1}"):
        check_server(ServedSettings(url=served[2].url, top_k=VOCAB + 1))


def test_training_with_the_served_teacher_at_k_equal_v_matches_the_local_teacher(served, tmp_path):
    """At teacher_top_k = the vocabulary the tail loss is the full loss: the first step's loss equals the local
    teacher's within 1e-4; and the teacher/ metrics are logged."""
    from esrdistill.config import make_config
    from esrdistill.train import train

    student, teacher_dir, server = served
    common = dict(steps=2, temperature=1.0)
    local = tracking.read_metrics(train(make_config(tiny_overrides(student, teacher_dir, tmp_path / "local", **common))))
    remote = tracking.read_metrics(train(make_config(tiny_overrides(student, server.url, tmp_path / "served",
                                                                    teacher_top_k=VOCAB, **common))))
    assert abs(local[0]["loss"] - remote[0]["loss"]) < 1e-4
    assert local[0]["rollout/tokens"] == remote[0]["rollout/tokens"]
    for m in remote:
        assert m["teacher/topk_mass"] > 0.999 and m["teacher/request_s"] > 0 and m["teacher/retries"] == 0


def test_a_server_killed_mid_step_keeps_every_finished_step_and_resume_continues_exactly(served, tmp_path, monkeypatch):
    """save_every=0, and the server killed in step 3, after its rollouts and before its requests: the retries fail,
    the run checkpoints the two finished steps and stops with ServedTeacherDown; with the server back, resume=true
    ends with the metrics of an uninterrupted run."""
    from esrdistill import checkpoint
    from esrdistill.config import make_config
    from esrdistill.teachers import served as served_teacher
    from esrdistill.teachers.served import ServedTeacherDown
    from esrdistill.train import train

    student, _, server = served
    values = dict(steps=4, save_every=0, temperature=1.0, teacher_top_k=8, teacher_retries=1, teacher_timeout_s=5)
    straight = tracking.read_metrics(train(make_config(tiny_overrides(student, server.url, tmp_path / "straight", **values))))

    cut = tiny_overrides(student, server.url, tmp_path / "cut", **values)
    real_plan, plans = served_teacher.ServedTeacher.plan, []

    def kill_in_step_3(self, *args, **kwargs):
        plans.append(1)
        if len(plans) == 3:
            server.stop()
        return real_plan(self, *args, **kwargs)

    monkeypatch.setattr(served_teacher.ServedTeacher, "plan", kill_in_step_3)
    with pytest.raises(ServedTeacherDown, match="gave no answer in 2 tries.*resume=true"):
        train(make_config(cut))
    monkeypatch.setattr(served_teacher.ServedTeacher, "plan", real_plan)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_0000002"]
    assert [m["step"] for m in tracking.read_metrics(tmp_path / "cut")] == [1, 2]
    server.start()
    resumed = tracking.read_metrics(train(make_config({**cut, "resume": True})))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["rollout/tokens"] == b["rollout/tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["teacher/topk_mass"] - b["teacher/topk_mass"]) < 1e-5


def test_a_server_serving_another_tokenizer_than_teacher_tokenizer_is_refused_at_start(served, byte_level):
    """The server's /tokenize reads the probe text as the served model's ids: a local tokenizer with other ids is
    refused with both lists, the served model's own is accepted."""
    from esrdistill.teachers.served import PROBE_TEXT, ServedSettings, ServedTeacherError, check_server

    settings = ServedSettings(url=served[2].url, top_k=4)
    with pytest.raises(ServedTeacherError, match="tokenizes a test text into other ids than teacher_tokenizer") as caught:
        check_server(settings, tokenizer=byte_level)
    for tokenizer in (byte_level, make_tokenizer()):
        assert str(tokenizer.encode(PROBE_TEXT, add_special_tokens=False)) in str(caught.value)
    assert check_server(settings, tokenizer=make_tokenizer()).max_model_len == 512


def test_a_prompt_that_fills_the_servers_context_is_scored(served, tmp_path):
    """--max-model-len 512, rollout_tokens=8: the longest teacher prompt kept leaves room for the 8 response tokens
    and the one token the server generates (511 tokens scored), and the server scores it; vLLM refuses 512."""
    from esrdistill import build
    from esrdistill.config import make_config
    from esrdistill.data import Problem, Task
    from esrdistill.teachers.served import Client, ServedTeacherError

    student, _, server = served
    k = 8
    cfg = make_config(tiny_overrides(student, server.url, tmp_path / "run", rollout_tokens=k))
    pair = build.served_pair(cfg, torch.device("cpu"), trainable=True)
    problems = [Problem("x" * n, "1") for n in range(440, 500)]  # teacher prompts of about 477 to 536 tokens
    kept = build.prompt_set(cfg, pair, Task("t", [], [], []), problems, k, "rollout_tokens")
    longest = list(max(kept.teacher_ids, key=len))
    client = Client(build.served_settings(cfg), pair.served, pair.vocab_size)
    row = client.submit(longest + [40] * k, len(longest)).result()
    assert row.ids.shape == (k, cfg.teacher_top_k) and len(longest) + k == 511
    with pytest.raises(ServedTeacherError, match="HTTP 400"):  # the fact the limit stands on
        Client(build.served_settings(cfg), pair.served, pair.vocab_size).submit(longest + [40] * (k + 1), len(longest)).result()
