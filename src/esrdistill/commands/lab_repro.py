"""`esrdistill lab repro`: the paper's ablations on the lab's models with seeds, its diagnostics, and a
claims table (each claim, what the paper measured, what the lab measures, and whether it holds here).

Every arm trains the same student for the same steps on the same problems (data_seed); seeds vary
sampling, data order and initialisation. The selection arms roll out in full and put the loss on
`select_tokens` tokens per trajectory: the same budget as ESR at K = select_tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from esrdistill.commands import diagnose as diagnose_module
from esrdistill.commands import lab, sweep
from esrdistill.config import load_config
from esrdistill.errors import UserError

SCORE_RULES = ("top_reverse_kl", "top_forward_kl", "top_teacher_entropy", "top_student_entropy", "kl_x_student_entropy",
               "teacher_x_student_entropy", "kl_x_teacher_x_student_entropy")
PLACE_RULES = ("prefix_mask", "random", "middle", "last")


@dataclass(frozen=True)
class Grid:
    k: int = 32  # ESR's K of the main comparison, and the budget of every selection arm
    ks: tuple[int, ...] = (16, 32, 64)  # ESR arms
    rules: tuple[str, ...] = PLACE_RULES + SCORE_RULES  # selection arms (full rollouts, k tokens each)
    progressive: bool = True
    adaptive: tuple[str, ...] = ("first", "peak")  # rollout_tokens=adaptive arms (horizon.py), from K/2 up to max_new_tokens,
    # one per adaptive_reference: `adaptive` (first) and `adaptive_peak`
    weights: tuple[str, ...] = ("iw_opd", "decay")  # soft token weight arms (weighting.py), on full rollouts
    seeds: int = 3
    steps: int = 300
    eval_problems: int = 128
    diagnose_problems: int = 64
    overrides: dict = field(default_factory=dict)


QUICK = Grid(k=16, ks=(16,), rules=("prefix_mask", "top_reverse_kl"), progressive=True, adaptive=(), weights=(), seeds=2, steps=4, eval_problems=16,
             diagnose_problems=8, overrides={"batch_size": 4, "micro_batch_size": 4, "eval_every": 2, "save_every": 2,
                                             "max_new_tokens": 140})


def adaptive_arm(reference: str) -> str:
    """The lab arm of rollout_tokens=adaptive with this adaptive_reference: `adaptive` (first), `adaptive_peak`."""
    return "adaptive" if reference == "first" else f"adaptive_{reference}"


def arms(grid: Grid) -> list[tuple[str, dict]]:
    """(name, config values) of every arm of the grid."""
    out = [("full", {"rollout_tokens": None})]
    out += [(f"esr_k{k}", {"rollout_tokens": k}) for k in grid.ks]
    if grid.progressive:
        out.append((f"progressive_1-{grid.k}", {"rollout_tokens": grid.k, "rollout_tokens_schedule": "progressive",
                                                  "rollout_tokens_start": 1}))
    out += [(rule, {"rollout_tokens": None, "token_select": rule, "select_tokens": grid.k}) for rule in grid.rules]
    for reference in grid.adaptive:
        values = {"rollout_tokens": "adaptive", "rollout_tokens_min": max(1, grid.k // 2)}
        out.append((adaptive_arm(reference), values if reference == "first" else {**values, "adaptive_reference": reference}))
    out += [(f"full_{rule}", {"rollout_tokens": None, "token_weight": rule}) for rule in grid.weights]
    return out


def run_values(root: Path, grid: Grid, arm: str, seed: int) -> dict:
    """The config values of one arm's run with one seed."""
    return lab.lab_config(root, **{"steps": grid.steps, "eval_prompts": grid.eval_problems, **grid.overrides,
                                   **dict(arms(grid))[arm], "seed": seed, "run_dir": str(root / "runs" / arm / f"seed{seed}")})


