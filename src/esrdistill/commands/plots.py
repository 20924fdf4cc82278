"""Plots and the Markdown report of `esrdistill diagnose` (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finite(values):
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else float("nan") for v in values]


def _mark_k(ax, k):
    if k:
        ax.axvline(k, color="grey", linestyle="--", linewidth=1)
        ax.text(k, ax.get_ylim()[0], f" K={k}", va="bottom", fontsize=8, color="grey")


def plot_decay(result: dict, path: Path) -> Path:
    d = result["decay"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, ci_key, label in (("teacher_continues_student", "teacher_ci", "teacher continues student's first k tokens"),
                               ("student_continues_teacher", "student_ci", "student continues teacher's first k tokens")):
        ax.plot(d["ks"], d[key], marker="o", label=label)
        ax.fill_between(d["ks"], [c[0] for c in d[ci_key]], [c[1] for c in d[ci_key]], alpha=0.15)
    ax.set_xlabel("prefix length k (tokens)")
    ax.set_ylabel(f"accuracy (n={d['n']}, 95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title("Off-policy teacher decay")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_profile(result: dict, path: Path) -> Path:
    p = result["profile"]
    x = p["bucket_starts"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(x, _finite(p["reverse_kl"]), marker=".", label="reverse KL")
    axes[0].plot(x, _finite(p["forward_kl"]), marker=".", label="forward KL")
    axes[0].set_title("KL per position")
    axes[1].plot(x, _finite(p["teacher_entropy"]), marker=".", label="teacher entropy")
    axes[1].plot(x, _finite(p["student_entropy"]), marker=".", label="student entropy")
    axes[1].set_title("Entropy per position (nats)")
    axes[2].plot(x, _finite(p["teacher_top1_prob"]), marker=".", label="teacher top-1 prob")
    axes[2].plot(x, _finite(p["agreement"]), marker=".", label="argmax agreement")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("Teacher confidence and agreement")
    for ax in axes:
        ax.set_xlabel(f"response position (buckets of {p['bucket_width']})")
        ax.legend(fontsize=8)
    fig.suptitle("Per-position profile of student rollouts")
    return _save(fig, path)


def plot_cascading(result: dict, path: Path) -> Path:
    c = result["cascading"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = result["profile"]["bucket_width"]
    xb = [i * width for i in range(len(c["before"]))]
    xa = [i * width for i in range(len(c["after"]))]
    axes[0].plot(xb, _finite(c["before"]), marker=".", label="student")
    axes[0].plot(xa, _finite(c["after"]), marker=".", label="second (trained) student")
    axes[0].set_title("Reverse KL to the teacher, fresh rollouts")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].bar([i * width for i in range(len(c["relative_change"]))], [v * 100 for v in _finite(c["relative_change"])],
                width=width * 0.8, align="edge")
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set_title("Change of KL per bucket (%)")
    for ax in axes:
        ax.set_xlabel("response position")
        _mark_k(ax, c["k"])
    return _save(fig, path)


def plot_submode(result: dict, path: Path) -> Path:
    s = result["submode"]
    names = list(s)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bottom = [0.0] * len(names)
    for key, label in (("equal_top1", "= teacher top-1"), ("top2_5", "in teacher top 2-5"), ("outside_top5", "outside top 5")):
        values = [s[n][key] if s[n][key] == s[n][key] else 0.0 for n in names]
        axes[0].bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"Student top-1 in teacher's ranking\n(top {result['options']['top_frac']:.0%} highest-KL tokens)")
    axes[0].legend(fontsize=8)
    lengths = result["median_lengths"]
    axes[1].bar(list(lengths), list(lengths.values()), color="tab:gray")
    axes[1].set_title(f"Median response length (tokens, cap {result['max_new_tokens']})")
    return _save(fig, path)


def plot_kl_share(result: dict, path: Path) -> Path:
    shares = {int(k): v for k, v in result["profile"]["kl_share"].items()}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(shares), _finite(list(shares.values())), marker="o", label="all positions")
    without = result["profile"].get("kl_share_without_first")
    if without:
        ax.plot([int(k) for k in without], _finite(list(without.values())), marker=".", label="position 0 left out")
        ax.legend(fontsize=8)
    ax.axhline(result["options"]["share_target"], color="grey", linewidth=0.8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("K (first K response tokens)")
    ax.set_ylabel("share of a trajectory's reverse KL")
    ax.set_title(f"Recommended K = {result['recommendation']['k']}")
    _mark_k(ax, result["recommendation"]["k"])
    return _save(fig, path)


def plot_alignment(result: dict, path: Path) -> Path:
    a = result["alignment"]
    w = a["bucket_width"]
    starts = [i * w for i in range(len(a["aligned_by_bucket"]))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(starts, _finite(a["aligned_by_bucket"]), marker="o", label="aligned positions")
    for key, label in (("student_mass_by_bucket", "student mass on shared tokens"), ("teacher_mass_by_bucket", "teacher mass on shared tokens")):
        values = _finite(a[key])
        ax.plot(starts[: len(values)], values, marker=".", label=label)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("response position (student tokens)")
    ax.set_ylabel("fraction")
    ax.set_title(f"Cross-tokenizer alignment ({a['rule']} rule)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(result: dict, out: Path) -> dict[str, Path]:
    pngs = {
        "decay": plot_decay(result, out / "decay.png"),
        "profile": plot_profile(result, out / "position_profile.png"),
        "submode": plot_submode(result, out / "submode.png"),
        "recommendation": plot_kl_share(result, out / "kl_share.png"),
    }
    if result.get("cascading"):
        pngs["cascading"] = plot_cascading(result, out / "cascading.png")
    if result.get("alignment"):
        pngs["alignment"] = plot_alignment(result, out / "alignment.png")
    return pngs


def _pct(v):
    return f"{v:.1%}" if isinstance(v, (int, float)) and v == v else "-"


def _num(v):
    return f"{v:.3f}" if isinstance(v, (int, float)) and v == v else "-"


def report_markdown(result: dict, pngs: dict[str, Path]) -> str:
    d, p = result["decay"], result["profile"]
    lines = [
        "# esrdistill diagnostics", "",
        f"Teacher `{result['teacher']}`, student `{result['student']}`"
        + (f", trained student `{result['student_after']}`" if result["student_after"] else "")
        + f", on {result['problems']} problems of `{result['dataset']}`; rollouts up to {result['max_new_tokens']} tokens "
        f"at T={result['temperature']}.", "",
        f"**Recommended K = {result['recommendation']['k']}**: {result['recommendation']['reason']}.", "",
        "## 1. Teacher decay by prefix continuation", "",
        "| k | teacher continues student | student continues teacher |", "|---|---|---|",
        *[f"| {k} | {_pct(a)} | {_pct(b)} |" for k, a, b in zip(d["ks"], d["teacher_continues_student"], d["student_continues_teacher"])],
        "", f"![decay]({pngs['decay'].name})", "",
        "## 2. Per-position profile of student rollouts", "",
        "| positions | tokens | reverse KL | forward KL | teacher entropy | student entropy | teacher top-1 | agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    w = p["bucket_width"]
    for i, start in enumerate(p["bucket_starts"]):
        lines.append(f"| {start}-{start + w - 1} | {p['counts'][i]} | {_num(p['reverse_kl'][i])} | {_num(p['forward_kl'][i])} | "
                     f"{_num(p['teacher_entropy'][i])} | {_num(p['student_entropy'][i])} | {_num(p['teacher_top1_prob'][i])} | "
                     f"{_num(p['agreement'][i])} |")
    lines += ["", "Share of a trajectory's KL in its first K tokens: "
              + ", ".join(f"K={k}: {_pct(v)}" for k, v in p["kl_share"].items()), ""]
    if "kl_share_without_first" in p:
        lines += [f"Response position 0 alone holds {_pct(p['first_position_kl_share'])} of a trajectory's KL (often the "
                  "student's opening against the teacher's own format). Without it: "
                  + ", ".join(f"K={k}: {_pct(v)}" for k, v in p["kl_share_without_first"].items())
                  + ". The K rule's share uses the shares without position 0.", ""]
    lines += [f"![profile]({pngs['profile'].name})", ""]
    lines += ["## 3. Cascading alignment", ""]
    c = result.get("cascading")
    if c:
        lines += ["| positions | KL before | KL after | change |", "|---|---|---|---|"]
        for i, change in enumerate(c["relative_change"]):
            start = i * w
            lines.append(f"| {start}-{start + w - 1} | {_num(c['before'][i])} | {_num(c['after'][i])} | {_pct(change)} |")
        lines += ["", f"![cascading]({pngs['cascading'].name})", ""]
    else:
        lines += ["Not run: give `--student-after` (a trained student) to compare KL profiles on fresh rollouts.", ""]
    lines += ["## 4. Sub-mode commitment", "",
              "| model | tokens | student top-1 = teacher top-1 | in teacher top 2-5 | outside top 5 | student top-1 prob |",
              "|---|---|---|---|---|---|"]
    for name, s in result["submode"].items():
        lines.append(f"| {name} | {s['tokens']} | {_pct(s['equal_top1'])} | {_pct(s['top2_5'])} | {_pct(s['outside_top5'])} | {_num(s['student_top1_prob'])} |")
    lines += ["", "Median response length (tokens): " + ", ".join(f"{k} {v}" for k, v in result["median_lengths"].items()), "",
              f"![submode]({pngs['submode'].name})", "", "## 5. Recommended K", "",
              f"K = {result['recommendation']['k']} (rules: {result['recommendation']['rules']}).", "",
              f"![kl share]({pngs['recommendation'].name})", ""]
    a = result.get("alignment")
    if a:
        w = a["bucket_width"]
        lines += ["## Alignment of the two tokenizers", "", result.get("tokenizers", ""), "",
                  f"{a['units']:,} shared token units: {_pct(a['vocab_mapped'])} of the student's {a['student_vocab']:,} tokens "
                  f"have a teacher counterpart (the teacher has {a['teacher_vocab']:,}). Rule: `{a['rule']}`. "
                  f"{_pct(a['aligned_frac'])} of the student's response positions are aligned; on those, the student puts "
                  f"{_pct(a['student_mass'])} and the teacher {_pct(a['teacher_mass'])} of its probability on shared "
                  f"tokens. {_pct(a['unmapped_frac'])} of the sampled tokens have no teacher counterpart.", "",
                  "| positions | aligned | student mass on shared | teacher mass on shared |", "|---|---|---|---|"]
        for i, frac in enumerate(a["aligned_by_bucket"]):
            sm = a["student_mass_by_bucket"][i] if i < len(a["student_mass_by_bucket"]) else None
            tm = a["teacher_mass_by_bucket"][i] if i < len(a["teacher_mass_by_bucket"]) else None
            lines.append(f"| {i * w}-{i * w + w - 1} | {_pct(frac)} | {_pct(sm)} | {_pct(tm)} |")
        for key, title in (("top_unaligned", "Most frequent unaligned student tokens"),
                           ("top_unmapped", "Most frequent sampled student tokens without a teacher counterpart")):
            lines += ["", f"{title}: " + (", ".join(f"`{t!r}` ({c})" for t, c in a[key]) or "none")]
        lines += ["", f"![alignment]({pngs['alignment'].name})", ""]
    return "\n".join(lines)
