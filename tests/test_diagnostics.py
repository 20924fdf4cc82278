import json
import math

import pytest
import torch

from esrdistill import diagnostics, rollout
from esrdistill.commands.diagnose import DiagnoseOptions, diagnose
from esrdistill.config import make_config
from esrdistill.data import Problem
from esrdistill.engines import hf as engine_hf
from esrdistill.measure import prefix_continuation, profile
from helpers import make_model, make_tokenizer, tiny_overrides


def random_logp(seed, B=3, T=6, V=9):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)


def test_position_stats_match_naive_loops():
    s, t = random_logp(0), random_logp(1)
    mask = torch.ones(3, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    stats = diagnostics.position_stats(s, t, mask)
    for b in range(3):
        for i in range(6):
            ps, pt = s[b, i].exp().tolist(), t[b, i].exp().tolist()
            if not mask[b, i]:
                assert all(stats[k][b, i] == 0 for k in stats)
                continue
            assert stats["reverse_kl"][b, i] == pytest.approx(sum(a * math.log(a / c) for a, c in zip(ps, pt)))
            assert stats["forward_kl"][b, i] == pytest.approx(sum(c * math.log(c / a) for a, c in zip(ps, pt)))
            assert stats["teacher_entropy"][b, i] == pytest.approx(-sum(c * math.log(c) for c in pt))
            assert stats["teacher_top1_prob"][b, i] == pytest.approx(max(pt))
            s_top = max(range(9), key=lambda v: ps[v])
            assert stats["agreement"][b, i] == float(s_top == max(range(9), key=lambda v: pt[v]))
            assert stats["teacher_rank"][b, i] == sorted(pt, reverse=True).index(pt[s_top])


def test_identical_distributions_give_zero_kl_and_full_agreement():
    s = random_logp(3)
    mask = torch.ones(3, 6, dtype=torch.float64)
    stats = diagnostics.position_stats(s, s.clone(), mask)
    assert stats["reverse_kl"].abs().max() < 1e-12 and stats["forward_kl"].abs().max() < 1e-12
    assert stats["agreement"].min() == 1.0 and stats["teacher_rank"].max() == 0


def test_bucket_means_match_naive_and_counts_add_up():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(4, 11, generator=g)
    mask = (torch.rand(4, 11, generator=g) > 0.3).float()
    mask[:, 9:] = 0
    means, counts = diagnostics.bucket_means(values, mask, 3)
    assert len(means) == 3  # buckets past the last counted position are dropped
    assert sum(counts) == int(mask.sum())
    for i, (mean, count) in enumerate(zip(means, counts)):
        cells = [values[b, t].item() for b in range(4) for t in range(3 * i, min(3 * i + 3, 11)) if mask[b, t]]
        assert count == len(cells) and mean == pytest.approx(sum(cells) / len(cells))


def test_kl_shares_reach_one_and_match_naive():
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    shares = diagnostics.kl_share(kl, mask, [1, 2, 4])
    assert shares[1] == pytest.approx((1 / 10 + 1.0) / 2)  # the all-zero trajectory is left out
    assert shares[2] == pytest.approx((3 / 10 + 1.0) / 2)
    assert shares[4] == pytest.approx(1.0)


def test_submode_shares_add_up_and_pick_the_highest_kl_tokens():
    stats = {
        "reverse_kl": torch.tensor([[5.0, 0.1, 4.0, 0.2, 3.0, 0.3, 0.0, 0.0, 0.0, 0.0]]),
        "teacher_rank": torch.tensor([[0.0, 9.0, 2.0, 9.0, 7.0, 9.0, 0.0, 0.0, 0.0, 0.0]]),
        "student_top1_prob": torch.tensor([[0.9, 0.1, 0.6, 0.1, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0]]),
    }
    mask = torch.tensor([[1.0] * 6 + [0.0] * 4])
    out = diagnostics.submode_commitment(stats, mask, top_frac=0.5)  # 3 of the 6 counted tokens
    assert out["tokens"] == 3
    assert (out["equal_top1"], out["top2_5"], out["outside_top5"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert out["student_top1_prob"] == pytest.approx((0.9 + 0.6 + 0.3) / 3)


def test_recommend_k_reproduces_the_papers_k_from_its_own_decay_figures():
    rec = diagnostics.recommend_k([0, 100, 200, 300], [0.653, 0.627, 0.563, 0.5175], [100, 200], [0.45, 0.7], [1150] * 10)
    assert rec["k"] == 100 and rec["rules"]["decay"] == 100


def test_recommend_k_covers_the_whole_answer_when_the_teacher_decays_at_once():
    lengths = [16, 16, 17, 17, 18, 18, 18, 16, 17, 30]
    rec = diagnostics.recommend_k([0, 2, 4], [0.72, 0.2, 0.19], [2, 4], [0.55, 0.6], lengths)
    assert rec["rules"]["decay"] is None and rec["rules"]["coverage"] == 18 and rec["k"] == 18
    assert "whole" in rec["reason"] and "close to a full rollout" in rec["reason"]


def test_recommend_k_falls_back_to_the_kl_share_when_the_teacher_solves_nothing():
    rec = diagnostics.recommend_k([0, 25], [0.0, 0.0], [25, 50], [0.4, 0.9], [200] * 5)
    assert rec["k"] == 50 and rec["rules"]["share"] == 50 and "solves none" in rec["reason"]


def test_percentile_nearest_rank():
    assert diagnostics.percentile([5, 1, 3, 2, 4], 50) == 3
    assert diagnostics.percentile(list(range(1, 11)), 90) == 9
    assert diagnostics.percentile([7], 90) == 7


class _ContextFreeTeacher:
    """Stand-in for a teacher that ignores its context: whatever the prefix, it writes the same answer."""


def test_teacher_that_ignores_its_context_gives_a_flat_decay_curve(monkeypatch):
    tok = make_tokenizer()
    answer = tok("<answer>7</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def fake_generate_all(model, prompts, *args, **kwargs):
        return [list(answer) for _ in prompts]  # ignores the prompt and the prefix

    import esrdistill.measure as diag
    from esrdistill.grading import Grader

    monkeypatch.setattr(diag, "generate_all", fake_generate_all)
    problems = [Problem("q", "7") for _ in range(4)]
    responses = [tok(f"I think <answer>{d}</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in "1234"]
    sampling = rollout.Sampling(max_new_tokens=40, temperature=0.0, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    grade = Grader("exact", "tag")
    acc, texts = prefix_continuation(_ContextFreeTeacher(), [[1]] * 4, responses, [0, 2, 5, 10], sampling, 4,
                                     tok, grade, problems, False, "t")
    assert list(acc.values()) == [1.0, 1.0, 1.0, 1.0]
    assert texts[0][0] == "<answer>7</answer>" and texts[5][0].startswith("I thi")
    # a response that ended within k tokens is graded as it is
    acc_long, texts_long = prefix_continuation(_ContextFreeTeacher(), [[1]] * 4, responses, [100], sampling, 4,
                                               tok, grade, problems, False, "t")
    assert acc_long[100] == 0.0 and texts_long[100][0] == "I think <answer>1</answer>"


def test_profile_of_identical_models_is_zero_kl_and_agreement_one_at_every_position():
    tok = make_tokenizer()
    model = make_model(len(tok), 4)
    prompts = [[3, 40, 41], [3, 50, 51, 52], [3, 60]]
    responses = engine_hf.sample(model, prompts, rollout.Sampling(10, 1.0, 1.0, (tok.eos_token_id,), tok.pad_token_id))
    lists = [responses.responses[r, : int(responses.mask[r].sum())].tolist() for r in range(3)]
    from esrdistill.teachers.protocol import LossSettings
    from esrdistill.teachers.same import SameTokenizer

    scorer = SameTokenizer(model, tok.pad_token_id, len(tok), 2, LossSettings())
    stats, mask, _, _ = profile(model, scorer, prompts, prompts, lists, tok.pad_token_id, [tok.eos_token_id], len(tok), 2, False, "p")
    counted = mask.bool()
    assert stats["reverse_kl"][counted].abs().max() < 1e-5
    assert stats["agreement"][counted].min() == 1.0
    means, _ = diagnostics.bucket_means(stats["agreement"], mask, 2)
    assert all(m == 1.0 for m in means)


def test_diagnose_on_tiny_models_writes_every_analysis_and_valid_pngs(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    cfg = make_config(tiny_overrides(student, teacher, tmp_path / "unused", eval_prompts=4, max_new_tokens=10,
                                     answer_extract="last_number"))
    out = tmp_path / "diag"
    result = diagnose(cfg, DiagnoseOptions(out=str(out), student_after=teacher, problems=4, prefixes=(0, 2, 4), bucket=2))
    saved = json.loads((out / "diagnostics.json").read_text())
    assert saved["decay"]["ks"] == [0, 2, 4] and len(saved["decay"]["teacher_continues_student"]) == 3
    assert saved["cascading"] is not None and "trained_student" in saved["submode"]
    assert set(saved["median_lengths"]) == {"student", "teacher", "trained_student"}
    assert result["recommendation"]["k"] is not None
    assert (out / "recommended_k.txt").read_text().split("\n")[0] == str(result["recommendation"]["k"])
    for name in ("decay", "position_profile", "cascading", "submode", "kl_share"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    report = (out / "report.md").read_text()
    for heading in ("1. Teacher decay", "2. Per-position profile", "3. Cascading alignment", "4. Sub-mode commitment", "5. Recommended K"):
        assert heading in report


def test_bad_options_are_config_errors():
    from esrdistill.config import ConfigError

    with pytest.raises(ConfigError, match="--bucket must be >= 1"):
        DiagnoseOptions(out="x", bucket=0)
    with pytest.raises(ConfigError, match="--top-frac"):
        DiagnoseOptions(out="x", top_frac=0.0)


def test_json_safe_replaces_nan():
    from esrdistill.commands.diagnose import _json_safe

    assert _json_safe({"a": [1.0, float("nan")], "b": (float("inf"), "x")}) == {"a": [1.0, None], "b": [None, "x"]}