def plan(root: Path, grid: Grid, only: tuple[str, ...] | None = None) -> list[sweep.Run]:
    """The grid's runs (only the arms named in `only`, when given)."""
    runs = []
    for name, _ in arms(grid):
        if only and name not in only:
            continue
        for seed in range(grid.seeds):
            values = run_values(root, grid, name, seed)
            load_config(None, values)  # a bad value fails before any run starts
            runs.append(sweep.Run(combo={"arm": name}, seed=seed, run_dir=Path(values["run_dir"]), values=values))
    return runs


# ---------------------------------------------------------------- claims

def _batch_size(grid: Grid) -> int:
    return {**lab.lab_config(Path(".")), **grid.overrides}["batch_size"]


def _row(rows: list[dict], arm: str) -> dict | None:
    return next((r for r in rows if r["combo"]["arm"] == arm), None)


def _acc(row: dict | None) -> tuple[float, float, int]:
    """(mean, std, seeds) of a row's final accuracy."""
    if row is None or row["final_accuracy"]["mean"] is None:
        return float("nan"), float("nan"), 0
    f = row["final_accuracy"]
    return f["mean"], f["std"], f["n"]


def compare(a: dict | None, b: dict | None) -> tuple[float, str]:
    """(mean_a - mean_b, verdict): 'holds' when a beats b by more than the seeds' noise (the larger
    standard error of the two means), 'does not hold' when b beats a by that much, else 'within noise'."""
    ma, sa, na = _acc(a)
    mb, sb, nb = _acc(b)
    if not (na and nb):
        return float("nan"), "not measured"
    diff = ma - mb
    noise = max(sa / max(na, 1) ** 0.5, sb / max(nb, 1) ** 0.5, 1e-9)
    return diff, "holds" if diff > noise else "does not hold" if diff < -noise else "within noise"


def _pct(v: float) -> str:
    return "-" if v != v else f"{v:.1%}"


def _pts(v: float) -> str:
    return "-" if v != v else f"{v * 100:+.1f} pts"


