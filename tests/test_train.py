import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from esrdistill import cli, tracking
from esrdistill.config import make_config
from esrdistill.train import train
from helpers import make_tokenizer, tiny_overrides, train_interrupted_then_resumed

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
    stop = train_interrupted_then_resumed(values, 2, monkeypatch)
    assert stop.step == 2 and stop.checkpoint.name == "step_0000002"

    a, b = _final_state(straight), _final_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [m["step"] for m in tracking.read_metrics(resumed)]
    assert steps == [1, 2, 3, 4, 5]
    losses_a = [m["loss"] for m in tracking.read_metrics(straight)]
    losses_b = [m["loss"] for m in tracking.read_metrics(resumed)]
    assert losses_a == losses_b
    summaries = [json.loads((run / "summary.json").read_text()) for run in (straight, resumed)]
    assert [{k: v for k, v in s.items() if k != "best_checkpoint"} for s in summaries][0] == \
        {k: v for k, v in summaries[1].items() if k != "best_checkpoint"}


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


# ---- non-finite steps -------------------------------------------------------------------------------

def _nan_at(monkeypatch, bad_steps: set[int]):
    """Make the loss NaN on the given (1-based) steps, by poisoning per_token_loss on those steps."""
    from esrdistill import losses
    from esrdistill.engines import hf as engine_hf

    real = losses.per_token_loss
    state = {"step": 0}
    real_sample = engine_hf.HFEngine.sample

    def sample(*args, **kwargs):
        state["step"] += 1
        return real_sample(*args, **kwargs)

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return out * float("nan") if state["step"] in bad_steps else out

    monkeypatch.setattr(engine_hf.HFEngine, "sample", sample)
    monkeypatch.setattr(losses, "per_token_loss", poisoned)


