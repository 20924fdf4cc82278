"""Cross-tokenizer alignment: the bytes of every token, which teacher position matches which student
position, and which student tokens have a teacher counterpart. Pure functions and plain data; the
teacher that uses them is cross.py.

The student's sampled ids are the ground truth. Its response is the concatenation of its tokens'
bytes (special tokens have none); the teacher reads that text, tokenised by its own tokenizer, after
its own prompt. Positions are matched by the text they condition on:

- rule "start" (the default): student position t (which predicts student token t) is compared with
  the teacher position that predicts the teacher token starting at the same byte, so both models
  condition on exactly the same text. Where the two tokenizations agree on a boundary, positions
  pair one to one; inside a group where they split the text differently, the student positions
  that start mid-way through a teacher token have no teacher position with the same context and
  are left out (masked and counted, never paired with another context).
- rule "middle" (the paper's): student token t is compared with the teacher position that predicts
  the teacher token covering the middle byte of student token t; every student token with text gets
  a partner, whose context may end a few bytes earlier.

A teacher whose SentencePiece tokenizer adds a dummy prefix (Llama-2, Mistral v0.1, TinyLlama: a '▁'
before the first piece) reads the response as " " + text; that added space is no text of the
student's, so its bytes are dropped before the positions are matched (`drop_dummy_prefix`), and the
teacher position that predicts the token holding it (whose every candidate, '▁Hello', carries the
space) is never paired.

The student's EOS has no text: it is compared with the teacher position after the whole text, where
the teacher decides whether to stop. Positions after a special token other than EOS (which the
teacher never sees) are left out, as are those past the end of the valid UTF-8 text (ESR may cut a
multi-byte character in two).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

START, MIDDLE = "start", "middle"
ALIGN_RULES = (START, MIDDLE)


# ---- the bytes of every token ---------------------------------------------------------------------

def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes ('Ġ' is a space, 'Ċ' a newline), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _decoder_kinds(tokenizer) -> set[str]:
    """The kinds of decoder steps of a fast tokenizer: {'ByteLevel'}, {'Replace', 'ByteFallback', ...}."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {step.get("type") for step in steps if step}


def token_bytes(tokenizer) -> tuple[list[bytes], set[int]]:
    """(bytes of every token id, the ids of special tokens).

    Byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM): each character of a token stands for one byte.
    SentencePiece-style (Gemma, Llama-2, Mistral): '▁' is a space and '<0xNN>' is the byte NN (the
    space a dummy-prefix tokenizer adds before a text is found by `dummy_prefix`).
    Added tokens that are not special are their text. Anything else: the token's string as UTF-8.
    Special tokens (BOS, EOS, pad, chat markers) have no bytes: they are not text.
    """
    size = len(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids)
    added = {}
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            special.add(token_id)
        else:
            added[token_id] = token.content
    kinds = _decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds
    byte_map = _byte_level_decoder() if byte_level else {}
    out: list[bytes] = []
    for token_id, string in enumerate(strings):
        if token_id in special or string is None:
            out.append(b"")
        elif token_id in added:
            out.append(added[token_id].encode("utf-8"))
        elif byte_level and all(ch in byte_map for ch in string):
            out.append(bytes(byte_map[ch] for ch in string))
        elif len(string) == 6 and string.startswith("<0x") and string.endswith(">"):
            out.append(bytes([int(string[3:5], 16)]))
        else:
            out.append(string.replace("\u2581", " ").encode("utf-8"))
    return out, special