def claims(rows: list[dict], grid: Grid, before: dict | None, full_diag: dict | None, models: dict) -> list[dict]:
    """The paper's claims against the lab's measurements: {claim, paper, lab, verdict}."""
    out = []
    esr, full, prefix_mask = _row(rows, f"esr_k{grid.k}"), _row(rows, "full"), _row(rows, "prefix_mask")

    def add(claim, paper, lab_text, verdict):
        out.append({"claim": claim, "paper": paper, "lab": lab_text, "verdict": verdict})

    diff, verdict = compare(esr, full)
    add("ESR beats a full rollout", "MATH avg@4 65.85 vs 62.35 (Qwen LoRA); 27.20 vs 22.95 (Gemma)",
        f"K={grid.k}: {_pct(_acc(esr)[0])} ± {_pct(_acc(esr)[1])} vs {_pct(_acc(full)[0])} ± {_pct(_acc(full)[1])} ({_pts(diff)})",
        verdict)
    esr_rows = [r for r in (_row(rows, f"esr_k{k}") for k in grid.ks) if r is not None and _acc(r)[2]]
    if len(esr_rows) > 1:
        means = [_acc(r)[0] for r in esr_rows]
        worst_std = max(_acc(r)[1] for r in esr_rows)
        spread = max(means) - min(means)
        add("ESR's accuracy is flat in K", "K=50/100/150/200: 66.65/65.85/66.65/66.05",
            "K=" + "/".join(str(k) for k in grid.ks) + ": " + "/".join(_pct(m) for m in means) + f" (range {spread * 100:.1f} pts)",
            "holds" if spread <= max(0.03, 2 * worst_std) else "does not hold")
    if esr and full and esr["step_s"] and full["step_s"]:
        ratio = full["step_s"] / esr["step_s"]
        add("ESR's step is much faster", "8 s vs 194 s per step (24x), generation 5 s vs 180 s",
            f"{esr['step_s']:.2f} s vs {full['step_s']:.2f} s per step ({ratio:.1f}x)", "holds" if ratio > 1.5 else "does not hold")
    if prefix_mask and esr:
        diff, verdict = compare(prefix_mask, esr)
        add("Selection, not speed: a full rollout with the loss on its first K tokens matches ESR",
            "(not measured in the paper; the issue's ablation)",
            f"prefix_mask {_pct(_acc(prefix_mask)[0])} vs ESR {_pct(_acc(esr)[0])} ({_pts(diff)})",
            "holds" if verdict == "within noise" else f"does not hold (prefix_mask {'better' if diff > 0 else 'worse'})")
    for rules, claim, paper in (
            (SCORE_RULES, "Position is not KL or entropy in disguise: the first K tokens beat the K chosen by a score",
             "prefix 65.85 vs top teacher entropy 63.30, top student entropy 62.70, top reverse KL 53.35, products 55-58"),
            (("middle", "last", "random"), "Early tokens beat middle, last and random ones",
             "prefix 65.85 vs random 63.05, middle 47.80, last 50.35")):
        others = [(rule, _row(rows, rule)) for rule in rules if _row(rows, rule) is not None]
        if prefix_mask and others:
            lines, verdicts = [], []
            for rule, row in others:
                diff, verdict = compare(prefix_mask, row)
                lines.append(f"{rule} {_pct(_acc(row)[0])} ({_pts(-diff)})")
                verdicts.append(verdict)
            summary = "holds" if all(v == "holds" for v in verdicts) else (
                "does not hold" if "does not hold" in verdicts else "partly (some within noise)")
            add(claim, paper, f"prefix_mask {_pct(_acc(prefix_mask)[0])}; " + ", ".join(lines), summary)
    progressive = next((r for r in rows if r["combo"]["arm"].startswith("progressive")), None)
    if progressive and esr:
        diff, verdict = compare(progressive, esr)
        add("A progressive K schedule", "tried (K from 1 to 200), no figure given",
            f"progressive {_pct(_acc(progressive)[0])} vs fixed K={grid.k} {_pct(_acc(esr)[0])} ({_pts(diff)})",
            {"holds": "better than fixed", "does not hold": "worse than fixed", "within noise": "same as fixed"}.get(verdict, verdict))
    for reference in grid.adaptive:
        name = adaptive_arm(reference)
        adaptive = _row(rows, name)
        if adaptive and esr:
            diff, verdict = compare(adaptive, esr)
            add(f"A K that adapts during training (rollout_tokens=adaptive, adaptive_reference={reference})",
                "ADWIN (arXiv 2605.28396): up to 4.1x cheaper than full OPD at the same accuracy; not in the ESR paper",
                f"{name} {_pct(_acc(adaptive)[0])} vs fixed K={grid.k} {_pct(_acc(esr)[0])} ({_pts(diff)})",
                {"holds": "better than fixed", "does not hold": "worse than fixed", "within noise": "same as fixed"}.get(verdict, verdict))
    for rule in grid.weights:
        weighted = _row(rows, f"full_{rule}")
        if weighted and full:
            diff, verdict = compare(weighted, full)
            add(f"Soft token weights on full rollouts (token_weight={rule})",
                "IW-OPD (arXiv 2606.22600): the first 30% of tokens carry about all of the gain" if rule.startswith("iw_opd")
                else "(a soft form of ESR's prefix; not in either paper)",
                f"{rule} {_pct(_acc(weighted)[0])} vs unweighted full {_pct(_acc(full)[0])} ({_pts(diff)})",
                {"holds": "better than unweighted", "does not hold": "worse than unweighted",
                 "within noise": "same as unweighted"}.get(verdict, verdict))
    stable = [(name, _row(rows, name)) for name in ("full", f"esr_k{grid.k}")]
    if all(r and r["best_accuracy"]["mean"] is not None for _, r in stable):
        drops = {name: r["best_accuracy"]["mean"] - r["final_accuracy"]["mean"] for name, r in stable}
        add("Full rollouts are less stable (drop from best to final)", "full rollout collapsed in 7 settings, ESR within 3 pts of best",
            f"best - final: full {drops['full'] * 100:.1f} pts, ESR {drops[f'esr_k{grid.k}'] * 100:.1f} pts",
            "holds" if drops["full"] > drops[f"esr_k{grid.k}"] + 0.03 else "does not hold (no collapse here)")
    if before:
        decay = before["decay"]
        first, last = decay["teacher_continues_student"][0], decay["teacher_continues_student"][-1]
        add("Teacher decay: the teacher continuing a student's prefix gets worse as the prefix grows",
            "65.30 / 62.70 / 56.30 / 51.75 at k = 0 / 100 / 200 / 300",
            " / ".join(_pct(a) for a in decay["teacher_continues_student"]) + " at k = " + " / ".join(map(str, decay["ks"]))
            + f" (n={decay['n']})", "holds" if last < first - 0.05 else "does not hold")
        profile = before["profile"]
        lengths = before["median_lengths"]["student"]
        k = grid.k
        share = profile["kl_share_without_first"].get(str(k))
        if share is not None:
            add(f"The first tokens hold a large share of the KL (first {k} of a median {lengths:.0f})",
                "first 100 tokens: 44-46% of the KL (about 1/3 of the length or less)",
                f"{share:.1%} without position 0, {profile['kl_share'].get(str(k), float('nan')):.1%} with it "
                f"(position 0 alone: {_pct(profile['first_position_kl_share'] or float('nan'))}); uniform would be {min(1, k / lengths):.1%}",
                "holds" if share > min(1, k / lengths) + 0.05 else "does not hold")
        cascade = before.get("cascading")
        if cascade:
            rel = _beyond_k(cascade, k, profile["counts"])
            full_rel = (_beyond_k(full_diag["cascading"], k, full_diag["profile"]["counts"])
                        if full_diag and full_diag.get("cascading") else float("nan"))
            add("Cascading alignment: training on the first K tokens lowers the KL beyond K",
                "-30 to -40% at positions beyond K, fresh rollouts before vs after",
                f"mean KL per token beyond K={k}, after vs before: ESR {rel:+.0%}, full rollout {full_rel:+.0%}",
                "holds" if rel < -0.1 else "does not hold")
        sub = before["submode"]
        if "trained_student" in sub:
            base, after = sub["student"]["equal_top1"], sub["trained_student"]["equal_top1"]
            full_after = full_diag["submode"]["trained_student"]["equal_top1"] if full_diag and "trained_student" in full_diag["submode"] else float("nan")
            add("Sub-mode commitment: on the highest-KL tokens the ESR student's top-1 is the teacher's more often",
                "equal to the teacher's top-1: ESR 41.9%, full 45.7%, base 28.6%",
                f"ESR {after:.1%}, full {_pct(full_after)}, base {base:.1%}", "holds" if after > base + 0.02 else "does not hold")
    return out


