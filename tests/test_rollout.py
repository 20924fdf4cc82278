import pytest
import torch

from esrdistill import losses, rollout
from esrdistill.engines import hf as engine_hf
from esrdistill.teachers import same
from helpers import make_model, make_tokenizer

EOS = 4
PAD = 0


def naive_mask(responses, eos_ids):
    out = torch.zeros(responses.shape)
    for b in range(responses.shape[0]):
        for t in range(responses.shape[1]):
            out[b, t] = 1.0
            if responses[b, t].item() in eos_ids:
                break
    return out


def test_response_mask_matches_naive_on_random_tokens():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        responses = torch.randint(0, 8, (5, 11), generator=g)
        for eos_ids in ([EOS], [EOS, 6]):
            assert torch.equal(rollout.response_mask(responses, eos_ids), naive_mask(responses, eos_ids))


def test_response_mask_counts_eos_and_nothing_after():
    responses = torch.tensor([[10, 11, EOS, PAD, PAD], [10, 11, 12, 13, 14], [EOS, 11, EOS, 12, 13]])
    assert rollout.response_mask(responses, [EOS]).tolist() == [
        [1, 1, 1, 0, 0],  # EOS counts, padding after it does not
        [1, 1, 1, 1, 1],  # cut at the length limit: every token counts
        [1, 0, 0, 0, 0],  # only up to the first EOS
    ]


def test_pack_left_pads_prompts_and_counts_positions_over_real_tokens():
    packed = rollout.pack([[7, 8, 9], [5]], torch.tensor([[20, 21], [22, EOS]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]]), PAD)
    assert packed["input_ids"].tolist() == [[7, 8, 9, 20, 21], [PAD, PAD, 5, 22, EOS]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]


def test_esr_truncation_generates_exactly_k_tokens():
    """With EOS held back (min_new_tokens = K) every row has exactly K tokens, all counted: generation
    itself stops at K, nothing is generated and masked off."""
    model = make_model(len(make_tokenizer()), 3)
    prompts = [[3, 40, 41, 42], [3, 50], [3, 60, 61]]
    for k in (1, 5, 9):
        out = engine_hf.sample(model, prompts, rollout.Sampling(k, temperature=1.0, eos_ids=(EOS,), pad_id=PAD, min_new_tokens=k))
        assert out.responses.shape == (3, k)
        assert out.mask.sum(-1).tolist() == [k, k, k]
        assert not (out.responses == EOS).any()


def test_rollouts_that_may_stop_never_pass_k():
    model = make_model(len(make_tokenizer()), 3)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 3  # EOS is likely: some rows stop early
    prompts = [[3, 40 + i] for i in range(8)]
    out = engine_hf.sample(model, prompts, rollout.Sampling(6, temperature=1.0, eos_ids=(EOS,), pad_id=PAD))
    assert out.responses.shape[1] <= 6 and out.mask.sum(-1).max().item() <= 6
    assert torch.equal(out.mask, naive_mask(out.responses, [EOS]))


