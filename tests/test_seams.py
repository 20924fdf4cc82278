"""Every engine and every teacher implements its seam, stated once as a Protocol (Engine,
protocol.Teacher): each method the loop calls exists under the Protocol's name, with the Protocol's
parameters in the same order and the same defaults. Renaming a method or a parameter fails here.

The two wrappers the loop itself receives, a Routed teacher of several teachers and the engine that gathers an
FSDP2-sharded student, are also checked by behaviour: every method of the Protocol is called on one built over
tiny models, and gives what the Protocol promises (types, shapes) and what the wrapped objects give."""

import copy
import inspect
import typing

import pytest
import torch

from esrdistill import rollout, sharding
from esrdistill.engines.gathering import GatheringEngine, gathering
from esrdistill.engines.hf import HFEngine
from esrdistill.engines.protocol import Engine
from esrdistill.engines.vllm import VLLMEngine  # importable without vLLM: it is imported when an engine starts
from esrdistill.losses import log_probs
from esrdistill.teachers import protocol
from esrdistill.teachers.cross import CrossTokenizer
from esrdistill.teachers.protocol import Comparison, LossSettings, Plan, Scores
from esrdistill.teachers.routed import Routed, TeacherPrompt
from esrdistill.teachers.same import SameTokenizer
from esrdistill.teachers.served import ServedTeacher
from helpers import make_model, make_tokenizer

IMPLEMENTATIONS = [(Engine, HFEngine), (Engine, VLLMEngine), (Engine, GatheringEngine),
                   (protocol.Teacher, SameTokenizer), (protocol.Teacher, CrossTokenizer), (protocol.Teacher, ServedTeacher),
                   (protocol.Teacher, Routed)]


def _methods(protocol) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("protocol, implementation", IMPLEMENTATIONS, ids=lambda x: x.__name__)
def test_each_implementation_has_the_protocols_methods_with_its_parameters(protocol, implementation):
    for name in _methods(protocol):
        assert callable(getattr(implementation, name, None)), f"{implementation.__name__} has no {name}"
        assert _parameters(getattr(implementation, name)) == _parameters(getattr(protocol, name)), name


def test_the_engines_name_their_kind():
    assert (HFEngine.name, VLLMEngine.name) == ("hf", "vllm")


def test_built_engines_and_teachers_are_instances_of_their_protocol(byte_level, sentencepiece):
    tok = make_tokenizer()
    model = make_model(len(tok), 1)
    assert isinstance(HFEngine(model), Engine)
    same = SameTokenizer(model, tok.pad_token_id, len(tok), 2, LossSettings())
    cross = CrossTokenizer(make_model(len(sentencepiece), 2), byte_level, sentencepiece, [byte_level.eos_token_id],
                           [sentencepiece.eos_token_id], 2, LossSettings())
    for scorer, kind in ((same, "same"), (cross, "cross")):
        assert isinstance(scorer, protocol.Teacher) and scorer.kind == kind
        assert all(isinstance(v, float) for v in scorer.constant_metrics.values())
    assert not isinstance(same, Engine) and not isinstance(HFEngine(model), protocol.Teacher)

    class NoSync:  # an engine that forgot `sync` is not one
        name = "none"

        def sample(self, prompts, sampling, seeds=None):
            return rollout.Rollouts(prompts, torch.zeros(len(prompts), 0, dtype=torch.long), torch.zeros(len(prompts), 0))

    assert not isinstance(NoSync(), Engine)


# ---- the wrappers the loop receives, by behaviour ------------------------------------------------------------

class _Calls:
    """`target`, noting which of its methods were called (`called`)."""

    def __init__(self, target):
        self.target, self.called = target, set()

    def __getattr__(self, name):
        value = getattr(self.target, name)
        if inspect.ismethod(value):
            self.called.add(name)
        return value


