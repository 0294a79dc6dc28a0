"""k*: the edited module's input at each fact's last subject token, weighted over its context prefixes.

The prefixes form one context type and the bare prompt another; each type is averaged, then the
types — so the bare prompt weighs as much as all prefixed prompts together, as the batched references
do (MEMIT/UME ``compute_ks``; ROME's single-fact code takes a plain mean instead, seqedit uses the
batched weighting for every objective). See docs/math.md ("k* and v*").
"""

from __future__ import annotations

import torch

from editing.models.adapter import ModelAdapter
from editing.rows import RewriteRows
from editing.tracing import read_states


def compute_keys(adapter: ModelAdapter, rows: RewriteRows, layer: int, n_facts: int,
                 residual_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k* per fact at ``layer`` (B × d_in, weighted by :attr:`RewriteRows.prefix_weights`) and, optionally,
    the current residual at ``residual_layer`` on the bare prompts (B × d) — one forward pass for both."""
    residual_layers = [residual_layer] if residual_layer is not None else []
    states = read_states(adapter, rows.batch, rows.subject_position, [layer], residual_layers)
    keys = states.keys[layer]                                                               # (rows, d_in)
    weight_of_row = rows.prefix_weights.repeat(n_facts)[:, None]                            # (rows, 1)
    mean_keys = torch.zeros(n_facts, keys.shape[1]).index_add_(0, rows.fact_of_row, keys * weight_of_row)
    current = states.residuals[residual_layer][rows.bare_rows] if residual_layer is not None else None
    return mean_keys, current
