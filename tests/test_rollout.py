import torch

from conftest import make_model, make_tokenizer
from esrdistill import rollout, teacher

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
    model = make_model(len(make_tokenizer()), 3)
    prompts = [[3, 40, 41, 42], [3, 50], [3, 60, 61]]
    for k in (1, 5, 9):
        out = rollout.sample(model, prompts, k, temperature=1.0, top_p=1.0, eos_ids=[EOS], pad_id=PAD)
        assert out.responses.shape[1] <= k
        assert out.mask.sum(-1).max().item() <= k


def test_rollout_without_eos_is_full_k_long():
    tok = make_tokenizer()
    model = make_model(len(tok), 3)
    prompts = [[3, 40, 41], [3, 50]]
    out = rollout.sample(model, prompts, 7, temperature=1.0, top_p=1.0, eos_ids=[len(tok) + 5], pad_id=PAD)  # an id never sampled
    assert out.responses.shape == (2, 7)
    assert out.mask.sum().item() == 14


def test_greedy_is_deterministic_and_independent_of_batch_padding():
    model = make_model(len(make_tokenizer()), 3)
    a = rollout.sample(model, [[3, 40, 41, 42]], 6, temperature=0.0, top_p=1.0, eos_ids=[EOS], pad_id=PAD)
    b = rollout.sample(model, [[3, 40, 41, 42], [3, 50, 51, 52, 53, 54, 55, 56]], 6, temperature=0.0, top_p=1.0, eos_ids=[EOS], pad_id=PAD)
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
    whole = teacher.score(model, prompts, responses, mask, PAD, vocab_size=model.config.vocab_size, micro_batch=3)
    assert whole.shape == (3, 4, model.config.vocab_size)  # response positions only
    assert torch.allclose(whole.exp().sum(-1), torch.ones(3, 4), atol=1e-5)
    for micro in (1, 2):
        part = teacher.score(model, prompts, responses, mask, PAD, vocab_size=model.config.vocab_size, micro_batch=micro)
        assert torch.allclose(part * mask[..., None], whole * mask[..., None], atol=1e-5)
    # row 1 scored alone, without any padding, gives the same numbers
    alone = teacher.score(model, prompts[1:2], responses[1:2, :2], mask[1:2, :2], PAD, model.config.vocab_size, 1)
    assert torch.allclose(alone[0], whole[1, :2], atol=1e-5)


def test_log_probs_cut_padding_rows_before_normalising():
    logits = torch.randn(2, 3, 10)
    logits[..., 8:] = 50.0  # padding rows with large junk logits
    out = teacher.log_probs(logits, vocab_size=8)
    assert out.shape == (2, 3, 8)
    assert torch.allclose(out, torch.log_softmax(logits[..., :8], -1))


def test_micro_batches_group_similar_lengths_and_cover_every_row_once():
    from esrdistill.order import micro_batches

    groups = micro_batches([3, 9, 1, 9, 5], 2)
    assert groups == [[1, 3], [4, 0], [2]]
    assert sorted(r for g in groups for r in g) == list(range(5))
