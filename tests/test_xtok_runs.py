"""Cross-tokenizer distillation end to end: training, clear errors, diagnose and quickstart cross on two
tiny tokenizers of different kinds (a byte-level BPE student and a SentencePiece-style teacher)."""

import json
import math

import pytest

from esrdistill import cli, tracking
from helpers import make_model, tiny_overrides

# ---- the whole loop on two tokenizers of different kinds -----------------------------------------------

@pytest.fixture(scope="module")
def cross_dirs(tmp_path_factory, byte_level, sentencepiece):
    """A byte-level chat student and a SentencePiece-style base teacher, as local model directories."""
    root = tmp_path_factory.mktemp("xtok")
    out = []
    for name, tok, seed in (("student", byte_level, 1), ("teacher", sentencepiece, 2)):
        model = make_model(len(tok), seed)
        model.config.eos_token_id = tok.eos_token_id
        model.config.bos_token_id = tok.bos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(str(root / name))
    return out


@pytest.mark.parametrize("xtok_loss", ["matched_kl", "hybrid"])
def test_train_two_steps_across_tokenizers_writes_the_xtok_metrics(cross_dirs, tmp_path, capsys, xtok_loss):
    student, teacher = cross_dirs
    run = tmp_path / "run"
    values = tiny_overrides(student, teacher, run, steps=2, teacher_fewshot=2, xtok_loss=xtok_loss)
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    assert cli.main(["train", *args]) == 0
    metrics = tracking.read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0 < m["xtok/aligned_frac"] <= 1
        assert 0 < m["xtok/student_mapped_mass"] <= 1 + 1e-6 and 0 < m["xtok/teacher_mapped_mass"] <= 1 + 1e-6
        assert 0 < m["xtok/vocab_mapped"] < 1
        assert math.isfinite(m["loss"]) and m["loss"] >= 0
    assert "tokenizers: cross-tokenizer distillation (they differ" in capsys.readouterr().out


def test_adaptive_k_and_soft_weights_train_across_tokenizers(cross_dirs, tmp_path):
    from esrdistill import horizon
    from esrdistill.config import make_config
    from esrdistill.train import train

    student, teacher = cross_dirs
    run = tmp_path / "run"
    train(make_config(tiny_overrides(student, teacher, run, steps=3, teacher_fewshot=2, rollout_tokens="adaptive",
                                     rollout_tokens_min=4, adaptive_patience=1, adaptive_kl_drop=0.99,
                                     token_weight="iw_opd_kl")))
    metrics = tracking.read_metrics(run)
    history = horizon.history(metrics, 3)
    rule = horizon.Adaptive(k_min=4, k_max=12, kl_drop=0.99, patience=1)
    assert [k for k, _ in history] == [horizon.adaptive_k(history[:s], rule) for s in range(3)]
    assert all(1 <= m["weight/max_mean"] <= 1.5 and math.isfinite(m["loss"]) for m in metrics)


def test_cross_tokenizer_off_keeps_the_clear_error_and_on_forces_the_path(cross_dirs, tiny_dirs, tmp_path, capsys):
    student, teacher = cross_dirs
    values = tiny_overrides(student, teacher, tmp_path / "off", steps=1, cross_tokenizer="off")
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    assert cli.main(["train", *args]) == 1
    assert "tokenizers differ" in capsys.readouterr().err
    same_student, same_teacher = tiny_dirs
    run = tmp_path / "on"
    values = tiny_overrides(same_student, same_teacher, run, steps=1, cross_tokenizer="on")
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
    assert cli.main(["train", *args]) == 0
    assert tracking.read_metrics(run)[0]["xtok/vocab_mapped"] == 1.0


def test_losses_that_make_no_sense_across_tokenizers_are_clear_errors(cross_dirs, tmp_path, capsys):
    student, teacher = cross_dirs
    for extra, message, code in (({"loss": "sampled"}, "loss=sampled needs the teacher's probability", 1),
                                 ({"token_weight": "iw_opd"}, "config error: token_weight=iw_opd reads each sampled "
                                                              "token's log-prob", 2),
                                 ({"xtok_loss": "uld", "loss": "forward_kl"}, "xtok_loss=uld compares sorted probabilities", 1)):
        values = tiny_overrides(student, teacher, tmp_path / extra.get("loss", "x"), steps=1, **extra)
        args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]
        assert cli.main(["train", *args]) == code
        assert message in capsys.readouterr().err


