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


# ---- the sampled loss under temperature and top_p: its exact expectation, by enumeration ----------

def naive_nucleus(probs: list[float], top_p: float) -> list[float]:
    """The top_p distribution by hand: the most likely tokens, one at a time, until their mass reaches
    top_p (transformers' rule: a token is dropped when the mass of the less likely tokens, itself
    included, is <= 1 - top_p), renormalised."""
    order = sorted(range(len(probs)), key=lambda v: probs[v])  # ascending
    keep, tail = set(), 0.0
    for rank, v in enumerate(order):
        tail += probs[v]
        if tail > 1 - top_p or rank == len(order) - 1:
            keep.add(v)
    total = sum(probs[v] for v in keep)
    return [probs[v] / total if v in keep else 0.0 for v in range(len(probs))]


def naive_sampling_probs(logits: list[float], temperature: float, top_p: float) -> list[float]:
    scaled = [math.exp(z / temperature) for z in logits]
    return naive_nucleus([x / sum(scaled) for x in scaled], top_p)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 1.0), (0.7, 0.95), (1.0, 0.6)])
def test_sampling_logp_equals_the_distribution_generate_samples_from(temperature, top_p):
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 11, generator=g, dtype=torch.float64) * 3
    got = losses.sampling_logp(torch.log_softmax(logits, -1), temperature, top_p).exp()
    flat = logits.reshape(-1, 11)
    scores = TemperatureLogitsWarper(temperature)(None, flat.clone()) if temperature != 1.0 else flat.clone()
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    hf = torch.softmax(scores, -1).reshape(4, 3, 11)
    assert torch.allclose(got, hf, atol=1e-12)
    for b in range(4):
        for t in range(3):
            expected = naive_sampling_probs(logits[b, t].tolist(), temperature, top_p)
            assert got[b, t].tolist() == pytest.approx(expected, abs=1e-12)


def _expected_sampled_gradient(logits, teacher_logp, temperature, top_p):
    """E_{y ~ q}[grad of the sampled loss at y], enumerating every token y of a 1-position vocabulary."""
    V = logits.shape[-1]
    q = naive_sampling_probs(logits.tolist(), temperature, top_p)
    expected = torch.zeros(V, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)
    for y in range(V):
        if q[y] == 0:
            continue
        leaf = logits.clone().requires_grad_(True)
        s = torch.log_softmax(leaf, -1).view(1, 1, V)
        tokens = torch.tensor([[y]])
        losses.per_token_loss("sampled", s, teacher_logp.view(1, 1, V), tokens, mask, temperature=temperature, top_p=top_p).sum().backward()
        expected += q[y] * leaf.grad
    return expected, q


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_sampled_loss_is_unbiased_for_the_reverse_kl_gradient_at_any_temperature(temperature):
    """Under the distribution that really samples the tokens (tempered), the expected gradient of the
    sampled loss equals the gradient of KL(p || t) over the full vocabulary, to 1e-10."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, generator=g, dtype=torch.float64) * 2
    teacher = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, -1)
    expected, _ = _expected_sampled_gradient(logits, teacher, temperature, 1.0)
    leaf = logits.clone().requires_grad_(True)
    p_log = torch.log_softmax(leaf, -1)
    kl = sum(p_log[v].exp() * (p_log[v] - teacher[v]) for v in range(6))  # the KL by hand
    kl.backward()
    assert torch.allclose(expected, leaf.grad, atol=1e-10), (expected, leaf.grad)


def test_sampled_loss_under_top_p_leaves_out_exactly_the_tokens_never_sampled():
    """With top_p < 1 the expectation is the reverse-KL gradient restricted to q's support: the bias
    the training loop warns about, no more and no less."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64) * 2, -1)
    expected, q = _expected_sampled_gradient(logits, teacher, 1.0, 0.8)
    support = [v for v in range(7) if q[v] > 0]
    assert 1 < len(support) < 7
    leaf = logits.clone().requires_grad_(True)
    p_log = torch.log_softmax(leaf, -1)
    # sum over the support of p(v) (log p(v) - log t(v)) grad log p(v), the weights held constant
    surrogate = sum((p_log[v].exp() * (p_log[v] - teacher[v])).detach() * p_log[v] for v in support)
    surrogate.backward()
    assert torch.allclose(expected, leaf.grad, atol=1e-10)


# ---- junk at masked positions ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "sampled"])
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_junk_at_masked_positions_reaches_neither_loss_nor_gradient(name, junk):
    s, t, tokens, mask = random_case(4)
    t_junk = t.clone()
    t_junk[mask == 0] = junk  # a teacher position that does not count holds garbage
    logits = torch.log_softmax(torch.randn(s.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)

    def run(teacher):
        leaf = logits.clone().requires_grad_(True)
        per_token = losses.per_token_loss(name, torch.log_softmax(leaf, -1), teacher, tokens, mask, temperature=0.7, top_p=0.9)
        loss = losses.reduce_loss(per_token, mask, "trajectory", 3)
        loss.backward()
        return per_token.detach(), loss.item(), leaf.grad

    clean, junky = run(t), run(t_junk)
    assert torch.equal(clean[0], junky[0]) and clean[1] == junky[1] and math.isfinite(junky[1])
    assert torch.equal(clean[2], junky[2]) and torch.isfinite(junky[2]).all()
    # junk in the student's own values at masked positions does not reach the loss value either
    s_junk = s.clone()
    s_junk[mask == 0] = junk
    assert torch.equal(losses.per_token_loss(name, s_junk, t, tokens, mask), losses.per_token_loss(name, s, t, tokens, mask))


def test_nan_student_log_probs_under_top_p_give_a_nan_loss_not_an_index_error():
    """The sampled loss with top_p < 1 finds each row's nucleus; a NaN row (a diverging student) has
    none. It must give a NaN loss where it counts (train then skips the step, as for the other losses)
    and nothing where it is masked, and leave the other rows' nucleus as it was."""
    s, t, tokens, mask = random_case(5)
    counted, masked = (mask == 1).nonzero()[0].tolist(), (mask == 0).nonzero()[0].tolist()
    s_nan = s.clone()
    s_nan[tuple(counted)] = float("nan")
    s_nan[tuple(masked)] = float("nan")
    nucleus = losses.sampling_logp(s_nan, 0.7, 0.9)
    assert torch.isnan(nucleus[tuple(counted)]).all()
    others = torch.ones(mask.shape, dtype=torch.bool)
    others[tuple(counted)] = others[tuple(masked)] = False
    assert torch.equal(nucleus[others], losses.sampling_logp(s, 0.7, 0.9)[others])
    per_token = losses.per_token_loss("sampled", s_nan, t, tokens, mask, temperature=0.7, top_p=0.9)
    assert math.isnan(per_token[tuple(counted)].item()) and per_token[tuple(masked)].item() == 0.0
    clean = losses.per_token_loss("sampled", s, t, tokens, mask, temperature=0.7, top_p=0.9)
    assert torch.equal(per_token[others], clean[others])