def _beyond_k(cascade: dict, k: int, before_counts: list[int]) -> float:
    """Relative change of the mean KL per token at positions >= k, after vs before (bucket means
    weighted by their token counts; a bucket's own relative change is unstable where its KL is ~0)."""
    def mean(values, counts):
        pairs = [(v, n) for start, v, n in zip(cascade["bucket_starts"], values, counts) if start >= k and v is not None and v == v]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else float("nan")

    before = mean(cascade["before"], before_counts)
    after = mean(cascade["after"], cascade["after_profile"]["counts"])
    return after / before - 1 if before and before == before else float("nan")


# ---------------------------------------------------------------- report

def plot_arms(rows: list[dict], models: dict, path: Path) -> Path:
    """Final accuracy of every arm (mean and the seeds' spread), with the student before and the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["combo"]["arm"] for r in rows]
    means = [r["final_accuracy"]["mean"] if r["final_accuracy"]["mean"] is not None else float("nan") for r in rows]
    lows = [m - (r["final_accuracy"]["min"] if r["final_accuracy"]["min"] is not None else m) for m, r in zip(means, rows)]
    highs = [(r["final_accuracy"]["max"] if r["final_accuracy"]["max"] is not None else m) - m for m, r in zip(means, rows)]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    colours = ["tab:orange" if n.startswith(("esr", "progressive", "adaptive")) else "tab:grey" if n == "full" else "tab:blue"
               for n in names]
    ax.barh(y, means, xerr=[lows, highs], color=colours, capsize=2)
    ax.set_yticks(y, names, fontsize=8)
    ax.axvline(models["student"]["accuracy"], color="black", linestyle="--", linewidth=1, label="student before")
    ax.set_xlabel("final eval accuracy: mean over seeds, bars from min to max")
    ax.set_xlim(0, max(0.5, max((m for m in means if m == m), default=0) + 0.1))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_seconds(runs: list[sweep.Run]) -> float:
    """Wall-clock time of the grid: from the first run's config.yaml to the last run's summary.json."""
    starts = [(r.run_dir / "config.yaml").stat().st_mtime for r in runs if (r.run_dir / "config.yaml").is_file()]
    ends = [(r.run_dir / "summary.json").stat().st_mtime for r in runs if (r.run_dir / "summary.json").is_file()]
    return max(ends) - min(starts) if starts and ends else float("nan")


def report_markdown(models: dict, grid: Grid, rows: list[dict], table: str, found: list[dict], pngs: dict[str, str],
                    seconds: float, command: str, only: tuple[str, ...] | None = None) -> str:
    t, s = models["teacher"], models["student"]
    lines = [
        "# esrdistill lab repro", "",
        f"`{command}`: {len(rows)} arms x {grid.seeds} seeds, {grid.steps} steps of "
        f"{_batch_size(grid)} prompts each; " + (f"the arms {', '.join(only)} ran" if only else "the grid ran")
        + f" in {seconds / 60:.0f} min of wall-clock time on this machine (2 CPU cores, 2 runs at a time; models and "
        "diagnostics not included)" + ("; the other arms' rows are those of the earlier lab.json of this directory "
                                       "(the same models)." if only else "."), "",
        "## The lab", "",
        f"Task: a two-term recurrence modulo 10 (r = x op y, then (x, y) = (y, r); op in '{models['task']['ops']}'), "
        f"{models['task']['steps_min']}-{models['task']['steps_max']} steps, each written on its own line, the answer boxed: "
        f"the teacher's responses are {t['len_mean']:.0f} tokens on average (character tokenizer). See `esrdistill/commands/lab.py`.",
        f"Teacher: Llama {models['teacher']['hidden']}x{models['teacher']['layers']}, {models['teacher']['steps']} steps; "
        f"{t['accuracy']:.1%} greedy ({t['ci'][0]:.1%}-{t['ci'][1]:.1%}, {t['problems']} problems), trained in "
        f"{models.get('train_seconds', {}).get('teacher', float('nan')) / 60:.1f} min.",
        f"Student: Llama {models['student']['hidden']}x{models['student']['layers']}, {models['student']['steps']} steps; "
        f"{s['accuracy']:.1%} greedy ({s['ci'][0]:.1%}-{s['ci'][1]:.1%}), trained in "
        f"{models.get('train_seconds', {}).get('student', float('nan')) / 60:.1f} min.", "",
        "## Claims", "",
        "| claim | the paper | the lab | verdict |", "|---|---|---|---|",
        *[f"| {c['claim']} | {c['paper']} | {c['lab']} | {c['verdict']} |" for c in found], "",
        "Verdicts: a difference 'holds' when it exceeds the seeds' noise (the larger standard error of the two means), "
        "'within noise' otherwise.", "",
        "## Every arm", "", table, "",
    ]
    for title, png in pngs.items():
        lines += [f"### {title}", "", f"![{title}]({png})", ""]
    lines += ["## What differs from the paper", "",
              "- Models of 0.45M parameters trained from scratch on one synthetic task of 1,200 distinct problems (the "
              "models see most of them in training), not 1.5-14B chat models on open-ended math; full fine-tuning, fp32, on a CPU.",
              "- Temperature 1 and no nucleus cut for rollouts (the paper: 0.7 and 0.95); greedy evaluation.",
              f"- {grid.steps} steps of {_batch_size(grid)} prompts (the paper: 200 of 16), "
              f"K={grid.k} of about {t['len_mean']:.0f} tokens (the paper: 100 of up to 3,584).",
              "- A mistake at one step of this task carries into every later line, so late positions depend on early "
              "ones more strictly than in free-form reasoning.", ""]
    return "\n".join(lines)


def earlier_rows(root: Path, grid: Grid, models: dict, only: tuple[str, ...]) -> list[dict]:
    """The rows of the arms not in `only` from OUT/lab.json, the report of an earlier `lab repro`, refused when
    that report's models are not these (another CPU can train other models from the same specification)."""
    path = root / "lab.json"
    earlier = json.loads(path.read_text())
    for who in ("teacher", "student"):
        was, now = earlier["models"][who]["accuracy"], models[who]["accuracy"]
        if was != now:
            raise UserError(f"the {who} here solves {now:.1%} of the held-out problems, the one of {path} {was:.1%}: the "
                            "models differ (trained on another machine?), so its rows do not compare with new runs; run "
                            "every arm (without --arms), or the arms they are compared with too (full, esr_k"
                            f"{grid.k}, ...)")
    return [r for r in earlier["rows"] if r["combo"]["arm"] not in only]


