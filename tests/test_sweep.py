import json

import pytest

from esrdistill import cli
from esrdistill.commands import sweep
from esrdistill.config import ConfigError
from helpers import tiny_overrides

pytestmark = pytest.mark.slow  # sweeps of training runs


def test_grid_parsing_and_errors(tmp_path):
    assert sweep.parse_grid(["rollout_tokens=8,16", "token_select=prefix"]) == {"rollout_tokens": ["8", "16"], "token_select": ["prefix"]}
    with pytest.raises(ConfigError, match="did you mean 'rollout_tokens'"):
        sweep.parse_grid(["rollout_token=8"])
    with pytest.raises(ConfigError, match="at least one --grid"):
        sweep.parse_grid([])
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("lr: [0.001, 0.01]\nrollout_tokens: [8, null]\n")
    assert sweep.parse_grid([], str(grid_file)) == {"lr": ["0.001", "0.01"], "rollout_tokens": ["8", "null"]}


def _fake_run(run_dir, accuracies, correct, total, step_s=2.0, tokens=100):
    run_dir.mkdir(parents=True)
    lines = [{"step": i + 1, "time/step_s": step_s, "rollout/tokens": tokens, "loss/tokens": tokens,
              **({"eval/accuracy": a} if a is not None else {})} for i, a in enumerate(accuracies)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "eval").mkdir()
    problems = [{"correct": [i < correct]} for i in range(total)]
    (run_dir / "eval" / "step_0000002.json").write_text(json.dumps({"problems": problems}))
    (run_dir / "summary.json").write_text("{}")


def test_aggregate_computes_known_numbers(tmp_path):
    runs = []
    for seed, (accs, correct) in enumerate([([0.2, 0.5], 5), ([0.6, 0.4], 4), ([0.3, 0.6], 6)]):
        run = sweep.Run(combo={"rollout_tokens": "8"}, seed=seed, run_dir=tmp_path / f"seed{seed}", values={"data_seed": 7})
        _fake_run(run.run_dir, accs, correct, 10, step_s=1.0 + seed)
        runs.append(run)
    row = sweep.aggregate(runs)[0]
    assert row["final_accuracy"]["mean"] == pytest.approx(0.5) and row["final_accuracy"]["std"] == pytest.approx(0.1)
    assert (row["final_accuracy"]["min"], row["final_accuracy"]["max"]) == (0.4, 0.6)
    assert row["best_accuracy"]["mean"] == pytest.approx((0.5 + 0.6 + 0.6) / 3)
    assert (row["pooled_correct"], row["pooled_problems"]) == (15, 30)
    from esrdistill.evalstats import wilson_interval

    assert row["pooled_ci"] == pytest.approx(list(wilson_interval(15, 30)))
    assert row["step_s"] == pytest.approx(2.0) and row["tokens_trained"] == pytest.approx(200) and row["data_seed"] == 7
    assert "| 8 | 0,1,2 | 50.0% ± 10.0% | 40.0%-60.0% |" in sweep.markdown([row], 7)


def test_sweep_runs_every_combination_skips_complete_runs_and_resumes_partial_ones(tiny_dirs, tmp_path, capsys):
    student, teacher = tiny_dirs
    base = tiny_overrides(student, teacher, tmp_path / "unused", steps=2, eval_every=2, eval_prompts=3)
    base.pop("run_dir")
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in base.items()]
    out = tmp_path / "sweep"
    assert cli.main(["sweep", *args, "--grid", "rollout_tokens=4,8", "--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 0 already complete, 4 to run" in printed
    result = json.loads((out / "sweep.json").read_text())
    assert [r["combo"] for r in result["rows"]] == [{"rollout_tokens": "4"}, {"rollout_tokens": "8"}]
    assert all(r["final_accuracy"]["n"] == 2 and r["pooled_problems"] == 6 for r in result["rows"])
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG" and "pooled 95% CI" in (out / "sweep.md").read_text()
    # seeds share the problems (data_seed): every run evaluated the same prompts
    prompts = {tuple(p["prompt"] for p in json.loads(f.read_text())["problems"]) for f in out.glob("*/seed*/eval/step_*.json")}
    assert len(prompts) == 1
    # again: nothing to run; then a partial run (interrupted: no summary) is resumed
    assert cli.main(["sweep", *args, "--grid", "rollout_tokens=4,8", "--seeds", "2", "--out", str(out)]) == 0
    assert "4 runs, 4 already complete, 0 to run" in capsys.readouterr().out
    partial = out / "rollout_tokens-8" / "seed1"
    (partial / "summary.json").unlink()
    assert cli.main(["sweep", *args, "--grid", "rollout_tokens=4,8", "--seeds", "2", "--out", str(out)]) == 0
    assert "rollout_tokens=8 seed=1 (resuming)" in capsys.readouterr().out
    assert (partial / "summary.json").is_file()


def test_sweep_refuses_seed_in_the_grid_and_a_missing_config(tmp_path, capsys):
    assert cli.main(["sweep", "--grid", "seed=1,2", "--out", str(tmp_path)]) == 2
    assert "set by the sweep itself" in capsys.readouterr().err
    assert cli.main(["sweep", str(tmp_path / "none.yaml"), "--grid", "lr=1,2"]) == 2
    assert cli.main(["sweep", "--grid", "lr=1", "--seeds", "x"]) == 2


def test_a_dataset_option_seed_is_the_data_seed():
    from esrdistill.data import load_task

    a = load_task("reasoning_gym:chain_sum", num_prompts=5, eval_prompts=2, seed=0, options={"seed": 9})
    b = load_task("reasoning_gym:chain_sum", num_prompts=5, eval_prompts=2, seed=9)
    assert [p.prompt for p in a.train] == [p.prompt for p in b.train]


def test_a_missing_or_broken_grid_file_is_a_config_error(tmp_path, capsys):
    assert cli.main(["sweep", "--grid-file", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "s")]) == 2
    assert f"--grid-file {tmp_path / 'missing.yaml'} does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [0.1, 0.2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        sweep.parse_grid([], str(broken))
