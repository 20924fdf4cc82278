"""`esrdistill study NAME|FILE [--quick] [--out DIR] [--report DIR] [--arms A,B] [--seeds 0,1] [key=value ...]`:
one pair of models, several arms (ESR at some K, full rollouts, ...), each trained on every seed, evaluated on the
same held-out problems; runs.json (one object per run) and report.md (studyreport.py) from what the runs logged.

A study file (the shipped ones: src/esrdistill/configs/study_NAME.yaml) holds `pair` (its name in the report),
`config` (a train config), `arms` ({name: changes to the config}), `seeds`, `target` (the time to this fraction of
the teacher's accuracy is measured), `diagnose` (the diagnostics run once, after the arm it names) and `quick`
(the changes, seeds and arms of a short check). A run gets seed=S and data_seed=S together.

Resumable: a run whose summary.json exists is complete and is not trained again; one that has a checkpoint is
resumed from it (resume=true: the config's save_every sets how much an interruption can lose); the teacher's and
the zero-shot student's accuracies are computed once and kept in OUT/before/ and REPORT/before-NAME.json, the
diagnostics once and kept in REPORT/diagnose-NAME/ (both reused on a fresh checkout while the settings are the same).
Every finished run is added to REPORT/runs.json and the report is rewritten, so a study stopped half-way has its
finished runs reported.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from esrdistill.commands import studyreport
from esrdistill.commands.diagnose import DiagnoseOptions, diagnose
from esrdistill.commands.evaluation import run_eval
from esrdistill.config import Config, ConfigError, load_config, parse_overrides
from esrdistill.rundir import commit
from esrdistill.tracking import read_metrics
from esrdistill.train import TrainingInterrupted, train

STUDIES = {"same": "study_same.yaml", "cross": "study_cross.yaml"}
STUDY_KEYS = {"pair", "about", "config", "arms", "seeds", "target", "diagnose", "quick"}


@dataclass
class Study:
    name: str
    pair: str
    config: dict
    arms: dict[str, dict]
    seeds: list[int]
    target: float = 0.9  # the target accuracy is this fraction of the teacher's
    diagnose: dict = field(default_factory=dict)  # {after: ARM, problems, prefixes, k}; {} = no diagnostics
    about: str = ""
    source: str = ""  # the study file


@dataclass
class StudyRun:
    arm: str
    seed: int
    run_dir: Path
    values: dict  # the run's changes to the study's config


def _fail(source, message: str):
    raise ConfigError(f"study {source}: {message}")


def load_study(spec: str, quick: bool = False) -> Study:
    """A shipped study by name, or a study file; quick=True applies its `quick` section."""
    path = Path(files("esrdistill") / "configs" / STUDIES[spec]) if spec in STUDIES else Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"no study '{spec}': name a shipped one ({', '.join(STUDIES)}) or a study file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        _fail(path, f"not valid YAML: {str(err).splitlines()[0]}")
    if not isinstance(raw, dict):
        _fail(path, "must be a mapping with pair, config, arms and seeds")
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        _fail(path, f"unknown keys {', '.join(sorted(unknown))} (a study has {', '.join(sorted(STUDY_KEYS))})")
    for key, kind in (("config", dict), ("arms", dict), ("seeds", list)):
        if not isinstance(raw.get(key), kind) or not raw[key]:
            _fail(path, f"'{key}' must be a non-empty {kind.__name__}")
    arms = {str(name): dict(changes or {}) for name, changes in raw["arms"].items()}
    seeds = raw["seeds"]
    config = dict(raw["config"])
    if quick:
        q = raw.get("quick") or {}
        config.update(q.get("config") or {})
        seeds = q.get("seeds", seeds)
        keep = q.get("arms")
        if keep:
            missing = [a for a in keep if a not in arms]
            if missing:
                _fail(path, f"quick.arms names {', '.join(missing)}, which are not arms")
            arms = {a: arms[a] for a in keep}
    if not all(isinstance(s, int) and s >= 0 for s in seeds):
        _fail(path, f"seeds must be non-negative integers, got {seeds}")
    target = raw.get("target", 0.9)
    if not isinstance(target, (int, float)) or not 0 < target <= 1:
        _fail(path, f"target is a fraction of the teacher's accuracy in (0, 1], got {target}")
    diagnose = dict(raw.get("diagnose") or {})
    if quick and "diagnose" in (raw.get("quick") or {}):
        diagnose = dict(raw["quick"]["diagnose"] or {})
    if diagnose and diagnose.get("after") not in arms:
        _fail(path, f"diagnose.after must name an arm ({', '.join(arms)}), got {diagnose.get('after')}")
    name = path.stem.removeprefix("study_")
    return Study(name=name, pair=str(raw.get("pair", name)), config=config, arms=arms, seeds=list(seeds),
                 target=float(target), diagnose=diagnose, about=str(raw.get("about", "")).strip(), source=str(path))


def _pick(names: str | None, have: list, kind: str, parse=str) -> list:
    if not names:
        return have
    picked = [parse(n.strip()) for n in names.split(",") if n.strip()]
    missing = [n for n in picked if n not in have]
    if missing:
        raise ConfigError(f"--{kind} {', '.join(map(str, missing))}: the study's {kind} are {', '.join(map(str, have))}")
    return picked


def plan(study: Study, out: Path, overrides: dict, arms: str | None = None, seeds: str | None = None) -> list[StudyRun]:
    """Every seed x arm (seed by seed, each in the arms' order), each config checked now, so that a bad value
    fails before any run starts."""
    for key in ("seed", "data_seed", "run_dir", "resume"):
        if key in overrides or any(key in changes for changes in study.arms.values()):
            raise ConfigError(f"{key} is set by the study itself for each run")
    runs = []
    chosen = _pick(arms, list(study.arms), "arms")
    for seed in _pick(seeds, study.seeds, "seeds", int):  # seed by seed: a study stopped half-way has whole seeds
        for arm in chosen:
            run_dir = out / arm / f"seed{seed}"
            values = {**study.arms[arm], **overrides, "seed": seed, "data_seed": seed, "run_dir": str(run_dir)}
            load_config(str(out / "config.yaml"), values)
            runs.append(StudyRun(arm=arm, seed=seed, run_dir=run_dir, values=values))
    return runs


def before(cfg, out: Path, view: str, say=print, kept: Path | None = None, settings: str = "") -> dict:
    """The accuracy of the config's teacher (view=teacher, with its worked examples) or zero-shot student on the
    held-out problems, computed once and kept in OUT/before/: the teacher's per data seed (its worked examples are
    rows of that seed), the student's once when the problems do not depend on the seed (eval_split). `kept` (the
    report's before-NAME.json) keeps them beside runs.json too, each with the study's `settings` hashed, so that a fresh
    checkout reuses them while the settings are the same."""

    key = f"{view}-data_seed{cfg.data_seed}" if view == "teacher" or not cfg.eval_split else f"{view}-any"
    path = out / "before" / f"{key}.json"
    stored = json.loads(kept.read_text()) if kept is not None and kept.is_file() else {}
    if path.is_file():
        record = json.loads(path.read_text())
    elif stored.get(key, {}).get("settings") == settings:
        record = {k: v for k, v in stored[key].items() if k != "settings"}
        say(f"[study] {view} accuracy before training ({key}): kept from {kept}")
    else:
        say(f"[study] {view} accuracy before training ({key}) ...")
        result = run_eval(cfg, cfg.teacher if view == "teacher" else cfg.student, view=view, progress=cfg.progress)
        correct = sum(sum(p.correct) for p in result.problems)
        record = {"accuracy": result.accuracy, "ci": list(result.accuracy_ci), "correct": correct,
                  "problems": result.n_problems, "len_mean": result.len_mean, "cut_frac": result.cut_frac}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    if kept is not None and stored.get(key) != {**record, "settings": settings}:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({**stored, key: {**record, "settings": settings}}, indent=1, sort_keys=True))
    return record


def _provenance(run_dir: Path, code: str | None = None, command: str | None = None) -> dict:
    """{"commits", "commands"} that trained a run (RUN/study.json; a resumed run lists each); for a run trained
    without it, the given ones."""
    path = run_dir / "study.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"commits": [code] if code else [], "commands": [command] if command else []}


def _train_seconds(row: dict) -> float:
    """A step's training time: time/step_s less the evaluation and the checkpoint write it holds."""
    return float(row.get("time/step_s", 0.0)) - float(row.get("time/eval_s", 0.0)) - float(row.get("time/save_s", 0.0))


