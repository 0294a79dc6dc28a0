"""The v* engine: a model run from one block's output up, and only from each row's injection point on.

An optimisation of the same loss as a full forward pass (docs/math.md, "k* and v*"), not another
computation: nothing below the injection block, and nothing before the injection position, depends on δ.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import nn
from transformers import DynamicCache

from editing.models.adapter import ModelAdapter, block_hidden
from editing.tokens import PaddedBatch
from editing.tracing import at_positions


class _PassThrough(nn.Module):
    """Stands in for a block below the recorded one: its output is replaced anyway, so it does nothing."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for name in _LAYER_ATTRIBUTES:  # what a model's forward may read off its blocks
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Replay(_PassThrough):
    """Stands in for the recorded block: returns its recorded output (with δ added) for the current rows."""

    output: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.output is None or self.output.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError("UpperStack: no recorded output set for these rows")
        return self.output


_LAYER_ATTRIBUTES = ("attention_type", "layer_idx", "is_sliding", "sliding_window")


class SuffixStates(NamedTuple):
    """Final hidden states of some rows from their first recomputed position on: ``hidden[i, j]`` is row
    ``i`` at position ``start[i] + j`` (:meth:`UpperStack.final_hidden`)."""

    hidden: torch.Tensor
    start: torch.Tensor