def _has_the_protocols_attributes(protocol, obj) -> None:
    for name, kind in typing.get_type_hints(protocol).items():
        value, origin = getattr(obj, name), typing.get_origin(kind) or kind
        assert isinstance(value, origin), name
        if origin is dict:
            key, item = typing.get_args(kind)
            assert all(isinstance(k, key) and isinstance(v, item) for k, v in value.items()), name


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone, for FSDP2 inside the test; destroyed after it."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_gathering_engine_over_an_fsdp2_student_is_an_engine_that_samples_as_the_unsharded_student(one_process_group):
    """sample: Rollouts of (B, T <= max_new_tokens) responses and their mask, on the CPU, the draws of the unsharded
    student with the same seeds, and the student sharded again after; sync: handed to the wrapped engine."""
    from torch.distributed.tensor import DTensor

    tok = make_tokenizer()
    reference = make_model(len(tok), 1)
    student = sharding.shard(copy.deepcopy(reference), torch.device("cpu"), 1)
    wrapped, synced = HFEngine(student), []
    wrapped.sync = synced.append
    built = gathering(wrapped, student)
    assert isinstance(built, GatheringEngine) and isinstance(built, Engine)
    _has_the_protocols_attributes(Engine, built)
    assert built.name == wrapped.name

    engine = _Calls(built)
    prompts = [tok("What is 2+2?")["input_ids"], tok("Hi")["input_ids"], tok("7 * 3 =")["input_ids"]]
    sampling = rollout.Sampling(6, temperature=1.0, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, vocab_size=len(tok))
    out = engine.sample(prompts, sampling, [11, 12, 13])
    assert isinstance(out, rollout.Rollouts) and out.prompts == prompts
    assert out.responses.shape == out.mask.shape and out.responses.shape[0] == 3 and 0 < out.responses.shape[1] <= 6
    assert out.responses.device.type == out.mask.device.type == "cpu"
    assert torch.equal(out.mask, rollout.response_mask(out.responses, sampling.eos_ids))
    plain = HFEngine(reference).sample(prompts, sampling, [11, 12, 13])
    assert torch.equal(out.responses, plain.responses) and torch.equal(out.mask, plain.mask)
    assert all(isinstance(p, DTensor) for p in student.parameters())  # sharded again after sampling

    assert engine.sync(student) is None and synced == [student]
    assert engine.called == set(_methods(Engine))


def test_a_routed_teacher_of_several_is_a_teacher_that_gives_each_row_its_own_teachers_results():
    """plan: a Plan with a (B, T) mask; score: Scores with the micro-batch's (b, T') mask; comparable: (b, T', C) log-probs
    of the student and the teacher; compare: a (b, T') loss with the gradient of the student's log-probs and
    (b, T') metrics; row by row, what the row's own teacher gives for it alone."""
    tok = make_tokenizer()
    vocab = len(tok)
    subs = {name: SameTokenizer(make_model(vocab, seed), tok.pad_token_id, vocab, 2, LossSettings())
            for name, seed in (("a", 2), ("b", 5))}
    built = Routed(subs)
    assert isinstance(built, protocol.Teacher)
    _has_the_protocols_attributes(protocol.Teacher, built)

    g = torch.Generator().manual_seed(0)
    route = ["a", "b", "b", "a"]
    prompts = [tok("<|im_start|>user\nWhat is 2+2?<|im_end|>\n")["input_ids"][: 6 + b] for b in range(4)]
    responses = torch.randint(10, vocab, (4, 6), generator=g)
    mask = (torch.arange(6) < torch.tensor([6, 3, 5, 2])[:, None]).float()
    routed = _Calls(built)
    plan = routed.plan([TeacherPrompt(p, n) for p, n in zip(prompts, route)], responses, mask)
    assert isinstance(plan, Plan) and plan.mask.shape == (4, 6)
    rows, width = [3, 0, 1, 2], 5  # a micro-batch, in the loop's order
    scores = routed.score(plan, rows, width)
    assert isinstance(scores, Scores) and scores.mask.shape == (4, width)
    student_logp = log_probs(torch.randn(4, width, vocab, generator=g), vocab).requires_grad_()
    s, t = routed.comparable(student_logp, scores)
    assert s.shape == t.shape == (4, width, vocab)
    tokens = responses[rows, :width]
    comparison = routed.compare(student_logp, scores, tokens)
    assert isinstance(comparison, Comparison) and comparison.per_token.shape == (4, width)
    assert comparison.metrics and all(v.shape == (4, width) for v in comparison.metrics.values())
    comparison.per_token.sum().backward()
    assert (student_logp.grad.abs().sum((1, 2)) > 0).all()  # every row's loss reaches the student
    assert routed.called == set(_methods(protocol.Teacher))

    for name, sub in subs.items():  # each teacher alone on its rows
        mine = [i for i, r in enumerate(rows) if route[r] == name]
        own_rows = [rows[i] for i in mine]
        alone = sub.plan([prompts[r] for r in own_rows], responses[own_rows], mask[own_rows])
        own = sub.score(alone, list(range(len(own_rows))), width)
        own_s, own_t = sub.comparable(student_logp[mine].detach(), own)
        assert torch.equal(scores.mask[mine], own.mask) and torch.equal(plan.mask[own_rows], alone.mask)
        assert torch.equal(s[mine], own_s) and torch.equal(t[mine], own_t)
        own_comparison = sub.compare(student_logp[mine].detach(), own, tokens[mine])
        torch.testing.assert_close(comparison.per_token[mine].detach(), own_comparison.per_token, rtol=0, atol=1e-6)
        torch.testing.assert_close(comparison.metrics["kl/reverse"][mine], own_comparison.metrics["kl/reverse"],
                                   rtol=0, atol=1e-6)