def naive_greedy(model, prompt: list[int], steps: int, vocab_size: int | None = None) -> list[int]:
    """Argmax decoding by hand: one full forward per token, no cache, no logits processors."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1]
        if vocab_size is not None:
            logits = logits[:vocab_size]
        ids.append(int(logits.argmax()))
        if ids[-1] == EOS:
            break
    return ids[len(prompt):]


def test_the_models_own_generation_config_does_not_change_sampling():
    """A shipped repetition_penalty, no_repeat_ngram_size, min_new_tokens or top_k (Qwen2.5-Instruct ships
    a repetition penalty) must not reach the rollouts: greedy rollouts equal plain argmax decoding."""
    model = make_model(len(make_tokenizer()), 8)
    prompts = [[3, 40, 41, 42], [3, 50, 51]]
    expected = [naive_greedy(model, p, 12) for p in prompts]
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.min_new_tokens = 12
    model.generation_config.top_k = 1
    model.generation_config.suppress_tokens = list(range(10, 60))
    out = engine_hf.sample(model, prompts, rollout.Sampling(12, temperature=0.0, eos_ids=(EOS,), pad_id=PAD))
    for row, want in enumerate(expected):
        n = int(out.mask[row].sum())
        assert out.responses[row, :n].tolist() == want
    assert len({t for want in expected for t in want}) < sum(len(w) for w in expected)  # the argmax repeats tokens
    assert model.generation_config.repetition_penalty == 50.0  # the model's own config is left as it was


def test_the_models_generation_config_does_not_reach_sampled_rollouts_either():
    """At temperature 1, top_p 1 a sampled rollout's tokens follow the model's distribution: a shipped
    top_k=1 would make every sample the argmax."""
    model = make_model(len(make_tokenizer()), 8)
    model.generation_config.top_k = 1
    model.generation_config.do_sample = False
    prompts = [[3, 40, 41, 42]] * 16
    out = engine_hf.sample(model, prompts, rollout.Sampling(4, temperature=1.0, eos_ids=(EOS,), pad_id=PAD))
    assert len({tuple(r.tolist()) for r in out.responses}) > 4


def test_ids_past_the_shared_vocabulary_are_never_sampled():
    """An LM head with more rows than the tokenizer (Qwen: 151,936 for 151,665 tokens) never yields an id
    past the vocabulary, greedy or sampled, even when those rows have the largest logits."""
    tok = make_tokenizer()
    vocab = len(tok)
    model = make_model(vocab, 9, vocab_rows=vocab + 28)
    with torch.no_grad():
        model.lm_head.weight[vocab:] = model.lm_head.weight[:28] * 20  # padding rows that would win
    prompts = [[3, 40 + i] for i in range(6)]
    for temperature in (0.0, 1.0):
        out = engine_hf.sample(model, prompts, rollout.Sampling(8, temperature=temperature, top_p=0.95, eos_ids=(EOS,), pad_id=PAD,
                                                              vocab_size=vocab))
        assert out.responses.max().item() < vocab
    greedy = engine_hf.sample(model, prompts[:2], rollout.Sampling(8, temperature=0.0, eos_ids=(EOS,), pad_id=PAD, vocab_size=vocab))
    for row in range(2):
        n = int(greedy.mask[row].sum())
        assert greedy.responses[row, :n].tolist() == naive_greedy(model, prompts[row], 8, vocab_size=vocab)


def test_response_logits_of_a_bf16_model_come_from_an_fp32_lm_head():
    """The body runs in bf16, but the LM head's product is done in fp32: the logits equal the bf16
    hidden states times the fp32 head to 1e-5, where a bf16 head is off by about 1e-2."""
    model = make_model(len(make_tokenizer()), 5).to(torch.bfloat16)
    prompts = [[3, 40, 41, 42, 43], [3, 50]]
    responses = torch.tensor([[60, 61, 62], [70, EOS, PAD]])
    mask = rollout.response_mask(responses, [EOS])
    got = rollout.response_logits(model, prompts, responses, mask, PAD)
    assert got.dtype == torch.float32
    packed = rollout.pack(prompts, responses, mask, PAD)
    with torch.no_grad():
        hidden = model.model(**packed).last_hidden_state[:, -4:-1]  # (B, T, H) bf16, positions that predict the response
        expected = hidden.float() @ model.lm_head.weight.float().T
        bf16_head = model.lm_head(hidden).float()
    assert (got - expected).abs().max().item() < 1e-5
    assert (bf16_head - expected).abs().max().item() > 1e-3  # what the old bf16 head gave
    assert model.lm_head.forward.__func__ is torch.nn.Linear.forward  # the patch is gone after the call


def test_rollout_without_eos_is_full_k_long():
    tok = make_tokenizer()
    model = make_model(len(tok), 3)
    prompts = [[3, 40, 41], [3, 50]]
    out = engine_hf.sample(model, prompts, rollout.Sampling(7, temperature=1.0, eos_ids=(len(tok) + 5,), pad_id=PAD))  # an id never sampled
    assert out.responses.shape == (2, 7)
    assert out.mask.sum().item() == 14


def test_greedy_is_deterministic_and_independent_of_batch_padding():
    model = make_model(len(make_tokenizer()), 3)
    greedy = rollout.Sampling(6, temperature=0.0, eos_ids=(EOS,), pad_id=PAD)
    a = engine_hf.sample(model, [[3, 40, 41, 42]], greedy)
    b = engine_hf.sample(model, [[3, 40, 41, 42], [3, 50, 51, 52, 53, 54, 55, 56]], greedy)
    n = int(a.mask[0].sum())
    assert torch.equal(a.responses[0, :n], b.responses[0, :n])


def test_response_logits_equal_a_full_forward_at_response_positions():
    model = make_model(len(make_tokenizer()), 5)
    prompts = [[3, 40, 41, 42, 43], [3, 50]]
    responses = torch.tensor([[60, 61, 62], [70, EOS, PAD]])
    mask = rollout.response_mask(responses, [EOS])
    got = rollout.response_logits(model, prompts, responses, mask, PAD)
    assert got.shape == (2, 3, model.config.vocab_size)
    for row, prompt in enumerate(prompts):
        n = int(mask[row].sum())
        ids = torch.tensor([prompt + responses[row, :n].tolist()])
        full = model(ids).logits[0]  # no padding at all
        expected = full[len(prompt) - 1 : len(prompt) - 1 + n]
        assert torch.allclose(got[row, :n], expected, atol=1e-5)


def test_teacher_scores_only_response_positions_in_micro_batches():
    model = make_model(len(make_tokenizer()), 6)
    prompts = [[3, 40, 41, 42, 43, 44], [3, 50], [3, 60, 61]]
    responses = torch.tensor([[70, 71, 72, 73], [74, EOS, PAD, PAD], [75, 76, 77, EOS]])
    mask = rollout.response_mask(responses, [EOS])
    whole = same.score(model, prompts, responses, mask, PAD, vocab_size=model.config.vocab_size, micro_batch=3)
    assert whole.shape == (3, 4, model.config.vocab_size)  # response positions only
    assert torch.allclose(whole.exp().sum(-1), torch.ones(3, 4), atol=1e-5)
    for micro in (1, 2):
        part = same.score(model, prompts, responses, mask, PAD, vocab_size=model.config.vocab_size, micro_batch=micro)
        assert torch.allclose(part * mask[..., None], whole * mask[..., None], atol=1e-5)
    # row 1 scored alone, without any padding, gives the same numbers
    alone = same.score(model, prompts[1:2], responses[1:2, :2], mask[1:2, :2], PAD, model.config.vocab_size, 1)
    assert torch.allclose(alone[0], whole[1, :2], atol=1e-5)


def test_log_probs_cut_padding_rows_before_normalising():
    import math

    logits = torch.randn(2, 3, 10, dtype=torch.float64)
    logits[..., 8:] = 50.0  # padding rows with large junk logits
    out = losses.log_probs(logits, vocab_size=8)
    assert out.shape == (2, 3, 8)
    for b in range(2):
        for t in range(3):
            row = logits[b, t, :8].tolist()
            total = sum(math.exp(x) for x in row)  # normalised over the 8 real tokens only, by hand
            assert out[b, t].tolist() == pytest.approx([math.log(math.exp(x) / total) for x in row], abs=1e-6)


def test_micro_batches_group_similar_lengths_and_cover_every_row_once():
    from esrdistill.order import micro_batches

    groups = micro_batches([3, 9, 1, 9, 5], 2)
    assert groups == [[1, 3], [4, 0], [2]]
    assert sorted(r for g in groups for r in g) == list(range(5))


def test_the_sampler_draws_from_the_rollout_distribution_and_never_outside_the_nucleus():
    """20,000 draws per row with seeded generators: frequencies within 0.015 of q (temperature then
    top_p, the distribution the loss assumes), and never a token outside q's support."""
    from esrdistill.losses import sampling_logp

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 7, generator=g) * 2
    scores[1, 5] = float("-inf")  # a suppressed token (past the vocabulary, or EOS before min_new_tokens)
    q = sampling_logp(torch.log_softmax(scores, -1), 0.7, 0.9).exp()
    torch.manual_seed(0)
    sampler = engine_hf.InverseCDFSampler(0.7, 0.9, None)  # the global generator, one draw per row
    out = sampler(None, scores.repeat(20000, 1))  # (60000, 7): each of the 3 rows 20,000 times
    assert (torch.isfinite(out).sum(-1) == 1).all()  # one finite entry per row: greedy takes it
    drawn = out.argmax(-1).view(20000, 3)
    counts = torch.stack([torch.bincount(drawn[:, r], minlength=7) for r in range(3)]).float()
    freq = counts / 20000
    assert (freq - q).abs().max().item() < 0.015
    assert (counts[q == 0] == 0).all()