def answer_forms(run_dir: Path) -> dict:
    """From the run's last evaluation (eval/step_N.json, every response): the share of responses with an answer
    the grader could extract (the asked-for format) and the share whose last number is the reference (the sum
    right, in whatever format): what a 0% is made of."""
    files = sorted((run_dir / "eval").glob("step_*.json"))
    if not files:
        return {"after_answer_extracted": None, "after_last_number_right": None}
    problems = json.loads(files[-1].read_text())["problems"]
    n = sum(len(p["responses"]) for p in problems)

    def last_number(text: str) -> str | None:
        found = re.findall(r"-?\d+", text)
        return found[-1] if found else None

    return {"after_answer_extracted": sum(a is not None for p in problems for a in p["answers"]) / n,
            "after_last_number_right": sum(last_number(r) == p["reference"] for p in problems for r in p["responses"]) / n}


def record(study: Study, run: StudyRun, cfg, teacher: dict, student: dict, code: str) -> dict:
    """One run's object in runs.json, from its metrics.jsonl and the accuracies before training."""
    rows = read_metrics(run.run_dir)
    seconds, tokens, curve = 0.0, 0, [{"step": 0, "seconds": 0.0, "generated_tokens": 0, "accuracy": student["accuracy"]}]
    for row in rows:
        seconds += _train_seconds(row)
        tokens += int(row.get("rollout/tokens", 0))
        if isinstance(row.get("eval/accuracy"), (int, float)):
            curve.append({"step": row["step"], "seconds": seconds, "generated_tokens": tokens, "accuracy": row["eval/accuracy"]})
    last_eval = next((r for r in reversed(rows) if isinstance(r.get("eval/accuracy"), (int, float))), None)
    after = last_eval["eval/accuracy"] if last_eval else None
    target = study.target * teacher["accuracy"]
    hit = next((point for point in curve if point["accuracy"] >= target and target > 0), None)
    phases = sorted({k[5:-2] for row in rows for k in row if k.startswith("time/") and k.endswith("_s") and k != "time/step_s"})
    return {
        "pair": study.pair, "study": study.name, "arm": run.arm,
        "rollout_tokens": cfg.rollout_tokens, "max_new_tokens": cfg.max_new_tokens, "token_select": cfg.token_select,
        "select_tokens": cfg.select_tokens if cfg.token_select != "prefix" else None, "loss": cfg.loss,
        "token_weight": cfg.token_weight, "k_per_step": [int(r["rollout/k"]) for r in rows if "rollout/k" in r]
        if cfg.rollout_tokens == "adaptive" else None,
        "adaptive_reference": cfg.adaptive_reference if cfg.rollout_tokens == "adaptive" else None,
        "seed": cfg.seed, "data_seed": cfg.data_seed, "student": cfg.student, "teacher": cfg.teacher, "dataset": cfg.dataset,
        "teacher_accuracy": teacher["accuracy"], "teacher_ci": teacher["ci"],
        "student_before": student["accuracy"], "student_before_ci": student["ci"],
        "student_after": after,
        "student_after_ci": [last_eval["eval/accuracy_ci_low"], last_eval["eval/accuracy_ci_high"]] if last_eval else None,
        "eval_problems": int(last_eval["eval/n"]) if last_eval else student["problems"],
        "best_accuracy": max(p["accuracy"] for p in curve), "best_minus_final": None if after is None else
        max(p["accuracy"] for p in curve) - after,
        "steps": rows[-1]["step"] if rows else 0, "batch_size": cfg.batch_size,
        "seconds": seconds, "seconds_with_eval": sum(float(r.get("time/step_s", 0.0)) for r in rows),
        "seconds_per_step": seconds / len(rows) if rows else None,
        "phase_seconds_per_step": {p: sum(float(r.get(f"time/{p}_s", 0.0)) for r in rows) / len(rows) for p in phases},
        "generated_tokens": tokens, "teacher_scored_tokens": tokens,  # the teacher reads every generated token
        "loss_tokens": sum(int(r.get("loss/tokens", r.get("rollout/tokens", 0))) for r in rows),
        "mean_response_tokens": sum(float(r.get("rollout/len_mean", 0.0)) for r in rows) / len(rows) if rows else None,
        "cut_frac": sum(1.0 - float(r.get("rollout/eos_frac", 0.0)) for r in rows) / len(rows) if rows else None,
        "len_per_step": [round(float(r.get("rollout/len_mean", 0.0)), 2) for r in rows],
        "cut_per_step": [round(1.0 - float(r.get("rollout/eos_frac", 0.0)), 4) for r in rows],
        "after_len_mean": last_eval.get("eval/len_mean") if last_eval else None, **answer_forms(run.run_dir),
        "after_cut_frac": last_eval.get("eval/cut_frac") if last_eval else None,
        "target_accuracy": target, "seconds_to_target": hit["seconds"] if hit else None,
        "tokens_to_target": hit["generated_tokens"] if hit else None, "steps_to_target": hit["step"] if hit else None,
        "curve": curve, "commit": code, "config_key": config_key(cfg),
    }


