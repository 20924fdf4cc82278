"""Token selection rules against a naive version written with Python loops."""


import pytest
import torch

from esrdistill import selection


def naive_select(rule, mask, budget, stats, noise):
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        counted = [t for t in range(T) if mask[b, t]]
        n = len(counted)
        if rule == "prefix" or n <= budget:
            chosen = counted
        elif rule == "prefix_mask":
            chosen = counted[:budget]
        elif rule == "last":
            chosen = counted[n - budget:]
        elif rule == "middle":
            start = (n - budget) // 2
            chosen = counted[start:start + budget]
        else:
            if rule == "random":
                key = {t: noise[b, t].item() for t in counted}
            else:
                key = {}
                for t in counted:
                    value = 1.0
                    for name in selection.SIGNALS[rule]:
                        value *= stats[name][b, t].item()
                    key[t] = value
            ranked = sorted(counted, key=lambda t: (-key[t], t))  # highest first, earlier first on ties
            chosen = ranked[:budget]
        for t in chosen:
            out[b, t] = True
    return out


def random_case(seed, B=6, T=12):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[0] = 0  # an all-masked row
    mask[1, 3:] = 0  # a row shorter than the budget
    stats = {name: torch.randint(0, 4, (B, T), generator=g).double() / 3 for name in
             ("reverse_kl", "forward_kl", "teacher_entropy", "student_entropy")}  # few values: many ties
    return mask, stats


@pytest.mark.parametrize("rule", selection.RULES)
@pytest.mark.parametrize("budget", [1, 4, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_rule_matches_the_naive_version(rule, budget, seed):
    mask, stats = random_case(seed)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed))
    got = selection.select(rule, mask, budget, stats, generator)
    assert torch.equal(got, naive_select(rule, mask, budget, stats, noise))
    assert torch.equal(got.sum(-1), selection.selected_count(mask, rule, budget))
    assert not got[0].any()  # the all-masked row keeps nothing
    assert not (got & ~mask.bool()).any()  # never a position that does not count


def test_positional_rules_on_a_plain_row():
    mask = torch.ones(1, 10)
    picks = {rule: selection.select(rule, mask, 3)[0].nonzero().flatten().tolist() for rule in ("prefix_mask", "middle", "last")}
    assert picks == {"prefix_mask": [0, 1, 2], "middle": [3, 4, 5], "last": [7, 8, 9]}


def test_signal_rules_need_their_statistics():
    with pytest.raises(ValueError, match="needs the per-token statistics"):
        selection.select("top_reverse_kl", torch.ones(1, 4), 2)


def test_selection_metrics_split_selected_from_unselected():
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    chosen = torch.tensor([[False, True, False, True, False]])
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    m = selection.selection_metrics(chosen, mask, {"reverse_kl": kl})
    assert m == {"select/position": 4.0, "select/n": 2.0, "select/n_counted": 4.0, "select/reverse_kl_in": 6.0,
                 "select/reverse_kl_out": 4.0}
