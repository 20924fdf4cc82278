"""The study's report from runs.json alone: per pair, a table of every arm over its seeds (mean ± std), the time
and tokens to the target accuracy, the speed-up against the full rollout, the diagnostics, and a picture (accuracy
against training seconds with every seed drawn; response length and cut-off rate per step).

Pure functions of the records (`arm_rows`, `diagnostics_summary`), so the report says what the runs logged.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path

from esrdistill.commands.runreport import save_figure


def _stats(values: list) -> dict:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "study"


def is_full(rec: dict) -> bool:
    return rec["rollout_tokens"] is None


def arm_rows(records: list[dict]) -> list[dict]:
    """One row per arm of one pair (in the order the records list them): mean ± std over its seeds."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in records):
        group = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        first = group[0]
        reached = [r for r in group if r["seconds_to_target"] is not None]
        rows.append({
            "arm": arm, "rollout_tokens": first["rollout_tokens"], "max_new_tokens": first["max_new_tokens"],
            "token_select": first["token_select"], "select_tokens": first.get("select_tokens"), "loss": first["loss"],
            "token_weight": first.get("token_weight", "none"), "seeds": [r["seed"] for r in group],
            "final_k": [r["k_per_step"][-1] for r in group if r.get("k_per_step")],
            "adaptive_reference": first.get("adaptive_reference") or "first",
            **{key: _stats([r[key] for r in group]) for key in (
                "teacher_accuracy", "student_before", "student_after", "best_minus_final", "steps", "seconds",
                "seconds_per_step", "generated_tokens", "mean_response_tokens", "cut_frac", "after_len_mean")},
            "reached": len(reached),
            "seconds_to_target": _stats([r["seconds_to_target"] for r in reached]),
            "tokens_to_target": _stats([r["tokens_to_target"] for r in reached]),
        })
    return rows


def _pct(s: dict, spread: bool = True) -> str:
    if s["mean"] is None:
        return "-"
    text = f"{s['mean']:.1%}"
    if spread and s["n"] > 1:
        text += f" ± {s['std']:.1%} ({s['min']:.0%}-{s['max']:.0%})"
    return text


def _num(s: dict, digits: int = 0, spread: bool = False) -> str:
    if s["mean"] is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if spread and s["n"] > 1 else "")


def _rollout(row: dict) -> str:
    weight = f", token_weight={row['token_weight']}" if row.get("token_weight", "none") != "none" else ""
    if row["rollout_tokens"] == "adaptive":
        settled = "/".join(map(str, row.get("final_k") or []))
        reference = ", peak reference" if row.get("adaptive_reference") == "peak" else ""
        return f"ESR, K adaptive{reference} (final K {settled or '-'})" + weight
    if row["rollout_tokens"] is not None:
        return f"ESR, K={row['rollout_tokens']}" + weight
    if row["token_select"] != "prefix":
        return f"full (up to {row['max_new_tokens']}), loss on {row['token_select']} {row['select_tokens']}" + weight
    return f"full (up to {row['max_new_tokens']})" + weight


def table(rows: list[dict]) -> list[str]:
    head = ["arm", "rollout", "loss", "seeds", "teacher", "student before", "student after (mean ± std, min-max)",
            "best - final", "training s", "s per step", "generated tokens", "mean length / cut (training)",
            "reached target", "s to target", "tokens to target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["arm"], _rollout(r), r["loss"], ",".join(map(str, r["seeds"])), _pct(r["teacher_accuracy"], False),
            _pct(r["student_before"], False), _pct(r["student_after"]), _pct(r["best_minus_final"], False),
            _num(r["seconds"], 0, True), _num(r["seconds_per_step"], 1), _num(r["generated_tokens"]),
            f"{_num(r['mean_response_tokens'], 1)} / {_pct(r['cut_frac'], False)}",
            f"{r['reached']}/{len(r['seeds'])}", _num(r["seconds_to_target"]), _num(r["tokens_to_target"])]) + " |")
    return lines


def run_table(records: list[dict]) -> list[str]:
    """Every run on its own line: the seeds behind the means."""
    head = ["arm", "seed", "teacher", "student after (95% CI)", "best (step)", "training s", "s to target",
            "eval length / cut after", "tagged / last number right", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(records, key=lambda r: (list(dict.fromkeys(x["arm"] for x in records)).index(r["arm"]), r["seed"])):
        best = max(r["curve"], key=lambda p: (p["accuracy"], -p["step"]))
        after = "-" if r["student_after"] is None else (
            f"{r['student_after']:.0%} ({r['student_after_ci'][0]:.0%}-{r['student_after_ci'][1]:.0%})")
        lines.append("| " + " | ".join([
            r["arm"], str(r["seed"]), f"{r['teacher_accuracy']:.0%}", after, f"{best['accuracy']:.0%} ({best['step']})",
            f"{r['seconds']:.0f}", "never" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.0f}",
            "-" if r["after_len_mean"] is None else f"{r['after_len_mean']:.0f} / {r['after_cut_frac']:.0%}",
            "-" if r.get("after_answer_extracted") is None else
            f"{r['after_answer_extracted']:.0%} / {r['after_last_number_right']:.0%}", r["commit"]]) + " |")
    return lines


