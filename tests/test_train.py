import json
import os
import signal

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import tiny_overrides
from esrdistill import cli, tracking
from esrdistill.config import make_config
from esrdistill.train import TrainingInterrupted, train

STEP_KEYS = {
    "step", "loss", "kl/reverse", "rollout/len_mean", "rollout/eos_frac", "rollout/tokens", "time/rollout_s",
    "time/teacher_s", "time/train_s", "time/step_s", "mem/peak_mb", "optim/lr", "optim/grad_norm",
}


def _args(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]


def test_cli_train_writes_metrics_checkpoints_and_final(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=3, save_every=1, keep_checkpoints=2, eval_every=3)
    assert cli.main(["train", *_args(values)]) == 0

    metrics = tracking.read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert STEP_KEYS <= set(m), STEP_KEYS - set(m)
        assert 0 < m["rollout/len_mean"] <= 8  # ESR: never more than K=8 tokens
        assert m["rollout/tokens"] <= 4 * 8
        assert m["loss"] >= 0 and m["kl/reverse"] >= 0
    assert metrics[0]["optim/lr"] == pytest.approx(1e-2)  # warmup of int(0.1 * 3) = 0 steps
    assert {"eval/accuracy", "eval/n", "eval/accuracy_ci_low", "eval/pass@1", "eval/maj@1", "eval/cut_frac", "eval/repeated_answer_frac", "eval/ngram_rep"} <= set(metrics[-1])
    assert metrics[-1]["eval/n"] == 4 and metrics[-1]["eval/best_step"] == 3
    assert (run / "eval" / "step_0000003.json").is_file() and (run / "eval" / "step_0000003.md").is_file()
    assert "eval/accuracy" not in metrics[0]

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["rollout_tokens"] == 8 and saved["student"] == student
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    assert (run / "checkpoints" / "step_0000003" / "adapter" / "adapter_model.safetensors").is_file()
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert not any("lora" in n for n, _ in final.named_parameters())  # merged
    assert json.loads((run / "summary.json").read_text())["best_eval_step"] == 3


def test_training_lowers_kl_on_tiny_models(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    values = tiny_overrides(student, teacher, tmp_path / "run", steps=15, lora_r=0, lr=1e-2, batch_size=8, micro_batch_size=8,
                            num_prompts=8, temperature=1.0)
    train(make_config(values))
    kl = [m["kl/reverse"] for m in tracking.read_metrics(tmp_path / "run")]
    assert sum(kl[-3:]) / 3 < 0.7 * sum(kl[:3]) / 3, kl


def test_existing_run_dir_needs_resume(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    values = tiny_overrides(student, teacher, tmp_path / "run", steps=1)
    train(make_config(values))
    assert cli.main(["train", *_args(values)]) == 1


def _final_state(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


@pytest.mark.parametrize("lora_r", [4, 0])
def test_interrupted_then_resumed_equals_uninterrupted(tiny_dirs, tmp_path, monkeypatch, lora_r):
    student, teacher = tiny_dirs
    common = dict(steps=5, lora_r=lora_r, lr=5e-3, temperature=1.0, warmup_ratio=0.2, lora_dropout=0.1 if lora_r else 0.0,
                  eval_every=2)
    straight = tmp_path / "straight"
    train(make_config(tiny_overrides(student, teacher, straight, **common)))

    resumed = tmp_path / "resumed"
    values = tiny_overrides(student, teacher, resumed, **common)
    original_log = tracking.MetricsLogger.log

    def interrupt_at_step_2(self, step, metrics):
        original_log(self, step, metrics)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does

    monkeypatch.setattr(tracking.MetricsLogger, "log", interrupt_at_step_2)
    with pytest.raises(TrainingInterrupted) as stop:
        train(make_config(values))
    assert stop.value.step == 2 and stop.value.checkpoint.name == "step_0000002"
    assert not (resumed / "final").exists()
    monkeypatch.setattr(tracking.MetricsLogger, "log", original_log)
    train(make_config({**values, "resume": True}))

    a, b = _final_state(straight), _final_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [m["step"] for m in tracking.read_metrics(resumed)]
    assert steps == [1, 2, 3, 4, 5]
    losses_a = [m["loss"] for m in tracking.read_metrics(straight)]
    losses_b = [m["loss"] for m in tracking.read_metrics(resumed)]
    assert losses_a == losses_b
    assert json.loads((straight / "summary.json").read_text()) == json.loads((resumed / "summary.json").read_text())


def test_micro_batch_size_does_not_change_training(tiny_dirs, tmp_path):
    """Same rollouts, same loss, same update whatever the micro-batch size (trajectory and token norms)."""
    student, teacher = tiny_dirs
    for norm in ("trajectory", "token"):
        states, losses = [], []
        for micro in (1, 3, 4):
            run = tmp_path / f"{norm}-{micro}"
            train(make_config(tiny_overrides(student, teacher, run, steps=2, micro_batch_size=micro, lora_r=0, lr=1e-2,
                                             loss_norm=norm, temperature=1.0)))
            states.append(_final_state(run))
            losses.append([m["loss"] for m in tracking.read_metrics(run)])
        for other, other_losses in zip(states[1:], losses[1:]):
            assert other_losses == pytest.approx(losses[0], rel=1e-5)
            for name in states[0]:
                assert torch.allclose(other[name], states[0][name], atol=1e-5), name
