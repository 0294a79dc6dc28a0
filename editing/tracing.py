"""Forward hooks that read keys and residual states, and inject residual deltas.

Everything the editor needs from inside a model is one of four things, at one
token per row: the edited module's *input* (a key) or *output* (the MLP's
value), a block's *output* (the residual stream), or an additive change to a
block's output (the v* delta).
Reading stops the forward pass at the deepest layer needed, since the layers
above it cannot change what was read.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch

from editing.models.adapter import ModelAdapter, block_hidden
from editing.tokens import PaddedBatch


class _StopForward(Exception):
    """Raised by a hook once everything wanted has been read."""


def _stop(module, args, output) -> None:
    raise _StopForward


def _at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[row, positions[row]]`` for every row."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]


class States(NamedTuple):
    """What :func:`read_states` read: layer → (rows × dim) float32 CPU tensor, per kind."""

    keys: dict[int, torch.Tensor]
    """Inputs of the edited module."""
    residuals: dict[int, torch.Tensor]
    """Block outputs (the residual stream after the layer)."""
    values: dict[int, torch.Tensor]
    """Outputs of the edited module (the MLP's contribution to the residual)."""


@torch.no_grad()
def read_states(adapter: ModelAdapter, batch: PaddedBatch, positions: torch.Tensor,
                key_layers: list[int] = (), residual_layers: list[int] = (), value_layers: list[int] = ()
                ) -> States:
    """Keys, residual states and MLP values at one position per row, in one pass stopped at the deepest layer."""
    states = States({}, {}, {})
    deepest = max([*key_layers, *residual_layers, *value_layers])
    handles = []

    def input_hook(into: dict[int, torch.Tensor], layer: int):
        def hook(module, args):
            into[layer] = _at(args[0], positions).float().cpu()
        return hook

    def output_hook(into: dict[int, torch.Tensor], layer: int):
        def hook(module, args, output):
            into[layer] = _at(block_hidden(output), positions).float().cpu()
        return hook

    try:
        for layer in key_layers:
            handles.append(adapter.edited_module(layer).register_forward_pre_hook(input_hook(states.keys, layer)))
        for layer in value_layers:
            handles.append(adapter.edited_module(layer).register_forward_hook(output_hook(states.values, layer)))
        for layer in residual_layers:
            handles.append(adapter.block(layer).register_forward_hook(output_hook(states.residuals, layer)))
        forward_until(adapter, batch, deepest)
    finally:
        for handle in handles:
            handle.remove()
    return states


def forward_until(adapter: ModelAdapter, batch: PaddedBatch, layer: int) -> None:
    """Run the model on ``batch`` through block ``layer`` and no further (for hooks that read)."""
    handle = adapter.block(layer).register_forward_hook(_stop)
    on_device = batch.to(adapter.device)
    try:
        adapter.model.base_model(input_ids=on_device.input_ids, attention_mask=on_device.attention_mask,
                                 use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()


class ResidualInjection:
    """Adds ``delta[row]`` to block ``layer``'s output at ``positions[row]`` while active.

    ``delta`` is set before each forward pass; gradients flow to it, which is
    how v* is optimised.
    """

    def __init__(self, adapter: ModelAdapter, layer: int) -> None:
        self.block = adapter.block(layer)
        self.delta: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    def _hook(self, module, args, output):
        if self.delta is None:
            return output
        hidden = block_hidden(output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        added = hidden.index_put((rows, self.positions.to(hidden.device)), self.delta.to(hidden.dtype),
                                 accumulate=True)
        return (added, *output[1:]) if isinstance(output, tuple) else added

    @contextmanager
    def active(self) -> Iterator["ResidualInjection"]:
        handle = self.block.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self.delta = None


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
    logits = adapter.model.get_output_embeddings()(selected).float()
    return torch.log_softmax(logits, dim=-1)