def speedups(rows: list[dict], records: list[dict]) -> list[str]:
    """Each ESR arm against the full rollout of the same loss, seed by seed: the ratios of one seed's two runs, which
    ran in one session (a mean of seconds over seeds would mix sessions, and this machine's speed varies between them)."""
    lines = []
    plain = [r for r in rows if r.get("token_weight", "none") == "none"]
    for full in (r for r in plain if r["rollout_tokens"] is None and r["token_select"] == "prefix"):
        for esr in (r for r in plain if r["rollout_tokens"] is not None and r["loss"] == full["loss"]):
            runs = {(r["arm"], r["seed"]): r for r in records}
            pairs = [(runs[(esr["arm"], s)], runs[(full["arm"], s)]) for s in esr["seeds"] if (full["arm"], s) in runs]
            steps = [(s, e["seconds_per_step"] / f["seconds_per_step"]) for e, f in pairs if e["seconds_per_step"]
                     and f["seconds_per_step"] for s in [e["seed"]]]
            if not steps:
                continue
            text = (f"- {esr['arm']} against {full['arm']} ({esr['loss']}), seed by seed: a step takes "
                    + ", ".join(f"{ratio:.2f}x" for _, ratio in steps) + " as long (seeds "
                    + ", ".join(str(s) for s, _ in steps) + ")")
            sooner = [(e["seed"], f["seconds_to_target"] / e["seconds_to_target"]) for e, f in pairs
                      if e["seconds_to_target"] and f["seconds_to_target"]]
            if sooner:
                text += "; the target is reached " + ", ".join(f"{ratio:.1f}x" for _, ratio in sooner) + " sooner (seeds " \
                        + ", ".join(str(s) for s, _ in sooner) + ")"
            reached = [(e["seconds_to_target"] is not None, f["seconds_to_target"] is not None) for e, f in pairs]
            if any(a != b for a, b in reached) or not any(a and b for a, b in reached):
                text += (f"; the target is reached by {sum(a for a, _ in reached)} of ESR's seeds and "
                         f"{sum(b for _, b in reached)} of the full rollout's")
            lines.append(text + ".")
    return lines


def diagnostics_summary(result: dict, k: int | None) -> dict:
    """From diagnose's diagnostics.json: the teacher's decay, the share of the reverse KL in the first K positions
    (position 0 left out), and the mean reverse KL beyond K before and after training (cascading alignment)."""
    decay = result["decay"]
    shares = {int(key): v for key, v in result["profile"]["kl_share_without_first"].items()}
    at = max((s for s in shares if k is None or s <= k), default=None)
    out = {"ks": decay["ks"], "teacher_continues_student": decay["teacher_continues_student"],
           "student_continues_teacher": decay["student_continues_teacher"], "n": decay["n"],
           "share_k": at, "kl_share_without_first": shares.get(at), "first_position_share": result["profile"].get("first_position_kl_share"),
           "k": k, "beyond_k_before": None, "beyond_k_after": None}
    cascading = result.get("cascading")
    if cascading and k is not None:
        def beyond(values):
            kept = [v for start, v in zip(cascading["bucket_starts"], values) if start >= k and v is not None and math.isfinite(v)]
            return statistics.fmean(kept) if kept else None
        out["beyond_k_before"], out["beyond_k_after"] = beyond(cascading["before"]), beyond(cascading["after"])
        out["within_k_before"] = statistics.fmean([v for s, v in zip(cascading["bucket_starts"], cascading["before"]) if s < k and v is not None] or [math.nan])
        out["within_k_after"] = statistics.fmean([v for s, v in zip(cascading["bucket_starts"], cascading["after"]) if s < k and v is not None] or [math.nan])
    return out


def keep_diagnostics(report_dir: Path, name: str, source: Path) -> Path:
    """Copy a study's diagnostics (report.md, diagnostics.json, plots) into REPORT/diagnose-NAME/."""
    target = report_dir / f"diagnose-{slug(name)}"
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix in (".md", ".json", ".png", ".txt"):
            shutil.copy2(path, target / path.name)
    return target