def config_key(cfg) -> str:
    """A run's settings, hashed (its run directory and progress bars left out): a record in runs.json stands for a
    run whose directory is gone (another machine, a fresh checkout) only when the settings are the same. Settings at
    their default are left out too, so that a setting added later (at a default that changes nothing) keeps every
    earlier record's key; the code that trained a record is its `commit`."""
    defaults = asdict(Config())
    values = {k: v for k, v in asdict(cfg).items() if k not in ("run_dir", "resume", "progress") and v != defaults[k]}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _records(report_dir: Path) -> list[dict]:
    path = report_dir / "runs.json"
    return json.loads(path.read_text()) if path.is_file() else []


def save_record(report_dir: Path, rec: dict) -> list[dict]:
    """Put one run's object into REPORT/runs.json (replacing the same study, arm and seed); return them all."""
    path = report_dir / "runs.json"
    records = _records(report_dir)
    records = [r for r in records if (r["study"], r["arm"], r["seed"]) != (rec["study"], rec["arm"], rec["seed"])] + [rec]
    report_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return records


def _same_diagnostics(earlier: dict, study: Study, out: Path, values: dict) -> bool:
    """Whether the diagnostics in the report were made with the study's settings (models, task, rollout limit,
    temperature, problems, prefixes, bucket, K) against a trained student of `diagnose.after` (any seed)."""
    d, options = study.diagnose, earlier.get("options", {})
    cfg = load_config(str(out / "config.yaml"), {**study.arms[d["after"]], **values})
    k = cfg.rollout_tokens if isinstance(cfg.rollout_tokens, int) else None
    students = {str(out / d["after"] / f"seed{seed}" / "final") for seed in study.seeds}
    return ((earlier.get("teacher"), earlier.get("student"), earlier.get("dataset"), earlier.get("max_new_tokens"),
             earlier.get("temperature"), earlier.get("student_after")) in
            {(cfg.teacher, cfg.student, cfg.dataset, cfg.max_new_tokens, cfg.temperature, s) for s in students}
            and options.get("problems") == int(d.get("problems", 32)) and options.get("bucket") == int(d.get("bucket", 8))
            and list(options.get("prefixes", ())) == list(d.get("prefixes", (0, 25, 50, 100, 200))) and options.get("k") == k)


