"""Forward hooks that read what the editor needs from inside a model, at one token per row.

Three things: the edited module's *input* (a key), its *output* (the MLP's output), and a
block's *output* (the residual stream). Reading stops the forward pass at the deepest layer
needed, since the layers above it cannot change what was read. (The v* engine, which runs
a model from a block's output up, is :mod:`editing.upper_stack`.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from editing.models.adapter import ModelAdapter, block_hidden
from editing.tokens import PaddedBatch


class _StopForward(Exception):
    """Raised by a hook once everything wanted has been read."""


def _stop(module, args, output) -> None:
    raise _StopForward


def at_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[row, positions[row]]`` for every row."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]


class States(NamedTuple):
    """What :func:`read_states` read: layer → (rows × dim) float32 CPU tensor, per kind."""

    keys: dict[int, torch.Tensor]
    """Inputs of the edited module."""
    residuals: dict[int, torch.Tensor]
    """Block outputs (the residual stream after the layer)."""
    mlp_outputs: dict[int, torch.Tensor]
    """Outputs of the edited module (the MLP's contribution to the residual)."""


@torch.no_grad()
def read_states(adapter: ModelAdapter, batch: PaddedBatch, positions: torch.Tensor,
                key_layers: list[int] = (), residual_layers: list[int] = (), mlp_output_layers: list[int] = ()
                ) -> States:
    """Keys, residual states and MLP outputs at one position per row, in one pass stopped at the deepest layer."""
    states = States({}, {}, {})
    deepest = max([*key_layers, *residual_layers, *mlp_output_layers])
    handles = []

    def input_hook(into: dict[int, torch.Tensor], layer: int):
        def hook(module, args):
            into[layer] = at_positions(args[0], positions).float().cpu()
        return hook

    def output_hook(into: dict[int, torch.Tensor], layer: int):
        def hook(module, args, output):
            into[layer] = at_positions(block_hidden(output), positions).float().cpu()
        return hook

    try:
        for layer in key_layers:
            handles.append(adapter.edited_module(layer).register_forward_pre_hook(input_hook(states.keys, layer)))
        for layer in mlp_output_layers:
            handles.append(adapter.edited_module(layer).register_forward_hook(output_hook(states.mlp_outputs, layer)))
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