class UpperStack:
    """Runs a model from block ``layer``'s output up, and only from each row's injection point on.

    The v* optimisation adds δ to block ``layer``'s output at one position per row
    (``split[row]``, the last subject token). Nothing below block ``layer`` depends on
    δ, and, attention being causal, nothing at an earlier position depends on it at
    any layer. So one full forward pass (:meth:`_record`) keeps block ``layer``'s
    output and every layer's keys and values; each optimisation step then runs only
    the blocks above ``layer``, only for the positions from ``split`` on, attending to
    the recorded keys and values of the positions before.

    Inside :meth:`active` blocks ``0 .. layer`` are replaced by stand-ins — pass-throughs
    below, a replay of the recorded output (plus δ) at ``layer`` — and the model's own
    forward does the rest with the recorded keys and values as its cache: its causal
    and padding masks, rotary or learned positions (explicit ``position_ids``), the
    upper blocks, the final norm. Nothing architecture-specific is re-implemented, so
    GPT-2, GPT-J and Llama adapters get exactly what a full pass would compute.

    On a model dispatched over several devices (``device_map``) the recorded output is
    kept on the adapter's (input) device, where δ lives, and each layer's recorded
    keys and values on that layer's device, where its attention reads them back;
    accelerate's hooks move the replayed output on to the next block's device. The
    stand-ins have no hooks, so the blocks below ``layer`` — offloaded or not — are
    not loaded at all during the steps.
    """

    def __init__(self, adapter: ModelAdapter, layer: int, batch: PaddedBatch, split: torch.Tensor,
                 rows_per_chunk: int = 64) -> None:
        self.adapter = adapter
        self.layer = layer
        self.batch = batch
        self.split = split.long()
        self.lengths = batch.attention_mask.sum(dim=1)
        if torch.any(self.split >= self.lengths) or torch.any(self.split < 0):
            raise ValueError("UpperStack: every row's injection position must be one of its tokens")
        self.recorded, self.past_keys, self.past_values = self._record(rows_per_chunk)

    @torch.no_grad()
    def _record(self, rows_per_chunk: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Block ``layer``'s output (rows × width × d) and, per layer, keys and values (rows × heads × width × d_head)
        of every row, from full forward passes."""
        adapter, layer = self.adapter, self.layer
        n_rows, width = self.batch.input_ids.shape
        recorded = torch.zeros(n_rows, width, adapter.hidden_dim, device=adapter.device,
                               dtype=next(adapter.model.parameters()).dtype)
        past_keys: list[torch.Tensor] = []                              # per layer (rows, heads, width, d_head)
        past_values: list[torch.Tensor] = []
        seen: dict[str, torch.Tensor] = {}
        handle = adapter.block(layer).register_forward_hook(lambda m, a, o: seen.update(out=block_hidden(o)))
        try:
            for chunk in torch.arange(n_rows).split(rows_per_chunk):
                sub = self.batch.rows(chunk).to(adapter.device)
                # A cache of full layers, given explicitly: the one a model makes for itself keeps only the
                # last window of a sliding-window layer (Mistral, Gemma-2), and every position is replayed.
                cache = adapter.model.base_model(input_ids=sub.input_ids, attention_mask=sub.attention_mask,
                                                 cache=DynamicCache(), use_cache=True).cache
                # Block `layer` may run on another device than the embeddings (device_map): its output is
                # kept on the adapter's device, where δ lives; each layer's keys/values stay on that
                # layer's device, where its attention reads them.
                recorded[chunk.to(recorded.device), :sub.input_ids.shape[1]] = seen["out"].to(recorded.device)
                for index, (key, value, *_) in enumerate(cache):
                    if len(past_keys) <= index:
                        past_keys.append(key.new_zeros(n_rows, key.shape[1], width, key.shape[3]))
                        past_values.append(value.new_zeros(n_rows, value.shape[1], width, value.shape[3]))
                    past_keys[index][chunk.to(key.device), :, :key.shape[2]] = key
                    past_values[index][chunk.to(value.device), :, :value.shape[2]] = value
        finally:
            handle.remove()
        return recorded, past_keys, past_values

    def at(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The recorded output at ``(rows[i], positions[i])`` (the states δ is added to)."""
        return at_positions(self.recorded[rows.to(self.recorded.device)], positions)

    @contextmanager
    def active(self) -> Iterator["UpperStack"]:
        blocks = self.adapter.blocks
        originals = [blocks[index] for index in range(self.layer + 1)]
        self._replay = _Replay(originals[-1])
        try:
            for index, block in enumerate(originals[:-1]):
                blocks[index] = _PassThrough(block)
            blocks[self.layer] = self._replay
            yield self
        finally:
            for index, block in enumerate(originals):
                blocks[index] = block
            del self._replay

    def final_hidden(self, rows: torch.Tensor, delta: torch.Tensor) -> SuffixStates:
        """Final (normed) hidden states of ``rows`` from their injection position on, with ``delta[i]`` added
        to block ``layer``'s output at that position (gradients flow to ``delta``); call inside :meth:`active`."""
        device = self.recorded.device
        rows = rows.to(device)
        start = self.split.to(device)[rows]
        suffix_lengths = self.lengths.to(device)[rows] - start
        past, steps = int(start.max()), int(suffix_lengths.max())
        offsets = torch.arange(steps, device=device)
        positions = start[:, None] + offsets[None, :]
        real = offsets[None, :] < suffix_lengths[:, None]
        at = torch.where(real, positions, start[:, None])  # padding reads the injection position (masked out)
        input_ids = torch.where(real, self.batch.input_ids.to(device)[rows[:, None], at],
                                self.adapter.tokenizer.pad_token_id)
        output = self.recorded[rows[:, None], at]
        index = (torch.arange(len(rows), device=device), torch.zeros(len(rows), dtype=torch.long, device=device))
        self._replay.output = output.index_put(index, delta.to(output.dtype), accumulate=True)
        # The recorded keys/values of positions [0, start) of each row, right-aligned in `past` slots.
        slots = torch.arange(past, device=device)[None, :] - (past - start[:, None])
        cache = None
        if past:
            gather = slots.clamp(min=0)[:, None, :, None]
            cache = DynamicCache(ddp_cache_data=[
                _gathered(key, value, rows, gather) for key, value in zip(self.past_keys, self.past_values)])
        mask = torch.cat([slots >= 0, real], dim=1).long()
        try:
            hidden = self.adapter.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                                   cache=cache, use_cache=cache is not None).last_hidden_state
        finally:
            self._replay.output = None
        return SuffixStates(hidden, start)


def _gathered(key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's recorded keys and values of ``rows`` at ``slots`` (rows × 1 × past × 1), on that layer's
    device (a dispatched model's layers, and so their caches, may be on several)."""
    rows, slots = rows.to(key.device), slots.to(key.device)
    return (key[rows].gather(2, slots.expand(-1, key.shape[1], -1, key.shape[3])),
            value[rows].gather(2, slots.expand(-1, value.shape[1], -1, value.shape[3])))
