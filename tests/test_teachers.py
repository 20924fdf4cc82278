"""Several teachers in one run (teachers.py): each row is scored by its own teacher, and the loss is the same
whatever the routing."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from esrdistill import build, order, routing, tracking
from esrdistill.config import TEACHER_KEYS, ConfigError, make_config
from esrdistill.data import DataError, Problem
from esrdistill.losses import log_probs
from esrdistill.teachers.cross import CrossTokenizer
from esrdistill.teachers.protocol import LossSettings
from esrdistill.teachers.routed import Routed, TeacherPrompt
from esrdistill.teachers.same import SameTokenizer
from helpers import make_model, make_tokenizer, record_teachers, save_pair, tiny_overrides

# ---- the Routed teacher on its own ------------------------------------------------------------------

def _batch(tok, rows: int = 6, width: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    letters = tok.convert_tokens_to_ids(list("abcdefgh 0123456789+="))
    responses = torch.tensor(letters)[torch.randint(len(letters), (rows, width), generator=g)]
    lengths = torch.tensor([width, 3, width - 1, 5, 2, width][:rows])
    mask = (torch.arange(width) < lengths[:, None]).float()
    prompts = [tok("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")["input_ids"][: 8 + b] for b in range(rows)]
    return prompts, responses * mask.long(), mask


def _student_logp(vocab, rows, width, seed=3):
    g = torch.Generator().manual_seed(seed)
    return log_probs(torch.randn(rows, width, vocab, generator=g), vocab).requires_grad_()


@pytest.fixture(scope="module")
def three_teachers(byte_level):
    """{a, b: two tiny teachers on the student's tokenizer; c: one with another tokenizer} and that tokenizer."""
    tok = make_tokenizer()
    same = {name: SameTokenizer(make_model(len(tok), seed), tok.pad_token_id, len(tok), 2, LossSettings())
            for name, seed in (("a", 2), ("b", 5))}
    cross = CrossTokenizer(make_model(len(byte_level), 7), tok, byte_level, [tok.eos_token_id], [byte_level.eos_token_id], 2,
                           LossSettings())
    return {**same, "c": cross}, tok


@pytest.mark.parametrize("names", [("a", "b"), ("a", "c")])
@pytest.mark.parametrize("hidden", [False, True])
def test_each_row_gets_its_own_teachers_scores_loss_and_metrics(three_teachers, names, hidden):
    every, tok = three_teachers
    subs = {n: every[n] for n in names}
    prompts, responses, mask = _batch(tok)
    route = [names[0], names[1], names[1], names[0], names[1], names[0]]
    routed = Routed(subs)
    plan = routed.plan([TeacherPrompt(p, n) for p, n in zip(prompts, route)], responses, mask)
    idx, width = [4, 0, 1, 3], 6  # a micro-batch, in the loop's order
    scores = routed.score(plan, idx, width, hidden=hidden)
    student = _student_logp(len(tok), len(idx), width)
    tokens = responses[idx, :width]
    chunks = [slice(0, 4), slice(4, width)] if hidden else [slice(0, width)]
    per_token = torch.cat([routed.compare(student[:, c], scores.chunk(c), tokens[:, c]).per_token for c in chunks], dim=1)
    comparison = routed.compare(student[:, :4], scores.chunk(slice(0, 4)), tokens[:, :4]) if hidden else \
        routed.compare(student, scores, tokens)

    for name in names:  # each teacher alone on its rows
        mine = [i for i, r in enumerate(idx) if route[r] == name]
        rows = [r for r in idx if route[r] == name]
        alone = subs[name].plan([prompts[r] for r in rows], responses[rows], mask[rows])
        own_scores = subs[name].score(alone, list(range(len(rows))), width, hidden=hidden)
        own = torch.cat([subs[name].compare(student[mine][:, c], own_scores.chunk(c), tokens[mine][:, c]).per_token
                         for c in chunks], dim=1)
        torch.testing.assert_close(per_token[mine], own, rtol=0, atol=1e-6)
        assert torch.equal(scores.mask[mine].cpu(), alone.mask[:, :width])
        counted = comparison.metrics[f"kl/reverse/{name}:den"]
        assert counted[mine].sum() > 0 and counted[[i for i in range(len(idx)) if i not in mine]].sum() == 0
    assert plan.ratios[f"teacher/rows/{names[0]}"] == (3.0, 0.0) and plan.ratios[f"teacher/rows/{names[1]}"] == (3.0, 0.0)
    # the gradient reaches the student's log-probs of every row
    per_token.sum().backward()
    assert (student.grad.abs().sum((1, 2)) > 0).all()
    # the keys each kind reports are the ones its metric_keys list
    kinds = {subs[n].kind for n in names}
    if kinds == {"same"}:
        assert {k for k in comparison.metrics if ":" not in k} == set(subs[names[0]].metric_keys)
    else:
        assert "xtok/student_mapped_mass:num" in comparison.metrics and "kl/sampled:den" in comparison.metrics
        assert "xtok/aligned_frac" in plan.ratios and "xtok/aligned_frac/c" in plan.ratios


def test_each_teacher_reports_the_metrics_and_ratios_it_declares(three_teachers):
    every, tok = three_teachers
    prompts, responses, mask = _batch(tok)
    for teacher in [*every.values(), Routed(dict(every))]:
        routed = isinstance(teacher, Routed)
        names = list(every)
        plan = teacher.plan([TeacherPrompt(p, names[b % len(names)]) for b, p in enumerate(prompts)] if routed else prompts,
                            responses, mask)
        scores = teacher.score(plan, [0, 1, 2], 5)
        keys = set(teacher.compare(_student_logp(len(tok), 3, 5), scores, responses[:3, :5]).metrics)
        if routed:  # each key its teachers declare, over the positions of those that report it
            assert {k.split(":")[0] for k in keys} >= set(teacher.metric_keys)
        else:
            assert keys == set(teacher.metric_keys)
        assert set(plan.ratios) == set(teacher.ratio_keys)
        assert teacher.topk_keys == ()


def test_a_row_naming_an_unknown_teacher_is_a_clear_error():
    cfg = make_config({"teachers": {"math": "m1", "logic": "m2"}, "teacher_field": "source"})
    problems = [Problem("q", "1", {"source": "math"}), Problem("q", "1", {}), Problem("q", "1", {"metadata": {"source": "logic"}})]
    assert routing.route(cfg, problems) == ["math", "math", "logic"]  # no value: default_teacher (the first)
    with pytest.raises(DataError, match="names no teacher: the teachers are math, logic"):
        routing.route(cfg, problems + [Problem("q", "1", {"source": "poetry"})])
    with pytest.raises(DataError, match="teacher_field 'source' is in no row"):
        routing.route(cfg, [Problem("q", "1", {"question": "q"})])


def test_teachers_config_keys():
    cfg = make_config({"teachers": "{math: m1, logic: {model: m2, system_prompt: Think., fewshot: 2}}",
                       "default_teacher": "logic", "teacher_field": "source"})  # the command line's inline YAML
    assert cfg.teacher == "m2"  # the default teacher's model: what evaluation and diagnostics read
    views = routing.views(cfg)
    assert views["logic"].teacher_system_prompt == "Think." and views["logic"].teacher_fewshot == 2
    assert views["math"].teacher == "m1" and views["math"].teacher_fewshot == 0
    assert routing.fewshot_counts(cfg) == {"math": 0, "logic": 2}  # routed: each teacher's examples are its own rows
    assert routing.fewshot_counts(make_config({"teachers": cfg.teachers})) == 2  # not routed: the most any one sees
    assert make_config({**cfg.__dict__}).teacher == "m2"  # a saved config loads again
    for bad, message in [({"teacher": "other"}, "give one"), ({"default_teacher": "x"}, "not one of teachers"),
                         ({"teachers": {"a": "m", "b": "http://localhost:8000"}, "loss_chunk": 8}, "served teacher \\(b\\)"),
                         ({"teachers": {"a/b": "m"}}, "without '/'"), ({"teachers": {"a": {"modle": "m"}}}, "mapping of"),
                         ({"rollout_tokens": "auto"}, "rollout_tokens=auto"),
                         ({"teacher_offload": True, "loss_chunk": 8}, "teacher_offload with loss_chunk")]:
        with pytest.raises(ConfigError, match=message):
            make_config({"teachers": {"math": "m1", "logic": "m2"}, **bad})
    assert set(routing.VIEW_KEYS) == set(TEACHER_KEYS)
    with pytest.raises(ConfigError, match="give them with teachers"):
        make_config({"teacher_field": "source"})


# ---- whole runs -------------------------------------------------------------------------------------------

def _routed_data(path, rows: int = 48):
    with open(path, "w") as f:
        for i in range(rows):
            a, b = i % 7, (3 * i) % 5
            row = {"question": f"What is {a} + {b}?", "answer": str(a + b)}
            if i % 3:
                row["source"] = "one" if i % 3 == 1 else "two"  # every third row has none: the default teacher
            f.write(json.dumps(row) + "\n")
    return str(path)


def _final(run):
    return AutoModelForCausalLM.from_pretrained(run / "final").state_dict()


def test_two_identical_teachers_under_two_names_train_as_one(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    data = _routed_data(tmp_path / "data.jsonl")
    common = dict(dataset=data, dataset_options={}, steps=3, temperature=1.0, lora_r=0, answer_extract="last_number")
    one = tmp_path / "one"
    train(tiny_overrides(student, teacher, one, **common))
    two = tmp_path / "two"
    values = tiny_overrides(student, None, two, teachers={"one": teacher, "two": teacher}, teacher_field="source", **common)
    del values["teacher"]
    cfg = train(values)

    a, b = tracking.read_metrics(one), tracking.read_metrics(two)
    for x, y in zip(a, b):
        for key in ("loss", "kl/reverse", "kl/forward", "agree/top1"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), key
    for key, value in _final(one).items():
        torch.testing.assert_close(_final(two)[key], value, rtol=0, atol=1e-6)

    # teacher/rows/<name>: each step's rows of each teacher, as the data routes them
    task = build.task(cfg)
    route = routing.route(cfg, task.train)
    for step, m in enumerate(b):
        rows = order.batch_indices(step, cfg.batch_size, len(task.train), cfg.seed, cfg.shuffle_prompts)
        for name in ("one", "two"):
            assert m[f"teacher/rows/{name}"] == sum(route[i] == name for i in rows)
            assert m[f"time/teacher_s/{name}"] >= 0
        # the two identical teachers' reverse KLs bracket the whole mean, which their positions weight
        low, high = sorted((m["kl/reverse/one"], m["kl/reverse/two"]))
        assert low - 1e-6 <= m["kl/reverse"] <= high + 1e-6 or 0 in (m["teacher/rows/one"], m["teacher/rows/two"])
    assert sum(m["teacher/rows/two"] for m in b) > 0


def test_teachers_of_different_tokenizers_train_together(tiny_dirs, tmp_path, byte_level):
    student, teacher = tiny_dirs
    other = make_model(len(byte_level), 9)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(other.config, key, getattr(byte_level, key))
    other.generation_config.eos_token_id, other.generation_config.pad_token_id = byte_level.eos_token_id, byte_level.pad_token_id
    other.save_pretrained(tmp_path / "cross")
    byte_level.save_pretrained(tmp_path / "cross")
    data = _routed_data(tmp_path / "data.jsonl")
    values = tiny_overrides(student, None, tmp_path / "run", dataset=data, dataset_options={}, steps=2,
                            teachers={"one": teacher, "two": {"model": str(tmp_path / "cross"), "suffix": "Think."}},
                            teacher_field="source", loss_chunk=3)
    del values["teacher"]
    train(values)
    metrics = tracking.read_metrics(tmp_path / "run")
    for m in metrics:
        assert m["teacher/rows/one"] + m["teacher/rows/two"] == 4
        assert 0 < m["xtok/aligned_frac"] <= 1 and "xtok/vocab_mapped/two" in m and m["loss"] >= 0


def train(values: dict):
    from esrdistill.train import train as run

    cfg = make_config(values)
    run(cfg)
    return cfg


# ---- a served teacher among several ------------------------------------------------------------------------

@pytest.fixture
def served_tiny(tiny_dirs):
    """A stand-in for vLLM's server (/v1/models, /v1/completions with prompt_logprobs) serving the tiny teacher."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    model, lock = AutoModelForCausalLM.from_pretrained(tiny_dirs[1]).eval(), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"data": [{"id": "tiny", "max_model_len": 1024}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids, k = body["prompt"], body["prompt_logprobs"]
            with lock, torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            entries = [None]
            for t in range(1, len(ids)):
                top = logp[t - 1].topk(k)
                entry = {str(i): {"logprob": v, "rank": r + 1} for r, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()))}
                own = ids[t]
                entry.setdefault(str(own), {"logprob": logp[t - 1, own].item(), "rank": int((logp[t - 1] > logp[t - 1, own]).sum()) + 1})
                entries.append(entry)
            self._send({"choices": [{"prompt_logprobs": entries}]})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", model.config.vocab_size
    server.shutdown()


def test_a_served_teacher_among_several_scores_its_rows_as_the_local_teacher_does(tiny_dirs, tmp_path, served_tiny):
    """The same tiny teacher, local under one name and served under another (all V log-probs): the run equals the
    run with that teacher alone."""
    student, teacher = tiny_dirs
    url, vocab = served_tiny
    data = _routed_data(tmp_path / "data.jsonl")
    common = dict(dataset=data, dataset_options={}, steps=2, temperature=1.0, lora_r=0, teacher_top_k=vocab)
    train(tiny_overrides(student, teacher, tmp_path / "one", **common))
    values = tiny_overrides(student, None, tmp_path / "two", teachers={"local": teacher, "served": {"model": url}},
                            teacher_field="source", default_teacher="local", **common)
    del values["teacher"]
    with open(data) as f:  # route the data's "one"/"two" to the two teachers
        rows = [json.loads(line) for line in f]
    with open(data, "w") as f:
        for row in rows:
            if "source" in row:
                row["source"] = {"one": "local", "two": "served"}[row["source"]]
            f.write(json.dumps(row) + "\n")
    train(values)
    a, b = tracking.read_metrics(tmp_path / "one"), tracking.read_metrics(tmp_path / "two")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
        assert x["kl/reverse"] == pytest.approx(y["kl/reverse"], abs=1e-4)
    assert sum(m["teacher/rows/served"] for m in b) > 0 and all(m["teacher/retries"] == 0 for m in b)
    assert all(m["teacher/request_s/served"] > 0 for m in b if m["teacher/rows/served"])
    for key, value in _final(tmp_path / "one").items():
        torch.testing.assert_close(_final(tmp_path / "two")[key], value, rtol=0, atol=1e-4)


def test_an_offloaded_teacher_is_on_the_device_only_while_it_scores(three_teachers):
    every, tok = three_teachers
    model, moves = every["b"].model, []
    original = model.to

    def to(device):
        moves.append(str(device))
        return original(device)

    model.to = to
    try:
        routed = Routed({"a": every["a"], "b": every["b"]}, offload={"b": (model, torch.device("cpu"))})
        prompts, responses, mask = _batch(tok)
        plan = routed.plan([TeacherPrompt(p, n) for p, n in zip(prompts, "ababab")], responses, mask)
        routed.score(plan, [0, 2], 5)
        assert moves == []  # no row of b
        routed.score(plan, [0, 1, 3], 5)
        assert moves == ["cpu", "cpu"]  # to the device (here the CPU) for b's rows, then back
    finally:
        del model.to


def test_offloaded_teachers_move_to_the_device_for_each_scoring_and_train_as_resident_ones(tiny_dirs, tmp_path, monkeypatch):
    """Two local teachers through a run. Offloaded, each one moves to the run's device for each of its scorings and
    back after it: at its k-th scoring it has moved 2k - 1 times, at each rollout and after each step an even
    number of times (here the device is the CPU itself: tests/test_cuda.py checks where the weights are on a GPU).
    Resident, neither moves. The two runs have the same losses."""
    student, teacher = tiny_dirs
    other = save_pair(tmp_path / "other", seed=5)
    data = _routed_data(tmp_path / "data.jsonl")
    runs, events = {}, {}
    for offload in (False, True):
        values = tiny_overrides(student, None, tmp_path / f"run-{offload}", dataset=data, dataset_options={}, steps=2,
                                teachers={"one": teacher, "two": other}, teacher_field="source", teacher_offload=offload)
        del values["teacher"]
        with monkeypatch.context() as patch:
            events[offload] = record_teachers(patch, {"one": teacher, "two": other})
            train(values)
        runs[offload] = tracking.read_metrics(tmp_path / f"run-{offload}")
    for offload, recorded in events.items():
        scorings = [e[1:] for e in recorded if e[0] == "score"]  # (name, moves, device)
        between = [e[1] for e in recorded if e[0] != "score"]  # at each rollout and step: {name: (moves, device)}
        assert [e[0] for e in recorded].count("step") == 2
        for name in ("one", "two"):
            mine = [moves for n, moves, _ in scorings if n == name]
            assert len(mine) >= 2  # scored more than once: the moves repeat
            assert mine == (list(range(1, 2 * len(mine), 2)) if offload else [0] * len(mine)), (offload, name)
        assert all(moves % 2 == 0 for where in between for moves, _ in where.values())
        assert {device for _, _, device in scorings} == {"cpu"}
    assert [m["loss"] for m in runs[True]] == [m["loss"] for m in runs[False]]
    assert [m["kl/reverse/two"] for m in runs[True]] == [m["kl/reverse/two"] for m in runs[False]]


def test_each_teacher_reads_its_own_view_of_the_prompt(tiny_dirs, tmp_path):
    student, teacher = tiny_dirs
    values = tiny_overrides(student, None, tmp_path / "run", dataset=_routed_data(tmp_path / "data.jsonl"), dataset_options={},
                            teachers={"one": teacher, "two": {"model": teacher, "system_prompt": "Think.", "suffix": "SUFFIX",
                                                              "fewshot": 1}}, teacher_field="source")
    del values["teacher"]
    cfg = make_config(values)
    pair = build.pair(cfg, torch.device("cpu"), trainable=True)
    assert pair.teachers["one"][1] is pair.teachers["two"][1]  # one model, loaded once
    task = build.task(cfg)
    assert len(task.fewshot) == 1 and task.fewshot[0].row["source"] == "two"  # a worked example of its own rows
    prompts = build.prompt_set(cfg, pair, task, task.train, 8, "rollout_tokens")
    assert prompts.problems == task.train and len(prompts.teacher_ids) == len(task.train)
    for problem, ids, name in zip(prompts.problems, prompts.teacher_ids, routing.route(cfg, task.train)):
        text = pair.tokenizer.decode(ids)
        assert ids.teacher == name and problem.prompt in text
        assert (text.endswith("SUFFIX") and "Think." in text and text.count("user") == 2) == (name == "two"), text
        assert ("Answer." in text) == (name == "one")  # the run's system_prompt, as teacher_system_prompt is null
    assert isinstance(build.teacher(cfg, pair, prompts.teacher_ids), Routed)


def test_each_teacher_sees_worked_examples_of_its_own_rows_in_its_own_template(tmp_path):
    """With teacher_field, the task holds out each teacher's first `fewshot` rows of its own (against a slow
    split: the rest, in order, gives the evaluation problems then the training prompts); each teacher's
    prompt shows those, filled with its own fewshot_template."""
    data = _routed_data(tmp_path / "data.jsonl", rows=60)
    cfg = make_config({"dataset": data, "shuffle_prompts": False, "eval_prompts": 5, "num_prompts": 20, "teacher_field": "source",
                       "teachers": {"one": {"model": "m1", "fewshot": 3, "fewshot_template": "ONE {answer}"},
                                    "two": {"model": "m2", "fewshot": 2, "fewshot_template": "TWO {answer}"}}})
    task = build.task(cfg)
    rows = [json.loads(line) for line in open(data)]
    route = [r.get("source", "one") for r in rows]
    few = [i for i in range(60) if route[i] == "one"][:3] + [i for i in range(60) if route[i] == "two"][:2]
    rest = [i for i in range(60) if i not in few]
    assert sorted(rows.index(p.row) for p in task.fewshot) == sorted(few)
    assert [rows.index(p.row) for p in task.eval] == rest[:5]
    assert [rows.index(p.row) for p in task.train] == rest[5:25]
    for name, template, count in [("one", "ONE", 3), ("two", "TWO", 2)]:
        own = routing.own(cfg, task, name)
        assert [p.row.get("source", "one") for p in own.fewshot] == [name] * count
        assert all(p.row.get("source", "one") == name for p in own.eval) and own.train == task.train
        _, style = build.styles(routing.views(cfg)[name], own)
        assert [answer for _, answer in style.fewshot] == [f"{template} {p.answer}" for p in own.fewshot]
    cfg.teachers["two"]["fewshot"] = 30  # more than the rows routed to it
    with pytest.raises(DataError, match="too few rows for the worked examples of teacher two \\(it has 20 of the 30"):
        build.task(cfg)


def test_eval_of_one_teachers_rows_prompts_them_as_that_teacher(tiny_dirs, tmp_path, capsys):
    """`esrdistill eval --teacher NAME`: the evaluation problems routed to NAME only, in NAME's view."""
    import yaml

    from esrdistill import cli
    from esrdistill.commands.evaluation import run_eval

    student, teacher = tiny_dirs
    values = tiny_overrides(student, None, tmp_path / "run", dataset=_routed_data(tmp_path / "data.jsonl"), dataset_options={},
                            eval_prompts=9, teacher_field="source",
                            teachers={"one": teacher, "two": {"model": teacher, "fewshot": 2, "fewshot_template": "TWO {answer}"}})
    del values["teacher"]
    cfg = make_config(values)
    routes = routing.route(cfg, build.task(cfg).eval)
    for name in ("one", "two"):
        result = run_eval(cfg, teacher, view="teacher", progress=False, teacher=name)
        assert result.n_problems == routes.count(name) > 0
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    assert cli.main(["eval", str(config), "--model", teacher, "--view", "teacher", "--teacher", "two"]) == 0
    assert f"{routes.count('two')} problems, greedy" in capsys.readouterr().out
    assert cli.main(["eval", str(config), "--teacher", "three"]) == 2
    assert "--teacher three is not one of teachers: one, two" in capsys.readouterr().err
