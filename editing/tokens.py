"""Tokenisation for editing: subject positions by character offsets, targets, padding.

Two rules make editing work for every tokenizer:

* the *last subject token* is found from character offsets (or, for slow
  tokenizers, by encoding the text up to the end of the subject), never by
  assuming whether the tokenizer adds a BOS token;
* targets are tokenised as ``" " + target`` with ``add_special_tokens=False``
  and appended to the prompt's ids, so a target never carries a BOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of a prompt with the tokenizer's own special-token convention."""
    return tokenizer(text)["input_ids"]


def encode_target(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Ids of a target continuation: leading space, no special tokens."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def last_token_before(tokenizer: PreTrainedTokenizerBase, text: str, char_end: int) -> tuple[list[int], int]:
    """Encode ``text`` and return its ids and the index of the token holding character ``char_end - 1``.

    With ``char_end`` the end of the subject, that is the last subject token.
    """
    if not 0 < char_end <= len(text):
        raise ValueError(f"character position {char_end} outside text of length {len(text)}")
    if tokenizer.is_fast:
        encoding = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        target_char = char_end - 1
        for index, (start, end) in enumerate(offsets):
            if start <= target_char < end:
                return ids, index
        # A character inside no token's span (e.g. a space the tokenizer folded
        # into the next token): take the last token that starts before it.
        candidates = [i for i, (start, end) in enumerate(offsets) if end > start and start <= target_char]
        if candidates:
            return ids, candidates[-1]
        raise ValueError(f"no token covers character {target_char} of {text!r}")
    ids = encode_prompt(tokenizer, text)
    prefix_ids = encode_prompt(tokenizer, text[:char_end])
    return ids, len(prefix_ids) - 1


@dataclass
class PaddedBatch:
    """Right-padded ids: causal attention keeps every real token's states independent of the padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device) -> "PaddedBatch":
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def rows(self, index: torch.Tensor) -> "PaddedBatch":
        """A sub-batch, trimmed to its own longest row."""
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        return PaddedBatch(self.input_ids[index, :width], mask[:, :width])


def pad_right(sequences: list[list[int]], pad_id: int) -> PaddedBatch:
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return PaddedBatch(ids, mask)