def _diagnosed_student(root: Path, grid: Grid, arm: str) -> str:
    """The seed-0 student that the diagnostics named `arm` ("esr" or "full") read."""
    return str(root / "runs" / (f"esr_k{grid.k}" if arm == "esr" else arm) / "seed0" / "final")


def undiagnosable(root: Path, grid: Grid, only: tuple[str, ...]) -> list[str]:
    """The arms whose seed-0 diagnostics a run of just `only` cannot have: no reusable diagnostics.json, no
    trained student on disk, and the arm not among those that will run."""
    missing = []
    for arm, run_arm in (("esr", f"esr_k{grid.k}"), ("full", "full")):
        done = root / "diagnostics" / arm / "diagnostics.json"
        earlier = json.loads(done.read_text()) if done.is_file() else {}
        reusable = (earlier.get("student_after") == _diagnosed_student(root, grid, arm)
                    and earlier.get("problems") == grid.diagnose_problems)
        if not (reusable or run_arm in only or Path(_diagnosed_student(root, grid, arm)).is_dir()):
            missing.append(run_arm)
    return missing


def repro(out: str = "runs/lab", quick: bool = False, parallel: int = 2, say=print, progress: bool = True,
          only: tuple[str, ...] | None = None) -> dict:
    """Models, the grid with seeds, diagnostics, claims; everything under OUT/ with report.md. With `only`, just
    those arms run, and the other arms' rows come from OUT/lab.json (earlier_rows)."""

    grid = QUICK if quick else Grid()
    root = Path(out).expanduser()
    if only:  # before any model trains
        names = [name for name, _ in arms(grid)]
        unknown = [a for a in only if a not in names]
        if unknown:
            raise UserError(f"--arms: no arm {', '.join(unknown)} in the lab's grid; its arms: {', '.join(names)}")
        if not (root / "lab.json").is_file():
            raise UserError(f"--arms runs some arms and takes the others' rows from {root / 'lab.json'}, which does not "
                            "exist: run `esrdistill lab repro` once without --arms (or copy an earlier lab's lab.json "
                            "and diagnostics/ there, for instance docs/lab's)")
        missing = undiagnosable(root, grid, only)
        if missing:
            raise UserError(f"--arms: the claims need the diagnostics of {', '.join(missing)} (seed 0), and neither "
                            f"{root / 'diagnostics'}/<arm>/diagnostics.json nor that run's student is here: copy the "
                            "earlier lab's diagnostics/ with its lab.json, or add those arms to --arms")
    started = time.perf_counter()
    if quick:
        models = lab.models(str(root), teacher=lab.QUICK_TEACHER, student=lab.QUICK_STUDENT, eval_problems=grid.eval_problems,
                            say=say, progress=progress)
    else:
        models = lab.models(str(root), eval_problems=grid.eval_problems, say=say, progress=progress)
    runs = plan(root, grid, only)
    kept = earlier_rows(root, grid, models, only) if only else []
    say(f"[lab] {len(runs)} runs: {len(runs) // grid.seeds} arms x {grid.seeds} seeds, {grid.steps} steps each"
        + (f"; {len(kept)} arms' rows from {root / 'lab.json'}" if only else ""))
    sweep.execute(None, runs, parallel, say)
    order = [name for name, _ in arms(grid)]
    rows = sorted(kept + sweep.aggregate(runs), key=lambda r: order.index(r["combo"]["arm"]))
    table = sweep.markdown(rows, 0)

    say("[lab] diagnostics: teacher decay, profile, cascading alignment and sub-mode commitment (seed 0)")
    diag_dir = root / "diagnostics"
    esr_cfg = load_config(None, run_values(root, grid, f"esr_k{grid.k}", 0))
    def diagnosed(arm: str, prefixes: tuple[int, ...]) -> dict:
        """diagnose() against the seed-0 student of an arm, reused when it already ran on that student."""
        out, after = diag_dir / arm, _diagnosed_student(root, grid, arm)
        if (out / "diagnostics.json").is_file():
            done = json.loads((out / "diagnostics.json").read_text())
            if done.get("student_after") == after and done.get("problems") == grid.diagnose_problems:
                return done
        return diagnose_module.diagnose(esr_cfg, diagnose_module.DiagnoseOptions(
            out=str(out), student_after=after, problems=grid.diagnose_problems, prefixes=prefixes, bucket=8, k=grid.k))

    before = diagnosed("esr", tuple(range(0, esr_cfg.max_new_tokens, 20)))
    full_diag = diagnosed("full", (0,))
    found = claims(rows, grid, before, full_diag, models)

    pngs = {}
    plot_arms(rows, models, root / "arms.png")
    pngs["Final accuracy of every arm (orange: ESR, grey: full rollout, blue: selections and weights on full rollouts)"] = "arms.png"
    for name, title in (("decay.png", "Teacher decay"), ("position_profile.png", "Per-position profile of the base student"),
                        ("kl_share.png", "Share of the KL in the first K tokens"), ("cascading.png", "Cascading alignment (ESR student)"),
                        ("submode.png", "Sub-mode commitment (base and ESR student)")):
        if (diag_dir / "esr" / name).is_file():
            pngs[title] = f"diagnostics/esr/{name}"
    if (diag_dir / "full" / "cascading.png").is_file():
        pngs["Cascading alignment (full-rollout student)"] = "diagnostics/full/cascading.png"
    seconds = time.perf_counter() - started
    command = "esrdistill lab repro" + (" --quick" if quick else "") + (f" --arms {','.join(only)}" if only else "")
    grid_s = grid_seconds(runs)
    (root / "report.md").write_text(report_markdown(models, grid, rows, table, found, pngs, grid_s, command, only))
    (root / "lab.json").write_text(json.dumps({"models": models, "rows": rows, "claims": found, "seconds": seconds, "grid_seconds": grid_s,
                                               "grid": {k: v for k, v in grid.__dict__.items()}}, indent=2, default=str))
    say("\n| claim | lab | verdict |\n|---|---|---|")
    for c in found:
        say(f"| {c['claim']} | {c['lab']} | {c['verdict']} |")
    say(f"\nWrote {root / 'report.md'} ({seconds / 60:.1f} min)")
    if not found:
        raise UserError("the lab measured nothing: see the runs' logs under " + str(root / "runs"))
    return {"rows": rows, "claims": found, "models": models}
