"""Cross-tokenizer distillation: token bytes, alignment, vocabulary mapping and losses, each against a
slow reference, and the permuted-copy identity (runs end to end: test_xtok_runs.py)."""

import functools
import math

import pytest
import torch
from xtok_tokenizers import permute_model, permuted_copy, sentencepiece_tokenizer

from esrdistill import losses
from esrdistill.losses import log_probs
from esrdistill.teachers import xtok
from esrdistill.teachers.cross import CrossTokenizer, XtokSettings
from esrdistill.teachers.protocol import LossSettings
from esrdistill.teachers.same import SameTokenizer
from helpers import make_model, make_tokenizer

TEXTS = [
    "What is 3 + 4? The answer is 7.",
    "café naïve über: é ü",
    "中文 日本語",
    "emoji 🙂 then 🎉!",
    "  leading and   repeated spaces",
    "new\nlines\n\n and tabs\tx",
    "digits 1234567890 and 98765",
    "<answer>15</answer>",
]


# ---- token bytes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_of_both_kinds_spell_the_text_exactly(byte_level, sentencepiece, text):
    for tok in (byte_level, sentencepiece):
        table, special = xtok.token_bytes(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")
        assert all(table[i] == b"" for i in special)


def test_markers_read_as_bytes(byte_level, sentencepiece):
    bl, _ = xtok.token_bytes(byte_level)
    sp, _ = xtok.token_bytes(sentencepiece)
    assert bl[byte_level.convert_tokens_to_ids("Ġ")] == b" " and bl[byte_level.convert_tokens_to_ids("Ċ")] == b"\n"
    assert sp[sentencepiece.convert_tokens_to_ids("\u2581")] == b" "
    assert sp[sentencepiece.convert_tokens_to_ids("<0xF0>")] == b"\xf0"


# ---- alignment against a slow reference -------------------------------------------------------------

def naive_alignment(student_ids, s_bytes, s_special, s_eos, teacher_tok, t_bytes, rule):
    """Obviously correct and slow: compare the text each position conditions on, byte string by byte string.

    A teacher tokenizer with a dummy prefix spells `added + text`: the added bytes are no text of the
    student's, so they are cut from the teacher's contexts, and position 0, which predicts the token
    holding them, is never paired."""
    cut = next((t for t, i in enumerate(student_ids) if i in s_special and i not in s_eos), len(student_ids))
    data = b"".join(s_bytes[i] for i in student_ids[:cut])
    valid = len(data)
    while True:
        try:
            text = data[:valid].decode("utf-8")
            break
        except UnicodeDecodeError:
            valid -= 1
    t_ids = teacher_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    valid_text = data[:valid]
    spelled = b"".join(t_bytes[i] for i in t_ids)
    added = spelled[: len(spelled) - len(valid_text)] if spelled.endswith(valid_text) else b""
    first = 1 if added else 0
    teacher_contexts = [b"".join(t_bytes[i] for i in t_ids[:j])[len(added):] for j in range(len(t_ids) + 1)]
    out = []
    for t, token in enumerate(student_ids):
        if t >= cut:
            out.append(-1)
            continue
        context = b"".join(s_bytes[i] for i in student_ids[:t])
        length = len(s_bytes[token])
        if not valid_text.startswith(context):
            out.append(-1)
        elif rule == "start" or length == 0:
            out.append(next((j for j, c in enumerate(teacher_contexts) if j >= first and c == context and valid_text.startswith(c)),
                            -1))
        else:
            middle = len(context) + (length - 1) // 2
            found = -1
            for j in range(first, len(t_ids)):
                start, end = len(teacher_contexts[j]), len(teacher_contexts[j + 1])
                if start <= middle < end and middle < valid:
                    found = j
            out.append(found)
        if token in s_eos:
            out += [-1] * (len(student_ids) - t - 1)
            break
    return out


def _cross(student_tok, teacher_tok, rule="start", loss="matched_kl", model=None):
    model = model or make_model(len(teacher_tok), 3)
    return CrossTokenizer(model, student_tok, teacher_tok, [student_tok.eos_token_id], [teacher_tok.eos_token_id], 4,
                          LossSettings(), XtokSettings(loss=loss, align=rule))


@functools.lru_cache(maxsize=None)
def dummy_prefix_tokenizer(style: str):
    """Llama-2 style ("legacy") or Mistral style ("first"), with more merges than the plain one, so that
    the token holding the added '▁' often holds text too ('▁d')."""
    return sentencepiece_tokenizer(480, dummy_prefix=style)


@pytest.mark.parametrize("rule", ["start", "middle"])
@pytest.mark.parametrize("direction", ["byte_level->sentencepiece", "sentencepiece->byte_level", "byte_level->legacy",
                                       "byte_level->first", "legacy->byte_level"])
def test_alignment_equals_the_slow_reference_on_every_prefix(byte_level, sentencepiece, rule, direction):
    """Every prefix of every text (so every cut, mid-character ones included), with and without an EOS;
    `legacy` and `first` are SentencePiece tokenizers with a dummy prefix."""
    named = {"byte_level": byte_level, "sentencepiece": sentencepiece, "legacy": dummy_prefix_tokenizer("legacy"),
             "first": dummy_prefix_tokenizer("first")}
    student_tok, teacher_tok = (named[side] for side in direction.split("->"))
    cross = _cross(student_tok, teacher_tok, rule)
    eos = student_tok.eos_token_id
    cases = []
    for text in TEXTS:
        ids = student_tok(text, add_special_tokens=False)["input_ids"]
        cases += [ids[:n] for n in range(1, len(ids) + 1)] + [ids + [eos], ids[:3] + [eos, 5, 6]]
    cut_mid_character = 0
    for ids in cases:
        responses = torch.tensor([ids])
        mask = torch.ones(1, len(ids))
        mask[0] = (torch.cumsum((responses[0] == eos).long(), 0) - (responses[0] == eos).long() == 0).float()
        plan = cross.plan([[1]], responses, mask)
        expected = naive_alignment(ids, cross.student_bytes, cross.student_special, cross.student_eos,
                                   teacher_tok, cross.teacher_bytes, rule)
        assert plan.positions[0].tolist() == expected, (teacher_tok.convert_ids_to_tokens(ids), rule)
        data = b"".join(cross.student_bytes[i] for i in ids)
        cut_mid_character += xtok.valid_utf8_length(data) < len(data)
    assert cut_mid_character > 5  # the cases do include responses cut inside a multi-byte character


def test_a_dummy_prefix_teacher_aligns_as_many_positions_as_the_same_tokenizer_without_it(byte_level):
    """Reading the response as ' ' + text, such a teacher once shared no context with the student past
    position 0 (27 and 9 of these 94 positions aligned, against 86); now it loses at most the one
    position per row whose teacher token holds the added space and text ('▁d')."""
    aligned = {}
    for style in (None, "legacy", "first"):
        tok = dummy_prefix_tokenizer(style) if style else sentencepiece_tokenizer(480)
        cross = _cross(byte_level, tok)
        assert cross.teacher_prefix == (b" " if style else b"")
        aligned[style], total = 0.0, 0.0
        for text in TEXTS:
            ids = byte_level(text, add_special_tokens=False)["input_ids"] + [byte_level.eos_token_id]
            part, whole = cross.plan([[1]], torch.tensor([ids]), torch.ones(1, len(ids))).ratios["xtok/aligned_frac"]
            aligned[style], total = aligned[style] + part, total + whole
    assert total == 94 and aligned[None] > 0.9 * total
    assert aligned[None] - len(TEXTS) <= aligned["legacy"] <= aligned[None]
    assert aligned[None] - len(TEXTS) <= aligned["first"] <= aligned[None]


def test_the_dummy_space_is_dropped_only_where_the_tokenizer_added_it():
    assert xtok.drop_dummy_prefix([2, 2], b" abc", b"abc", b" ") == ([1, 2], b"abc", True)  # '▁a' 'bc'
    assert xtok.drop_dummy_prefix([1, 1, 2], b"  ab", b" ab", b" ") == ([0, 1, 2], b" ab", True)  # Llama-2: '▁' '▁' 'ab'
    assert xtok.drop_dummy_prefix([1, 2], b" ab", b" ab", b" ") == ([1, 2], b" ab", False)  # Mistral: nothing added
    assert xtok.drop_dummy_prefix([2], b"ab", b"ab", b"") == ([2], b"ab", False)
    # student 'ab' 'c' against teacher '▁a' 'bc' read as 'a' 'bc': position 0 predicts '▁a', never a student token
    assert xtok.align_row([2, 1], [False] * 2, [False] * 2, 3, [1, 2], 3, "start", teacher_first=1) == [-1, -1]
    assert xtok.align_row([1, 2], [False] * 2, [False] * 2, 3, [1, 2], 3, "start", teacher_first=1) == [-1, 1]
    # after a lone '▁' (now empty) position 1 has the same empty context and predicts a plain token
    assert xtok.align_row([1, 2], [False] * 2, [False] * 2, 3, [0, 1, 2], 3, "start", teacher_first=1) == [1, 2]
    assert xtok.align_row([1, 2], [False] * 2, [False] * 2, 3, [0, 1, 2], 3, "middle", teacher_first=1) == [1, 2]


def test_start_rule_pairs_same_contexts_and_masks_the_rest():
    """Hand-made spans: student 'ab' 'c' | EOS against teacher 'a' 'bc'."""
    pairs = xtok.align_row([2, 1, 0], [False, False, True], [False, False, True], 3, [1, 2], 3, "start")
    assert pairs == [0, -1, 2]  # 'ab' <-> 'a' (empty context); 'c' starts inside 'bc'; EOS <-> after the text
    middle = xtok.align_row([2, 1, 0], [False, False, True], [False, False, True], 3, [1, 2], 3, "middle")
    assert middle == [0, 1, 2]  # the middle byte of 'ab' is 'a' (token 0); 'c' lies in 'bc' (token 1)


def test_nothing_after_eos_and_nothing_past_the_valid_text_is_paired():
    # 'a' EOS 'b': the EOS pairs with the position after the text, 'b' with nothing
    assert xtok.align_row([1, 0, 1], [False, True, False], [False, True, False], 1, [1], 1) == [0, 1, -1]
    # 'a' then the first byte of a 2-byte character: only 1 valid byte; the cut token starts at 1, which the
    # teacher (who read 'a') can score; an EOS-less token starting past the valid text cannot
    assert xtok.align_row([1, 1, 1], [False] * 3, [False] * 3, 1, [1], 1) == [0, 1, -1]


def test_the_teachers_log_probs_are_floored_after_renormalising(byte_level, sentencepiece):
    model = make_model(len(sentencepiece), 4)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # extreme logits: many tokens far below e^-20
    cross = CrossTokenizer(model, byte_level, sentencepiece, [byte_level.eos_token_id], [sentencepiece.eos_token_id], 4,
                           LossSettings(), XtokSettings(teacher_floor=-20.0))
    ids = byte_level("12 + 30 = 42", add_special_tokens=False)["input_ids"]
    responses, mask = torch.tensor([ids]), torch.ones(1, len(ids))
    plan = cross.plan([[sentencepiece.bos_token_id]], responses, mask)
    scores = cross.score(plan, [0], len(ids))
    from esrdistill.rollout import response_logits

    full = log_probs(response_logits(model, plan.prompts, plan.responses, plan.response_mask, sentencepiece.pad_token_id),
                     len(sentencepiece))
    aligned = full[0, plan.positions[0]]  # (T, Vt): every position is aligned here
    units, _ = xtok.renormalise(xtok.unit_logp(aligned, cross.map.teacher_primary, cross.map.teacher_extra_units,
                                               cross.map.teacher_extra_ids))
    assert (units < -20).any()
    assert torch.equal(scores.logp[0], units.clamp(min=-20.0))


def test_a_special_token_mid_response_masks_everything_after_it(byte_level, sentencepiece):
    cross = _cross(byte_level, sentencepiece)
    ids = byte_level("abc def", add_special_tokens=False)["input_ids"]
    start = byte_level.convert_tokens_to_ids("<|im_start|>")
    responses = torch.tensor([ids[:2] + [start] + ids[2:]])
    plan = cross.plan([[1]], responses, torch.ones(responses.shape))
    assert (plan.positions[0, :2] >= 0).all() and (plan.positions[0, 2:] == -1).all()
    assert plan.ratios["xtok/aligned_frac"] == (2.0, float(responses.shape[1]))


# ---- vocabulary mapping ---------------------------------------------------------------------------------

def test_vocab_map_groups_equal_bytes_and_maps_eos_by_role(byte_level, sentencepiece):
    cross = _cross(byte_level, sentencepiece)
    vm = cross.map
    s_bytes, t_bytes = cross.student_bytes, cross.teacher_bytes
    student_units = {}
    for sid in range(len(s_bytes)):
        unit = int(vm.student_unit_of[sid])
        if unit >= 0:
            student_units.setdefault(unit, []).append(sid)
    teacher_units = {}
    for u, tid in enumerate(vm.teacher_primary.tolist()):
        teacher_units.setdefault(u, []).append(tid)
    for u, tid in zip(vm.teacher_extra_units.tolist(), vm.teacher_extra_ids.tolist()):
        teacher_units.setdefault(u, []).append(tid)
    eos_unit = int(vm.student_unit_of[byte_level.eos_token_id])
    assert teacher_units[eos_unit] == [sentencepiece.eos_token_id]  # <|im_end|> <-> <eos>, by role
    for unit, sids in student_units.items():
        if unit == eos_unit:
            continue
        assert {s_bytes[s] for s in sids} | {t_bytes[t] for t in teacher_units[unit]} == {s_bytes[sids[0]]}
    # naive: every student text token whose bytes some teacher token has is mapped, and only those
    teacher_byte_set = {b for i, b in enumerate(t_bytes) if b}
    for sid, data in enumerate(s_bytes):
        expected = bool(data) and data in teacher_byte_set or sid == byte_level.eos_token_id
        assert (int(vm.student_unit_of[sid]) >= 0) == expected, byte_level.convert_ids_to_tokens(sid)
    space = int(vm.student_unit_of[byte_level.convert_tokens_to_ids("Ġ")])
    assert sorted(sentencepiece.convert_ids_to_tokens(teacher_units[space])) == ["<0x20>", "\u2581"]
    assert vm.vocab_mapped == pytest.approx(sum(int(u) >= 0 for u in vm.student_unit_of) / len(byte_level))


def test_unit_log_probs_sum_the_probabilities_of_each_units_tokens(byte_level, sentencepiece):
    cross = _cross(byte_level, sentencepiece)
    vm = cross.map
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 3, len(sentencepiece), generator=g, dtype=torch.float64), -1)
    got = xtok.unit_logp(logp, vm.teacher_primary, vm.teacher_extra_units, vm.teacher_extra_ids)
    members = {u: [t] for u, t in enumerate(vm.teacher_primary.tolist())}
    for u, t in zip(vm.teacher_extra_units.tolist(), vm.teacher_extra_ids.tolist()):
        members[u].append(t)
    assert any(len(m) > 1 for m in members.values())
    for b in range(2):
        for t in range(3):
            for u, ids in members.items():
                assert math.exp(got[b, t, u]) == pytest.approx(sum(math.exp(logp[b, t, i]) for i in ids), rel=1e-9)