def _diagnose(study: Study, runs: list[StudyRun], out: Path, values: dict, say, report_dir: Path) -> Path | None:
    """The diagnostics once per pair (decay, KL share, cascading alignment against the trained student of
    `diagnose.after`'s first seed), in OUT/diagnose/; skipped when done, when the report already holds them for the
    same settings (a fresh checkout), or when that run is not finished."""

    d = study.diagnose
    if not d:
        return None
    target = out / "diagnose"
    if (target / "diagnostics.json").is_file():
        return target
    kept = report_dir / f"diagnose-{studyreport.slug(study.name)}" / "diagnostics.json"
    if kept.is_file() and _same_diagnostics(json.loads(kept.read_text()), study, out, values):
        say(f"[study] diagnostics kept from {kept.parent} (the same settings, a student of {d['after']})")
        return None
    after = next((r for r in runs if r.arm == d["after"] and (r.run_dir / "final").is_dir()), None)
    if after is None:
        say(f"[study] diagnostics wait for a finished run of {d['after']}")
        return None
    say(f"[study] diagnostics: decay, KL share and cascading alignment (after: {after.arm} seed {after.seed}) ...")
    cfg = load_config(str(out / "config.yaml"), {**study.arms[d["after"]], **values, "seed": after.seed,
                                                  "data_seed": after.seed, "run_dir": str(target)})
    options = DiagnoseOptions(out=str(target), student_after=str(after.run_dir / "final"), problems=int(d.get("problems", 32)),
                              prefixes=tuple(d.get("prefixes", (0, 25, 50, 100, 200))), bucket=int(d.get("bucket", 8)),
                              k=cfg.rollout_tokens if isinstance(cfg.rollout_tokens, int) else None)
    diagnose(cfg, options)
    return target


