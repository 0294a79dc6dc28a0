"""Batched scoring of continuations: the one primitive every evaluation metric is built on.

CounterFact metrics, retention, downstream few-shot accuracy and perplexity all
ask the same question: *how likely is this token sequence after that context?*
Answering it one prompt at a time with a full forward pass and a full-vocabulary
softmax at every position is what makes naive evaluation slow. Here:

* every sequence is tokenised once (prompt with the tokenizer's defaults, a
  target as ``" " + target`` without special tokens, by :mod:`editing.tokens`,
  exactly as the editor tokenises targets), so a score never depends on whether
  a tokenizer adds a BOS token;
* the last scored token is only predicted, never fed, so the model input is the
  sequence minus its last token, and requests with identical inputs share one
  row (a prompt scored against several one-token targets — CounterFact's
  ``target_new``/``target_true``, or label words — costs one row, not several);
* rows are sorted by length and right-padded into batches (causal attention
  keeps every real token independent of the padding to its right);
* when every row of a batch starts with the same tokens (a downstream task's
  few-shot demonstrations), that prefix is run once and its keys/values are
  reused by every row from the KV cache;
* the LM head is applied only at the positions whose next token is scored,
  in chunks bounded in memory, because for small models the vocabulary
  projection (SmolLM2: 49k × 576) costs more than the transformer itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from editing.models.adapter import ModelAdapter
from editing.tokens import PaddedBatch, encode_prompt, encode_target, pad_right

LOGIT_BUDGET = 1 << 24
"""Most logits (positions × vocabulary) materialised at once: 64 MiB of float32."""

MIN_SHARED_PREFIX = 16
"""Shortest prefix common to a batch's rows that is run once and reused through the KV cache;
shorter ones cost more in cache handling than they save."""


@dataclass(frozen=True)
class TokenScores:
    """Per-token results for one scored continuation."""

    nll: torch.Tensor
    """Negative log-likelihood of each scored token (float32, CPU)."""
    argmax: torch.Tensor
    """Whether each scored token is the model's most probable next token (bool, CPU)."""


@dataclass(frozen=True)
class TargetScores:
    """Scores of (prompt, target) pairs, in the order the pairs were given."""

    mean_nll: torch.Tensor
    """Mean per-token negative log-likelihood of each target (float32, CPU)."""
    greedy: torch.Tensor
    """True where every target token is the argmax, i.e. greedy decoding would produce the target."""
    n_tokens: torch.Tensor
    """Number of target tokens of each pair."""
    token_accuracy: torch.Tensor
    """Share of each target's tokens that are the argmax given the target's earlier tokens (teacher forcing):
    MEMIT's and AlphaEdit's zsRE accuracy, EasyEdit's rewrite/rephrase accuracy (float32, CPU)."""