def test_a_nan_step_is_skipped_and_never_reaches_the_weights(tiny_dirs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    student, teacher = tiny_dirs
    run = tmp_path / "run"
    _nan_at(monkeypatch, {2})
    train(make_config(tiny_overrides(student, teacher, run, steps=4, save_every=1, keep_checkpoints=4, lora_r=0, lr=1e-2)))
    metrics = tracking.read_metrics(run)
    assert [m["optim/skipped"] for m in metrics] == [0, 1, 0, 0]
    assert metrics[1]["loss"] == "nan"
    lrs = [m["optim/lr"] for m in metrics]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 4  # the schedule goes on through a skipped step
    weights = [load_file(str(run / "checkpoints" / f"step_{s:07d}" / "model.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # step 3 trained
    final = _final_state(run)
    assert all(torch.isfinite(v).all() for v in final.values())


def test_consecutive_non_finite_steps_stop_with_a_clear_error_and_keep_the_good_checkpoint(tiny_dirs, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    student, teacher = tiny_dirs
    run = tmp_path / "run"
    _nan_at(monkeypatch, {2, 3, 4, 5})
    values = tiny_overrides(student, teacher, run, steps=6, save_every=1, keep_checkpoints=1, lora_r=0, max_skipped_steps=3)
    assert cli.main(["train", *_args(values)]) == 1
    err = capsys.readouterr().err
    assert "3 steps in a row had a non-finite loss or gradient (last: step 4)" in err and "Traceback" not in err
    assert [m["optim/skipped"] for m in tracking.read_metrics(run)] == [0, 1, 1, 1]
    saved = load_file(str(run / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (run / "final").exists()


# ---- resume keeps the run's record --------------------------------------------------------------------

def test_a_failed_resume_leaves_config_yaml_as_it_was(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=1)
    train(make_config(values))
    before = (run / "config.yaml").read_text()
    code = cli.main(["train", *_args({**values, "resume": True, "steps": 3, "teacher": str(tmp_path / "missing")})])
    assert code == 1
    assert (run / "config.yaml").read_text() == before


def test_resume_without_a_checkpoint_restarts_and_trims_the_metrics(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=2, save_every=0)
    train(make_config(values))
    messages = []
    train(make_config({**values, "steps": 3, "resume": True}), log=messages.append)
    assert [m["step"] for m in tracking.read_metrics(run)] == [1, 2, 3]
    assert any("Dropping the metrics of 2 steps after step 0" in m for m in messages)
    assert not list(run.glob(".metrics.jsonl*"))  # the rewrite went through a temporary file, now gone


# ---- the best evaluation keeps its checkpoint ------------------------------------------------------------

class _FakeEval:
    def __init__(self, accuracy):
        self.accuracy = accuracy

    def metrics(self, prefix):
        return {f"{prefix}/accuracy": self.accuracy}

    def save(self, path, title=""):
        return path, path


def test_the_best_checkpoint_survives_rotation(tiny_dirs, tmp_path, monkeypatch):
    from esrdistill import train as train_module

    scores = iter([0.5, 0.9, 0.2, 0.1])
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: _FakeEval(next(scores)))
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    train(make_config(tiny_overrides(student, teacher, run, steps=4, eval_every=1, save_every=1, keep_checkpoints=1)))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_eval_step"] == 2 and summary["best_checkpoint"].endswith("step_0000002")


def test_a_new_best_between_regular_saves_gets_its_own_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    from esrdistill import train as train_module

    scores = iter([0.1, 0.9, 0.2])
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: _FakeEval(next(scores)))
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    train(make_config(tiny_overrides(student, teacher, run, steps=3, eval_every=1, save_every=3, keep_checkpoints=1)))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]


# ---- the teacher is scored on its own view ---------------------------------------------------------------

def test_loss_is_scored_on_the_teachers_own_view(tiny_dirs, tmp_path, monkeypatch):
    """End to end: the logged loss of step 1 equals a slow reference that writes the teacher's input by
    hand (its system prompt, two worked examples as earlier turns, its suffix) and the student's."""
    import math

    from esrdistill.data import load_task

    student_dir, teacher_dir = tiny_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student_dir, teacher_dir, run, steps=1, lora_r=0, batch_size=4, micro_batch_size=2, temperature=1.0,
                            system_prompt="Answer.", teacher_system_prompt="Think.", teacher_fewshot=2,
                            fewshot_template="= {answer}", teacher_prompt_suffix="#", prompt_template="Q: {prompt}")
    from esrdistill.engines import hf as engine_hf

    captured = []
    real_sample = engine_hf.HFEngine.sample
    monkeypatch.setattr(engine_hf.HFEngine, "sample", lambda *a, **k: captured.append(real_sample(*a, **k)) or captured[-1])
    train(make_config(values))
    logged = tracking.read_metrics(run)[0]["loss"]

    cfg = make_config(values)
    task = load_task(cfg.dataset, num_prompts=cfg.num_prompts, eval_prompts=cfg.eval_prompts, fewshot=2, seed=cfg.seed,
                     options=cfg.dataset_options)
    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    shots = "".join(f"<|im_start|>user\nQ: {p.prompt}<|im_end|>\n<|im_start|>assistant\n= {p.answer}<|im_end|>\n" for p in task.fewshot)
    batch = captured[0]
    per_row = []
    for row, prompt_ids in enumerate(batch.prompts):
        student_text = tok.decode(prompt_ids)
        question = student_text.split("<|im_start|>user\nQ: ")[1].split("<|im_end|>")[0]
        teacher_text = (f"<|im_start|>system\nThink.<|im_end|>\n{shots}<|im_start|>user\nQ: {question}<|im_end|>\n"
                        f"<|im_start|>assistant\n#")
        assert student_text == f"<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\nQ: {question}<|im_end|>\n<|im_start|>assistant\n"
        n = int(batch.mask[row].sum())
        response = batch.responses[row, :n].tolist()
        teacher_ids = tok(teacher_text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            s_logits = student(torch.tensor([prompt_ids + response])).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + n]
            t_logits = teacher(torch.tensor([teacher_ids + response])).logits[0, len(teacher_ids) - 1 : len(teacher_ids) - 1 + n]
        kls = []
        for t in range(n):
            s_lp = torch.log_softmax(s_logits[t].double(), -1).tolist()
            t_lp = torch.log_softmax(t_logits[t].double(), -1).tolist()
            kls.append(sum(math.exp(a) * (a - b) for a, b in zip(s_lp, t_lp)))
        per_row.append(sum(kls) / n)
    reference = sum(per_row) / len(per_row)
    assert logged == pytest.approx(reference, rel=1e-5, abs=1e-6)


# ---- bf16 full fine-tuning keeps fp32 master weights ------------------------------------------------------

def test_bf16_full_finetuning_changes_the_weights_as_fp32_does(tiny_dirs, tmp_path):
    """At the paper's full fine-tuning lr (5e-6) a step is below bf16's spacing: with bf16 weights updated
    in place almost nothing changes. With fp32 master weights a bf16 step moves (nearly) every weight by
    about lr, as the fp32 step does."""
    from safetensors.torch import load_file

    student, teacher = tiny_dirs
    initial = AutoModelForCausalLM.from_pretrained(student).state_dict()
    deltas = {}
    for dtype in ("float32", "bfloat16"):
        run = tmp_path / dtype
        train(make_config(tiny_overrides(student, teacher, run, steps=1, lora_r=0, lr=5e-6, warmup_ratio=0.0, dtype=dtype,
                                         save_every=1, max_grad_norm=0.0, temperature=1e-3)))
        master = load_file(str(run / "checkpoints" / "step_0000001" / "model.safetensors"))
        assert all(v.dtype == torch.float32 for v in master.values())
        deltas[dtype] = torch.cat([(master[k] - initial[k].float()).flatten() for k in master if k in initial])
        final = AutoModelForCausalLM.from_pretrained(run / "final")
        assert final.dtype == getattr(torch, dtype)  # final/ is saved in the run's dtype
    fp32, bf16 = deltas["float32"], deltas["bfloat16"]
    changed = lambda d: (d.abs() > 1e-7).float().mean().item()  # noqa: E731
    assert changed(fp32) > 0.9 and changed(bf16) > 0.9
    # Adam's first step moves a weight by lr * sign(gradient); bf16 rounding in the forward flips the sign
    # of the weights whose gradient is close to 0 (77% agree on these tiny models), far from the 50% of chance.
    both = (fp32.abs() > 1e-7) & (bf16.abs() > 1e-7)
    assert (torch.sign(fp32[both]) == torch.sign(bf16[both])).float().mean().item() > 0.7
    assert bf16.abs().max().item() == pytest.approx(5e-6, rel=0.05)  # Adam's first step: lr per weight


def test_min_new_tokens_forces_every_rollout_to_its_full_length(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    run = tmp_path / "run"
    train(make_config(tiny_overrides(student, teacher, run, steps=2, rollout_tokens=8, min_new_tokens=8)))
    for m in tracking.read_metrics(run):
        assert m["rollout/len_mean"] == 8 and m["rollout/eos_frac"] == 0 and m["rollout/tokens"] == 4 * 8


# ---- K schedules, token selection, rollout_tokens=auto ----------------------------------------------------

def test_progressive_k_follows_its_formula_and_survives_a_resume(tiny_dirs, tmp_path, monkeypatch):
    from esrdistill.order import rollout_k

    student, teacher = tiny_dirs
    common = dict(steps=5, rollout_tokens=9, rollout_tokens_schedule="progressive", rollout_tokens_start=1, schedule_steps=4,
                  min_new_tokens=9)
    expected = [rollout_k(s, 9, "progressive", 1, 4) for s in range(5)]
    assert expected == [1, 3, 5, 7, 9]
    straight = tmp_path / "straight"
    train(make_config(tiny_overrides(student, teacher, straight, **common)))
    metrics = tracking.read_metrics(straight)
    assert [m["rollout/k"] for m in metrics] == expected
    assert [m["rollout/len_mean"] for m in metrics] == expected  # generation really stops at the step's K

    resumed = tmp_path / "resumed"
    train_interrupted_then_resumed(tiny_overrides(student, teacher, resumed, **common), 2, monkeypatch)
    assert [m["rollout/k"] for m in tracking.read_metrics(resumed)] == expected
    assert [m["loss"] for m in tracking.read_metrics(resumed)] == [m["loss"] for m in metrics]


def test_selecting_every_token_equals_no_selection_and_top_kl_selects_high_kl(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    common = dict(steps=2, rollout_tokens=None, max_new_tokens=10, lora_r=0, lr=1e-2)
    runs = {}
    for name, extra in {"none": {}, "all": {"token_select": "prefix_mask", "select_tokens": 10},
                        "top": {"token_select": "top_reverse_kl", "select_tokens": 3}}.items():
        train(make_config(tiny_overrides(student, teacher, tmp_path / name, **common, **extra)))
        runs[name] = tracking.read_metrics(tmp_path / name)
    assert [m["loss"] for m in runs["all"]] == pytest.approx([m["loss"] for m in runs["none"]], rel=1e-6)
    assert all(m["select/frac_selected"] == 1.0 for m in runs["all"])
    for m in runs["top"]:
        assert m["select/reverse_kl_selected"] > m["select/reverse_kl_unselected"]
        assert 0 < m["select/frac_selected"] < 1 and m["select/mean_position"] >= 0
        assert m["select/frac_selected"] == pytest.approx(4 * 3 / m["rollout/tokens"])  # 3 of each 10-token rollout


def test_rollout_tokens_auto_trains_with_the_diagnostics_k(tiny_dirs, tmp_path):
    from esrdistill import build
    from esrdistill.measure import auto_k

    student, teacher = tiny_dirs
    values = tiny_overrides(student, teacher, tmp_path / "run", steps=1, rollout_tokens="auto", max_new_tokens=16,
                            auto_k_problems=4)
    messages = []
    train(make_config(values), log=messages.append)
    chosen = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["rollout_tokens"]
    assert isinstance(chosen, int) and 1 <= chosen <= 16
    assert tracking.read_metrics(tmp_path / "run")[0]["rollout/k"] == chosen
    assert any(m.startswith(f"rollout_tokens=auto: K = {chosen}: ") for m in messages)
    # the same measurement outside training gives the same K
    cfg = make_config(values)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    pair = build.pair(cfg, torch.device("cpu"), trainable=True)
    task = build.task(cfg)
    assert auto_k(cfg, pair, task, build.grader(cfg, task), say=lambda m: None)[0] == chosen


def test_token_selection_needs_full_rollouts():
    from esrdistill.config import ConfigError

    with pytest.raises(ConfigError, match="token_select=top_reverse_kl picks tokens of full rollouts: set rollout_tokens=null"):
        make_config({"token_select": "top_reverse_kl", "rollout_tokens": 50})


def test_shuffle_prompts_false_trains_on_the_files_prompts_in_order(tiny_dirs, tmp_path, monkeypatch):
    from esrdistill.engines import hf as engine_hf

    student, teacher = tiny_dirs
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(6)))
    seen = []
    original = engine_hf.HFEngine.sample

    def record(self, prompts, sampling, seeds=None):
        tok = make_tokenizer()
        seen.append([tok.decode(p).split("user\n")[-1].split("<|im_end|>")[0] for p in prompts])
        return original(self, prompts, sampling, seeds)

    monkeypatch.setattr(engine_hf.HFEngine, "sample", record)
    values = tiny_overrides(student, teacher, tmp_path / "run", dataset=str(data), num_prompts=None, eval_prompts=0,
                            grader="exact", shuffle_prompts=False, steps=3, batch_size=4, micro_batch_size=4)
    train(make_config(values))
    assert seen == [["q0", "q1", "q2", "q3"], ["q4", "q5", "q0", "q1"], ["q2", "q3", "q4", "q5"]]


def test_nan_student_logits_under_sampled_top_p_skip_the_step(tiny_dirs, tmp_path, monkeypatch):
    """loss=sampled with top_p < 1 finds a nucleus in the student's log-probs; NaN there (at counted and
    masked positions alike) skips the step as it does for the other losses, instead of an IndexError."""
    from esrdistill import objective
    from esrdistill.engines import hf as engine_hf

    student, teacher = tiny_dirs
    state, real_sample, real_log_probs = {"step": 0}, engine_hf.HFEngine.sample, objective.log_probs

    def sample(*args, **kwargs):
        state["step"] += 1
        return real_sample(*args, **kwargs)

    def log_probs(*args, **kwargs):  # the student's log-probs (the teacher's come from teacher.log_probs)
        out = real_log_probs(*args, **kwargs)
        return out * float("nan") if state["step"] == 2 else out

    monkeypatch.setattr(engine_hf.HFEngine, "sample", sample)
    monkeypatch.setattr(objective, "log_probs", log_probs)
    run = tmp_path / "run"
    train(make_config(tiny_overrides(student, teacher, run, steps=3, loss="sampled", top_p=0.9, lora_r=0)))
    assert [m["optim/skipped"] for m in tracking.read_metrics(run)] == [0, 1, 0]


def test_final_dtype_float32_keeps_the_master_weights_of_bf16_full_finetuning(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    student, teacher = tiny_dirs
    run = tmp_path / "run"
    train(make_config(tiny_overrides(student, teacher, run, steps=1, lora_r=0, lr=5e-6, dtype="bfloat16", save_every=1,
                                     final_dtype="float32")))
    master = load_file(str(run / "checkpoints" / "step_0000001" / "model.safetensors"))
    final = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    assert final.dtype == torch.float32
    state = final.state_dict()
    assert all(torch.equal(state[k], master[k]) for k in master)