def study(spec: str, overrides: list[str] | None = None, out: str | None = None, report: str | None = None,
          quick: bool = False, arms: str | None = None, seeds: str | None = None, say=print) -> list[dict]:
    """Plan, train what is not done (resuming what was interrupted), record, diagnose once, report."""

    st = load_study(spec, quick)
    values = parse_overrides(overrides or [])
    out_dir = Path(out or f"runs/study/{st.name}{'-quick' if quick else ''}").expanduser()
    report_dir = Path(report).expanduser() if report else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config_text = yaml.safe_dump({**st.config, **values}, sort_keys=False)
    (out_dir / "config.yaml").write_text(config_text)
    runs = plan(st, out_dir, values, arms, seeds)
    code = commit()
    command = " ".join(["esrdistill study", spec, *(["--quick"] if quick else []), *([f"--out {out}"] if out else []),
                        *([f"--report {report}"] if report else []), *([f"--arms {arms}"] if arms else []),
                        *([f"--seeds {seeds}"] if seeds else []), *(overrides or [])])
    say(f"[study] {st.name}: {st.pair}; {len(runs)} runs ({len(dict.fromkeys(r.arm for r in runs))} arms x "
        f"{len(dict.fromkeys(r.seed for r in runs))} seeds) in {out_dir}; "
        f"report in {report_dir} (code {code})")
    kept = {(r["study"], r["arm"], r["seed"]): r for r in _records(report_dir)}
    accuracies = report_dir / f"before-{studyreport.slug(st.name)}.json"
    settings = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    for index, run in enumerate(runs, start=1):
        cfg = load_config(str(out_dir / "config.yaml"), run.values)
        done = (run.run_dir / "summary.json").is_file()
        earlier = kept.get((st.name, run.arm, run.seed))
        if not done and not run.run_dir.exists() and earlier and earlier.get("config_key") == config_key(cfg):
            say(f"[study] {run.arm} seed {run.seed}: kept from {report_dir / 'runs.json'} (its run directory is not here)")
            continue
        teacher, student = (before(cfg, out_dir, view, say, accuracies, settings) for view in ("teacher", "student"))
        if not done:
            resume = (run.run_dir / "checkpoints").is_dir() and any((run.run_dir / "checkpoints").iterdir())
            say(f"[study] {index}/{len(runs)} {run.arm} seed {run.seed}" + (" (resuming)" if resume else "") + " ...")
            if run.run_dir.exists() and not resume:  # started, nothing saved: start it again
                import shutil

                shutil.rmtree(run.run_dir)
            provenance = _provenance(run.run_dir) if resume else {"commits": [], "commands": []}
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "study.json").write_text(json.dumps(  # the code and command that trained it, kept
                {"commits": list(dict.fromkeys(provenance["commits"] + [code])),
                 "commands": list(dict.fromkeys(provenance["commands"] + [command]))}, indent=1))
            try:
                train(load_config(str(out_dir / "config.yaml"), {**run.values, "resume": resume}))
            except TrainingInterrupted as stop:  # the same command continues it; finished runs are kept
                raise TrainingInterrupted(stop.step, stop.checkpoint, f"`{command}`") from None
        made = _provenance(run.run_dir, code, command)
        rec = {**record(st, run, cfg, teacher, student, "+".join(made["commits"])), "command": " then ".join(made["commands"]),
               **({"note": made["note"]} if made.get("note") else {})}  # a person's word on the run, in RUN/study.json
        say(f"[study] {run.arm} seed {run.seed}: {rec['student_before']:.1%} -> "
            + (f"{rec['student_after']:.1%}" if rec["student_after"] is not None else "no evaluation")
            + f" (teacher {rec['teacher_accuracy']:.1%}), {rec['seconds']:.0f} s of training")
        records = save_record(report_dir, rec)
        studyreport.write(report_dir, records)
    diagnostics = _diagnose(st, runs, out_dir, values, say, report_dir)
    if diagnostics is not None:
        studyreport.keep_diagnostics(report_dir, st.name, diagnostics)
    records = _records(report_dir)
    path = studyreport.write(report_dir, records)
    say(f"[study] wrote {path} and {report_dir / 'runs.json'}")
    return [r for r in records if r["study"] == st.name]