def test_diagnose_across_tokenizers_reports_the_alignment(cross_dirs, tmp_path):
    from esrdistill.commands.diagnose import DiagnoseOptions, diagnose
    from esrdistill.config import make_config

    student, teacher = cross_dirs
    cfg = make_config(tiny_overrides(student, teacher, tmp_path / "unused", eval_prompts=4, max_new_tokens=10,
                                     answer_extract="last_number"))
    out = tmp_path / "diag"
    result = diagnose(cfg, DiagnoseOptions(out=str(out), student_after=student, problems=4, prefixes=(0, 2, 4), bucket=2))
    a = result["alignment"]
    assert 0 < a["aligned_frac"] <= 1 and 0 < a["vocab_mapped"] < 1 and a["rule"] == "start"
    assert len(a["aligned_by_bucket"]) == 5 and all(0 <= x <= 1 for x in a["aligned_by_bucket"])
    assert all(isinstance(t, str) and c > 0 for t, c in a["top_unaligned"] + a["top_unmapped"])
    assert len(result["decay"]["teacher_continues_student"]) == 3
    report = (out / "report.md").read_text()
    assert "## Alignment of the two tokenizers" in report and "shared token units" in report
    assert (out / "alignment.png").read_bytes()[:4] == b"\x89PNG"


def test_quickstart_cross_reports_the_accuracies_and_the_alignment(cross_dirs, tmp_path, monkeypatch, capsys):
    """The flow of `esrdistill quickstart cross` (before/after accuracies, the alignment statistics) on the
    tiny cross-tokenizer pair instead of the packaged one."""
    import yaml

    from esrdistill.commands import quickstart

    student, teacher = cross_dirs
    config = tmp_path / "cross.yaml"
    values = tiny_overrides(student, teacher, tmp_path / "unused", steps=2, eval_prompts=3, teacher_fewshot=1, save_every=0)
    values.pop("run_dir")
    config.write_text(yaml.safe_dump(values))
    monkeypatch.setitem(quickstart.VARIANTS, "cross", config)
    run = tmp_path / "qs"
    assert cli.main(["quickstart", "cross", f"run_dir={run}", "rollout_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert "| student after ESR, K=4 |" in out and "| xtok/aligned_frac |" in out
    report = json.loads((run / "quickstart.json").read_text())
    assert {"teacher_before", "student_before", "student_after"} <= set(report)
    assert set(report["alignment"]) == {"xtok/aligned_frac", "xtok/student_mapped_mass", "xtok/teacher_mapped_mass", "xtok/vocab_mapped"}
    assert [m["rollout/len_mean"] <= 4 for m in tracking.read_metrics(run)] == [True, True]
    assert (run / "final" / "config.json").is_file()
    assert cli.main(["quickstart", "crosss"]) == 2
    assert "unknown quickstart 'crosss'" in capsys.readouterr().err


def test_a_dummy_prefix_teacher_aligns_in_training_as_the_same_tokenizer_without_it(tmp_path, byte_level):
    """The same teacher weights behind a SentencePiece tokenizer without and with a Llama-2 style dummy
    prefix: the first step's rollouts are the same, and so (give or take the first position of a row)
    is the share of their positions aligned. Read as ' ' + text, only position 0 of each row aligned
    (1/12; 0.25 without the prefix on these random rollouts, which soon emit a special token)."""
    from xtok_tokenizers import sentencepiece_tokenizer

    from esrdistill.config import make_config
    from esrdistill.train import train

    dirs = {}
    for name, tok, seed in (("student", byte_level, 1), ("plain", sentencepiece_tokenizer(480), 2),
                            ("legacy", sentencepiece_tokenizer(480, dummy_prefix="legacy"), 2)):
        model = make_model(len(tok), seed)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            setattr(model.config, key, getattr(tok, key))
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    aligned = {}
    for teacher in ("plain", "legacy"):
        values = tiny_overrides(dirs["student"], dirs[teacher], tmp_path / f"run-{teacher}", steps=1, batch_size=8,
                                micro_batch_size=8, rollout_tokens=12, temperature=1.0)
        train(make_config(values))
        aligned[teacher] = tracking.read_metrics(tmp_path / f"run-{teacher}")[0]["xtok/aligned_frac"]
    assert aligned["plain"] > 2 / 12
    assert aligned["plain"] - 1 / 12 < aligned["legacy"] <= aligned["plain"]