def valid_utf8_length(data: bytes) -> int:
    """The length of the longest prefix of `data` that is valid UTF-8."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as err:
        return err.start


def dummy_prefix(tokenizer, table: list[bytes], probe: str = "a") -> bytes:
    """The bytes `tokenizer` adds before any text it encodes: b" " for a SentencePiece dummy prefix
    (Llama-2, Mistral v0.1, TinyLlama), else b"". table: token_bytes(tokenizer)[0]."""
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    data = b"".join(table[i] for i in ids)
    return data[: -len(probe)] if data.endswith(probe.encode("utf-8")) else b""


def drop_dummy_prefix(teacher_lengths: list[int], teacher_data: bytes, text: bytes, prefix: bytes) -> tuple[list[int], bytes, bool]:
    """The teacher's tokenisation of `text` without the dummy prefix its tokenizer added in front.

    teacher_lengths: byte length of each teacher token; teacher_data: the bytes they spell; prefix: what
    the tokenizer adds (`dummy_prefix`). The prefix is dropped when the teacher's bytes start with it
    and reproduce `text` at least as far without it (a text that starts with a space keeps it where
    the tokenizer added nothing, as Metaspace's prepend_scheme="first" does). Returns (lengths,
    bytes, whether it was dropped); the first tokens lose the prefix's bytes (a lone '▁' becomes empty).
    """
    kept = common_prefix(teacher_data, text)
    if not prefix or not teacher_data.startswith(prefix) or common_prefix(teacher_data[len(prefix):], text) < kept:
        return list(teacher_lengths), teacher_data, False
    lengths, left = list(teacher_lengths), len(prefix)
    for j in range(len(lengths)):
        taken = min(left, lengths[j])
        lengths[j], left = lengths[j] - taken, left - taken
    return lengths, teacher_data[len(prefix):], True


# ---- alignment of one response --------------------------------------------------------------------

@dataclass
class RowAlignment:
    """One response: its text for the teacher, and for each student position the teacher position."""

    text: str  # the valid text of the student's response (what the teacher reads)
    teacher_pos: list[int]  # per student position: index of the teacher's next-token position, or -1
    # teacher positions are 0..n for a teacher tokenisation of n tokens: position j predicts teacher
    # token j, position n predicts what follows the whole text


def student_spans(lengths: list[int]) -> list[int]:
    """Start byte of each token from the byte lengths of the tokens before it."""
    starts, offset = [], 0
    for length in lengths:
        starts.append(offset)
        offset += length
    return starts


def align_row(
    student_lengths: list[int],
    student_eos: list[bool],
    student_special: list[bool],
    valid_bytes: int,
    teacher_lengths: list[int],
    teacher_ok_bytes: int,
    rule: str = START,
    teacher_first: int = 0,
) -> list[int]:
    """Teacher position per student position (-1: none), for one response.

    student_lengths: byte length of each student token; student_eos / student_special: flags per
    token (an EOS is special too). valid_bytes: how many leading bytes of the student's text are valid
    UTF-8 (the text the teacher reads). teacher_lengths: byte length of each token of the teacher's
    tokenisation of that text; teacher_ok_bytes: how many leading bytes the teacher's tokens reproduce
    exactly (past that point, a tokenizer that normalises text, say, no longer reads the same text).
    Teacher position j conditions on the text before teacher token j (position len(teacher_lengths)
    on the whole text); it is usable when that text is within teacher_ok_bytes and j >= teacher_first
    (1 after a dropped dummy prefix: position 0 predicts the token that holds it). Where several
    teacher positions end at one byte (after a lone dummy '▁'), the last one is paired.
    See the module docstring for the rules.
    """
    starts = student_spans(student_lengths)
    t_starts = student_spans(teacher_lengths) + [sum(teacher_lengths)]  # context end of every teacher position
    usable = {offset: j for j, offset in enumerate(t_starts) if offset <= teacher_ok_bytes and j >= teacher_first}
    out: list[int] = []
    for t, (start, length) in enumerate(zip(starts, student_lengths)):
        if student_special[t] and not student_eos[t]:
            break  # the teacher never sees this token: no context matches from here on
        if rule == START or length == 0:
            pair = usable.get(start, -1)
        else:  # MIDDLE: the teacher token covering the student token's middle byte
            middle = start + (length - 1) // 2
            j = _covering(t_starts[:-1], middle) if middle < min(valid_bytes, t_starts[-1]) else -1
            pair = j if j >= teacher_first and t_starts[j] <= teacher_ok_bytes else -1
        out.append(pair)
        if student_eos[t]:
            break  # nothing after EOS counts
    return out + [-1] * (len(student_lengths) - len(out))


def _covering(starts: list[int], offset: int) -> int:
    """Index of the token (given by sorted start bytes) that covers byte `offset`."""
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= offset:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---- the vocabulary mapping ---------------------------------------------------------------------

@dataclass
class VocabMap:
    """Student and teacher tokens grouped into units: the tokens of both sides with the same bytes
    (after '▁'/'Ġ'/'<0xNN>' are read as bytes), special tokens with the same text, and the EOS unit
    (every student EOS with every teacher EOS: stopping is judged by the teacher).

    A side may hold several tokens of one unit (SentencePiece's '▁' and '<0x20>' are both a space);
    their probabilities add up. `*_primary` is one token per unit, `*_extra_units` / `*_extra_ids`
    the others, as pairs.
    """

    units: int
    student_primary: torch.Tensor  # (U,) long
    teacher_primary: torch.Tensor  # (U,) long
    student_extra_units: torch.Tensor  # (Es,) long
    student_extra_ids: torch.Tensor  # (Es,) long
    teacher_extra_units: torch.Tensor
    teacher_extra_ids: torch.Tensor
    student_unit_of: torch.Tensor  # (Vs,) long: the unit of each student id, -1 when unmapped
    student_vocab: int
    teacher_vocab: int
    names: list[str]  # a readable name of each unit (for reports)

    @property
    def vocab_mapped(self) -> float:
        """Share of the student's vocabulary with a teacher counterpart."""
        return float((self.student_unit_of >= 0).float().mean())

    def to(self, device) -> "VocabMap":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return VocabMap(**moved)


def build_vocab_map(
    student_bytes: list[bytes],
    student_special: set[int],
    student_strings: list[str],
    student_eos: list[int],
    teacher_bytes: list[bytes],
    teacher_special: set[int],
    teacher_strings: list[str],
    teacher_eos: list[int],
) -> VocabMap:
    """Group the two vocabularies into units (see VocabMap). Deterministic: units follow the student's ids."""

    def keyed(byte_list, special, strings, eos):
        keys: dict[object, list[int]] = {}
        for token_id, data in enumerate(byte_list):
            if token_id in eos:
                key = ("eos",)
            elif token_id in special:
                key = ("special", strings[token_id])
            elif data:
                key = ("text", data)
            else:
                continue
            keys.setdefault(key, []).append(token_id)
        return keys

    s_keys = keyed(student_bytes, student_special, student_strings, set(student_eos))
    t_keys = keyed(teacher_bytes, teacher_special, teacher_strings, set(teacher_eos))
    shared = sorted((k for k in s_keys if k in t_keys), key=lambda k: s_keys[k][0])
    s_primary, t_primary, s_extra, t_extra, names = [], [], [], [], []
    unit_of = torch.full((len(student_bytes),), -1, dtype=torch.long)
    for unit, key in enumerate(shared):
        s_ids, t_ids = s_keys[key], t_keys[key]
        s_primary.append(s_ids[0])
        t_primary.append(t_ids[0])
        s_extra += [(unit, i) for i in s_ids[1:]]
        t_extra += [(unit, i) for i in t_ids[1:]]
        unit_of[s_ids] = unit
        names.append("<eos>" if key == ("eos",) else key[1] if key[0] == "special" else key[1].decode("utf-8", "replace"))

    def pairs(items):
        return (torch.tensor([u for u, _ in items], dtype=torch.long), torch.tensor([i for _, i in items], dtype=torch.long))

    s_units, s_ids = pairs(s_extra)
    t_units, t_ids = pairs(t_extra)
    return VocabMap(
        units=len(shared), student_primary=torch.tensor(s_primary, dtype=torch.long),
        teacher_primary=torch.tensor(t_primary, dtype=torch.long), student_extra_units=s_units, student_extra_ids=s_ids,
        teacher_extra_units=t_units, teacher_extra_ids=t_ids, student_unit_of=unit_of,
        student_vocab=len(student_bytes), teacher_vocab=len(teacher_bytes), names=names,
    )


def unit_logp(logp: torch.Tensor, primary: torch.Tensor, extra_units: torch.Tensor, extra_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) log-probabilities -> (B, T, U) log-probability of each unit (the log of the summed
    probabilities of its tokens), not renormalised; differentiable."""
    out = logp.index_select(-1, primary)
    if extra_ids.numel():
        # one pass per extra member a unit may have (rarely more than one)
        order = torch.argsort(extra_units, stable=True)
        units, ids = extra_units[order], extra_ids[order]
        rank = torch.arange(len(units), device=units.device) - torch.searchsorted(units, units)
        for r in range(int(rank.max()) + 1):
            pick = rank == r
            u, i = units[pick], ids[pick]
            merged = torch.logaddexp(out.index_select(-1, u), logp.index_select(-1, i))
            out = out.index_copy(-1, u, merged)
    return out


def renormalise(unit_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, U) unit log-probs -> (log-probs renormalised over the units, (B, T) mapped mass)."""
    total = torch.logsumexp(unit_lp, dim=-1, keepdim=True)
    return unit_lp - total, total.squeeze(-1).exp()


class TextBridge:
    """Token ids of one tokenizer -> the text they spell -> token ids of another (the ids themselves
    when the two tokenizers are the same). Special tokens carry no text; a cut multi-byte character at
    the end is left out."""

    def __init__(self, source_tokenizer, target_tokenizer, same: bool):
        self.source, self.target, self.same = source_tokenizer, target_tokenizer, same
        self.bytes, self.special = (None, None) if same else token_bytes(source_tokenizer)

    def text(self, ids: list[int]) -> str:
        if self.same:
            return self.source.decode(ids, skip_special_tokens=True)
        data = b"".join(self.bytes[i] for i in ids)
        return data[: valid_utf8_length(data)].decode("utf-8")

    def ids(self, ids: list[int]) -> list[int]:
        if self.same:
            return list(ids)
        return self.target(self.text(ids), add_special_tokens=False, split_special_tokens=True)["input_ids"]