@torch.no_grad()
def score_continuations(adapter: ModelAdapter, sequences: Sequence[Sequence[int]], starts: Sequence[int],
                        batch_size: int = 16) -> list[TokenScores]:
    """Score the tokens ``sequence[start:]`` of each sequence, each predicted from the tokens before it.

    ``start`` must be at least 1 (the first token has no context) and less than
    the sequence's length. This is the low-level entry point: callers choose
    the token ids, which lets perplexity score whole texts and target scoring
    score only the targets with the same code.
    """
    if len(sequences) != len(starts):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} start positions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows: dict[tuple[int, ...], int] = {}
    row_of: list[int] = []
    for sequence, start in zip(sequences, starts):
        if not 1 <= start < len(sequence):
            raise ValueError(f"start {start} outside [1, {len(sequence)}) for a sequence of {len(sequence)} tokens")
        row_of.append(rows.setdefault(tuple(sequence[:-1]), len(rows)))
    inputs = list(rows)
    requests_of_row: list[list[int]] = [[] for _ in inputs]
    for request, row in enumerate(row_of):
        requests_of_row[row].append(request)

    vocab = adapter.model.get_output_embeddings().weight.shape[0]
    chunk = max(1, LOGIT_BUDGET // vocab)
    results: list[TokenScores | None] = [None] * len(sequences)
    order = sorted(range(len(inputs)), key=lambda row: (-len(inputs[row]), row))
    for first in range(0, len(order), batch_size):
        batch_rows = order[first:first + batch_size]
        batch_requests = [request for row in batch_rows for request in requests_of_row[row]]
        # The prefix shared by every row, up to the first position whose state is needed.
        shared = min(_common_prefix_length([inputs[row] for row in batch_rows]),
                     min(starts[request] - 1 for request in batch_requests))
        if len(batch_rows) < 2 or shared < MIN_SHARED_PREFIX:
            shared = 0
        hidden = _suffix_hidden_states(adapter, [inputs[row] for row in batch_rows], shared)
        # One flat list of (row in batch, position in the suffix, label) for every scored token.
        batch_index, positions, labels, owners = [], [], [], []
        for index, row in enumerate(batch_rows):
            for request in requests_of_row[row]:
                sequence, start = sequences[request], starts[request]
                count = len(sequence) - start
                batch_index += [index] * count
                positions += range(start - 1 - shared, len(sequence) - 1 - shared)
                labels += sequence[start:]
                owners.append((request, count))
        nll, argmax = _score_positions(adapter, hidden, torch.tensor(batch_index), torch.tensor(positions),
                                       torch.tensor(labels), chunk)
        offset = 0
        for request, count in owners:
            results[request] = TokenScores(nll[offset:offset + count], argmax[offset:offset + count])
            offset += count
    return results  # type: ignore[return-value]


def _score_positions(adapter: ModelAdapter, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                     labels: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of ``labels[i]`` and whether it is the argmax, from the logits at ``(rows[i], positions[i])``,
    computing at most ``chunk`` positions' logits at a time."""
    nll_parts, argmax_parts = [], []
    for lo in range(0, len(labels), chunk):
        log_probs = log_probs_at(adapter, hidden, rows[lo:lo + chunk], positions[lo:lo + chunk]).cpu()
        wanted = labels[lo:lo + chunk]
        nll_parts.append(-log_probs.gather(1, wanted[:, None]).squeeze(1))
        argmax_parts.append(log_probs.argmax(dim=1) == wanted)
    return torch.cat(nll_parts), torch.cat(argmax_parts)


def _common_prefix_length(rows: list[tuple[int, ...]]) -> int:
    shortest = min(len(row) for row in rows)
    for position in range(shortest):
        token = rows[0][position]
        if any(row[position] != token for row in rows):
            return position
    return shortest


def _suffix_hidden_states(adapter: ModelAdapter, rows: list[tuple[int, ...]], shared: int) -> torch.Tensor:
    """Final hidden states of ``rows`` from position ``shared`` on (all positions when ``shared`` is 0).

    The first ``shared`` tokens, identical in every row, are run once and their
    keys/values reused by every row through the KV cache.
    """
    suffixes = pad_right([list(row[shared:]) for row in rows], adapter.tokenizer.pad_token_id)
    if shared == 0:
        return hidden_states(adapter, suffixes)
    model, device = adapter.model.base_model, adapter.device
    prefix = torch.tensor([rows[0][:shared]], device=device)
    cache = model(input_ids=prefix, use_cache=True).cache
    cache.batch_repeat_interleave(len(rows))
    mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long), suffixes.attention_mask], dim=1)
    return model(input_ids=suffixes.input_ids.to(device), attention_mask=mask.to(device), cache=cache,
                 use_cache=True).last_hidden_state


def score_targets(adapter: ModelAdapter, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> TargetScores:
    """Mean per-token NLL (and greedy match) of each ``target`` after its ``prompt``, all pairs batched.

    The prompt is tokenised with the tokenizer's defaults and the target as
    ``" " + target`` without special tokens, then the ids are concatenated, so
    the target's tokens are exactly those the editor optimises.
    """
    tokenizer = adapter.tokenizer
    sequences, starts = [], []
    prompt_ids_of: dict[str, list[int]] = {}
    target_ids_of: dict[str, list[int]] = {}
    for prompt, target in pairs:
        if prompt not in prompt_ids_of:
            prompt_ids_of[prompt] = encode_prompt(tokenizer, prompt)
            if not prompt_ids_of[prompt]:
                raise ValueError(f"prompt {prompt!r} tokenises to nothing")
        if target not in target_ids_of:
            target_ids_of[target] = encode_target(tokenizer, target)
        prompt_ids = prompt_ids_of[prompt]
        sequences.append(prompt_ids + target_ids_of[target])
        starts.append(len(prompt_ids))
    scores = score_continuations(adapter, sequences, starts, batch_size)
    return TargetScores(
        mean_nll=torch.tensor([float(s.nll.mean()) for s in scores], dtype=torch.float32),
        greedy=torch.tensor([bool(s.argmax.all()) for s in scores], dtype=torch.bool),
        n_tokens=torch.tensor([len(s.nll) for s in scores], dtype=torch.long),
        token_accuracy=torch.tensor([float(s.argmax.float().mean()) for s in scores], dtype=torch.float32),
    )


# -- the LM head, applied only where logits are needed --------------------------------------------------------

def hidden_states(adapter: ModelAdapter, batch: PaddedBatch) -> torch.Tensor:
    """Final (normed) hidden states of every token; the LM head is applied by the caller
    only where logits are needed (the vocabulary projection dominates small models' cost)."""
    on_device = batch.to(adapter.device)
    output = adapter.model.base_model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask,
                                      use_cache=False)
    return output.last_hidden_state


def log_probs_at(adapter: ModelAdapter, hidden: torch.Tensor, rows: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary of the logits at ``(rows[i], positions[i])``."""
    selected = hidden[rows.to(hidden.device), positions.to(hidden.device)]
    logits = adapter.logits(selected).float()
    return torch.log_softmax(logits, dim=-1)