def test_a_rows_sample_depends_on_its_seed_not_on_its_batch():
    model = make_model(len(make_tokenizer()), 3)
    sampling = rollout.Sampling(8, temperature=1.0, top_p=0.95, eos_ids=(EOS,), pad_id=PAD)
    alone = engine_hf.sample(model, [[3, 40, 41, 42]], sampling, seeds=[123])
    together = engine_hf.sample(model, [[3, 50, 51, 52, 53, 54], [3, 40, 41, 42]], sampling, seeds=[7, 123])
    n = int(alone.mask[0].sum())
    assert torch.equal(alone.responses[0, :n], together.responses[1, :n])
    other = engine_hf.sample(model, [[3, 40, 41, 42]], sampling, seeds=[124])
    assert not torch.equal(other.responses[0], alone.responses[0])


def test_the_cpu_lm_head_gives_the_linear_layers_numbers():
    model = make_model(len(make_tokenizer()), 3)
    hidden = torch.randn(4, 1, model.config.hidden_size)
    expected = model.lm_head(hidden)
    with engine_hf._cpu_lm_head(model):
        got = model.lm_head(hidden)
    assert torch.allclose(got, expected, atol=1e-5) and got.shape == expected.shape


def test_teacher_log_probs_are_the_same_with_the_cached_shared_prefix():
    """A teacher prompt with a system message and few-shot turns: scoring from the cached shared prefix
    gives the plain forward's log-probs within 1e-5, for prompts of different lengths."""
    from esrdistill import prompts as prompt_lib
    from esrdistill.data import Problem

    tok = make_tokenizer()
    model = make_model(len(tok), 6)
    shots = prompt_lib.fewshot_turns([Problem("1 + 1", "2"), Problem("3 + 4", "7")], "Q: {prompt}", "= {answer}")
    style = prompt_lib.PromptStyle(system="You add numbers.", template="Q: {prompt}", fewshot=shots, suffix="#")
    problems = [Problem("2 + 2", "4"), Problem("10 + 25 + 3", "38"), Problem("7", "7")]
    ids = prompt_lib.encode(tok, problems, style)
    prefix = rollout.PrefixCache(model, ids)
    assert prefix.length > 40 and prefix.covers(ids)
    responses = torch.tensor([[70, 71, 72, 73], [74, EOS, PAD, PAD], [75, 76, 77, EOS]])
    mask = rollout.response_mask(responses, [EOS])
    plain = same.score(model, ids, responses, mask, PAD, len(tok), micro_batch=2)
    cached = same.score(model, ids, responses, mask, PAD, len(tok), micro_batch=2, prefix=prefix)
    assert torch.allclose(plain * mask[..., None], cached * mask[..., None], atol=1e-5)
    assert not rollout.PrefixCache(model, ids, min_tokens=1000).covers(ids)  # too short a prefix: not cached