def _diagnostics_lines(report_dir: Path, name: str) -> list[str]:
    path = report_dir / f"diagnose-{slug(name)}" / "diagnostics.json"
    if not path.is_file():
        return ["Diagnostics: not run yet (`esrdistill study NAME` runs them at its end, once the study's `diagnose.after` "
                "arm has a finished run)."]
    result = json.loads(path.read_text())
    d = diagnostics_summary(result, result["options"].get("k"))
    lines = [f"Diagnostics on {d['n']} held-out problems (`esrdistill diagnose`, [its report](diagnose-{slug(name)}/report.md)):", "",
             "| prefix k (student tokens) | " + " | ".join(map(str, d["ks"])) + " |", "|---|" + "---|" * len(d["ks"]),
             "| teacher continues the student's rollout | " + " | ".join(f"{v:.0%}" for v in d["teacher_continues_student"]) + " |",
             "| student continues the teacher's answer | " + " | ".join(f"{v:.0%}" for v in d["student_continues_teacher"]) + " |", ""]
    if d["share_k"] is not None:
        lines.append(f"- Share of the reverse KL in the first {d['share_k']} positions (position 0 left out): "
                     f"{d['kl_share_without_first']:.1%}; position 0 alone holds {d['first_position_share']:.1%} of it.")
    if d["beyond_k_before"] is not None and d["beyond_k_after"] is not None:
        lines.append(f"- Cascading alignment: the mean reverse KL per position beyond K={d['k']} on fresh rollouts was "
                     f"{d['beyond_k_before']:.3f} before and {d['beyond_k_after']:.3f} after ESR (within K: "
                     f"{d['within_k_before']:.3f} -> {d['within_k_after']:.3f}), student {result['student_after']}.")
    return lines


def plot(records: list[dict], path: Path) -> Path:
    """Accuracy against training seconds (every seed drawn, one colour per arm), response length and cut-off rate
    per step (the mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    arms = list(dict.fromkeys(r["arm"] for r in records))
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    for r in records:
        xs, ys = [p["seconds"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]]
        first = r is next(x for x in records if x["arm"] == r["arm"])
        axes[0].plot(xs, ys, marker="o", markersize=3, linewidth=1, color=colours[r["arm"]], label=r["arm"] if first else None)
    teacher = statistics.fmean(r["teacher_accuracy"] for r in records)
    target = statistics.fmean(r["target_accuracy"] for r in records)
    axes[0].axhline(teacher, color="grey", linestyle="--", linewidth=1, label=f"teacher (mean) {teacher:.0%}")
    axes[0].axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.0%}")
    axes[0].set(xlabel="training seconds (evaluations left out)", ylabel="held-out accuracy (greedy)", ylim=(-0.02, 1.02),
                title="accuracy against wall-clock time, every seed")
    for ax, key, title in ((axes[1], "len_per_step", "mean response length (tokens)"),
                           (axes[2], "cut_per_step", "rollouts cut at the length limit")):
        for arm in arms:
            series = [r[key] for r in records if r["arm"] == arm]
            width = min(map(len, series))
            ax.plot(range(1, width + 1), [statistics.fmean(s[i] for s in series) for i in range(width)], color=colours[arm],
                    label=arm, linewidth=1)
        ax.set(xlabel="step", title=title + " (mean over seeds)")
    axes[2].set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=100)


def write(report_dir: Path, records: list[dict]) -> Path:
    """REPORT/report.md and one PNG per pair, from every record of runs.json."""
    lines = ["# ESR against a full rollout: the study", "",
             "Written by `esrdistill study` from runs.json (one object per run) in this folder. Accuracy: greedy, on held-out "
             "problems that no run trained on; the target is the study's fraction of each seed's teacher accuracy; "
             "training seconds leave the evaluations and checkpoint writes out; ± is the standard deviation over seeds.", ""]
    for name in dict.fromkeys(r["study"] for r in records):
        group = [r for r in records if r["study"] == name]
        pair = group[0]["pair"]
        rows = arm_rows(group)
        image = plot(group, report_dir / f"{slug(name)}.png")
        commits = ", ".join(sorted({r["commit"] for r in group}))
        commands = sorted({r.get("command", "") for r in group})
        first = group[0]
        lines += [f"## {pair} (`esrdistill study {name}`)", "", f"Student {first['student']}, teacher {first['teacher']}, dataset {first['dataset']}, "
                  f"{first['eval_problems']} evaluation problems, batch {first['batch_size']}. Commands: "
                  + "; ".join(f"`{c}`" for c in commands) + f". Code: {commits}.", "", *table(rows), ""]
        speed = speedups(rows, group)
        lines += speed + ([""] if speed else [])
        lines += [f"{len(group)} runs: {sum(r['seconds'] for r in group) / 60:.0f} min of training, "
                  f"{sum(r['seconds_with_eval'] for r in group) / 60:.0f} min with the evaluations during training "
                  "(on the machine that ran them; the before-training evaluations and the diagnostics come on top).", ""]
        notes = [f"- {r['arm']} seed {r['seed']}: {r['note']}" for r in group if r.get("note")]
        lines += [f"![{pair}]({image.name})", "", "Every run:", "", *run_table(group), "", *notes, *([""] if notes else []),
                  *_diagnostics_lines(report_dir, name), ""]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
