"""Every engine and every teacher implements its seam, stated once as a Protocol (rollout.Engine,
teacher.Teacher): each method the loop calls exists under the Protocol's name, with the Protocol's
parameters in the same order and the same defaults. Renaming a method or a parameter fails here."""

import inspect

import pytest
import torch

from helpers import make_model, make_tokenizer
from esrdistill import rollout, teacher
from esrdistill.engine_hf import HFEngine
from esrdistill.engine_vllm import VLLMEngine  # importable without vLLM: it is imported when an engine starts
from esrdistill.teacher import LossSettings, SameTokenizer
from esrdistill.cross_teacher import CrossTokenizer
from esrdistill.served_teacher import ServedTeacher

IMPLEMENTATIONS = [(rollout.Engine, HFEngine), (rollout.Engine, VLLMEngine), (teacher.Teacher, SameTokenizer),
                   (teacher.Teacher, CrossTokenizer), (teacher.Teacher, ServedTeacher)]


def _methods(protocol) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_protocols_state_what_the_loop_calls():
    assert _methods(rollout.Engine) == ["sample", "sync"]
    assert set(rollout.Engine.__annotations__) == {"name"}
    assert _methods(teacher.Teacher) == ["plan", "score", "comparable", "compare"]
    assert set(teacher.Teacher.__annotations__) == {"kind", "constant_metrics"}


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
    assert isinstance(HFEngine(model), rollout.Engine)
    same = SameTokenizer(model, tok.pad_token_id, len(tok), 2, LossSettings())
    cross = CrossTokenizer(make_model(len(sentencepiece), 2), byte_level, sentencepiece, [byte_level.eos_token_id],
                           [sentencepiece.eos_token_id], 2, LossSettings())
    for scorer, kind in ((same, "same"), (cross, "cross")):
        assert isinstance(scorer, teacher.Teacher) and scorer.kind == kind
        assert all(isinstance(v, float) for v in scorer.constant_metrics.values())
    assert not isinstance(same, rollout.Engine) and not isinstance(HFEngine(model), teacher.Teacher)

    class NoSync:  # an engine that forgot `sync` is not one
        name = "none"

        def sample(self, prompts, sampling, seeds=None):
            return rollout.Rollouts(prompts, torch.zeros(len(prompts), 0, dtype=torch.long), torch.zeros(len(prompts), 0))

    assert not isinstance(NoSync(), rollout.Engine)