def _lora_student(seed: int = 3):
    from esrdistill.models import add_lora

    model = add_lora(make_model(len(make_tokenizer()), seed), r=4, alpha=8, dropout=0.0)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # peft starts B at zero (the adapters would do nothing): make them matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_merged_lora_computes_the_adapters_logits_and_restores_every_weight_bit_for_bit():
    model = _lora_student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        through_adapters = model(input_ids=ids).logits
        with engine_hf.merged_lora(model):
            assert all(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
            base = model.get_base_model()
            merged = base(input_ids=ids).logits  # the base layers alone now hold W + s*BA
        after = model(input_ids=ids).logits
    assert torch.allclose(merged, through_adapters, atol=1e-4)
    assert torch.equal(after, through_adapters)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


def test_merged_lora_restores_the_weights_when_the_block_raises():
    model = _lora_student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="in the block"):
        with engine_hf.merged_lora(model):
            raise RuntimeError("in the block")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


def test_a_lora_student_samples_the_same_tokens_merged_or_through_its_adapters():
    model = _lora_student()
    prompts = [[3, 40, 41, 42], [3, 50, 51]]
    greedy = rollout.Sampling(8, temperature=0.0, eos_ids=(EOS,), pad_id=PAD)
    sampled = rollout.Sampling(8, temperature=1.0, top_p=0.95, eos_ids=(EOS,), pad_id=PAD)
    for sampling, seeds in ((greedy, None), (sampled, [5, 6])):
        merged = engine_hf.sample(model, prompts, sampling, seeds)
        plain = engine_hf.sample(model, prompts, sampling, seeds, merge_lora=False)
        assert torch.equal(merged.responses, plain.responses) and torch.equal(merged.mask, plain.mask)
    with model.disable_adapter():  # the adapters matter to these tokens: without them others come
        no_adapters = engine_hf.sample(model, prompts, greedy)
    assert not torch.equal(no_adapters.responses, engine_hf.sample(model, prompts, greedy).responses)


