import math

import pytest
import torch

from esrdistill import losses


def random_case(seed=0, B=3, T=5, V=7, masked_rows=()):
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    t = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    for r in masked_rows:
        mask[r] = 0
    return s, t, tokens, mask


def naive_kl(p_log, q_log):
    """KL(p || q) for one position by a Python loop over the vocabulary."""
    return sum(math.exp(p_log[v]) * (p_log[v] - q_log[v]) for v in range(len(p_log)))


def naive_per_token(fn, s, t, mask):
    B, T, _ = s.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                out[b, i] = fn(s[b, i].tolist(), t[b, i].tolist())
    return out


def naive_jsd(beta):
    def fn(s, t):
        m = [math.log(beta * math.exp(tv) + (1 - beta) * math.exp(sv)) for sv, tv in zip(s, t)]
        return beta * naive_kl(t, m) + (1 - beta) * naive_kl(s, m)

    return fn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reverse_kl_matches_naive(seed):
    s, t, _, mask = random_case(seed)
    expected = naive_per_token(naive_kl, s, t, mask)
    assert torch.allclose(losses.reverse_kl(s, t, mask), expected, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_kl_matches_naive(seed):
    s, t, _, mask = random_case(seed)
    expected = naive_per_token(lambda a, b: naive_kl(b, a), s, t, mask)
    assert torch.allclose(losses.forward_kl(s, t, mask), expected, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_naive(beta):
    s, t, _, mask = random_case(3)
    expected = naive_per_token(naive_jsd(beta), s, t, mask)
    assert torch.allclose(losses.generalized_jsd(s, t, mask, beta), expected, atol=1e-5)


def test_jsd_rejects_end_points():
    s, t, _, mask = random_case()
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError):
            losses.generalized_jsd(s, t, mask, beta)


def test_sampled_loss_gradient_is_kl_estimate_times_score():
    s_logits = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(2, 4, 6, dtype=torch.float64), -1)
    tokens = torch.randint(0, 6, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.float64)
    s = torch.log_softmax(s_logits, -1)
    s_tok, t_tok = losses.token_logp(s, tokens), losses.token_logp(t, tokens)
    losses.sampled_token_pg(s_tok, t_tok, mask).sum().backward()
    got = s_logits.grad.clone()
    # naive: sum_t (log p_s(y_t) - log p_t(y_t)) * d log p_s(y_t) / d logits
    s_logits.grad = None
    s = torch.log_softmax(s_logits, -1)
    s_tok = losses.token_logp(s, tokens)
    weights = (s_tok - t_tok).detach()
    (weights * s_tok).sum().backward()
    assert torch.allclose(got, s_logits.grad, atol=1e-10)


def test_token_logp_matches_indexing():
    s, _, tokens, _ = random_case()
    expected = torch.tensor([[s[b, i, tokens[b, i]].item() for i in range(s.shape[1])] for b in range(s.shape[0])], dtype=s.dtype)
    assert torch.equal(losses.token_logp(s, tokens), expected)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_identical_distributions_give_zero(name):
    s, _, tokens, mask = random_case()
    out = losses.per_token_loss(name, s, s.clone(), tokens, mask)
    assert out.abs().max().item() < 1e-12


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "sampled"])
@pytest.mark.parametrize("norm", ["trajectory", "token"])
def test_all_masked_batch_gives_zero_not_nan(name, norm):
    s, t, tokens, mask = random_case(masked_rows=(0, 1, 2))
    per_token = losses.per_token_loss(name, s, t, tokens, mask)
    loss = losses.reduce_loss(per_token, mask, norm, denominator=mask.sum().item() if norm == "token" else 3)
    assert loss.item() == 0.0 and not torch.isnan(loss)


def test_padding_values_never_leak():
    s, t, tokens, mask = random_case()
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0] = torch.log_softmax(torch.randn_like(s2[mask == 0]) * 10, -1)
    t2[mask == 0] = -50.0
    for name in ["reverse_kl", "forward_kl", "jsd", "sampled"]:
        a = losses.per_token_loss(name, s, t, tokens, mask)
        b = losses.per_token_loss(name, s2, t2, tokens, mask)
        assert torch.allclose(a, b)


def test_trajectory_norm_is_mean_over_tokens_then_trajectories():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert losses.reduce_loss(per_token, mask, "trajectory", 2).item() == pytest.approx((2.0 + 4.0) / 2)
    assert losses.reduce_loss(per_token, mask, "token", 4).item() == pytest.approx(10.0 / 4)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "sampled"])
@pytest.mark.parametrize("norm", ["trajectory", "token"])
def test_loss_and_gradient_do_not_depend_on_micro_batch_size(name, norm):
    g = torch.Generator().manual_seed(7)
    B, T, V = 6, 5, 9
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.4).double()
    mask[2] = 0  # one trajectory with no counted token
    denominator = B if norm == "trajectory" else mask.sum().item()

    def run(micro):
        leaf = logits.clone().requires_grad_(True)
        total = 0.0
        for start in range(0, B, micro):
            sl = slice(start, start + micro)
            s = torch.log_softmax(leaf[sl], -1)
            loss = losses.reduce_loss(losses.per_token_loss(name, s, t[sl], tokens[sl], mask[sl]), mask[sl], norm, denominator)
            loss.backward()
            total += loss.item()
        return total, leaf.grad

    full_loss, full_grad = run(B)
    for micro in (1, 2, 4):
        loss, grad = run(micro)
        assert loss == pytest.approx(full_loss, abs=1e-10)
        assert torch.allclose(grad, full_grad, atol=1e-10)
