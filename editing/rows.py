"""The token rows an edit runs: each fact's prompts, with its context prefixes, tokenised once.

* rewrite rows ``prefix_j + prompt_i (+ target_i[:-1])``: where k* is read (the last subject
  token) and, with their targets, where v*'s NLL is measured;
* KL rows ``kl_prompt.format(subject)``: where v*'s KL term is read;
* v* rows: both in one padded batch, so each optimisation step runs them together.

See docs/math.md ("k* and v*") for what is read at these positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.facts import Fact
from editing.models.adapter import ModelAdapter
from editing.tokens import PaddedBatch, encode_target, last_token_before, pad_right


@dataclass
class RewriteRows:
    """Tokenised ``prefix_j + prompt_i (+ target_i[:-1])`` rows, facts-major.

    Row ``i * n_prefixes + j`` is fact ``i`` with prefix ``j``; prefix 0 is the
    empty prefix, so rows ``i * n_prefixes`` are the bare prompts.
    """

    batch: PaddedBatch
    fact_of_row: torch.Tensor
    subject_position: torch.Tensor
    target_positions: list[list[int]]
    """Per row, the positions whose logits predict the target tokens."""
    target_ids: list[list[int]]
    n_prefixes: int

    @property
    def bare_rows(self) -> torch.Tensor:
        return torch.arange(0, len(self.fact_of_row), self.n_prefixes)

    @property
    def prefix_weights(self) -> torch.Tensor:
        """Weight of each prefix in a fact's k*: ½ for the bare prompt and ½ shared by the others
        (the batched references' two context types), or 1 when there is only the bare prompt."""
        if self.n_prefixes == 1:
            return torch.ones(1)
        others = torch.full((self.n_prefixes - 1,), 0.5 / (self.n_prefixes - 1))
        return torch.cat([torch.tensor([0.5]), others])


def build_rewrite_rows(adapter: ModelAdapter, facts: list[Fact], prefixes: tuple[str, ...],
                       with_targets: bool = True) -> RewriteRows:
    tokenizer = adapter.tokenizer
    sequences, fact_of_row, subject_position, target_positions, target_ids = [], [], [], [], []
    for index, fact in enumerate(facts):
        target = encode_target(tokenizer, fact.target_new) if with_targets else []
        span_end = fact.subject_span[1]
        for prefix in prefixes:
            ids, position = last_token_before(tokenizer, prefix + fact.rewrite_prompt, len(prefix) + span_end)
            sequences.append(ids + target[:-1])
            fact_of_row.append(index)
            subject_position.append(position)
            target_positions.append([len(ids) - 1 + t for t in range(len(target))])
            target_ids.append(target)
    return RewriteRows(pad_right(sequences, tokenizer.pad_token_id), torch.tensor(fact_of_row),
                       torch.tensor(subject_position), target_positions, target_ids, len(prefixes))


def build_kl_rows(adapter: ModelAdapter, facts: list[Fact], kl_prompt: str) -> tuple[PaddedBatch, torch.Tensor]:
    """Rows ``kl_prompt.format(subject)``: (batch, last-subject-token positions, where δ goes and KL is read)."""
    start = kl_prompt.index("{}")
    sequences, subject_position = [], []
    for fact in facts:
        text = kl_prompt.replace("{}", fact.subject, 1)
        ids, position = last_token_before(adapter.tokenizer, text, start + len(fact.subject))
        sequences.append(ids)
        subject_position.append(position)
    return pad_right(sequences, adapter.tokenizer.pad_token_id), torch.tensor(subject_position)


@dataclass
class VStarRows:
    """Every row the v* optimisation runs, in one padded batch: the rewrite rows of
    :class:`RewriteRows` (facts-major, with targets), then one KL row per fact."""

    batch: PaddedBatch
    fact_of_row: torch.Tensor
    subject_position: torch.Tensor
    """Where δ is added (the last subject token), in rewrite and KL rows alike."""
    target_positions: list[list[int]]
    """Per rewrite row, the positions whose logits predict the target tokens (empty for KL rows)."""
    target_ids: list[list[int]]
    n_facts: int
    n_prefixes: int

    @property
    def bare_rows(self) -> torch.Tensor:
        return torch.arange(0, self.n_facts * self.n_prefixes, self.n_prefixes)

    def rows_of(self, facts: torch.Tensor) -> torch.Tensor:
        """The rewrite rows and the KL row of each of ``facts``, fact by fact."""
        per_fact = [torch.cat([torch.arange(f * self.n_prefixes, (f + 1) * self.n_prefixes),
                               torch.tensor([self.n_facts * self.n_prefixes + f])]) for f in facts.tolist()]
        return torch.cat(per_fact)

    def is_kl(self, rows: torch.Tensor) -> torch.Tensor:
        return rows >= self.n_facts * self.n_prefixes


def build_v_star_rows(adapter: ModelAdapter, facts: list[Fact], prefixes: tuple[str, ...], kl_prompt: str) -> VStarRows:
    rewrite = build_rewrite_rows(adapter, facts, prefixes)
    kl_batch, kl_subject = build_kl_rows(adapter, facts, kl_prompt)
    sequences = [row[mask.bool()].tolist() for batch in (rewrite.batch, kl_batch)
                 for row, mask in zip(batch.input_ids, batch.attention_mask)]
    return VStarRows(pad_right(sequences, adapter.tokenizer.pad_token_id),
                     torch.cat([rewrite.fact_of_row, torch.arange(len(facts))]),
                     torch.cat([rewrite.subject_position, kl_subject]),
                     rewrite.target_positions + [[] for _ in facts], rewrite.target_ids + [[] for _ in facts],
                     len(facts), len(prefixes))
