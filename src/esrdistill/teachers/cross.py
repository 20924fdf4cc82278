"""A teacher with another tokenizer: it reads the student's response as text, tokenised its own way,
and is compared with the student on the tokens the two vocabularies share (see xtok.py for the
alignment and the mapping, losses.py for the divergences).

Losses (`xtok_loss`):
- matched_kl (default, the paper's): `loss` (reverse KL by default; forward KL and JSD too) between
  the two distributions restricted to the shared units and renormalised there, the teacher's
  log-probs floored at `xtok_teacher_floor` (-20 in the paper);
- uld: Universal Logit Distillation over the full vocabularies (no mapping);
- hybrid: matched_kl on the shared units plus `xtok_uld_weight` x ULD on what is left unmapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esrdistill import losses
from esrdistill.errors import UserError
from esrdistill.losses import log_probs
from esrdistill.rollout import head_logits, response_logits
from esrdistill.teachers.protocol import DIVERGENCE_KEYS, Comparison, LossSettings, Plan, Scores
from esrdistill.teachers import xtok
from esrdistill.teachers.same import divergence_metrics

XTOK_LOSSES = ("matched_kl", "uld", "hybrid")


@dataclass(frozen=True)
class XtokSettings:
    """How a teacher with another tokenizer is aligned and compared (build.xtok_settings makes it from the
    config's xtok_* keys)."""

    loss: str = "matched_kl"  # xtok_loss: matched_kl | uld | hybrid
    align: str = xtok.START  # xtok_align: start | middle (xtok.align_row)
    teacher_floor: float = -20.0  # xtok_teacher_floor: the teacher's log-probs on the shared units are floored here
    uld_weight: float = 1.0  # xtok_uld_weight: hybrid's weight of ULD on the unmapped tokens


class CrossTokenizer:
    """A teacher (protocol.Teacher) that re-reads the student's text with its own tokenizer."""

    kind = "cross"
    metric_keys = DIVERGENCE_KEYS + ("xtok/student_mapped_mass", "xtok/teacher_mapped_mass")
    ratio_keys = ("xtok/aligned_frac",)
    topk_keys: tuple[str, ...] = ()

    def __init__(self, model, student_tokenizer, teacher_tokenizer, student_eos: list[int], teacher_eos: list[int],
                 micro_batch: int, settings: LossSettings, xtok_settings: XtokSettings = XtokSettings(), prefix=None):
        if settings.loss == "sampled":
            raise UserError("loss=sampled needs the teacher's probability of each sampled student token, which a teacher "
                            "with another tokenizer does not give: use reverse_kl, forward_kl or jsd (on the shared tokens)")
        if xtok_settings.loss == "uld" and settings.loss != "reverse_kl":
            raise UserError(f"xtok_loss=uld compares sorted probabilities and has no use for loss={settings.loss}: "
                            "use xtok_loss=matched_kl or hybrid to apply it to the shared tokens")
        self.model, self.settings, self.micro_batch, self.prefix = model, settings, micro_batch, prefix
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.xtok = xtok_settings
        self.student_bytes, student_special = xtok.token_bytes(student_tokenizer)
        self.teacher_bytes, teacher_special = xtok.token_bytes(teacher_tokenizer)
        self.teacher_prefix = xtok.dummy_prefix(teacher_tokenizer, self.teacher_bytes)  # b" " for Llama-2 style
        self.student_eos, self.student_special = set(student_eos), student_special | set(student_eos)
        self.teacher_vocab = len(teacher_tokenizer)
        self.teacher_pad = teacher_tokenizer.pad_token_id
        self.teacher_end = teacher_eos[0]  # read after the text, so that the position after it is scored
        self.map = xtok.build_vocab_map(
            self.student_bytes, student_special, student_tokenizer.convert_ids_to_tokens(list(range(len(student_tokenizer)))),
            list(student_eos), self.teacher_bytes, teacher_special,
            teacher_tokenizer.convert_ids_to_tokens(list(range(self.teacher_vocab))), list(teacher_eos),
        )
        device = next(model.parameters()).device
        self.map = self.map.to(device)
        teacher_unit_of = torch.full((self.teacher_vocab,), -1, dtype=torch.long, device=device)
        teacher_unit_of[self.map.teacher_primary] = self.map.teacher_primary.new_tensor(range(self.map.units))
        teacher_unit_of[self.map.teacher_extra_ids] = self.map.teacher_extra_units
        self.student_unmapped = self.map.student_unit_of.to(device) < 0  # (Vs,)
        self.teacher_unmapped = teacher_unit_of < 0  # (Vt,)
        self.constant_metrics = {"xtok/vocab_mapped": self.map.vocab_mapped}

    # ---- 1. what the teacher reads ----------------------------------------------------------------
    def plan(self, prompts: list[list[int]], responses: torch.Tensor, mask: torch.Tensor) -> Plan:
        rows, texts = [], []
        for b in range(responses.shape[0]):
            ids = responses[b, : int(mask[b].sum())].tolist()
            lengths = [len(self.student_bytes[i]) for i in ids]
            special = [i in self.student_special for i in ids]
            cut = next((t for t, i in enumerate(ids) if special[t] and i not in self.student_eos), len(ids))
            data = b"".join(self.student_bytes[i] for i in ids[:cut])
            valid = xtok.valid_utf8_length(data)
            rows.append((ids, lengths, special, valid, data[:valid]))
            texts.append(data[:valid].decode("utf-8"))
        encoded = self.teacher_tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        positions = torch.full(responses.shape, -1, dtype=torch.long)
        teacher_rows = []
        for b, ((ids, lengths, special, valid, data), t_ids) in enumerate(zip(rows, encoded)):
            t_lengths, t_data, dropped = xtok.drop_dummy_prefix([len(self.teacher_bytes[i]) for i in t_ids],
                                                                b"".join(self.teacher_bytes[i] for i in t_ids), data,
                                                                self.teacher_prefix)
            ok = xtok.common_prefix(t_data, data)
            pairs = xtok.align_row(lengths, [i in self.student_eos for i in ids], special, valid, t_lengths, ok, self.xtok.align,
                                   teacher_first=int(dropped))
            positions[b, : len(pairs)] = torch.tensor(pairs, dtype=torch.long)
            teacher_rows.append(list(t_ids) + [self.teacher_end])  # the last position predicts what follows the text
        width = max(len(r) for r in teacher_rows)
        t_responses = torch.full((len(teacher_rows), width), self.teacher_pad, dtype=torch.long)
        t_mask = torch.zeros((len(teacher_rows), width))
        for b, r in enumerate(teacher_rows):
            t_responses[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            t_mask[b, : len(r)] = 1.0
        aligned = mask * (positions >= 0)
        return Plan(prompts=prompts, responses=t_responses, response_mask=t_mask, mask=aligned, positions=positions,
                    ratios={"xtok/aligned_frac": (float(aligned.sum()), float(mask.sum()))})

    # ---- 2. the teacher's log-probs at the aligned positions, on the shared units ------------------
    @torch.no_grad()
    def score(self, plan: Plan, rows: list[int], width: int, hidden: bool = False) -> Scores:
        """The teacher's log-probs on the shared units at the aligned positions of rows `rows` (hidden=True:
        its hidden states there, projected chunk by chunk later)."""
        positions = plan.positions[rows, :width]  # (b, T)
        t_width = int(plan.response_mask[rows].sum(-1).max())
        chunks = []
        for start in range(0, len(rows), self.micro_batch):
            part = rows[start : start + self.micro_batch]
            out = response_logits(self.model, [plan.prompts[r] for r in part], plan.responses[part, :t_width],
                                  plan.response_mask[part, :t_width], self.teacher_pad, self.prefix, hidden)
            chunks.append(out if hidden else log_probs(out, self.teacher_vocab))  # (b', Tt, Vt or H)
            del out
        full = torch.cat(chunks)  # (b, Tt, Vt or H)
        index = positions.clamp(min=0).to(full.device)
        aligned = full.gather(1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]))  # (b, T, Vt or H)
        mask = plan.mask[rows, :width].to(full.device)
        if hidden:
            return Scores(logp=None, mask=mask, hidden=aligned,
                          project=lambda h: self._on_units(log_probs(head_logits(self.model, h), self.teacher_vocab), None))
        return self._on_units(aligned, mask)

    def _on_units(self, aligned: torch.Tensor, mask) -> Scores:
        """(b, T, Vt) teacher log-probs at aligned positions -> Scores on the shared units (floored)."""
        units, mass = xtok.renormalise(xtok.unit_logp(aligned, self.map.teacher_primary, self.map.teacher_extra_units,
                                                      self.map.teacher_extra_ids))
        extra = {"teacher_mass": mass}
        if self.xtok.loss != "matched_kl":
            extra["teacher_full"] = aligned
        return Scores(logp=units.clamp(min=self.xtok.teacher_floor), mask=mask, extra=extra)

    # ---- 3. the loss ---------------------------------------------------------------------------------
    def student_units(self, student_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, Vs) student log-probs -> (log-probs renormalised over the shared units, (B, T) mapped mass)."""
        return xtok.renormalise(xtok.unit_logp(student_logp, self.map.student_primary, self.map.student_extra_units,
                                               self.map.student_extra_ids))

    def comparable(self, student_logp: torch.Tensor, scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) log-probs over the same space: the shared units, both renormalised."""
        return self.student_units(student_logp)[0], scores.logp

    def compare(self, student_logp: torch.Tensor, scores: Scores, tokens: torch.Tensor) -> Comparison:
        s, mask = self.settings, scores.mask
        student_units, student_mass = self.student_units(student_logp)
        matched = None
        if self.xtok.loss in ("matched_kl", "hybrid"):
            matched = losses.per_token_loss(s.loss, student_units, scores.logp, tokens, mask, s.jsd_beta)
        if self.xtok.loss == "matched_kl":
            per_token = matched
        elif self.xtok.loss == "uld":
            per_token = losses.uld(student_logp.exp(), scores.extra["teacher_full"].exp(), mask)
        else:
            rest = losses.uld(student_logp.exp()[..., self.student_unmapped],
                              scores.extra["teacher_full"].exp()[..., self.teacher_unmapped], mask)
            per_token = matched + self.xtok.uld_weight * rest
        metrics = divergence_metrics(student_units, scores.logp, mask, matched if s.loss == "reverse_kl" else None,
                                     matched if s.loss == "forward_kl" else None)
        counted = mask.bool()
        metrics["xtok/student_mapped_mass"] = torch.where(counted, student_mass.detach(), 0.0)
        metrics["xtok/teacher_mapped_mass"] = torch.where(counted, scores.extra["teacher_mass"], 0.0)
        return Comparison(per_token=per_token, metrics=metrics)