def _decode_draws(model, decode: str):
    """Greedy and seeded draws over two batches of different prompt lengths (the second reuses the first's cache)."""
    greedy = rollout.Sampling(10, temperature=0.0, eos_ids=(EOS,), pad_id=PAD)
    sampled = rollout.Sampling(10, temperature=1.0, top_p=0.9, eos_ids=(EOS,), pad_id=PAD)
    batches = ([[3, 40, 41, 42], [3, 50, 51, 52, 53, 54, 55]], [[3, 7, 8, 9, 10, 11, 12, 13, 14], [3, 40, 41]])
    return [engine_hf.sample(model, prompts, s, seeds, decode=decode).responses
            for prompts in batches for s, seeds in ((greedy, None), (sampled, [21, 22]))]


def test_a_static_cache_decodes_the_tokens_the_dynamic_cache_does():
    model = make_model(len(make_tokenizer()), 3, hidden=64, heads=2, kv_heads=1)
    dynamic, static = _decode_draws(model, "dynamic"), _decode_draws(model, "static")
    assert all(torch.equal(a, b) for a, b in zip(dynamic, static))
    assert engine_hf.cache_options("static", 300, 100, torch.device("cpu"))["max_cache_len"] == 512  # steps of 256


def test_the_decode_mode_is_checked_when_the_engine_is_made():
    with pytest.raises(ValueError, match="decode must be one of dynamic, static, compiled"):
        engine_hf.HFEngine(make_model(len(make_tokenizer()), 3), decode="graphs")


@pytest.mark.slow  # torch.compile on the CPU: ~25 s, once
def test_a_compiled_decode_step_gives_the_eager_tokens_and_compiles_once_for_new_prompt_lengths():
    torch._dynamo.reset()
    model = make_model(len(make_tokenizer()), 3, hidden=64, heads=2, kv_heads=1)
    dynamic = _decode_draws(model, "dynamic")
    compiled = _decode_draws(model, "compiled")
    assert all(torch.equal(a, b) for a, b in zip(dynamic, compiled))
    from torch._dynamo.utils import counters

    frames = counters["stats"]["unique_graphs"]
    assert 0 < frames <= 2  # one graph (a second at most for the first call's shapes), not one per prompt length