# ---- losses -------------------------------------------------------------------------------------------

def naive_uld(p, q):
    a, b = sorted(p, reverse=True), sorted(q, reverse=True)
    n = max(len(a), len(b))
    a, b = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


def test_uld_matches_a_naive_sort_and_pad():
    g = torch.Generator().manual_seed(1)
    s = torch.softmax(torch.randn(2, 3, 7, generator=g, dtype=torch.float64), -1)
    t = torch.softmax(torch.randn(2, 3, 11, generator=g, dtype=torch.float64), -1)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    got = losses.uld(s, t, mask)
    for b in range(2):
        for i in range(3):
            expected = naive_uld(s[b, i].tolist(), t[b, i].tolist()) if mask[b, i] else 0.0
            assert got[b, i].item() == pytest.approx(expected, abs=1e-12)


def _random_logits(vocab, seed, shape=(2, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2


@pytest.mark.parametrize("xtok_loss", ["matched_kl", "uld", "hybrid"])
def test_cross_tokenizer_losses_match_naive_references(byte_level, sentencepiece, xtok_loss):
    """Each loss from the teacher object equals its definition written out with Python loops."""
    cross = _cross(byte_level, sentencepiece, loss=xtok_loss)
    vm = cross.map
    s_logits = _random_logits(len(byte_level), 2).requires_grad_(True)
    t_logp = torch.log_softmax(_random_logits(len(sentencepiece), 3), -1)
    s_logp = torch.log_softmax(s_logits, -1)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    units, mass = xtok.renormalise(xtok.unit_logp(t_logp, vm.teacher_primary, vm.teacher_extra_units, vm.teacher_extra_ids))
    from esrdistill.teachers.protocol import Scores

    scores = Scores(logp=units.clamp(min=cross.xtok.teacher_floor), mask=mask, extra={"teacher_mass": mass, "teacher_full": t_logp})
    got = cross.compare(s_logp, scores, torch.zeros(2, 4, dtype=torch.long)).per_token

    s_members, t_members = {}, {}
    for sid in range(len(byte_level)):
        if int(vm.student_unit_of[sid]) >= 0:
            s_members.setdefault(int(vm.student_unit_of[sid]), []).append(sid)
    for u, t in enumerate(vm.teacher_primary.tolist()):
        t_members.setdefault(u, []).append(t)
    for u, t in zip(vm.teacher_extra_units.tolist(), vm.teacher_extra_ids.tolist()):
        t_members[u].append(t)
    s_mapped = {i for ids in s_members.values() for i in ids}
    t_mapped = {i for ids in t_members.values() for i in ids}
    for b in range(2):
        for i in range(4):
            if not mask[b, i]:
                assert got[b, i].item() == 0.0
                continue
            ps, pt = s_logp[b, i].exp().tolist(), t_logp[b, i].exp().tolist()
            su = [sum(ps[k] for k in s_members[u]) for u in range(vm.units)]
            tu = [sum(pt[k] for k in t_members[u]) for u in range(vm.units)]
            su = [x / sum(su) for x in su]
            tu = [max(math.log(x / sum(tu)), -20.0) for x in tu]
            matched = sum(p * (math.log(p) - lt) for p, lt in zip(su, tu) if p > 0)
            full = naive_uld(ps, pt)
            rest = naive_uld([ps[k] for k in range(len(ps)) if k not in s_mapped], [pt[k] for k in range(len(pt)) if k not in t_mapped])
            expected = {"matched_kl": matched, "uld": full, "hybrid": matched + rest}[xtok_loss]
            assert got[b, i].item() == pytest.approx(expected, rel=1e-7, abs=1e-9)


# ---- the strongest check: a permuted copy of the student's own tokenizer -------------------------------

def test_a_permuted_copy_of_the_tokenizer_gives_the_same_loss_and_gradients():
    """The teacher's tokenizer is the student's with its ids shuffled (and the teacher model permuted to
    match), so the cross-tokenizer path is taken; matched_kl must equal the same-tokenizer reverse KL and
    its gradients to 1e-5, with every position aligned and all the probability mass mapped."""
    tok = make_tokenizer()
    teacher_tok, perm = permuted_copy(tok, seed=5)
    student, teacher = make_model(len(tok), 1), make_model(len(tok), 2)
    teacher_perm = permute_model(teacher, perm)
    texts = ["The answer is 7.", "12 + 30 = 42\nok", "x  y"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows[0] = rows[0] + [tok.eos_token_id]
    width = max(map(len, rows))
    responses = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros(3, width)
    for b, r in enumerate(rows):
        responses[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    prompt = tok("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    teacher_prompt = [perm[i] for i in prompt]

    same = SameTokenizer(teacher, tok.pad_token_id, len(tok), 4, LossSettings())
    cross = CrossTokenizer(teacher_perm, tok, teacher_tok, [tok.eos_token_id], [teacher_tok.eos_token_id], 4, LossSettings())
    results = []
    for scorer, prompts in ((same, [prompt] * 3), (cross, [teacher_prompt] * 3)):
        plan = scorer.plan(prompts, responses, mask)
        scores = scorer.score(plan, [0, 1, 2], width)
        student.zero_grad()
        from esrdistill.rollout import response_logits

        s_logp = log_probs(response_logits(student, [prompt] * 3, responses, mask, tok.pad_token_id), len(tok))
        comparison = scorer.compare(s_logp, scores, responses)
        losses.reduce_loss(comparison.per_token, scores.mask, "trajectory", 3).backward()
        grads = [p.grad.clone() for p in student.parameters()]
        results.append((plan, comparison, grads))
    (plan_s, comp_s, grads_s), (plan_x, comp_x, grads_x) = results
    assert plan_x.ratios["xtok/aligned_frac"][0] == plan_x.ratios["xtok/aligned_frac"][1] == mask.sum()
    assert torch.equal(plan_x.mask, mask)
    counted = mask.bool()
    assert torch.allclose(comp_x.metrics["xtok/student_mapped_mass"][counted], torch.ones(int(mask.sum())), atol=1e-6)
    assert torch.allclose(comp_x.metrics["xtok/teacher_mapped_mass"][counted], torch.ones(int(mask.sum())), atol=1e-6)
    assert torch.allclose(comp_x.per_token, comp_s.per_token, atol=1e-5)
    for a, b in zip(grads_s, grads_x):
        assert torch.allclose(a, b, atol=1e-5)
    assert cross.map.vocab_mapped == 1.0


def test_prefixes_cross_tokenizers_through_their_text(byte_level, sentencepiece):
    """The teacher continuing a student's prefix reads the prefix's text in its own tokens."""
    bridge = xtok.TextBridge(byte_level, sentencepiece, same=False)
    ids = byte_level("über ü 中文 42", add_special_tokens=False)["input_ids"]
    assert bridge.text(ids) == "über ü 中文 42"
    assert bridge.ids(ids) == sentencepiece("über ü 中文 42", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(1, len(ids)) if xtok.valid_utf8_length(b"".join(bridge.bytes[i] for i in ids[:n])) <
               len(b"".join(bridge.bytes[i] for i in ids[:n])))
    assert "\ufffd" not in bridge.text(ids[:cut])  # a cut character is left out, never replaced
